"""Stage 3: PPO-Lagrangian (Safe RLHF). Plain PPO (RLHF) when no cost model is given.

The actor samples answers to prompts; a frozen reward model R scores helpfulness and a frozen cost model C scores
harm (C > 0 means unsafe). Safe RLHF solves the constrained problem

    max_theta J_R(theta)   s.t.   J_C(theta) = E[C(x, y)] <= d          (d = --threshold)

through its Lagrangian  min_theta max_{lambda >= 0}  -J_R(theta) + lambda * (J_C(theta) - d):  PPO on the combined
advantage A = (A_r - lambda * A_c) / (1 + lambda) for theta, and a step on lambda for the multiplier. Reward and cost
are two *streams* (score model, sign, critic), each KL-shaped, GAE'd and fitted by its own critic.

    +-- one iteration of main() ---------------------------------------------------------------------------+
    | 1) rollout    sample answers from the actor (eval mode)                                              |
    | 2) score      old and reference log-probs, R and C at each answer's end, each critic's values        |
    | 3) advantage  per stream: KL-shaped per-token rewards, GAE; the actor's A = (A_r - lam A_c)/(1 + lam) |
    | 4) update     PPO epochs: the actor on A (+ PTX), each critic on its own stream's returns            |
    | 5) lambda     J_C = windowed_cost(...), then one step of the multiplier rule (LAMBDA_UPDATES)        |
    | 6) log        metrics line, samples.jsonl, eval, checkpoint                                          |
    +------------------------------------------------------------------------------------------------------+

An answer ends at the first stop token (the EOS, the actor's generation_config EOS list, the chat template's end of
turn); train/eos_rate is the share that did. The first rollout prints J_C of the initial policy beside d.
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
import itertools
import json
import math
import os
import random
import time
from collections import defaultdict, deque

import torch

import common
import lora
import rollout
from checkpoint import check_finite, check_model_folder, interrupted, load_checkpoint, weights_finite
from common import print0, str2bool
from data import IGNORE_INDEX, PromptOnlyDataset, SupervisedDataset, parse_dataset
from kernels import gae, mean_nll
from kernels.linear_logprobs import fused_head_problem, token_logprobs
from rollout import response_mask
from templates import CHAT_TEMPLATE_HELP, load_tokenizer, parse_chat_template, save_chat_template, stop_ids
from toy import toy_metrics

SAMPLES_PER_LOG = 4  # rollout samples written to samples.jsonl at each metrics line (the first one printed)
WARN_AFTER = 10  # consecutive rollouts with lambda at its cap, or J_C above d, before a warning line names the flag
RANGES = {  # each flag's range, beyond the tables every stage shares (checkpoint.LOOP_RANGES, SAMPLING_RANGES)
    ">= 1": "update_iters num_return_sequences per_device_prompt_batch_size episode_cost_window_size",
    ">= 0": "actor_lr critic_lr lambda_lr lambda_init kl_coeff ptx_coeff lambda_update_delay_steps actor_weight_decay "
    "critic_weight_decay pid_kp pid_ki pid_kd missing_eos_penalty missing_eos_cost_penalty",
    "> 0": "lambda_max clip_range_ratio clip_range_score clip_range_value",
    "[0, 1]": "gamma gae_lambda actor_lr_warmup_ratio critic_lr_warmup_ratio",
}

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


def missing_eos_penalty(score, ended, penalty):
    """An end score (B,) minus `penalty` on each answer that hit the token cap without a stop token (ended (B,) False):
    TRL's missing_eos_penalty on the reward (the anchor has none), so that never stopping cannot pay; the cost stream
    passes -penalty (a cut answer costs more), since a small cost model can see rambling as safe."""
    return score - penalty * (~ended).to(score.dtype) if penalty else score


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


def windowed_cost(window, costs, device):
    """J_C, what the multiplier constrains: the mean end cost over each rank's window of the last
    --episode_cost_window_size answers (this rollout's `costs` (B,) appended), pooled across ranks. A rule that needs
    another signal (the rollout's own mean, a tail quantile of the window) changes this function.
    Returns (J_C, the number of answers it averages)."""
    window.extend(costs.tolist())
    total = torch.tensor([sum(window), len(window)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item(), int(total[1].item())


def update_multiplier(lam_state, episode_cost, args, device):
    """One step of the --lambda_update rule; every rank then takes rank 0's multiplier."""
    lam_state = LAMBDA_UPDATES[args.lambda_update](lam_state, episode_cost, **vars(args))
    lam = torch.tensor([lam_state["lam"]], dtype=torch.float64, device=device)
    torch.distributed.broadcast(lam, 0)
    return {**lam_state, "lam": lam.item()}


def multiplier_warnings(counts, lam, episode_cost, args):
    """One line when the multiplier cannot do its job: stuck at its cap, or J_C above d, for WARN_AFTER rollouts in a
    row. counts: (rollouts at the cap, rollouts above d) so far; returns them updated."""
    at_cap = counts[0] + 1 if lam >= args.lambda_max * (1 - 1e-9) else 0
    above = counts[1] + 1 if episode_cost > args.threshold else 0
    if at_cap == WARN_AFTER:
        print0(
            f"warning: lambda has sat at its cap --lambda_max {args.lambda_max:g} for {WARN_AFTER} rollouts "
            f"(J_C {episode_cost:.3g}, d {args.threshold:g}): raise --lambda_max, or loosen --threshold if no policy "
            "near this one can meet it"
        )
    if above == WARN_AFTER:
        fix = "raise --lambda_lr, or try --lambda_update pid (its P term answers a violation at once)"
        if at_cap:
            fix = "it is at its cap: raise --lambda_max, or loosen --threshold"
        print0(
            f"warning: J_C {episode_cost:.3g} has stayed above d {args.threshold:g} for {WARN_AFTER} rollouts "
            f"(lambda {lam:.3g}): {fix}"
        )
    return at_cap, above


# ----------------------------------------------------------------------------------------------------------------
# The model calls (tests and kernels' benchmarks import them)


def sample_answers(actor, tok, batch, args, stops, step, num_return_sequences=1, desc="rollout"):
    """Sample answers to a batch of prompts from the actor (an engine: under ZeRO-3 its parameters are gathered once
    per call, see rollout.py). Returns (sequences (B, P + L), attention mask, response mask (B, L), ended (B,), P)."""
    device = actor.device
    input_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    P = input_ids.shape[1]
    kw = dict(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty
    )
    kw.update(max_new_tokens=args.max_length - P, num_return_sequences=num_return_sequences, eos_token_id=stops)
    kw.update(max_cache_len=args.max_length, cache=args.generation_cache, gather=args.gather_for_generation)
    kw.update(pad_token_id=tok.pad_token_id, desc=desc)  # desc: a bar over the new tokens (rank 0, in a terminal)
    kw["synced_gpus"] = args.zero_stage == 3 and torch.distributed.get_world_size() > 1  # ZeRO-3 per-token fetch
    try:
        with torch.no_grad():
            seq = rollout.generate(actor, input_ids, prompt_mask, **kw)
    except RuntimeError:  # sampling from a policy whose weights went non-finite fails in here: name the cause
        check_finite({"actor weights": 1.0 if weights_finite(actor.module) else math.nan}, step)
        raise
    stop_t = torch.tensor(stops, device=device)
    mask = response_mask(seq[:, P:], stop_t)  # (B, L)
    ended = torch.isin(seq[:, P:], stop_t).any(-1)  # (B,) stopped before the token cap
    attention_mask = torch.cat([prompt_mask.repeat_interleave(num_return_sequences, 0), mask], 1)
    return seq, attention_mask, mask, ended, P


def policy_logp(model, seq, attention_mask, P, fused=False):
    """log pi(y_t | x, y_<t) for the response tokens: (B, L) fp32."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
    inputs = dict(input_ids=seq, attention_mask=attention_mask, position_ids=position_ids)
    return token_logprobs(model, inputs, P, fused)


def critic_values(critic, seq, attention_mask, P):
    """V(s_t) before emitting response token t: (B, L)."""
    return critic(seq, attention_mask).scores[:, P - 1 : -1, 0]


def answers_of(tok, seq, mask, P):
    """The answers' texts: the response tokens up to the first stop, special tokens dropped."""
    return tok.batch_decode([s[P:][m] for s, m in zip(seq, mask)], skip_special_tokens=True)


def end_scores(scorers, seq, attention_mask, inputs, answers, chat_template):
    """{name: end score (B,)} of each frozen score model {name: (model, own tokenizer or None)}: one with its own
    tokenizer reads the conversation written again in it (rollout.score_conversations)."""
    scores = {}
    for name, (model, tok) in scorers.items():
        retokenize = None if tok is None else (tok, chat_template, inputs, answers)
        scores[name] = rollout.score_conversations(model, seq, attention_mask, retokenize)
    return scores


def evaluate(actor, actor_tok, scorers, eval_prompts, args, stops, step):
    """Mean reward and cost on the eval prompts, safe rate, eos rate, and the toy oracle's view on toy prompts.
    Every rank runs the same number of prompts (a ZeRO-3 generate is collective): the last few wrap around, and the
    duplicates are dropped when the results are gathered."""
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    n = len(eval_prompts)
    idx = [(rank + world_size * i) % n for i in range(math.ceil(n / world_size))]
    rows = []
    for i in rollout.progress(range(0, len(idx), args.per_device_eval_batch_size), desc="eval", unit="batch"):
        mb = idx[i : i + args.per_device_eval_batch_size]
        batch = eval_prompts.collate([eval_prompts[j] for j in mb])
        seq, attention_mask, mask, ended, P = sample_answers(
            actor, actor_tok, batch, args, stops, step, desc="eval generate"
        )
        answers = answers_of(actor_tok, seq, mask, P)
        with torch.no_grad():
            scores = end_scores(scorers, seq, attention_mask, batch["inputs"], answers, args.chat_template)
        r, c = scores["reward"], scores.get("cost", torch.zeros_like(scores["reward"]))
        rows += zip(mb, r.tolist(), c.tolist(), batch["prompts"], answers, ended.tolist())
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, rows)
    rows = list({row[0]: row for part in gathered for row in part}.values())  # one row per prompt
    r, c = torch.tensor([row[1] for row in rows]), torch.tensor([row[2] for row in rows])
    out = {"eval/reward": r.mean().item(), "eval/eos_rate": sum(row[5] for row in rows) / len(rows)}
    if "cost" in scorers:
        out.update({"eval/cost": c.mean().item(), "eval/safe_rate": (c <= 0).float().mean().item()})
    toy = toy_metrics([row[3] for row in rows], [row[4] for row in rows])
    return {**out, **{f"eval/{k}": v for k, v in (toy or {}).items()}}


def load_models(args, actor_tok, score_toks, optimizer_steps, world_size):
    """The engines: the actor and its frozen reference, the frozen score models {name: (model, own tokenizer or
    None)}, and the streams [{name, sign, critic}]: Safe RLHF's reward (maximised: sign +1) and cost (constrained:
    sign -1, so the KL term enters it as c_t = +beta * kl_t), each with a trained critic (a copy of its score model by
    default). Plain PPO and --reward_shaping train the reward stream only. With LoRA the actor's reference is the
    actor with its adapter off, and each stream's score model is loaded once, as its critic (adapter and a trained
    copy of the head on) that is also its frozen score model (both off): 3 backbones instead of 6."""
    from transformers import AutoModelForCausalLM

    from models import ScoreModel

    use_cost, lagrangian = args.cost_model_name_or_path is not None, is_lagrangian(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def build(model, prefix=None):  # a trained engine with the actor_ or critic_ optimisation flags, or a frozen one
        if prefix is None:
            return common.engine(model, common.ds_config(args, world_size, train=False))
        opt = common.optimizer(model, args, optimizer_steps, prefix)
        return common.engine(model, common.ds_config(args, world_size), opt)

    def load_lm():  # an adapter folder: its base with the adapter folded in
        path = args.actor_model_name_or_path
        return lora.from_pretrained(
            AutoModelForCausalLM.from_pretrained, path, dtype=dtype, trust_remote_code=(args.trust_remote_code)
        )

    def own_tokenizer(name):  # the score model's tokenizer when it cannot read the actor's ids, else None
        tok = score_toks[name]
        return None if rollout.reads_policy_tokens(tok, actor_tok, args.chat_template) else tok

    actor_model = load_lm()
    if args.actor_gradient_checkpointing:
        actor_model.gradient_checkpointing_enable()
    if args.actor_lora_rank:
        actor_model = lora.add_lora(actor_model, args, "actor_", args.actor_model_name_or_path)
    actor = build(actor_model, "actor_")
    ref = lora.adapter_off(actor, actor.module) if args.actor_lora_rank else build(load_lm())
    backbones = ["actor + ref"] if args.actor_lora_rank else ["actor", "ref"]  # full models in memory, by role
    if args.fused_logprobs and (problem := fused_head_problem(actor)):
        raise SystemExit(
            f"error: --fused_logprobs needs logits = last hidden state @ lm_head.weight^T, but {problem}: drop "
            "--fused_logprobs"
        )
    # --normalize_reward/cost (default off, as the anchor) override the checkpoint's own do_normalize
    stream_names = ["reward", "cost"] if lagrangian else ["reward"]
    shared = set(stream_names) if args.critic_lora_rank else set()  # LoRA critics: one backbone per stream
    scorers = {}
    for name in ["reward", "cost"] if use_cost else ["reward"]:
        if name in shared:
            scorers[name] = None  # below, from its critic (the entry keeps the reward, cost order)
            continue
        normalize = getattr(args, f"normalize_{name}")
        model = ScoreModel.from_pretrained(
            getattr(args, f"{name}_model_name_or_path"), dtype=dtype, score_type=name, do_normalize=normalize
        )
        scorers[name] = (build(model), own_tokenizer(name))
        backbones.append(f"{name}_model")
    streams = []
    for name in stream_names:
        path = getattr(args, f"{name}_critic_model_name_or_path") or getattr(args, f"{name}_model_name_or_path")
        score_type = name if name in shared else "critic"  # shared: the normaliser's rule for the frozen scores
        critic_model = ScoreModel.from_pretrained(path, score_type=score_type, do_normalize=False, dtype=dtype)
        if args.critic_gradient_checkpointing:
            critic_model.gradient_checkpointing_enable()
        if name in shared:
            critic_model = lora.add_lora(critic_model, args, "critic_", path, modules_to_save=["score_head"])
        critic = build(critic_model, "critic_")
        streams.append({"name": name, "sign": 1.0 if name == "reward" else -1.0, "critic": critic})
        if name in shared:  # the frozen score model reads what it would read loaded on its own
            scorers[name] = (
                lora.adapter_off(critic, critic.module, getattr(args, f"normalize_{name}")),
                own_tokenizer(name),
            )
        backbones.append(f"{name}_model + {name}_critic" if name in shared else f"{name}_critic")
    print0(f"{len(backbones)} backbones: {', '.join(backbones)}")
    return actor, ref, scorers, streams


def write_samples(run_dir, step, prompts, answers, ended, scores, num_return_sequences):
    """The first SAMPLES_PER_LOG rollouts to samples.jsonl, and the first one printed."""
    samples = [
        {"step": step, "prompt": prompts[i // num_return_sequences], "response": answers[i], "ended": bool(ended[i])}
        | {name: score[i].item() for name, score in scores.items()}
        for i in range(min(SAMPLES_PER_LOG, len(answers)))
    ]
    with open(os.path.join(run_dir, "samples.jsonl"), "a") as f:
        f.writelines(json.dumps(sample) + "\n" for sample in samples)
    s = samples[0]
    tail = (f" | cost {s['cost']:.4g}" if "cost" in s else "") + ("" if s["ended"] else " | cut")
    print(f"sample {s['prompt'][:200]!r} -> {s['response'][:300]!r} | reward {s['reward']:.4g}{tail}", flush=True)


def endless(loader, sampler, drawn):
    """The loader's batches without end, from the `drawn`-th on; pass k over the data is shuffled with (seed, k)."""
    passes, offset = divmod(drawn, len(loader))
    for k in itertools.count(passes):
        sampler.set_epoch(k)
        yield from itertools.islice(loader, offset, None)
        offset = 0


# ----------------------------------------------------------------------------------------------------------------
# The command line


def parse_args():
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
    lora.add_arguments(parser, "actor_")  # LoRA actor: the reference is the actor with its adapter off
    lora.add_arguments(parser, "critic_")  # LoRA critics: each is its score model with an adapter and a trained head
    add("--save_adapter_only", action="store_true", help="save the actor's LoRA adapter folder, not merged")
    # data
    add("--train_datasets", nargs="+", type=parse_dataset, required=True, help="prompt specs NAME[:PROPORTION[:PATH]]")
    add("--eval_datasets", nargs="+", type=parse_dataset, help="eval prompt specs")
    add("--ptx_datasets", nargs="+", type=parse_dataset, help="SFT specs for the PTX loss")
    add("--max_length", type=int, default=512, help="prompt + response length in tokens")
    add("--chat_template", type=parse_chat_template, default="anchor", help=f"prompt format: {CHAT_TEMPLATE_HELP}")
    # algorithm
    add("--epochs", type=int, default=1, help="passes over the prompt dataset")
    add("--max_steps", type=int, help="stop after this many rollouts (optional)")
    add("--update_iters", type=int, default=1, help="PPO epochs over each rollout")
    add("--temperature", type=float, default=1.0, help="sampling temperature (> 0; PPO needs sampled answers)")
    add("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    add("--repetition_penalty", type=float, default=1.0, help="HF generate repetition penalty")
    add("--num_return_sequences", type=int, default=1, help="answers sampled per prompt")
    add("--generation_cache", choices=["static", "dynamic"], help="KV cache (default: static on CUDA; see rollout.py)")
    add("--gather_for_generation", choices=["auto", "always", "never"], default="auto", help="ZeRO-3 (rollout.py)")
    add("--fused_logprobs", action="store_true", help="log-probs from the last hidden state: no (B, T, V) logits")
    add("--kl_coeff", type=float, help="beta of the KL shaping (default 0.01 PPO-Lag, 0.02 PPO and reward shaping)")
    add("--clip_range_ratio", type=float, default=0.2, help="PPO ratio clip epsilon")
    add("--clip_range_score", type=float, default=50.0, help="clip on every per-token shaped reward and cost")
    add("--clip_range_value", type=float, default=5.0, help="critic value clip c")
    add("--gamma", type=float, default=1.0, help="GAE discount")
    add("--gae_lambda", type=float, default=0.95, help="GAE lambda")
    add("--ptx_coeff", type=float, default=16.0, help="weight of the PTX loss")
    add("--threshold", type=float, default=0.0, help="cost limit d on J_C")
    add("--lambda_init", type=float, default=1.0, help="initial Lagrange multiplier (the fixed one with shaping)")
    add("--lambda_lr", type=float, default=0.1, help="multiplier step per unit of J_C - d (0: a fixed-lambda ablation)")
    add("--lambda_max", type=float, default=5.0, help="upper bound on lambda")
    add("--lambda_update_delay_steps", type=int, default=0, help="rollouts before lambda starts moving")
    add("--episode_cost_window_size", type=int, default=128, help="end costs averaged into J_C (per rank)")
    add("--lambda_update", choices=sorted(LAMBDA_UPDATES), default="sgd-log", help="multiplier rule (LAMBDA_UPDATES)")
    # PID gains in lambda per unit of cost, for a cost model that scores safe answers near -5 and unsafe ones near +7
    # (the toy world's; the anchor's Beaver cost models are on a similar scale): a strong P and D term that answer a
    # drift of J_C above d within a rollout, a small I term that does not wind up while the policy is slow to respond
    add("--pid_kp", type=float, default=2.0, help="PID proportional gain (lambda per unit of J_C - d)")
    add("--pid_ki", type=float, default=0.05, help="PID integral gain (lambda per unit of J_C - d, per rollout)")
    add("--pid_kd", type=float, default=4.0, help="PID derivative gain (lambda per unit rise of J_C in one rollout)")
    add("--reward_shaping", action="store_true", help="the anchor's baseline: one stream R - lambda_init * C")
    add("--missing_eos_penalty", type=float, default=0.0, help="subtracted from R when an answer hits the token cap")
    add("--missing_eos_cost_penalty", type=float, default=0.0, help="added to C when an answer hits the token cap")
    # optimisation
    add("--per_device_prompt_batch_size", type=int, default=16, help="prompts per rollout per device")
    add("--per_device_train_batch_size", type=int, default=16, help="rollout sequences per PPO micro-batch")
    add("--per_device_eval_batch_size", type=int, default=16, help="eval prompts per device per batch")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    for role, lr, decay, schedule in (("actor", 1e-5, 0.01, "cosine"), ("critic", 5e-6, 0.0, "constant")):
        add(f"--{role}_lr", type=float, default=lr, help=f"{role} learning rate")
        add(f"--{role}_weight_decay", type=float, default=decay, help=f"{role} AdamW weight decay")
        add(f"--{role}_lr_scheduler_type", default=schedule, choices=["cosine", "linear", "constant"])
        add(f"--{role}_lr_warmup_ratio", type=float, default=0.03, help=f"{role} warm-up fraction")
        add(f"--{role}_gradient_checkpointing", action="store_true", help=f"recompute {role} activations")
    common.add_run_arguments(parser, unit="rollouts")
    args = parser.parse_args()
    if args.kl_coeff is None:
        args.kl_coeff = 0.01 if is_lagrangian(args) else 0.02
    check_args(parser, args)
    return parser, args


def is_lagrangian(args):
    """Two streams and a moving multiplier: a cost model, and not the fixed-lambda --reward_shaping baseline."""
    return args.cost_model_name_or_path is not None and not args.reward_shaping


def check_args(parser, args):
    """Bad input stops here with one line, before any engine or folder exists."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name} must be a finite number, got {value}")
    ranges = {**checkpoint.LOOP_RANGES, **checkpoint.SAMPLING_RANGES}  # temperature 0 refused: PPO samples answers
    for rule, names in RANGES.items():
        ranges.update(dict.fromkeys(names.split(), rule))
    checkpoint.check_ranges(parser, args, ranges)
    lagrangian, use_cost = is_lagrangian(args), args.cost_model_name_or_path is not None
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
    common.check_run_arguments(parser, args)
    if args.reward_shaping and not use_cost:
        parser.error("--reward_shaping shapes R - lambda * C: pass --cost_model_name_or_path")
    if args.missing_eos_cost_penalty and not use_cost:
        parser.error("--missing_eos_cost_penalty raises the cost of cut answers: pass --cost_model_name_or_path")
    lora.check_arguments(parser, args, "actor_")
    lora.check_arguments(parser, args, "critic_", saved=False)
    for name in ("reward", "cost"):
        critic_path = getattr(args, f"{name}_critic_model_name_or_path")
        if args.critic_lora_rank and critic_path not in (None, getattr(args, f"{name}_model_name_or_path")):
            parser.error(
                f"--critic_lora_rank builds the {name} critic on the {name} model's own backbone: drop "
                f"--{name}_critic_model_name_or_path, or train the critics whole (--critic_lora_rank 0)"
            )
    kinds = {"actor": "causal_lm", "reward": "score_model", "cost": "score_model"}  # critics: any backbone
    for role in ("actor", "reward", "cost", "reward_critic", "cost_critic"):
        if (path := getattr(args, f"{role}_model_name_or_path")) is not None:
            check_model_folder(path, kinds.get(role, "any"), f"--{role}_model_name_or_path")
    rollout_size = args.per_device_prompt_batch_size * args.num_return_sequences
    if rollout_size % args.per_device_train_batch_size:
        parser.error(
            f"per_device_prompt_batch_size * num_return_sequences = {rollout_size} is not divisible by "
            f"per_device_train_batch_size = {args.per_device_train_batch_size}"
        )
    if (rollout_size // args.per_device_train_batch_size * args.update_iters) % args.gradient_accumulation_steps:
        # every rollout must end on an optimizer-step boundary, or its gradients leak into the next rollout's step
        parser.error(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must divide the micro-batches "
            f"of one rollout's PPO epochs ({rollout_size // args.per_device_train_batch_size} x "
            f"{args.update_iters} update_iters)"
        )


def load_tokenizers(parser, args):
    """The actor's tokenizer (left padding, for generation) and each score model's, each with the template it renders
    (no EOS, `model` without a template, a broken Jinja file: one line); the critics must share the actor's."""
    names = ["reward", "cost"] if args.cost_model_name_or_path is not None else ["reward"]
    try:
        actor_tok = load_tokenizer(args.actor_model_name_or_path, padding_side="left", chat_template=args.chat_template)
        score_toks = {
            n: load_tokenizer(getattr(args, f"{n}_model_name_or_path"), chat_template=args.chat_template) for n in names
        }
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for name in ["reward", "cost"] if is_lagrangian(args) else ["reward"]:
        path = getattr(args, f"{name}_critic_model_name_or_path") or getattr(args, f"{name}_model_name_or_path")
        if load_tokenizer(path).get_vocab() != actor_tok.get_vocab():
            parser.error(
                f"critic {path} has a different tokenizer from the actor; critics must share the actor's "
                "tokenizer: pass --reward/cost_critic_model_name_or_path with the actor's vocabulary"
            )
    return actor_tok, score_toks


# ----------------------------------------------------------------------------------------------------------------


def main():
    parser, args = parse_args()
    actor_tok, score_toks = load_tokenizers(parser, args)
    use_cost, lagrangian = args.cost_model_name_or_path is not None, is_lagrangian(args)
    rank, world_size, device = common.init_distributed()
    amp = common.compute_setup(args, device)  # the forward passes' precision (bf16 autocast or fp32), CPU threads
    master_process = rank == 0
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # + rank: each rank samples different answers

    # the output folder: locked for this run, written as <output_dir>.partial, renamed into place at the end; the
    # checkpoint to continue from, if any (refused, one line, when a flag that changes the result differs; the eval
    # flags may differ: evaluation samples from its own RNG stream, so it cannot move training)
    eval_flags = ("eval_interval", "eval_datasets", "per_device_eval_batch_size")
    run_dir, resume_dir = checkpoint.start_run(args, eval_flags)

    # data: prompts for the rollouts (and evals), SFT samples for the PTX loss
    try:
        kwargs = dict(max_length=args.max_length, seed=args.seed, chat_template=args.chat_template)
        prompts = PromptOnlyDataset(args.train_datasets, actor_tok, **kwargs)
        eval_prompts = PromptOnlyDataset(args.eval_datasets, actor_tok, **kwargs) if args.eval_datasets else None
        ptx_tok = load_tokenizer(args.actor_model_name_or_path, chat_template=args.chat_template)  # right padding
        ptx = SupervisedDataset(args.ptx_datasets, ptx_tok, **kwargs) if args.ptx_datasets else None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    loaders = {}
    for name, dataset, size, fix in (
        ("prompts", prompts, args.per_device_prompt_batch_size, "lower --per_device_prompt_batch_size"),
        ("PTX samples", ptx, args.per_device_train_batch_size, "add PTX data or lower --per_device_train_batch_size"),
    ):
        if dataset is None:
            continue
        loaders[name] = common.sharded_loader(dataset, size, rank, world_size, args.seed, drop_last=True)
        if len(loaders[name][1]) == 0:
            raise SystemExit(f"error: {len(dataset)} {name} give no full batch of {size} x {world_size} ranks; {fix}")
    sampler, loader = loaders["prompts"]
    total_steps = min(args.max_steps or math.inf, args.epochs * len(loader))
    rollout_size = args.per_device_prompt_batch_size * args.num_return_sequences
    micro_per_rollout = rollout_size // args.per_device_train_batch_size
    # every rollout ends on an optimizer-step boundary (checked with the flags), so this count is exact
    optimizer_steps = total_steps * args.update_iters * micro_per_rollout // args.gradient_accumulation_steps
    print0(
        f"{len(prompts):,} prompts | {total_steps} rollouts of {rollout_size * world_size} sequences | "
        f"{micro_per_rollout} micro-batches x {args.update_iters} PPO epochs | {optimizer_steps} optimizer steps"
    )

    # models: trained engines get an optimizer, frozen ones run as inference engines (ZeRO 0 or 3)
    actor, ref, scorers, streams = load_models(args, actor_tok, score_toks, optimizer_steps, world_size)
    print0(f"deepspeed config: {json.dumps(common.ds_config(args, world_size))}")
    # an answer ends at any stop token: the EOS, the actor's generation config's EOS list (sft.py saves the template's
    # end of turn there) and the template's end of turn; the saved actor keeps the list
    stops = stop_ids(actor_tok, args.chat_template, actor.module.generation_config)
    actor.module.generation_config.update(eos_token_id=stops[0] if len(stops) == 1 else stops)  # an int if one
    log = common.metrics_logger(run_dir, args, total_steps)
    trained = {"actor": actor, **{f"{s['name']}_critic": s["critic"] for s in streams}}  # what a checkpoint restores

    def write_model(folder, state_dict):  # the actor as an ordinary HF folder (LoRA: merged by default)
        lora.save_pretrained(actor.module, folder, state_dict, args.save_adapter_only)
        actor_tok.save_pretrained(folder)
        save_chat_template(actor_tok, args.chat_template, folder)  # the template it was trained in, for serving

    def set_train(mode):
        """Rollout and scoring run in eval mode (no dropout: the old log-probs are the ones PPO's ratio compares
        against), the PPO epochs in train mode, as in the anchor."""
        for model in [actor] + [s["critic"] for s in streams]:
            model.train(mode)

    # ------------------------------------------------------------------------------------------------------------
    # training loop
    torch.manual_seed(args.seed + rank)  # again: the rollouts do not depend on how many models were built above
    lam_state = lambda_init_state(args.lambda_init)
    warn_counts = (0, 0)  # consecutive rollouts with lambda at --lambda_max, with J_C above d
    episode_costs = deque(maxlen=args.episode_cost_window_size)  # this rank's last end costs
    step, start_epoch, skip, ptx_drawn = 0, 0, 0, 0
    if resume_dir is not None:  # engines (weights, optimizers, LR schedules), RNG, and where the loop stood
        state = load_checkpoint(resume_dir, trained)
        step, start_epoch, skip, ptx_drawn = state["step"], state["epoch"], state["position"], state["ptx_drawn"]
        lam_state = state["lam_state"]
        episode_costs.extend(state["episode_costs"])
    if ptx is not None:
        ptx_sampler, ptx_loader = loaders["PTX samples"]
        ptx_iter = endless(ptx_loader, ptx_sampler, ptx_drawn)
    t_start = time.time()
    try:
        for epoch, position, batch in common.resumed_batches(loader, sampler, args.epochs, start_epoch, skip):
            if step >= total_steps:
                break
            step += 1
            t0 = common.clock(device)
            lam = lam_state["lam"]  # a float: detached from the actor's graph

            # 1) rollout: sample answers from the current policy (eval mode: no dropout)
            set_train(False)
            with amp():
                seq, attention_mask, mask, ended, P = sample_answers(
                    actor, actor_tok, batch, args, stops, step, args.num_return_sequences
                )
            mask_f = mask.float()
            inputs = [x for x in batch["inputs"] for _ in range(args.num_return_sequences)]  # generate's order
            answers = answers_of(actor_tok, seq, mask, P)
            t1 = common.clock(device)

            with torch.no_grad():
                # 2) score with the frozen models: old and reference log-probs, end scores, each critic's values
                with amp():  # all four come out fp32
                    old_logp = policy_logp(actor, seq, attention_mask, P, args.fused_logprobs)  # (B, L)
                    ref_logp = policy_logp(ref, seq, attention_mask, P, args.fused_logprobs)
                    scores = end_scores(scorers, seq, attention_mask, inputs, answers, args.chat_template)
                    old_values = {s["name"]: critic_values(s["critic"], seq, attention_mask, P) for s in streams}
                t2 = common.clock(device)

                # 3) per stream: KL-shaped per-token rewards, then GAE with its own critic's values
                # (answers cut at the token cap: R - P, C + P_C; both 0 by default; J_C keeps the cost model's C)
                reward = missing_eos_penalty(scores["reward"], ended, args.missing_eos_penalty)
                cost = scores.get("cost")
                cost = cost if cost is None else missing_eos_penalty(cost, ended, -args.missing_eos_cost_penalty)
                if args.reward_shaping:  # the anchor's baseline: one stream, end score R - lambda * C
                    reward = reward - lam * cost
                ends, adv, ret = {"reward": reward, "cost": cost}, {}, {}
                for s in streams:
                    shaped = kl_shaped_rewards(
                        ends[s["name"]], old_logp, ref_logp, mask_f, args.kl_coeff, args.clip_range_score, s["sign"]
                    )
                    adv[s["name"]], ret[s["name"]] = gae(
                        shaped, old_values[s["name"]], mask_f, args.gamma, args.gae_lambda
                    )
                actor_adv = combined_advantage(adv["reward"], adv["cost"], lam) if lagrangian else adv["reward"]

            # 4) PPO epochs over micro-batches: the actor (+ PTX) on the combined advantage, then each critic on
            # its own stream's returns
            set_train(True)
            stats = defaultdict(list)
            bar = rollout.progress(total=args.update_iters * micro_per_rollout, desc="ppo update", unit="mb")
            for _ in range(args.update_iters):
                for mb in torch.randperm(seq.shape[0], device=device).split(args.per_device_train_batch_size):
                    with amp():
                        logp = policy_logp(actor, seq[mb], attention_mask[mb], P, args.fused_logprobs)
                    actor_loss, clip_frac = actor_loss_fn(
                        logp, old_logp[mb], actor_adv[mb], mask_f[mb], args.clip_range_ratio
                    )
                    loss = actor_loss
                    if ptx is not None:
                        ptx_batch = {k: v.to(device) for k, v in next(ptx_iter).items()}
                        ptx_drawn += 1
                        with amp():
                            lp = token_logprobs(actor, ptx_batch, 1, args.fused_logprobs)  # answer tokens, else 0
                        ptx_loss = mean_nll(lp, ptx_batch["labels"][:, 1:], IGNORE_INDEX)
                        loss = loss + args.ptx_coeff * ptx_loss
                        stats["loss/ptx"].append(ptx_loss.detach())
                    actor.backward(loss)  # DeepSpeed scales by gradient_accumulation_steps, steps at the boundary
                    actor.step()
                    stats["loss/actor"].append(actor_loss.detach())
                    stats["train/clip_frac"].append(clip_frac.detach())
                    for s in streams:
                        name = s["name"]
                        with amp():
                            v = critic_values(s["critic"], seq[mb], attention_mask[mb], P)
                        critic_loss = critic_loss_fn(
                            v, old_values[name][mb], ret[name][mb], mask_f[mb], args.clip_range_value
                        )
                        s["critic"].backward(critic_loss)
                        s["critic"].step()
                        stats[f"loss/{name}_critic"].append(critic_loss.detach())
                    bar.update()
            bar.close()
            t3 = common.clock(device)

            # 5) Lagrange multiplier: J_C over the window of end costs, then one step of the rule
            if use_cost:
                episode_cost, n_costs = windowed_cost(episode_costs, scores["cost"], device)
                if step == 1:  # where the constraint starts: the threshold d is set against this number
                    grows = episode_cost > args.threshold
                    verdict = " | above d: lambda grows" if grows else " | at or below d: lambda shrinks"
                    print0(
                        f"J_C {episode_cost:.4f} on the first rollout ({n_costs} answers of the initial policy) | "
                        f"threshold d {args.threshold:g}" + (verdict if lagrangian else "")
                    )
            if lagrangian and step > args.lambda_update_delay_steps:
                lam_state = update_multiplier(lam_state, episode_cost, args, device)
                warn_counts = multiplier_warnings(warn_counts, lam_state["lam"], episode_cost, args)

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
                torch.distributed.all_reduce(mean)
                metrics = dict(zip(local, (mean / world_size).tolist()))
                tokens = metrics.pop("tokens") * world_size
                if use_cost:
                    metrics.update({"train/lambda": lam_state["lam"], "train/episode_cost": episode_cost})
                check_finite(metrics, step)
                timing = {"time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2}
                log(step, {**metrics, "perf/tok_per_sec": tokens / (t3 - t0), **timing})
                if master_process:  # a few of the rollouts, to read what the numbers mean
                    write_samples(run_dir, step, batch["prompts"], answers, ended, scores, args.num_return_sequences)
            eval_now = args.eval_interval and step % args.eval_interval == 0 or step == total_steps
            if eval_prompts is not None and eval_now:
                set_train(False)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(args.seed + rank)  # its own stream: an eval does not move training
                    with amp():
                        metrics = evaluate(actor, actor_tok, scorers, eval_prompts, args, stops, step)
                log(step, metrics, head=f"eval step {step}")
            if args.save_interval and step % args.save_interval == 0 and step < total_steps:
                loop_state = {"epoch": epoch, "position": position, "lam_state": lam_state, "ptx_drawn": ptx_drawn}
                rank_state = {"episode_costs": list(episode_costs)}
                saving = dict(
                    engines=trained, state=loop_state, save_total_limit=args.save_total_limit, rank_state=rank_state
                )
                checkpoint.save_model(actor, run_dir, step, write_model, vars(args), saving, "actor weights")
    except KeyboardInterrupt:
        interrupted(step, run_dir)

    # save the actor into the .partial folder, then swap it into place: at every instant output_dir holds either the
    # previous complete model or the new one
    checkpoint.save_model(actor, run_dir, step, write_model, vars(args), what="actor weights")
    if master_process:
        checkpoint.publish(run_dir, args.output_dir)
        print(f"saved actor to {args.output_dir} | {step} rollouts in {time.time() - t_start:.0f} s")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
