#!/usr/bin/env bash
# The GPU checks in one run (under 8 minutes on one H100/H200), from the repository root:
#
#   bash scripts/gpu_check.sh            # on the GPU machine: device, tests, kernel bench, rollout bench, actor memory,
#                                        # PPO steps on the 1.24B model, toy PPO runs (each cache, fused log-probs)
#   bash scripts/gpu_check.sh ppo        # only the per-phase split of a PPO-Lag step on the 1.24B rollout model
#   bash scripts/gpu_check.sh ppo --hidden 64 --intermediate 128 --layers 2 --heads 4 --kv_heads 2 --vocab 512
#                                        # the same at a tiny shape (the flags go to scripts/bench.py --save_model):
#                                        # a dry run of that step on a CPU
#   bash scripts/gpu_check.sh wheels     # on a dev machine first: fill .whl/ (git-ignored) for the GPU machine
#
# The GPU machine's Python has torch, triton and transformers but no deepspeed or datasets and no package index
# of its own: the wheels in .whl/ go into /tmp/site with --no-deps. Each step has its own time limit, cut
# to what is left of BUDGET, so a slow step cannot eat the others' time nor push the whole run past 8 minutes; the
# log is also written to $OUT/gpu_check.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
[ $# -gt 0 ] && shift
case $mode in
    all | ppo | wheels) ;;
    *) echo "error: unknown mode '$mode': use no argument, ppo or wheels"; exit 2 ;;
esac

if [ "$mode" = wheels ]; then  # dev machine: the wheels ENV.md lists (about 23 MB), for CPython 3.12 x86_64
    set -e
    mkdir -p .whl
    PIP=".venv/bin/pip"
    cached=$(find ~/.cache/pip/wheels -name 'deepspeed-0.19.8-py3-none-any.whl' 2>/dev/null | head -1)
    if [ -n "$cached" ]; then cp "$cached" .whl/; else $PIP wheel -q --no-deps -w .whl deepspeed==0.19.8; fi
    $PIP download -q --no-deps -d .whl --python-version 3.12 --platform manylinux_2_17_x86_64 --only-binary=:all: \
        hjson pydantic pydantic_core annotated-types typing-inspection "datasets==5.2.0" dill multiprocess \
        "fsspec==2026.9.0" "transformers==5.23.0" "tokenizers==0.23.3" typing_extensions
    ls -l .whl
    echo "carry .whl to the GPU machine (run tool: carry=[\".whl\"])"
    exit 0
fi

LOG="${OUT:-/tmp}/gpu_check.log"
exec > >(tee "$LOG") 2>&1
start=$SECONDS
BUDGET=465  # seconds for the whole script: under 8 minutes with the machine's start-up and the log's return
step() { echo; echo "=== $1 (t=$((SECONDS - start)) s)"; }
limit() {  # a step's time limit: its own N seconds, or what is left of BUDGET if less (at least 1)
    local left=$((BUDGET - (SECONDS - start)))
    echo $((left < $1 ? (left > 1 ? left : 1) : $1))
}

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
if python3 -c "import deepspeed, datasets" 2>/dev/null; then
    echo "deepspeed and datasets already importable: .whl/ not installed"  # a dev machine's venv (a CPU dry run)
elif ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
else
    echo "no .whl/ folder: deepspeed-dependent tests will skip (fill it with: bash scripts/gpu_check.sh wheels)"
