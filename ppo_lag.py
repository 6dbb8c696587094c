"""Stage 3: PPO-Lagrangian (Safe RLHF). Plain PPO (RLHF) when no cost model is given.

The actor samples answers to prompts; a frozen reward model R scores helpfulness and a frozen cost model C scores
harm (C > 0 means unsafe). Safe RLHF solves the constrained problem

    max_theta J_R(theta)   s.t.   J_C(theta) = E[C(x, y)] <= d          (d = --threshold)

through its Lagrangian  min_theta max_{lambda >= 0}  -J_R(theta) + lambda * (J_C(theta) - d):  PPO on the combined
advantage A = (A_r - lambda * A_c) / (1 + lambda) for theta, and a step on log(lambda) for the multiplier.
Reward and cost are two *streams* (score model, sign, critic), each KL-shaped, GAE'd and fitted by its own critic.
Each iteration: 1) rollout, 2) score, 3) KL-shaped rewards and GAE per stream, 4) PPO epochs for the actor and the
critics, 5) Lagrange multiplier update, 6) log / eval / save.
Prompts are written in the anchor's template or the actor's own (--chat_template model); an answer ends at the first
stop token (the EOS, the actor's generation_config EOS list, the template's end of turn), train/eos_rate is the share
that did, and every metrics line writes a few (prompt, response, reward, cost) samples to samples.jsonl (one printed).
The first rollout prints J_C of the initial policy beside the threshold d: where the constraint starts.
--reward_shaping is the anchor's fixed-lambda baseline: ONE stream whose end score is R - lambda * C, one critic.

Deviations from the anchor (safe-rlhf at 82743cc; the README lists them all):
  1. The multiplier is updated once per rollout, after the PPO epochs (the anchor: at the start of each RL micro-step),
     and its delay is counted in rollouts; the rule is pluggable (--lambda_update sgd-log | pid | pgd).
  2. PTX: one optimizer step on L_actor + ptx_coeff * L_ptx, with a PTX batch drawn fresh for each micro-batch of each
     PPO epoch (the anchor takes a separate PTX step, which doubles accumulation: one step on (L_actor + c L_ptx) / 2).
  3. The response mask ends at the first EOS (the anchor masks pad/unk tokens, and drops EOS itself when pad == eos).
  4. PPO micro-batches are a random permutation of the rollout (the anchor keeps the order).
  5. Log-probs, GAE and end scores go through kernels/ (no (B, T, V) fp32 copy, no host sync, no loop over T).
  6. --save_interval writes full-state checkpoints (actor and critics with their optimizers and schedules, lambda, the
     episode-cost window, data and PTX positions, RNG); re-running the same command after a kill resumes from the
     newest one and ends on the same model (--resume_from_checkpoint). Evaluation samples from its own RNG stream.

Launch:
  python ppo_lag.py --actor_model_name_or_path SFT --reward_model_name_or_path RM --cost_model_name_or_path CM ...
  torchrun --nproc_per_node 8 ppo_lag.py ...            deepspeed --hostfile H ppo_lag.py ...
"""

# first, before the slow imports: from here on Ctrl-C and the errors a user can fix end in one line (error_line)
import checkpoint

# isort: split
import argparse
import inspect
import itertools
import json
import math
import os
import random
import socket
import time
from collections import defaultdict, deque

import torch

import lora
import rollout
from checkpoint import (
    check_finite,
    check_model_folder,
    find_resume,
    interrupted,
    load_checkpoint,
    prepare_output,
    publish,
    save_checkpoint,
    weights_finite,
)
from data import (
    CHAT_TEMPLATE_HELP,
    IGNORE_INDEX,
    PromptOnlyDataset,
    SupervisedDataset,
    conversation_ids,
    load_tokenizer,
    parse_chat_template,
    parse_dataset,
    save_chat_template,
    stop_ids,
    toy_metrics,
)
from kernels import gae, logprobs, mean_nll
from kernels.linear_logprobs import causal_lm, fused_head_problem, head_gives_logprobs

SAMPLES_PER_LOG = 4  # rollout samples written to samples.jsonl at each metrics line (the first one printed)
WARN_AFTER = 10  # consecutive rollouts with lambda at its cap, or J_C above d, before a warning line names the flag

# ----------------------------------------------------------------------------------------------------------------
# The math (pure functions, unit-tested in tests/test_ppo_lag.py)


def masked_mean(x, mask):
    """Token mean within each sequence, then mean over the batch (the anchor's convention). (B, L) -> ()."""
    mask = mask.to(x.dtype)
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def kl_shaped_rewards(end_score, old_logp, ref_logp, mask, kl_coeff, clip_range_score, sign=1.0):
    """Per-token rewards (B, L): -sign * beta * (log pi_old - log pi_ref) on every response token, plus the end score
    at the last valid token (EOS, or the last token when truncated); then every token is clipped to
    +/- clip_range_score, as in the anchor. sign = +1 for the reward stream, -1 for the cost stream
    (c_t = +beta * kl_t + C at the end)."""
    kl = (old_logp - ref_logp) * mask  # (B, L)
    rewards = -sign * kl_coeff * kl
    end = mask.long().sum(-1).clamp(min=1) - 1  # (B,) responses are a prefix of the (B, L) slot
    rewards = rewards.scatter_add(1, end[:, None], end_score[:, None].to(rewards.dtype))
    return rewards.clamp(-clip_range_score, clip_range_score)


def combined_advantage(reward_adv, cost_adv, lam):
    """Safe RLHF eq. (lambda detached): A = (A_r - lambda * A_c) / (1 + lambda)."""
    return (reward_adv - lam * cost_adv) / (1.0 + lam)


def actor_loss_fn(logp, old_logp, adv, mask, clip_ratio):
    """PPO clipped surrogate. Returns (loss, fraction of tokens where the ratio was clipped)."""
    ratio = torch.exp(logp - old_logp)  # (B, L)
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio))
    clipped = ((ratio - 1.0).abs() > clip_ratio).float()
    return masked_mean(surrogate, mask), masked_mean(clipped, mask)


def critic_loss_fn(values, old_values, returns, mask, clip_range_value):
    """0.5 * masked_mean(max((V - G)^2, (clip(V, V_old +/- c) - G)^2))."""
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def lambda_update_sgd_log(state, episode_cost, threshold, lambda_lr, lambda_max, **_):
    """The anchor's rule: one SGD step on L(log_lam) = -(J_C - d) * exp(log_lam), i.e.
    log_lam += lr * lambda * (J_C - d), clamped at log(lambda_max)."""
    log_lam = state["log_lam"] + lambda_lr * math.exp(state["log_lam"]) * (episode_cost - threshold)
    if lambda_max is not None:
        log_lam = min(log_lam, math.log(lambda_max))
    return {**state, "log_lam": log_lam, "lam": math.exp(log_lam)}


