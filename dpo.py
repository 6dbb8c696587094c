"""Stage 3 (offline): direct preference optimisation (DPO) and the offline constrained baselines beside PPO-Lag.
A policy learns from (better, worse) answer pairs directly, without a reward model or rollouts; a frozen copy of the
starting policy is the reference (with LoRA: the policy with its adapter off). The pair's order comes from the
helpfulness label (--label better), the safety label (--label safer), or, with --objective safedpo, from the
helpfulness label re-ordered by the safety indicators.

Objective (the anchor's DPO; Rafailov et al. 2023, Eq. 7): for a pair (x, y_w, y_l), with the log-probs summed from
the first token where the two sequences differ (d) to each one's last token (inclusive),

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]        (each a sum over t = d .. end)
    L = mean over pairs of  -log sigma(beta * h - m)                             beta = --scale_coeff

with m = 0 for DPO. --objective safedpo (Kim et al. 2025, arXiv 2505.20065, Eq. 12) trains on the pairs after its
transformation T (a pair whose better answer is unsafe while the worse one is safe is swapped) and sets
m = (h_l - h_w) * Delta (h = 1 for an unsafe answer, Delta = --safety_margin). SACPO (Wachi et al. 2024, arXiv
2404.11049, Theorem 1: pi*_{r + lambda g} is proportional to pi*_r exp(lambda g / beta)) is two runs of this stage:
DPO on helpfulness with beta, then DPO on safety (--label safer) from that model, as its own reference, with beta /
lambda (run_all.sh baselines). Implicit rewards beta * (log pi - log pi_ref) are logged as the anchor does.

Deviations from the anchor (safe-rlhf's dpo trainer at 82743cc):
 1. The sums run over the tokens d .. end themselves. The anchor slices its (B, L - 1) log-prob array, whose column t
    is log p(token t + 1), with token positions, so it sums tokens d + 1 .. end + 1: it skips the first token where
    the answers differ and adds the pad token after the shorter sequence (the last column of the longer one).
 2. Pairs that tokenisation made identical (truncation at --max_length) are dropped and counted, not asserted on;
    the divergence index counts real tokens, so left or right padding gives the same loss.
 3. Eval metrics (eval/loss and the reward metrics) on --eval_datasets at step 0 and the end (the anchor's DPO trainer
    defines no eval); a client torch AdamW (betas 0.9/0.95) as in sft.py; checkpoint.py's output protocol and full-state
    checkpoints: re-running the same command after a kill resumes and ends on the same model.
 4. --objective safedpo and --label safer are ours (the baselines); --label better on PKU-SafeRLHF is the anchor's run.

Launch (the anchor's scripts/dpo.sh: PKU-SafeRLHF/train, beta 0.1, lr 1e-6 cosine, warmup 0.03, wd 0.05, 2 epochs):
    python dpo.py --model_name_or_path output/tiny/sft --train_datasets toy-preference --output_dir output/tiny/dpo
    torchrun --nproc_per_node 8 dpo.py --model_name_or_path SFT --train_datasets PKU-SafeRLHF/train \\
        --eval_datasets PKU-SafeRLHF/test --zero_stage 3 --bf16 --gradient_checkpointing --output_dir output/dpo
    deepspeed --hostfile hostfile dpo.py <same flags>   # multi-node
"""

# first, before the slow imports: from here on Ctrl-C and the errors a user can fix end in one line (error_line)
import checkpoint

# isort: split
import argparse
import contextlib
import copy
import io
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import lora
import rollout
from checkpoint import interrupted, load_checkpoint, publish, save_model
from common import print0
from data import IGNORE_INDEX, PreferenceDataset, SafetyPreferenceDataset, parse_dataset
from kernels.linear_logprobs import fused_head_problem
from kernels.linear_logprobs import token_logprobs as kernel_token_logprobs
from templates import (
    CHAT_TEMPLATE_HELP,
    add_pad_token,
    load_tokenizer,
    parse_chat_template,
    save_chat_template,
    stop_ids,
)

METRICS = ("loss", "reward_accuracy", "reward_margin", "better_sample_reward", "worse_sample_reward", "reward")

# ----------------------------------------------------------------------------------------------------------------
# The math