fi
PY=python3
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
$PY - <<'PYEOF'
import importlib, torch
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for m in ("torch", "triton", "transformers", "deepspeed", "datasets"):
    try:
        print(f"  {m} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"  {m}: {type(e).__name__}: {e}")
PYEOF

if [ "$mode" = all ]; then
    step "tests: kernels (fp32 and bf16 on CUDA), fused log-probs and generation (compiled decoding with inductor)"
    timeout "$(limit 170)" $PY -m pytest -q -rs tests/test_kernels.py tests/test_linear_logprobs.py \
        tests/test_generation.py \
        || echo "TESTS FAILED OR TIMED OUT (rc $?)"

    # the log-prob kernel's figures (item 3) before the long steps: its first calls autotune (about 24 compiles per
    # shape and dtype), which the printed "first call" times include and the timed rows do not
    step "kernel bench: realistic shapes, with the torch.compile peer and the autotuner's picks"
    timeout "$(limit 120)" $PY kernels/bench.py --repeats 10 || echo "KERNEL BENCH FAILED OR TIMED OUT (rc $?)"

    step "rollout bench: random Llama 1.24B, bf16, batch 64, prompt 128, 256 new tokens (forward+backward in 4 chunks)"
    timeout "$(limit 150)" $PY scripts/bench.py --rollout --train_micro_batch 16 \
        || echo "ROLLOUT BENCH FAILED OR TIMED OUT (rc $?)"

    step "actor micro-batch memory: 1.24B, bf16, 8 x 2048 tokens, logits path vs --fused_logprobs"
    timeout "$(limit 60)" $PY scripts/bench.py --actor_memory || echo "ACTOR MEMORY BENCH FAILED OR TIMED OUT (rc $?)"
fi

# The per-phase split of a real ppo_lag.py step on the rollout bench's model: a random Llama of
# the 1.24B shape (scripts/bench.py --save_model: the toy tokenizer padded to its 128,256-word vocabulary, reward and
# cost models on its backbone), 3 PPO-Lag steps of 64 prompts x (128 prompt + 256 new tokens), bf16, static cache,
# PPO micro-batches of 16. The prompts are toy requests lengthened with toy words to exactly 128 tokens in the
# anchor's template (toy prompts alone are 15-25). An answer stops early only on a sampled EOS (1 in 128,256 a token):
# nearly all run 256 tokens, train/response_len says. Step 1's time/generate includes compiling the decode step.
# Memory (an H100 has about 78 GiB usable): a fully trained 1.24B model under DeepSpeed bf16 holds bf16 weights and
# gradients, fp32 master weights and gradients and Adam's two fp32 moments, 20 B a parameter = 23 GiB; a frozen one
# 2.3 GiB. Full PPO-Lag trains three (actor, reward and cost critics: 69 GiB) beside three frozen ones (ref, reward
# and cost models: 7 GiB): 76 GiB before the ~14 GiB of a micro-batch's activations and logits: it does not fit. So
# the critics are LoRA (--critic_lora_rank 8): each is its score model's backbone with an adapter and a trained copy
# of the head, and that backbone with both switched off is the frozen score model. 4 backbones: the actor trained
# whole (23 GiB) + ref, reward and cost (7 GiB) = 30 GiB, + an actor micro-batch of 16 x 384 tokens without gradient
# checkpointing (~14 GiB) or the scoring phase's (64, 384, 128256) bf16 logits (5.9 GiB): ~45 GiB at the peak. The
# actor, whose generation against training time the issue asks about, is trained as in a full run; a LoRA critic's
# backward still runs through every layer (without weight gradients), so time/update is somewhat below a full-critic
# run's. (Plain PPO with one full critic would fit too, ~65 GiB, but drops the cost stream.) nvidia-smi's used memory
# is sampled every 0.5 s to check this estimate.
step "ppo_lag.py on the 1.24B rollout model: time/generate, time/score, time/update of 3 PPO-Lag steps"
big=/tmp/gpu_check_1b
if timeout "$(limit 90)" $PY scripts/bench.py --save_model $big "$@"; then
    read -r B P N L < <($PY -c "import json; d = json.load(open('$big/bench_model.json'))
print(d['batch'], d['prompt'], d['new_tokens'], d['max_length'])")
    mb=$((B < 16 ? B : 16))
    sampler=
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >/tmp/gpu_check_mem.log &
        sampler=$!
    fi
    timeout "$(limit 240)" $PY ppo_lag.py --actor_model_name_or_path $big/actor \
        --reward_model_name_or_path $big/reward --cost_model_name_or_path $big/cost \
        --train_datasets prompts:1.0:$big/prompts.jsonl --max_length "$L" --max_steps 3 \
        --per_device_prompt_batch_size "$B" --per_device_train_batch_size "$mb" --update_iters 1 \
        --critic_lora_rank 8 --bf16 --generation_cache static --resume_from_checkpoint none \
        --output_dir /tmp/gpu_check_ppo_1b 2>&1 | tee /tmp/gpu_check_ppo_1b.log \
        | grep -E "^generation:|backbones|^step |error|Error" || echo "PPO 1.24B FAILED OR TIMED OUT"
    [ -n "$sampler" ] && kill "$sampler" && wait "$sampler" 2>/dev/null
    echo "prompts $B x $P tokens, up to $N new tokens each, PPO micro-batch $mb (step 1 includes compilation)"
    printf "%-6s %12s %9s %10s %16s %12s\n" step "generate s" "score s" "update s" "generate/update" "response len"
    grep "^step " /tmp/gpu_check_ppo_1b.log | awk -F' [|] ' '{
        for (i = 1; i <= NF; i++) { split($i, kv, " "); m[kv[1]] = kv[2] }
        printf "%-6s %12.2f %9.2f %10.2f %16.2f %12.1f\n", m["step"], m["time/generate"], m["time/score"],
            m["time/update"], m["time/generate"] / m["time/update"], m["train/response_len"] }'
    [ -s /tmp/gpu_check_mem.log ] && sort -n /tmp/gpu_check_mem.log | tail -1 \
        | awk '{ printf "peak GPU memory used: %.1f GiB (nvidia-smi, sampled every 0.5 s)\n", $1 / 1024 }'
else
    echo "SAVE MODEL FAILED OR TIMED OUT"
fi

[ "$mode" = ppo ] && { step "done in $((SECONDS - start)) s"; exit 0; }

step "ppo_lag.py on CUDA with each generation cache, and with --fused_logprobs (toy world, 2 steps)"
root=/tmp/gpu_check_toy
$PY - "$root" <<'PYEOF'
import sys, torch
import templates, toy
from score_model import ScoreModel
root = sys.argv[1]
toy.make_toy_model(f"{root}/base")
torch.manual_seed(0)
ScoreModel.from_pretrained(f"{root}/base", score_type="reward").save_pretrained(f"{root}/rm")
templates.load_tokenizer(f"{root}/base").save_pretrained(f"{root}/rm")
PYEOF
for cache in static dynamic fused; do  # fused: the static cache with --fused_logprobs
    extra=(--generation_cache "${cache/fused/static}")
    [ "$cache" = fused ] && extra+=(--fused_logprobs)
    timeout "$(limit 40)" $PY ppo_lag.py --actor_model_name_or_path $root/base \
        --reward_model_name_or_path $root/rm \
        --train_datasets toy-prompts:0.02 --eval_datasets toy-eval:0.05 --max_length 48 --max_steps 2 \
        --per_device_prompt_batch_size 4 --per_device_train_batch_size 2 --update_iters 1 \
        "${extra[@]}" --output_dir /tmp/gpu_check_ppo_$cache 2>&1 \
        | grep -E "^generation:|time/generate|^step |error" || echo "PPO ($cache) FAILED OR TIMED OUT"
done

step "done in $((SECONDS - start)) s"