def lambda_update_pid(state, episode_cost, threshold, pid_kp, pid_ki, pid_kd, lambda_max, **_):
    """PID Lagrangian (Stooke, Achiam & Abbeel 2020, alg. 2): e = J_C - d; I = (I + Ki e)_+;
    D = (J_C - J_C_prev)_+; lambda = (Kp e + I + Kd D)_+. The P and D terms damp the oscillation of plain
    gradient ascent on lambda (which is the I term alone). The state starts with I = lambda_init. I is also kept at or
    below lambda_max (anti-windup): an integral past the cap would hold lambda at its cap for as many rollouts after
    J_C falls below d as it spent winding up, and the policy overshoots into all-safe."""
    error = episode_cost - threshold
    integral = max(0.0, state["integral"] + pid_ki * error)
    if lambda_max is not None:
        integral = min(integral, lambda_max)
    derivative = max(0.0, episode_cost - state.get("prev_cost", episode_cost))
    lam = max(0.0, pid_kp * error + integral + pid_kd * derivative)
    if lambda_max is not None:
        lam = min(lam, lambda_max)
    return {**state, "integral": integral, "prev_cost": episode_cost, "lam": lam}


def lambda_update_pgd(state, episode_cost, threshold, lambda_lr, lambda_max, **_):
    """Projected gradient ascent on lambda itself: lambda = clip(lambda + lr * (J_C - d), 0, lambda_max). Its step does
    not scale with lambda, so a multiplier that decayed while the policy was safe rises as fast as it fell once the
    policy drifts above d (sgd-log's step is lr * lambda * (J_C - d) in log space: a small lambda barely moves)."""
    lam = max(0.0, state["lam"] + lambda_lr * (episode_cost - threshold))
    if lambda_max is not None:
        lam = min(lam, lambda_max)
    return {**state, "lam": lam}


# a new rule: one function, one entry (tests/test_ppo_lag.py checks every entry's properties)
LAMBDA_UPDATES = {"sgd-log": lambda_update_sgd_log, "pid": lambda_update_pid, "pgd": lambda_update_pgd}


def lambda_init_state(lambda_init):
    return {
        "log_lam": math.log(lambda_init) if lambda_init > 0 else -math.inf,
        "integral": lambda_init,
        "lam": lambda_init,
    }


def response_mask(response, stop_ids):
    """(B, L) bool: tokens up to and including the first stop token (stop_ids: an id, or a tensor of ids such as the
    EOS and the chat template's end of turn); works when pad == eos."""
    is_stop = torch.isin(response, torch.as_tensor(stop_ids, device=response.device))
    return (is_stop.long().cumsum(-1) - is_stop.long()) == 0


def lr_schedule(kind, total_steps, warmup_ratio):
    """LR multiplier per optimizer step, as transformers' schedulers (the anchor's): linear warm-up step / warmup over
    int(ratio * total) steps, then cosine or linear decay to 0; "constant" has no warm-up."""
    warmup = int(warmup_ratio * total_steps)

    def f(step):
        if kind == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

    return f


def adapter_off(model, peft_model, normalize=False):
    """`model` (an engine or module around `peft_model`) with the LoRA adapters and trained head copies switched off:
    the model it was loaded as. With LoRA this is PPO's frozen reference (the actor) and its frozen reward and cost
    models (each inside its critic), so none is loaded twice. normalize: apply the score model's normaliser, as its
    do_normalize would (the critic's values, with the adapter on, stay raw)."""

    def forward(*args, **kwargs):
        with peft_model.disable_adapter():
            out = model(*args, **kwargs)
        if normalize:
            score_model = peft_model.get_base_model()
            out = type(out)(*(score_model.normalizer.normalize(x, score_model.score_type) for x in out))
        return out

    forward.module = peft_model  # what it runs, for code that reaches inside (kernels.head_gives_logprobs)
    return forward