def pair_spans(better_ids, worse_ids, better_mask, worse_mask):
    """(B, T) bool each: the tokens of each sequence from the first real-token position where the pair differs to its
    last real token (inclusive). Positions count real tokens, so left and right padding give the same spans; a pair
    whose real tokens are equal gets empty spans (its log-ratio is 0, its gradient none)."""
    B, T = better_ids.shape
    # put each row's real tokens first (a stable sort keeps their order): right padding, whatever came in
    b_order = (~better_mask.bool()).int().sort(dim=-1, stable=True).indices  # (B, T)
    w_order = (~worse_mask.bool()).int().sort(dim=-1, stable=True).indices
    b_ids, b_real = better_ids.gather(-1, b_order), better_mask.bool().gather(-1, b_order)
    w_ids, w_real = worse_ids.gather(-1, w_order), worse_mask.bool().gather(-1, w_order)
    differ = (b_real | w_real) & ((b_ids != w_ids) | (b_real != w_real))  # a real token against a pad differs too
    pos = torch.arange(T, device=better_ids.device)
    d = torch.where(differ.any(-1, keepdim=True), differ.int().argmax(-1, keepdim=True), T)  # (B, 1) diverge index
    # back to the input's positions: span[order[k]] = (k >= d) & real
    b_span = torch.zeros_like(b_real).scatter(-1, b_order, (pos >= d) & b_real)
    w_span = torch.zeros_like(w_real).scatter(-1, w_order, (pos >= d) & w_real)
    return b_span, w_span


def dpo_loss(better_logp, worse_logp, ref_better_logp, ref_worse_logp, scale_coeff, margin=None):
    """Sequence log-probs (B,) of the policy and the reference -> (loss, per-pair metrics (B,) detached).
    loss = mean(-log sigma(beta * h - m)), h = (logp_w - ref_w) - (logp_l - ref_l); m = 0 (DPO) or SafeDPO's margin."""
    better_log_ratio = better_logp - ref_better_logp  # (B,)
    worse_log_ratio = worse_logp - ref_worse_logp
    logits = scale_coeff * (better_log_ratio - worse_log_ratio)  # DPO, Rafailov et al. 2023 Eq. 7
    if margin is not None:
        logits = logits - margin  # SafeDPO Eq. 12: - (h_l - h_w) * Delta inside the sigmoid
    loss = -F.logsigmoid(logits).mean()
    better_reward, worse_reward = scale_coeff * better_log_ratio.detach(), scale_coeff * worse_log_ratio.detach()
    metrics = {  # the anchor's names; per pair, averaged by the caller
        "loss": -F.logsigmoid(logits.detach()),
        "reward_accuracy": (better_reward > worse_reward).float(),
        "reward_margin": better_reward - worse_reward,
        "better_sample_reward": better_reward,
        "worse_sample_reward": worse_reward,
        "reward": better_reward + worse_reward,
    }
    return loss, metrics


def safedpo_margin(better_unsafe, worse_unsafe, safety_margin):
    """SafeDPO's margin (Eq. 12): (h_l - h_w) * Delta, h = 1 for an unsafe answer; on pairs already through T."""
    return (worse_unsafe.float() - better_unsafe.float()) * safety_margin


def safedpo_order(better_unsafe: bool, worse_unsafe: bool) -> bool:
    """SafeDPO's transformation T of a helpfulness pair: swap (True) when the better answer is unsafe and the worse
    one safe; every other pair keeps its order."""
    return better_unsafe and not worse_unsafe


def token_logprobs(model, input_ids, attention_mask, fused=False):
    """(B, T) fp32: column t holds log p(x_t | x_<t) for each real token after a row's first, 0 on the first and on
    padding. Position ids count real tokens (left padding scores as right). fused: the lm_head gives the log-probs."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    real = attention_mask.bool()
    # a real token predicted from a real one (with left padding the first real token is predicted from a pad)
    labels = input_ids.masked_fill(~(real & F.pad(real[:, :-1], (1, 0))), IGNORE_INDEX)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    return F.pad(kernel_token_logprobs(model, inputs, 1, fused), (1, 0))  # (B, T): nothing predicts the first token


# ----------------------------------------------------------------------------------------------------------------
# Data: the pair datasets of data.py, plus SafeDPO's view (helpfulness order after T, and the safety indicators)


class SafeDPODataset(PreferenceDataset):
    """Helpfulness pairs with each answer's safety indicator, after SafeDPO's transformation T; the collated batch adds
    better_unsafe, worse_unsafe (B,) 0/1. Samples without both is_safe labels are dropped."""

    DROP_REASON = "no room for an answer, or no safety labels"

    def preprocess(self, s):
        if "is_safe" not in s or "is_other_safe" not in s:
            return None
        first, second = (s["answer"], not s["is_safe"]), (s["other_answer"], not s["is_other_safe"])
        (better, better_unsafe), (worse, worse_unsafe) = (first, second) if s["better"] else (second, first)
        if safedpo_order(better_unsafe, worse_unsafe):
            (better, better_unsafe), (worse, worse_unsafe) = (worse, worse_unsafe), (better, better_unsafe)
        a, b = self.answer_ids(s["input"], better), self.answer_ids(s["input"], worse)
        if a is None or b is None:
            return None
        flags = {"better_unsafe": int(better_unsafe), "worse_unsafe": int(worse_unsafe)}
        return {"better_input_ids": a, "worse_input_ids": b, **flags}

    def collate(self, batch):
        flags = {k: torch.tensor([b[k] for b in batch]) for k in ("better_unsafe", "worse_unsafe")}
        return {**super().collate(batch), **flags}


# ----------------------------------------------------------------------------------------------------------------
# The model calls of the loop


def pair_loss(policy, ref, batch, scale_coeff, fused=False, safety_margin=None):
    """The batch's loss and per-pair metrics: one policy forward and one reference forward over both halves (rows [:B]
    the preferred answers, [B:] the others). safety_margin: SafeDPO's Delta (the batch has the safety indicators)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B = ids.size(0) // 2
    better_span, worse_span = pair_spans(ids[:B], ids[B:], mask[:B], mask[B:])
    span = torch.cat([better_span, worse_span])  # (2B, T)
    logp = (token_logprobs(policy, ids, mask, fused) * span).sum(-1)  # (2B,)
    with torch.no_grad():
        ref_logp = (token_logprobs(ref, ids, mask, fused) * span).sum(-1)
    margin = None
    if safety_margin is not None:
        margin = safedpo_margin(batch["better_unsafe"], batch["worse_unsafe"], safety_margin)
    return dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], scale_coeff, margin)


def evaluate(policy, ref, loader, scale_coeff, fused=False, safety_margin=None) -> dict:
    """The pair metrics averaged over every rank's pairs, as eval/<name>."""
    policy.eval()
    totals = torch.zeros(len(METRICS) + 1, device=policy.device)  # per-pair sums, pairs
    with torch.no_grad():
        for batch in rollout.progress(loader, desc="eval", unit="batch"):
            batch = {k: v.to(policy.device) for k, v in batch.items()}
            _, metrics = pair_loss(policy, ref, batch, scale_coeff, fused, safety_margin)
            pairs = torch.tensor(float(len(metrics["loss"])), device=policy.device)  # stack() takes one device
            totals += torch.stack([*(m.sum() for m in metrics.values()), pairs])
    dist.all_reduce(totals)
    policy.train()
    return {f"eval/{k}": v for k, v in zip(METRICS, totals[:-1] / totals[-1])}


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # data
    add("--train_datasets", type=parse_dataset, nargs="+", required=True, help="NAME[:PROPORTION[:PATH]] ...")
    add("--eval_datasets", type=parse_dataset, nargs="+", default=None, help="NAME[:PROPORTION[:PATH]] ...")
    add("--max_length", type=int, default=512, help="tokens per sequence (answers truncated)")
    add(
        "--chat_template",
        type=parse_chat_template,
        default="anchor",
        help=f"how conversations are written (and saved with the model): {CHAT_TEMPLATE_HELP}",
    )
    add("--label", choices=["better", "safer"], default="better", help="which label orders a pair: helpfulness, safety")
    # model
    add("--model_name_or_path", required=True, help="the starting policy (also the reference)")
    lora.add_arguments(parser)
    add("--save_adapter_only", action="store_true", help="save the LoRA adapter folder, not merged")
    # algorithm
    add("--scale_coeff", type=float, default=0.1, help="beta: the KL coefficient of DPO (nats^-1)")
    add("--objective", choices=["dpo", "safedpo"], default="dpo", help="safedpo: pairs reordered by T, a safety margin")
    add("--safety_margin", type=float, default=1.0, help="SafeDPO's Delta: logit margin of safe over unsafe answers")
    # optimisation
    common.add_optimizer_arguments(parser, "pairs", epochs=2, batch=16, accum=1, lr=1e-6, weight_decay=0.05)
    add(
        "--fused_logprobs",
        action="store_true",
        help="log-probs straight from the last hidden state "
        "(kernels/linear_logprobs.py): no (B, T, V) logits nor their gradient",
    )
    # output, checkpoints, metrics, system: common.py's flags; a metrics line every 10 steps
    common.add_run_arguments(parser)
    parser.set_defaults(logging_steps=10)
    args = parser.parse_args()
    check_args(parser, args)
    return args