def str2bool(text):
    """argparse type for the anchor's `--flag True/False` style."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# ----------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # model
    add("--actor_model_name_or_path", required=True, help="SFT model: the actor and the frozen reference")
    add("--reward_model_name_or_path", required=True, help="reward model folder (ScoreModel)")
    add("--cost_model_name_or_path", help="cost model folder; omit for plain PPO (RLHF)")
    add("--reward_critic_model_name_or_path", help="reward critic init (default: the reward model)")
    add("--cost_critic_model_name_or_path", help="cost critic init (default: the cost model)")
    add("--normalize_reward", type=str2bool, default=False, help="normalise R with the reward model's statistics")
    add("--normalize_cost", type=str2bool, default=False, help="scale C with the cost model's statistics")
    add("--trust_remote_code", action="store_true", help="allow custom model code")
    lora.add_arguments(parser, "actor_")  # LoRA actor: the reference is the actor with its adapter off
    lora.add_arguments(parser, "critic_")  # LoRA critics: each is its score model with an adapter and a trained head
    add("--save_adapter_only", action="store_true", help="save the actor's LoRA adapter folder, not merged")
    # data
    add("--train_datasets", nargs="+", type=parse_dataset, required=True, help="prompt specs NAME[:PROPORTION[:PATH]]")
    add("--eval_datasets", nargs="+", type=parse_dataset, help="eval prompt specs")
    add("--ptx_datasets", nargs="+", type=parse_dataset, help="SFT specs for the PTX loss")
    add("--max_length", type=int, default=512, help="prompt + response length in tokens")
    add(
        "--chat_template",
        type=parse_chat_template,
        default="anchor",
        help=f"how prompts are written (for the actor, the score models and the saved actor): {CHAT_TEMPLATE_HELP}",
    )
    # algorithm
    add("--epochs", type=int, default=1, help="passes over the prompt dataset")
    add("--max_steps", type=int, help="stop after this many rollouts (optional)")
    add("--update_iters", type=int, default=1, help="PPO epochs over each rollout")
    add("--temperature", type=float, default=1.0, help="sampling temperature (> 0; PPO needs sampled answers)")
    add("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    add("--repetition_penalty", type=float, default=1.0, help="HF generate repetition penalty")
    add("--num_return_sequences", type=int, default=1, help="answers sampled per prompt")
    add(
        "--generation_cache",
        choices=["static", "dynamic"],
        help="KV cache of rollout and eval generation: static = compiled decoding, sized to --max_length (default on "
        "CUDA); dynamic = Hugging Face's default (default on CPU)",
    )
    add(
        "--gather_for_generation",
        choices=["auto", "always", "never"],
        default="auto",
        help="ZeRO-3: gather the actor's parameters once per generate call instead of per layer per token (auto: "
        "when they fit in free device memory)",
    )
    add(
        "--fused_logprobs",
        action="store_true",
        help="actor, reference and PTX log-probs straight from the last hidden state (kernels/linear_logprobs.py): "
        "the (B, T, V) logits and their gradient never exist; a trained head: one more GEMM in backward",
    )
    add("--kl_coeff", type=float, help="beta of the KL shaping (default 0.01 PPO-Lag, 0.02 PPO and reward shaping)")
    add("--clip_range_ratio", type=float, default=0.2, help="PPO ratio clip epsilon")
    add("--clip_range_score", type=float, default=50.0, help="clip on every per-token shaped reward and cost")
    add("--clip_range_value", type=float, default=5.0, help="critic value clip c")
    add("--gamma", type=float, default=1.0, help="GAE discount")
    add("--gae_lambda", type=float, default=0.95, help="GAE lambda")
    add("--ptx_coeff", type=float, default=16.0, help="weight of the PTX loss")
    add("--threshold", type=float, default=0.0, help="cost limit d on J_C")
    add("--lambda_init", type=float, default=1.0, help="initial Lagrange multiplier (the fixed one with shaping)")
    add(
        "--lambda_lr",
        type=float,
        default=0.1,
        help="multiplier step size, per unit of J_C - d (sgd-log: on log lambda, pgd: on lambda; 0: our two-critic "
        "fixed-lambda ablation)",
    )
    add("--lambda_max", type=float, default=5.0, help="upper bound on lambda")
    add("--lambda_update_delay_steps", type=int, default=0, help="rollouts before lambda starts moving")
    add("--episode_cost_window_size", type=int, default=128, help="end costs averaged into J_C (per rank)")
    add(
        "--lambda_update",
        choices=sorted(LAMBDA_UPDATES),
        default="sgd-log",
        help="multiplier rule: sgd-log (the anchor's), pid (--pid_*), pgd (projected ascent on lambda itself)",
    )
    # PID gains in lambda per unit of cost, for a cost model that scores safe answers near -5 and unsafe ones near +7
    # (the toy world's; the anchor's Beaver cost models are on a similar scale): a strong P and D term that answer a
    # drift of J_C above d within a rollout, a small I term that does not wind up while the policy is slow to respond
    add("--pid_kp", type=float, default=2.0, help="PID proportional gain (lambda per unit of J_C - d)")
    add("--pid_ki", type=float, default=0.05, help="PID integral gain (lambda per unit of J_C - d, per rollout)")
    add("--pid_kd", type=float, default=4.0, help="PID derivative gain (lambda per unit rise of J_C in one rollout)")
    add("--reward_shaping", action="store_true", help="the anchor's baseline: one stream R - lambda_init * C")
    # optimisation
    add("--per_device_prompt_batch_size", type=int, default=16, help="prompts per rollout per device")
    add("--per_device_train_batch_size", type=int, default=16, help="rollout sequences per PPO micro-batch")
    add("--per_device_eval_batch_size", type=int, default=16, help="eval prompts per device per batch")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--actor_lr", type=float, default=1e-5, help="actor learning rate")
    add("--actor_weight_decay", type=float, default=0.01, help="actor AdamW weight decay")
    add("--actor_lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant"], help="actor schedule")
    add("--actor_lr_warmup_ratio", type=float, default=0.03, help="actor warmup fraction")
    add("--critic_lr", type=float, default=5e-6, help="critics' learning rate")
    add("--critic_weight_decay", type=float, default=0.0, help="critics' AdamW weight decay")
    add("--critic_lr_scheduler_type", default="constant", choices=["cosine", "linear", "constant"], help="critics")
    add("--critic_lr_warmup_ratio", type=float, default=0.03, help="critic warmup fraction")
    add("--actor_gradient_checkpointing", action="store_true", help="recompute actor activations")
    add("--critic_gradient_checkpointing", action="store_true", help="recompute critic activations")
    # logging
    add("--output_dir", required=True, help="where the actor is saved (HF folder)")
    add("--logging_steps", type=int, default=1, help="rollouts between metrics lines")
    add("--eval_interval", type=int, default=0, help="rollouts between evals (0: only at the end)")
    add("--save_interval", type=int, default=0, help="rollouts between full checkpoints, checkpoint-<step>/ (0: none)")
    add("--save_total_limit", type=int, help="keep the newest K checkpoints (default: all)")
    add(
        "--resume_from_checkpoint",
        default="auto",
        help="auto: continue from the newest checkpoint in <output_dir>.partial if any; PATH: from that checkpoint; "
        "none: start over (discards the old checkpoints)",
    )
    add("--log_type", choices=["none", "wandb", "tensorboard"], default="none", help="extra metrics sink")
    add("--log_project", default="nano-safe-rlhf", help="wandb project")
    # system
    add("--seed", type=int, default=42, help="random seed (+rank for sampling)")
    add("--zero_stage", type=int, choices=[0, 1, 2, 3], default=0, help="ZeRO stage of the trained models")
    add("--offload", choices=["none", "parameter", "optimizer", "all"], default="none", help="ZeRO offload to CPU")
    add("--bf16", action="store_true", help="bf16 weights and compute")
    add(
        "--ds_config",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
        help="DeepSpeed systems config",
    )
    add("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()
    use_cost = args.cost_model_name_or_path is not None
    lagrangian = use_cost and not args.reward_shaping  # two streams and a moving multiplier
    args.kl_coeff = args.kl_coeff if args.kl_coeff is not None else (0.01 if lagrangian else 0.02)

    # bad input stops here, before any engine or folder exists
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name} must be a finite number, got {value}")
    checkpoint.check_ranges(
        parser,
        args,
        {
            **checkpoint.LOOP_RANGES,
            **checkpoint.SAMPLING_RANGES,  # temperature 0 is refused: PPO needs sampled answers, not greedy ones
            **dict.fromkeys(
                ["update_iters", "num_return_sequences", "per_device_prompt_batch_size", "episode_cost_window_size"],
                ">= 1",
            ),
            **dict.fromkeys(
                [
                    "actor_lr",
                    "critic_lr",
                    "lambda_lr",
                    "lambda_init",
                    "kl_coeff",
                    "ptx_coeff",
                    "lambda_update_delay_steps",
                    "actor_weight_decay",
                    "critic_weight_decay",
                    "pid_kp",
                    "pid_ki",
                    "pid_kd",
                ],
                ">= 0",
            ),
            **dict.fromkeys(["lambda_max", "clip_range_ratio", "clip_range_score", "clip_range_value"], "> 0"),
            **dict.fromkeys(["gamma", "gae_lambda", "actor_lr_warmup_ratio", "critic_lr_warmup_ratio"], "[0, 1]"),
        },
    )
    if args.reward_shaping:  # lambda stays --lambda_init: the flags of the multiplier's update would be ignored
        rule = ("lambda_update", "lambda_lr", "lambda_max", "lambda_update_delay_steps", "pid_kp", "pid_ki", "pid_kd")
        ignored = [f"--{k} {getattr(args, k)}" for k in rule if getattr(args, k) != parser.get_default(k)]
        if ignored:
            parser.error(
                f"--reward_shaping keeps lambda fixed at --lambda_init, so {', '.join(ignored)} would be "
                "ignored: drop it, or drop --reward_shaping for the Lagrangian"
            )
    elif lagrangian and args.lambda_init > args.lambda_max:
        parser.error(
            f"--lambda_init {args.lambda_init} is above --lambda_max {args.lambda_max}: lambda would start "
            "outside its bound; lower --lambda_init or raise --lambda_max"
        )
    elif lagrangian and args.lambda_init == 0 and args.lambda_update == "sgd-log" and args.lambda_lr > 0:
        parser.error(
            "--lambda_init 0 can never move under --lambda_update sgd-log (its step is proportional to "
            "lambda): start from a small one such as --lambda_init 0.01, or use --lambda_update pid"
        )
    offload_param, offload_optimizer = args.offload in ("parameter", "all"), args.offload in ("optimizer", "all")
    if offload_param and args.zero_stage != 3 or offload_optimizer and args.zero_stage == 0:
        parser.error(f"--offload {args.offload} needs --zero_stage 3 (parameters) or >= 1 (optimizer)")
    if args.reward_shaping and not use_cost:
        parser.error("--reward_shaping shapes R - lambda * C: pass --cost_model_name_or_path")
    lora.check_arguments(parser, args, "actor_")
    lora.check_arguments(parser, args, "critic_")
    if args.save_adapter_only and not args.actor_lora_rank:
        parser.error("--save_adapter_only saves the actor's LoRA adapter: pass --actor_lora_rank > 0")
    for name in ("reward", "cost"):
        critic_path = getattr(args, f"{name}_critic_model_name_or_path")
        if args.critic_lora_rank and critic_path not in (None, getattr(args, f"{name}_model_name_or_path")):
            parser.error(
                f"--critic_lora_rank builds the {name} critic on the {name} model's own backbone: drop "
                f"--{name}_critic_model_name_or_path, or train the critics whole (--critic_lora_rank 0)"
            )
    kinds = {"actor": "causal_lm", "reward": "score_model", "cost": "score_model"}  # critics: any backbone
    for role in ("actor", "reward", "cost", "reward_critic", "cost_critic"):
        path = getattr(args, f"{role}_model_name_or_path")
        if path is not None:
            check_model_folder(path, kinds.get(role, "any"), f"--{role}_model_name_or_path")
    rollout_size = args.per_device_prompt_batch_size * args.num_return_sequences
    if rollout_size % args.per_device_train_batch_size:
        parser.error(
            f"per_device_prompt_batch_size * num_return_sequences = {rollout_size} is not divisible by "
            f"per_device_train_batch_size = {args.per_device_train_batch_size}"
        )
    micro_per_rollout = rollout_size // args.per_device_train_batch_size
    if (micro_per_rollout * args.update_iters) % args.gradient_accumulation_steps:
        # every rollout must end on an optimizer-step boundary, or its gradients leak into the next rollout's step
        parser.error(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide the micro-batches of one "
            f"rollout's PPO epochs ({micro_per_rollout} x {args.update_iters} update_iters)"
        )
    try:  # every tokenizer with the template it renders: no EOS, `model` without a template, a broken Jinja file
        template = args.chat_template
        actor_tok = load_tokenizer(args.actor_model_name_or_path, padding_side="left", chat_template=template)
        score_toks = {
            name: load_tokenizer(getattr(args, f"{name}_model_name_or_path"), chat_template=template)
            for name in ("reward", "cost")[: 1 + use_cost]
        }
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    critic_paths = [args.reward_critic_model_name_or_path or args.reward_model_name_or_path]
    if lagrangian:
        critic_paths.append(args.cost_critic_model_name_or_path or args.cost_model_name_or_path)
    for path in critic_paths:
        if load_tokenizer(path).get_vocab() != actor_tok.get_vocab():
            parser.error(
                f"critic {path} has a different tokenizer from the actor; critics must share the actor's "
                "tokenizer: pass --reward/cost_critic_model_name_or_path with the actor's vocabulary"
            )

    # distributed preamble
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rollout.silence_library_bars()  # transformers' loading bars in a terminal only, as ours (rank 0)
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from models import ScoreModel

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo does it all; avoids a 30 s JIT build
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    master_process = rank == 0
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # + rank: each rank samples different answers

    def print0(*a, **k):
        if master_process:
            print(*a, **k, flush=True)

    def clock():  # time/* phases: a CUDA phase's kernels are queued, so wait for them before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.time()

    # the output folder: locked for this run, written as <output_dir>.partial, renamed into place at the end
    run_dir = args.output_dir.rstrip("/") + ".partial"
    if master_process:
        prepare_output(args.output_dir, vars(args), args.resume_from_checkpoint)
    dist.barrier()
    # the checkpoint to continue from, if any; refused (one line) when a flag that changes the result differs. The
    # eval flags may differ: evaluation samples from its own RNG stream (below), so it cannot move training
    eval_flags = ("eval_interval", "eval_datasets", "per_device_eval_batch_size")
    resume_dir = find_resume(run_dir, args.resume_from_checkpoint, vars(args), eval_flags)

    # data
    try:
        kwargs = dict(max_length=args.max_length, seed=args.seed, chat_template=args.chat_template)
        prompts = PromptOnlyDataset(args.train_datasets, actor_tok, **kwargs)
        eval_prompts = PromptOnlyDataset(args.eval_datasets, actor_tok, **kwargs) if args.eval_datasets else None
        ptx_tok = load_tokenizer(args.actor_model_name_or_path, chat_template=args.chat_template)  # right padding
        ptx = SupervisedDataset(args.ptx_datasets, ptx_tok, **kwargs) if args.ptx_datasets else None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    def sharded_loader(dataset, batch_size, what, fix):
        """(sampler, loader) of full batches of this rank's shard. The loader gets its own generator: each iter() of a
        loader otherwise draws from the global one, which the sampling and the PPO minibatch order use, and a resumed
        run would draw again where the uninterrupted one did not."""
        sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size,
            sampler=sampler,
            collate_fn=dataset.collate,
            drop_last=True,
            generator=torch.Generator(),
        )
        if len(loader) == 0:
            raise SystemExit(
                f"error: {len(dataset)} {what} give no full batch of {batch_size} x {world_size} ranks; {fix}"
            )
        return sampler, loader

    sampler, loader = sharded_loader(
        prompts, args.per_device_prompt_batch_size, "prompts", "lower --per_device_prompt_batch_size"
    )
    total_steps = (
        args.epochs * len(loader) if args.max_steps is None else min(args.max_steps, args.epochs * len(loader))
    )
    # every rollout ends on an optimizer-step boundary (checked above), so this count is exact
    optimizer_steps = total_steps * args.update_iters * micro_per_rollout // args.gradient_accumulation_steps
    if ptx is not None:
        ptx_sampler, ptx_loader = sharded_loader(
            ptx, args.per_device_train_batch_size, "PTX samples", "add PTX data or lower --per_device_train_batch_size"
        )

        def ptx_stream(drawn):
            """PTX batches without end, from the `drawn`-th on; pass k over the PTX set is shuffled with (seed, k)."""
            passes, offset = divmod(drawn, len(ptx_loader))
            for k in itertools.count(passes):
                ptx_sampler.set_epoch(k)
                yield from itertools.islice(ptx_loader, offset, None)
                offset = 0

    print0(
        f"{len(prompts):,} prompts | {total_steps} rollouts of {rollout_size * world_size} sequences | "
        f"{micro_per_rollout} micro-batches x {args.update_iters} PPO epochs | {optimizer_steps} optimizer steps"
    )

    # models and engines: trained ones get an optimizer, frozen ones run as inference engines (ZeRO 0 or 3)
    with open(args.ds_config) as f:
        base_config = json.load(f)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def ds_config(train):
        config = json.loads(json.dumps(base_config))
        config.update(
            train_micro_batch_size_per_gpu=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            train_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        )
        zero = config.setdefault("zero_optimization", {})
        zero["stage"] = args.zero_stage if train else (3 if args.zero_stage == 3 else 0)
        offload_param = args.offload in ("parameter", "all") and zero["stage"] == 3
        zero["offload_param"] = {"device": "cpu" if offload_param else "none"}
        zero["offload_optimizer"] = {"device": "cpu" if train and args.offload in ("optimizer", "all") else "none"}
        config["zero_force_ds_cpu_optimizer"] = False  # we pass a torch AdamW
        config["bf16"] = {"enabled": args.bf16}
        return config

    def engine(model, lr=None, weight_decay=0.0, schedule="constant", warmup=0.0):
        if lr is None:  # frozen
            model.requires_grad_(False)
            frozen = deepspeed.initialize(model=model, config=ds_config(train=False))[0]
            frozen.eval()  # (DeepSpeedEngine.eval returns None)
            return frozen
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]  # LoRA: adapters (+ head)
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(
            [g for g in groups if g["params"]],  # an empty group (a LoRA actor has no 1-d one) trips the scheduler
            lr=lr,
            betas=(0.9, 0.95),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(schedule, optimizer_steps, warmup))
        return deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(train=True))[0]

    def load_lm():
        return lora.from_pretrained(  # an adapter folder: its base with the adapter folded in
            AutoModelForCausalLM.from_pretrained,
            args.actor_model_name_or_path,
            dtype=dtype,
            trust_remote_code=args.trust_remote_code,
        )

    actor_model = load_lm()
    if args.actor_gradient_checkpointing:
        actor_model.gradient_checkpointing_enable()
    if args.actor_lora_rank:
        actor_model = lora.add_lora(actor_model, args, "actor_", args.actor_model_name_or_path)
    actor = engine(
        actor_model, args.actor_lr, args.actor_weight_decay, args.actor_lr_scheduler_type, args.actor_lr_warmup_ratio
    )
    # LoRA: the reference is the actor with its adapter off (at the start B = 0: the same model), not a second copy
    ref = adapter_off(actor, actor.module) if args.actor_lora_rank else engine(load_lm())
    backbones = ["actor + ref"] if args.actor_lora_rank else ["actor", "ref"]  # full models in memory, by role
    # transformers' causal LMs can apply the lm_head to the last k positions only: the prompt's logits are never needed
    logits_to_keep = "logits_to_keep" in inspect.signature(causal_lm(actor).forward).parameters
    if args.fused_logprobs and (problem := fused_head_problem(actor)):
        raise SystemExit(
            f"error: --fused_logprobs needs logits = last hidden state @ lm_head.weight^T, but {problem}: "
            "drop --fused_logprobs"
        )

    def own_tokenizer(name):
        """The score model's tokenizer if it cannot read the actor's token ids (another vocabulary, EOS or chat
        template: inputs are then re-tokenized), else None."""
        tok = score_toks[name]
        same_template = args.chat_template == "anchor" or tok.chat_template == actor_tok.chat_template
        if tok.get_vocab() == actor_tok.get_vocab() and tok.eos_token_id == actor_tok.eos_token_id and same_template:
            return None
        tok.pad_token = tok.pad_token or tok.eos_token  # padding is masked: any id will do
        return tok

    # the frozen score models; --normalize_reward/cost (default off, as the anchor) override the checkpoint's own
    # do_normalize. Then the streams: Safe RLHF's reward (maximised: sign +1) and cost (constrained: sign -1, so the
    # KL term enters it as c_t = +beta * kl_t), each with a trained critic (a copy of its score model by default).
    # Plain PPO and --reward_shaping train the reward stream only.
    # LoRA critics: each stream's score model is loaded once, as its critic (adapter and a trained copy of the head
    # on) that is also its frozen score model (both off)
    shared = ("reward", "cost")[: 1 + lagrangian] if args.critic_lora_rank else ()
    scorers = {}
    for name, normalize in (("reward", args.normalize_reward), ("cost", args.normalize_cost))[: 1 + use_cost]:
        path = getattr(args, f"{name}_model_name_or_path")
        if name in shared:
            scorers[name] = None  # below, from its critic (the entry keeps the reward, cost order)
            continue
        model = ScoreModel.from_pretrained(path, dtype=dtype, score_type=name, do_normalize=normalize)
        scorers[name] = (engine(model), own_tokenizer(name))
        backbones.append(f"{name}_model")
    streams = []
    for name, sign in (("reward", 1.0), ("cost", -1.0))[: 1 + lagrangian]:
        path = getattr(args, f"{name}_critic_model_name_or_path") or getattr(args, f"{name}_model_name_or_path")
        score_type = name if name in shared else "critic"  # shared: the normaliser's rule for the frozen scores
        critic_model = ScoreModel.from_pretrained(path, score_type=score_type, do_normalize=False, dtype=dtype)
        if args.critic_gradient_checkpointing:
            critic_model.gradient_checkpointing_enable()
        if name in shared:
            critic_model = lora.add_lora(critic_model, args, "critic_", path, modules_to_save=["score_head"])
        critic = engine(
            critic_model,
            args.critic_lr,
            args.critic_weight_decay,
            args.critic_lr_scheduler_type,
            args.critic_lr_warmup_ratio,
        )
        streams.append({"name": name, "sign": sign, "critic": critic})
        if name in shared:
            # the frozen score model reads what it would read loaded on its own (re-tokenized when own_tokenizer says)
            off = adapter_off(critic, critic.module, getattr(args, f"normalize_{name}"))
            scorers[name] = (off, own_tokenizer(name))
        backbones.append(f"{name}_model + {name}_critic" if name in shared else f"{name}_critic")
    print0(f"{len(backbones)} backbones: {', '.join(backbones)}")
    # an answer ends at any stop token: the EOS, the actor's generation config's EOS list (sft.py saves the template's
    # end of turn there) and the template's end of turn; the saved actor keeps the list
    stops = stop_ids(actor_tok, args.chat_template, actor.module.generation_config)
    actor.module.generation_config.update(eos_token_id=stops[0] if len(stops) == 1 else stops)  # an int if one
    stops_t, pad = torch.tensor(stops, device=device), actor_tok.pad_token_id
    synced_gpus = args.zero_stage == 3 and world_size > 1  # ZeRO-3 per-token fetch: every rank joins each forward
    generation_cache = args.generation_cache or rollout.default_cache(device)

    def generate(batch, num_return_sequences=1, desc="rollout"):
        """Sample answers: returns (sequence (B, P+L), attention_mask, response mask (B, L), P)."""
        try:
            with torch.no_grad():
                seq = rollout.generate(
                    actor,  # the engine: under ZeRO-3 its parameters are gathered once per call (rollout.py)
                    batch["input_ids"].to(device),
                    batch["attention_mask"].to(device),
                    max_new_tokens=args.max_length - batch["input_ids"].shape[1],
                    max_cache_len=args.max_length,
                    cache=generation_cache,
                    gather=args.gather_for_generation,
                    do_sample=True,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty,
                    num_return_sequences=num_return_sequences,
                    pad_token_id=pad,
                    eos_token_id=stops,
                    synced_gpus=synced_gpus,
                    desc=desc,  # a bar over the new tokens (rank 0, on a terminal, when the call takes long)
                )
        except RuntimeError:  # sampling from a policy whose weights went non-finite fails in here: name the cause
            check_finite({"actor weights": 1.0 if weights_finite(actor.module) else math.nan}, step)
            raise
        P = batch["input_ids"].shape[1]
        mask = response_mask(seq[:, P:], stops_t)  # (B, L)
        attention_mask = torch.cat(
            [batch["attention_mask"].to(device).repeat_interleave(num_return_sequences, 0), mask], 1
        )
        return seq, attention_mask, mask, P

    def token_logp(model, inputs, P):
        """log p(x_t | x_<t) for t >= P of inputs["input_ids"] (B, T) -> (B, T - P) fp32; labels outside the
        vocabulary (-100) give 0. The logits of the positions that predict them, then the streaming log-prob kernel;
        with --fused_logprobs the lm_head itself gives the log-probs for that forward (kernels.head_gives_logprobs)."""
        labels = inputs.get("labels", inputs["input_ids"])[:, P:]
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        keep = labels.size(1) + 1  # positions P - 1 .. T - 1 (the last predicts nothing and is dropped)
        inputs.update(use_cache=False, **({"logits_to_keep": keep} if logits_to_keep else {}))  # skip prompt logits
        if not args.fused_logprobs:
            return logprobs(model(**inputs).logits[:, -keep:-1], labels)
        targets = torch.nn.functional.pad(labels, (P - 1, 1), value=IGNORE_INDEX)  # position t predicts token t + 1
        with head_gives_logprobs(model, targets):
            return model(**inputs).logits[:, -keep:-1]  # the "logits" are log p(target) now: (B, L)

    def policy_logp(model, seq, attention_mask, P):
        """log pi(y_t | x, y_<t) for the response tokens: (B, L) fp32."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
        return token_logp(model, dict(input_ids=seq, attention_mask=attention_mask, position_ids=position_ids), P)

    def end_score(model, tok, seq, attention_mask, inputs, answers):
        """The score model's end score (B,). A score model with its own tokenizer (tok not None) reads the conversation
        re-tokenized: in the anchor's template as the anchor does (the text decoded without special tokens, its own EOS
        appended), else rendered again in its own chat template from the inputs (B,) and answer texts (B,)."""
        if tok is not None and args.chat_template == "anchor":
            texts = actor_tok.batch_decode([s[m.bool()] for s, m in zip(seq, attention_mask)], skip_special_tokens=True)
            enc = tok([t + tok.eos_token for t in texts], return_tensors="pt", padding=True).to(device)
            seq, attention_mask = enc["input_ids"], enc["attention_mask"]
        elif tok is not None:
            ids = [torch.tensor(conversation_ids(tok, x, y, args.chat_template)) for x, y in zip(inputs, answers)]
            seq = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tok.pad_token_id).to(device)
            attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
            attention_mask = attention_mask.to(device)
        return model(seq, attention_mask).end_scores[:, 0].float()

    def answers_of(seq, mask, P):
        """The answers' texts: the response tokens up to the first stop, special tokens dropped."""
        return actor_tok.batch_decode([s[P:][m] for s, m in zip(seq, mask)], skip_special_tokens=True)

    def values(critic, seq, attention_mask, P):
        return critic(seq, attention_mask).scores[:, P - 1 : -1, 0]  # V(s_t) before emitting response token t: (B, L)

    def set_train(mode):
        """Rollout and scoring run in eval mode (no dropout: the old log-probs are the ones PPO's ratio compares
        against), the PPO epochs in train mode, as in the anchor."""
        for model in [actor] + [s["critic"] for s in streams]:
            model.train(mode)

    def evaluate():
        """Mean reward and cost on eval prompts, safe rate, and the toy oracle's view when the prompts are toy ones."""
        # every rank runs the same number of prompts (a ZeRO-3 generate is collective): the last few wrap around,
        # and the duplicates are dropped when the results are gathered
        set_train(False)
        n = len(eval_prompts)
        idx = [(rank + world_size * i) % n for i in range(math.ceil(n / world_size))]
        rows = []
        for i in rollout.progress(range(0, len(idx), args.per_device_eval_batch_size), desc="eval", unit="batch"):
            mb = idx[i : i + args.per_device_eval_batch_size]
            batch = eval_prompts.collate([eval_prompts[j] for j in mb])
            seq, attention_mask, mask, P = generate(batch, desc="eval generate")
            answers = answers_of(seq, mask, P)
            with torch.no_grad():
                scores = {
                    name: end_score(*scorer, seq, attention_mask, batch["inputs"], answers)
                    for name, scorer in scorers.items()
                }
            r, c = scores["reward"], scores.get("cost", torch.zeros_like(scores["reward"]))
            ended = torch.isin(seq[:, P:], stops_t).any(-1)  # (B,) stopped before the token cap
            rows += zip(mb, r.tolist(), c.tolist(), batch["prompts"], answers, ended.tolist())
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = list({row[0]: row for part in gathered for row in part}.values())  # one row per prompt
        r, c = torch.tensor([row[1] for row in rows]), torch.tensor([row[2] for row in rows])
        out = {"eval/reward": r.mean().item(), "eval/eos_rate": sum(row[5] for row in rows) / len(rows)}
        if use_cost:
            out.update({"eval/cost": c.mean().item(), "eval/safe_rate": (c <= 0).float().mean().item()})
        toy = toy_metrics([row[3] for row in rows], [row[4] for row in rows])
        if toy:
            out.update({f"eval/{k}": v for k, v in toy.items()})
        return out

    if master_process:
        print(json.dumps(ds_config(train=True)))
    tracker = None
    if master_process and args.log_type == "wandb":
        import wandb

        tracker = wandb.init(project=args.log_project, config=vars(args))
    elif master_process and args.log_type == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        tracker = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(metrics, step):
        if not master_process:
            return
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if args.log_type == "wandb":
            tracker.log(metrics, step=step)
        elif args.log_type == "tensorboard":
            for k, v in metrics.items():
                tracker.add_scalar(k, v, step)

    trained = {"actor": actor, **{f"{s['name']}_critic": s["critic"] for s in streams}}  # what a checkpoint restores

    def save(path, step, loop_state=None, rank_state=None):
        """The actor as an ordinary HF folder, arguments.json last; never a non-finite model. With `loop_state`, a
        full checkpoint-<step>/ in `path`: every trained engine's DeepSpeed state, RNG states and the loop state too."""
        finite = torch.tensor([float(weights_finite(actor.module))], device=device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # under ZeRO-3 each rank checks its own partition
        if not finite.item():
            check_finite({"actor weights": math.nan}, step)
        state_dict = actor._zero3_consolidated_16bit_state_dict() if args.zero_stage == 3 else None  # all ranks join

        def write_model(folder):
            os.makedirs(folder, exist_ok=True)
            lora.save_pretrained(actor.module, folder, state_dict, args.save_adapter_only)  # LoRA: merged by default
            actor_tok.save_pretrained(folder)
            save_chat_template(actor_tok, args.chat_template, folder)  # the template it was trained in, for serving

        if loop_state is not None:
            save_checkpoint(path, step, trained, loop_state, write_model, vars(args), args.save_total_limit, rank_state)
            return
        if master_process:
            write_model(path)
            with open(os.path.join(path, "arguments.json"), "w") as f:
                json.dump(vars(args), f, indent=2, default=str)
        dist.barrier()

    # ------------------------------------------------------------------------------------------------------------
    # training loop
    torch.manual_seed(args.seed + rank)  # again: the rollouts do not depend on how many models were built above
    lam_state = lambda_init_state(args.lambda_init)
    at_cap, above = 0, 0  # consecutive rollouts with lambda at --lambda_max, with J_C above d (for the warnings)
    episode_costs = deque(maxlen=args.episode_cost_window_size)  # this rank's last end costs
    step, start_epoch, skip, ptx_drawn = 0, 0, 0, 0
    if resume_dir is not None:  # engines (weights, optimizers, LR schedules), RNG, and where the loop stood
        state = load_checkpoint(resume_dir, trained)
        step, start_epoch, skip, ptx_drawn = state["step"], state["epoch"], state["position"], state["ptx_drawn"]
        lam_state = state["lam_state"]
        episode_costs.extend(state["episode_costs"])
    ptx_iter = ptx_stream(ptx_drawn) if ptx is not None else None
    t_start = time.time()
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)  # the epoch's order depends on (seed, epoch) only: a resume skips into it
            for position, batch in enumerate(itertools.islice(loader, skip, None), start=skip + 1):
                if step >= total_steps:
                    break
                step += 1
                t0 = clock()
                lam = lam_state["lam"]  # a float: detached from the actor's graph

                # 1) rollout: sample answers from the current policy (eval mode: no dropout)
                set_train(False)
                seq, attention_mask, mask, P = generate(batch, args.num_return_sequences)
                mask_f = mask.float()
                inputs = [x for x in batch["inputs"] for _ in range(args.num_return_sequences)]  # generate's order
                answers = answers_of(seq, mask, P)
                ended = torch.isin(seq[:, P:], stops_t).any(-1)  # (B,) stopped before the token cap
                t1 = clock()

                with torch.no_grad():
                    # 2) score with the frozen models: old and reference log-probs, end scores, each critic's values
                    old_logp = policy_logp(actor, seq, attention_mask, P)  # (B, L)
                    ref_logp = policy_logp(ref, seq, attention_mask, P)
                    scores = {
                        name: end_score(*scorer, seq, attention_mask, inputs, answers)
                        for name, scorer in scorers.items()
                    }  # (B,)
                    old_values = {s["name"]: values(s["critic"], seq, attention_mask, P) for s in streams}  # (B, L)
                    t2 = clock()

                    # 3) per stream: KL-shaped per-token rewards, then GAE with its own critic's values
                    adv, ret = {}, {}
                    for s in streams:
                        end = scores[s["name"]]
                        if args.reward_shaping:  # the anchor's baseline: one stream, end score R - lambda * C
                            end = scores["reward"] - lam * scores["cost"]
                        shaped = kl_shaped_rewards(
                            end, old_logp, ref_logp, mask_f, args.kl_coeff, args.clip_range_score, s["sign"]
                        )
                        adv[s["name"]], ret[s["name"]] = gae(
                            shaped, old_values[s["name"]], mask_f, args.gamma, args.gae_lambda
                        )
                    actor_adv = combined_advantage(adv["reward"], adv["cost"], lam) if lagrangian else adv["reward"]

                # 4) PPO epochs over micro-batches: actor (+ PTX) on the combined advantage, then each critic on its
                # own stream's returns
                set_train(True)
                stats = defaultdict(list)
                bar = rollout.progress(total=args.update_iters * micro_per_rollout, desc="ppo update", unit="mb")
                for _ in range(args.update_iters):
                    for mb in torch.randperm(seq.shape[0], device=device).split(args.per_device_train_batch_size):
                        logp = policy_logp(actor, seq[mb], attention_mask[mb], P)
                        actor_loss, clip_frac = actor_loss_fn(
                            logp, old_logp[mb], actor_adv[mb], mask_f[mb], args.clip_range_ratio
                        )
                        loss = actor_loss
                        if ptx is not None:
                            ptx_batch = {k: v.to(device) for k, v in next(ptx_iter).items()}
                            ptx_drawn += 1
                            lp = token_logp(actor, ptx_batch, 1)  # the answer tokens' log-probs, 0 elsewhere
                            ptx_loss = mean_nll(lp, ptx_batch["labels"][:, 1:], IGNORE_INDEX)
                            loss = loss + args.ptx_coeff * ptx_loss
                            stats["loss/ptx"].append(ptx_loss.detach())
                        actor.backward(loss)  # DeepSpeed scales by gradient_accumulation_steps, steps at the boundary
                        actor.step()
                        stats["loss/actor"].append(actor_loss.detach())
                        stats["train/clip_frac"].append(clip_frac.detach())
                        for s in streams:
                            name = s["name"]
                            critic_loss = critic_loss_fn(
                                values(s["critic"], seq[mb], attention_mask[mb], P),
                                old_values[name][mb],
                                ret[name][mb],
                                mask_f[mb],
                                args.clip_range_value,
                            )
                            s["critic"].backward(critic_loss)
                            s["critic"].step()
                            stats[f"loss/{name}_critic"].append(critic_loss.detach())
                        bar.update()
                bar.close()
                t3 = clock()

                # 5) Lagrange multiplier: J_C = windowed mean end cost, averaged across ranks, then one update
                if use_cost:
                    episode_costs.extend(scores["cost"].tolist())
                    window = torch.tensor([sum(episode_costs), len(episode_costs)], dtype=torch.float64, device=device)
                    dist.all_reduce(window)
                    episode_cost = (window[0] / window[1]).item()
                    if step == 1:  # where the constraint starts: the threshold d is set against this number
                        verdict = {True: " | above d: lambda grows", False: " | at or below d: lambda shrinks"}
                        print0(
                            f"J_C {episode_cost:.4f} on the first rollout ({int(window[1].item())} answers of the "
                            f"initial policy) | threshold d {args.threshold:g}"
                            + (verdict[episode_cost > args.threshold] if lagrangian else "")
                        )
                if lagrangian and step > args.lambda_update_delay_steps:
                    lam_state = LAMBDA_UPDATES[args.lambda_update](lam_state, episode_cost, **vars(args))
                    lam_t = torch.tensor([lam_state["lam"]], dtype=torch.float64, device=device)
                    dist.broadcast(lam_t, 0)  # every rank uses rank 0's multiplier
                    lam_state["lam"] = lam_t.item()
                    # one line when the multiplier cannot do its job: stuck at its cap, or J_C above d for too long
                    at_cap = at_cap + 1 if lam_state["lam"] >= args.lambda_max * (1 - 1e-9) else 0
                    above = above + 1 if episode_cost > args.threshold else 0
                    if at_cap == WARN_AFTER:
                        print0(
                            f"warning: lambda has sat at its cap --lambda_max {args.lambda_max:g} for {WARN_AFTER} "
                            f"rollouts (J_C {episode_cost:.3g}, d {args.threshold:g}): raise --lambda_max, or "
                            "loosen --threshold if no policy near this one can meet it"
                        )
                    if above == WARN_AFTER:
                        fix = (
                            "it is at its cap: raise --lambda_max, or loosen --threshold"
                            if at_cap
                            else "raise --lambda_lr, or try --lambda_update pid (its P term answers a violation)"
                        )
                        print0(
                            f"warning: J_C {episode_cost:.3g} has stayed above d {args.threshold:g} for "
                            f"{WARN_AFTER} rollouts (lambda {lam_state['lam']:.3g}): {fix}"
                        )

                # 6) log / eval / save: one all_reduce of the stacked per-rank means; a NaN on any rank survives it
                if step % args.logging_steps == 0 or step == total_steps:
                    local = {
                        **{f"train/{name}": score.mean() for name, score in scores.items()},
                        # a mean-cost constraint bounds the size of the cost, not how often an answer is unsafe
                        **({"train/unsafe_rate": (scores["cost"] > 0).float().mean()} if use_cost else {}),
                        "train/kl": masked_mean(old_logp - ref_logp, mask_f),
                        **{k: torch.stack(v).mean() for k, v in stats.items()},
                        "train/response_len": mask_f.sum(-1).mean(),
                        "train/eos_rate": ended.float().mean(),
                        "tokens": mask_f.sum(),
                    }
                    mean = torch.stack([v.float() for v in local.values()])
                    dist.all_reduce(mean)
                    metrics = dict(zip(local, (mean / world_size).tolist()))
                    tokens = metrics.pop("tokens") * world_size
                    if use_cost:
                        metrics.update({"train/lambda": lam_state["lam"], "train/episode_cost": episode_cost})
                    check_finite(metrics, step)
                    metrics.update(
                        {
                            "perf/tok_per_sec": tokens / (t3 - t0),
                            "time/generate": t1 - t0,
                            "time/score": t2 - t1,
                            "time/update": t3 - t2,
                        }
                    )
                    print0(f"step {step}/{total_steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                    log(metrics, step)
                    # a few of rank 0's rollouts, to read what the numbers mean
                    samples = [
                        {
                            "step": step,
                            "prompt": batch["prompts"][i // args.num_return_sequences],
                            "response": answers[i],
                            "ended": bool(ended[i]),
                            **{name: score[i].item() for name, score in scores.items()},
                        }
                        for i in range(min(SAMPLES_PER_LOG, seq.shape[0]))
                    ]
                    if master_process:
                        with open(os.path.join(run_dir, "samples.jsonl"), "a") as f:
                            f.writelines(json.dumps(sample) + "\n" for sample in samples)
                        s = samples[0]
                        print(
                            f"sample {s['prompt'][:200]!r} -> {s['response'][:300]!r} | reward {s['reward']:.4g}"
                            + (f" | cost {s['cost']:.4g}" if use_cost else "")
                            + ("" if s["ended"] else " | cut")
                        )
                if eval_prompts is not None and (
                    (args.eval_interval and step % args.eval_interval == 0) or step == total_steps
                ):
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        torch.manual_seed(args.seed + rank)  # its own stream: an eval does not move training
                        metrics = evaluate()
                    check_finite(metrics, step)
                    print0(f"eval step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                    log(metrics, step)
                if args.save_interval and step % args.save_interval == 0 and step < total_steps:
                    loop_state = {"epoch": epoch, "position": position, "lam_state": lam_state, "ptx_drawn": ptx_drawn}
                    save(run_dir, step, loop_state, {"episode_costs": list(episode_costs)})
            skip = 0
    except KeyboardInterrupt:
        interrupted(step, run_dir)

    # save the actor into the .partial folder, then swap it into place: at every instant output_dir holds either the
    # previous complete model or the new one
    save(run_dir, step)
    if master_process:
        publish(run_dir, args.output_dir)
        print(f"saved actor to {args.output_dir} | {step} rollouts in {time.time() - t_start:.0f} s")
    if tracker is not None and args.log_type == "tensorboard":
        tracker.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