def check_args(parser, args) -> None:
    """Flag ranges and combinations (argparse's one line, exit 2), before anything slow."""
    ranges = {**checkpoint.TRAIN_RANGES, "scale_coeff": "finite and > 0", "safety_margin": "finite and >= 0"}
    checkpoint.check_ranges(parser, args, ranges)
    common.check_run_arguments(parser, args)
    if args.objective == "safedpo" and args.label != "better":
        parser.error("--objective safedpo orders pairs by the helpfulness label: drop --label safer")
    lora.check_arguments(parser, args)
    # the model folder too, before any process group
    checkpoint.check_model_folder(args.model_name_or_path, "causal_lm", "--model_name_or_path")


# ----------------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    from transformers import AutoModelForCausalLM

    from lora import adapter_off

    rank, world_size, device = common.init_distributed()  # a plain `python dpo.py` is a world of one
    amp = common.compute_setup(args, device)  # the forward passes' precision (bf16 autocast or fp32), CPU threads
    master_process = rank == 0
    torch.manual_seed(args.seed)
    eval_flags = ("eval_interval", "eval_datasets", "per_device_eval_batch_size")  # they draw no random numbers
    partial, resume_dir = checkpoint.start_run(args, eval_flags)  # <output_dir>.partial, and a checkpoint or None

    # data: rows [:B] of input_ids are the preferred answers, rows [B:] the others; data.py reports on every rank
    Dataset = {"better": PreferenceDataset, "safer": SafetyPreferenceDataset}[args.label]
    Dataset = SafeDPODataset if args.objective == "safedpo" else Dataset
    try:
        tokenizer = load_tokenizer(args.model_name_or_path, padding_side="right", chat_template=args.chat_template)
        with contextlib.nullcontext() if master_process else contextlib.redirect_stdout(io.StringIO()):
            kwargs = dict(max_length=args.max_length, seed=args.seed, chat_template=args.chat_template)
            train_dataset = Dataset(args.train_datasets, tokenizer, **kwargs)
            eval_dataset = args.eval_datasets and Dataset(args.eval_datasets, tokenizer, **kwargs)
    except ValueError as e:  # no EOS token, no usable samples, nothing fits max_length, ...
        raise SystemExit(f"error: {e}") from None
    note = f" | {args.objective} on the {args.label} label, beta {args.scale_coeff:g}"
    train_sampler, train_loader, eval_loader, steps_per_epoch, total_steps = common.supervised_loaders(
        args, train_dataset, eval_dataset, rank, world_size, "pairs", note
    )
    accum = args.gradient_accumulation_steps  # micro-batches per optimizer step

    # models: the policy (trained) and the reference (frozen: a second copy, or the policy with its adapter off)
    model = lora.from_pretrained(  # an adapter folder: its base with the adapter folded in
        AutoModelForCausalLM.from_pretrained,
        args.model_name_or_path,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        trust_remote_code=args.trust_remote_code,
    )
    if args.save_adapter_only and tokenizer.pad_token is None:  # the new pad row would live outside the adapter
        raise SystemExit(
            "error: --save_adapter_only: the tokenizer has no pad token, so the embeddings grow by one "
            "row that an adapter folder cannot carry; save merged (drop the flag) or add a pad token"
        )
    add_pad_token(tokenizer, model)
    model.config.pad_token_id = tokenizer.pad_token_id
    # the reference: an exact copy of the starting policy, a new pad row included (that row is drawn at random)
    ref_model = None if args.lora_rank else copy.deepcopy(model)
    stops = stop_ids(tokenizer, args.chat_template, model.generation_config)
    model.generation_config.update(
        eos_token_id=stops[0] if len(stops) == 1 else stops, pad_token_id=tokenizer.pad_token_id
    )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if args.fused_logprobs and (problem := fused_head_problem(model)):
        raise SystemExit(
            f"error: --fused_logprobs needs logits = last hidden state @ lm_head.weight^T, but {problem}: "
            "drop --fused_logprobs"
        )
    if args.lora_rank:
        model = lora.add_lora(model, args, "", args.model_name_or_path)
    optimizer, scheduler = common.optimizer(model, args, total_steps)
    config = common.ds_config(args, world_size)
    print0(f"deepspeed config: {json.dumps(config)}")
    engine = common.engine(model, config, (optimizer, scheduler))
    if args.lora_rank:  # at the start B = 0: the adapter switched off is the starting policy, not a second copy
        ref = adapter_off(engine, engine.module)
    else:  # frozen: ZeRO-3 when the policy is, else none
        ref = common.engine(ref_model, common.ds_config(args, world_size, train=False))
    log = common.metrics_logger(partial, args, total_steps)
    safety_margin = args.safety_margin if args.objective == "safedpo" else None  # DPO: no margin

    def write_model(folder, state_dict):  # rank 0; state_dict: the gathered one under ZeRO-3, else None
        lora.save_pretrained(engine.module, folder, state_dict, args.save_adapter_only)
        tokenizer.save_pretrained(folder)
        save_chat_template(tokenizer, args.chat_template, folder)

    # the loop: both halves through the policy and the reference, the DPO loss, backward; DeepSpeed owns gradient
    # accumulation (engine.backward scales the loss by 1/accum, engine.step updates on every accum-th micro-batch)
    engine.train()
    step, micro_step, start_epoch, skip = 0, 0, 0, 0
    running = torch.zeros(len(METRICS) + 2, device=engine.device)  # per-pair sums, pairs, tokens
    bar = None
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, {"model": engine})
        step, micro_step, start_epoch, skip = state["step"], state["micro_step"], state["epoch"], state["position"]
        running = torch.tensor(state["running"], device=engine.device)
    t0 = time.time()
    try:  # Ctrl-C: one line, exit 130, the .partial left in place
        if eval_loader is not None and resume_dir is None:  # the starting policy: loss log 2, rewards 0
            with amp():
                log(0, evaluate(engine, ref, eval_loader, args.scale_coeff, args.fused_logprobs, safety_margin))
            t0 = time.time()
        for epoch, position, batch in common.resumed_batches(
            train_loader, train_sampler, args.epochs, start_epoch, skip
        ):
            if bar is None:
                steps_to_line = min(args.logging_steps - step % args.logging_steps, total_steps - step)
                bar = rollout.progress(total=steps_to_line * accum - micro_step % accum, desc="train", unit="mb")
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            # 1) log-probs of both answers under the policy and the reference, summed over the differing span
            # 2) the DPO loss (or SafeDPO's)
            with amp():
                loss, metrics = pair_loss(engine, ref, batch, args.scale_coeff, args.fused_logprobs, safety_margin)
            # 3) backward and (on boundaries) optimizer + LR step
            engine.backward(loss)
            engine.step()
            pairs = torch.tensor(float(len(metrics["loss"])), device=engine.device)
            running += torch.stack([*(m.sum() for m in metrics.values()), pairs, batch["attention_mask"].sum().float()])
            micro_step += 1
            bar.update()
            if micro_step % accum:
                continue
            step += 1
            # 4) log / eval / save
            if step % args.logging_steps == 0 or step == total_steps:
                bar.close()
                bar = None
                dist.all_reduce(running)
                elapsed, t0 = time.time() - t0, time.time()
                stats = {f"train/{k}": v for k, v in zip(METRICS, running[:-2] / running[-2])}
                stats.update({"train/lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch})
                log(step, {**stats, "perf/tok_per_sec": running[-1] / elapsed})
                running.zero_()
            t_pause = time.time()
            eval_now = args.eval_interval and step % args.eval_interval == 0 or step == total_steps
            if eval_loader is not None and eval_now:
                with amp():
                    log(step, evaluate(engine, ref, eval_loader, args.scale_coeff, args.fused_logprobs, safety_margin))
            if args.save_interval and step % args.save_interval == 0 and step < total_steps:
                # a full checkpoint-<step>/: engine state, RNG, where the loop stands, this rank's running sums
                loop_state = {"epoch": epoch, "position": position, "micro_step": micro_step}
                full = dict(engines={"model": engine}, state=loop_state, save_total_limit=args.save_total_limit)
                full["rank_state"] = {"running": running.tolist()}
                save_model(engine, partial, step, write_model, vars(args), full)
            t0 += time.time() - t_pause
            if step == total_steps:
                break
        save_model(engine, partial, step, write_model, vars(args))
    except KeyboardInterrupt:
        interrupted(step, partial)

    if master_process:
        publish(partial, args.output_dir)
        print0(f"saved {args.output_dir}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
