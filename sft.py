"""Stage 1: supervised fine-tuning (SFT). A pretrained causal LM learns to answer in the prompt template's format
by imitating (prompt, answer) pairs and dialogues; it becomes the initial actor and the frozen reference of PPO.
Conversations are written in the anchor's template or the model's own (--chat_template model: apply_chat_template,
only the assistant turns trained); the saved folder carries that template and stops generating at its end of turn.

Objective: mean token cross-entropy over answer tokens only (prompt and user tokens have label -100), per micro-batch

    L(theta) = -1/|A| * sum_{(i,t) in A} log pi_theta(y_{i,t} | y_{i,<t}),   A = answer tokens and their EOS

Deviations from the anchor (safe-rlhf's finetune):
 1. A client torch AdamW (betas 0.9/0.95, no weight decay on biases/norms) instead of DeepSpeed's FusedAdam/CPUAdam,
    which JIT-compile for ~40 s and need a toolchain; same update rule.
 2. Eval loss and perplexity on --eval_datasets (or a held-out --eval_split_ratio slice), first at step 0 (the
    untrained model, as the anchor); --max_steps caps a run.
 3. The output folder follows checkpoint.py's protocol: locked for the run, written to <output_dir>.partial and
    swapped into place atomically; a non-finite loss or weight stops the run before anything is saved.
 4. --save_interval writes full-state checkpoints (engine, optimizer, scheduler, RNG, data position); re-running the
    same command after a kill resumes from the newest one and ends on the same model (--resume_from_checkpoint).

Launch:
    python sft.py --model_name_or_path output/tiny/base --train_datasets toy-sft --output_dir output/tiny/sft
    torchrun --nproc_per_node 8 sft.py --model_name_or_path huggyllama/llama-7b --train_datasets alpaca \\
        --zero_stage 3 --bf16 --gradient_checkpointing --output_dir output/sft
    deepspeed --hostfile hostfile sft.py <same flags>   # multi-node
"""

# first, before the slow imports: from here on Ctrl-C and the errors a user can fix end in one line (error_line)
import checkpoint

# isort: split
import argparse
import contextlib
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
from data import IGNORE_INDEX, SupervisedDataset, parse_dataset
from kernels import cross_entropy, mean_nll
from kernels.linear_logprobs import fused_head_problem, head_gives_logprobs
from templates import (
    CHAT_TEMPLATE_HELP,
    add_pad_token,
    load_tokenizer,
    parse_chat_template,
    save_chat_template,
    stop_ids,
)

# ----------------------------------------------------------------------------------------------------------------
# The math, and the model calls of the loop


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens: logits (B,T,V) at t predict labels (B,T) at t+1."""
    return cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=IGNORE_INDEX)


def batch_loss(model, batch: dict, fused: bool = False) -> torch.Tensor:
    """The batch's masked next-token cross-entropy: from the logits (B, T, V), or fused (--fused_logprobs) from the
    log-probs the lm_head gives for one forward (kernels.head_gives_logprobs), the same number."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if not fused:
        return sft_loss(model(**inputs).logits, batch["labels"])
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # t predicts t + 1
    with head_gives_logprobs(model, targets):
        return mean_nll(model(**inputs).logits, targets, IGNORE_INDEX)  # the "logits" are log p(target): (B, T)


def evaluate(model, loader, fused: bool = False, amp=contextlib.nullcontext) -> dict:
    """Eval loss (per answer token, over every rank's shard) and perplexity."""
    model.eval()
    totals = torch.zeros(2, device=model.device)  # (sum of token losses, answer tokens)
    with torch.no_grad(), amp():
        for batch in rollout.progress(loader, desc="eval", unit="batch"):  # rank 0, in a terminal (rollout.py)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            totals += torch.stack([batch_loss(model, batch, fused).float() * n, n.float()])
    dist.all_reduce(totals)
    model.train()
    loss = totals[0] / totals[1]
    return {"eval/loss": loss, "eval/perplexity": loss.exp()}


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # data
    add("--train_datasets", type=parse_dataset, nargs="+", required=True, help="NAME[:PROPORTION[:PATH]] ...")
    add("--eval_datasets", type=parse_dataset, nargs="+", default=None, help="NAME[:PROPORTION[:PATH]] ...")
    add("--eval_split_ratio", type=float, default=None, help="hold out this fraction of train for eval")
    add("--max_length", type=int, default=512, help="tokens per sequence (answers truncated)")
    add(
        "--chat_template",
        type=parse_chat_template,
        default="anchor",
        help=f"how conversations are written (and saved with the model): {CHAT_TEMPLATE_HELP}",
    )
    # model
    add("--model_name_or_path", required=True, help="HF model folder or hub id")
    lora.add_arguments(parser)
    add("--save_adapter_only", action="store_true", help="save the LoRA adapter folder, not merged")
    # optimisation
    common.add_optimizer_arguments(parser, "sequences", epochs=3, batch=4, accum=8, lr=2e-5, weight_decay=0.0)
    add(
        "--fused_logprobs",
        action="store_true",
        help="the loss straight from the last hidden state "
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
    checkpoint.check_ranges(parser, args, checkpoint.TRAIN_RANGES)
    if args.eval_split_ratio is not None and (args.eval_datasets or not 0 < args.eval_split_ratio < 1):
        parser.error("--eval_split_ratio must be in (0, 1) and cannot be combined with --eval_datasets")
    common.check_run_arguments(parser, args)
    lora.check_arguments(parser, args)
    # the model folder too, before any process group
    checkpoint.check_model_folder(args.model_name_or_path, "causal_lm", "--model_name_or_path")


# ----------------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    from transformers import AutoModelForCausalLM

    rank, world_size, device = common.init_distributed()  # a plain `python sft.py` is a world of one
    amp = common.compute_setup(args, device)  # the forward passes' precision (bf16 autocast or fp32), CPU threads
    master_process = rank == 0
    torch.manual_seed(args.seed)
    # the output folder (locked, written as <output_dir>.partial) and the checkpoint to continue from, if any: refused
    # (one line) when a flag that changes the result differs; the eval flags may differ (evaluation draws no random
    # numbers, so it cannot move training)
    eval_flags = ("eval_interval", "eval_datasets", "per_device_eval_batch_size")
    partial, resume_dir = checkpoint.start_run(args, eval_flags)

    # data; data.py reports on every rank, keep rank 0's copy
    try:
        tokenizer = load_tokenizer(args.model_name_or_path, padding_side="right", chat_template=args.chat_template)
        with contextlib.nullcontext() if master_process else contextlib.redirect_stdout(io.StringIO()):
            kwargs = dict(max_length=args.max_length, seed=args.seed, chat_template=args.chat_template)
            train_dataset = SupervisedDataset(args.train_datasets, tokenizer, **kwargs)
            eval_dataset = args.eval_datasets and SupervisedDataset(args.eval_datasets, tokenizer, **kwargs)
    except ValueError as e:  # no EOS token, no chat template, no usable samples, nothing fits max_length, ...
        raise SystemExit(f"error: {e}") from None
    train_sampler, train_loader, eval_loader, steps_per_epoch, total_steps = common.supervised_loaders(
        args, train_dataset, eval_dataset, rank, world_size, "samples"
    )
    accum = args.gradient_accumulation_steps  # micro-batches per optimizer step

    # model, optimizer, engine
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
    # generation stops at any of: the EOS, the base model's EOS list, the template's end of turn (ChatML's <|im_end|>)
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
    if args.lora_rank:  # the base frozen; the optimizer sees the adapters only
        model = lora.add_lora(model, args, "", args.model_name_or_path)
    optimizer, scheduler = common.optimizer(model, args, total_steps)
    config = common.ds_config(args, world_size)
    print0(f"deepspeed config: {json.dumps(config)}")
    engine = common.engine(model, config, (optimizer, scheduler))
    log = common.metrics_logger(partial, args, total_steps)

    def write_model(folder, state_dict):  # rank 0; state_dict: the gathered one under ZeRO-3, else None
        lora.save_pretrained(engine.module, folder, state_dict, args.save_adapter_only)  # LoRA: merged by default
        tokenizer.save_pretrained(folder)
        save_chat_template(tokenizer, args.chat_template, folder)  # the template it was trained in, for serving

    # the loop: forward, masked CE, backward; DeepSpeed owns gradient accumulation (engine.backward scales the loss
    # by 1/accum, engine.step only updates on every accum-th micro-batch)
    engine.train()
    step, micro_step, start_epoch, skip = 0, 0, 0, 0
    running = torch.zeros(3, device=engine.device)  # (sum of micro-batch losses, micro-batches, tokens)
    bar = None  # over the micro-batches to the next metrics line (at the defaults the first comes after 320 sequences)
    if resume_dir is not None:  # weights, optimizer, LR schedule, RNG, and where the loop stood
        state = load_checkpoint(resume_dir, {"model": engine})
        step, micro_step, start_epoch, skip = state["step"], state["micro_step"], state["epoch"], state["position"]
        running = torch.tensor(state["running"], device=engine.device)
    t0 = time.time()
    try:  # Ctrl-C: one line, exit 130, the .partial left in place
        if eval_loader is not None and resume_dir is None:  # step 0 (as the anchor): the untrained model's eval, to
            log(0, evaluate(engine, eval_loader, args.fused_logprobs, amp))  # compare the later ones with
            t0 = time.time()
        for epoch, position, batch in common.resumed_batches(
            train_loader, train_sampler, args.epochs, start_epoch, skip
        ):
            if bar is None:
                steps_to_line = min(args.logging_steps - step % args.logging_steps, total_steps - step)
                bar = rollout.progress(total=steps_to_line * accum - micro_step % accum, desc="train", unit="mb")
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            # 1) forward and masked next-token cross-entropy
            with amp():
                loss = batch_loss(engine, batch, args.fused_logprobs)
            # 2) backward and (on boundaries) optimizer + LR step
            engine.backward(loss)
            engine.step()
            running += torch.stack(
                [loss.detach().float(), torch.ones((), device=engine.device), batch["attention_mask"].sum().float()]
            )
            micro_step += 1
            bar.update()
            if micro_step % accum:
                continue
            step += 1
            # 3) log / eval / save
            if step % args.logging_steps == 0 or step == total_steps:
                bar.close()  # erased before the line is printed
                bar = None
                dist.all_reduce(running)
                elapsed, t0 = time.time() - t0, time.time()
                stats = {"train/loss": running[0] / running[1], "train/lr": scheduler.get_last_lr()[0]}
                log(step, {**stats, "train/epoch": step / steps_per_epoch, "perf/tok_per_sec": running[2] / elapsed})
                running.zero_()
            t_pause = time.time()  # eval and save time does not count against throughput
            eval_now = args.eval_interval and step % args.eval_interval == 0 or step == total_steps
            if eval_loader is not None and eval_now:
                log(step, evaluate(engine, eval_loader, args.fused_logprobs, amp))
            if args.save_interval and step % args.save_interval == 0 and step < total_steps:
                # a full checkpoint-<step>/: engine state, RNG, where the loop stands, this rank's running sums
                loop_state = {"epoch": epoch, "position": position, "micro_step": micro_step}
                full = dict(engines={"model": engine}, state=loop_state, save_total_limit=args.save_total_limit)
                full["rank_state"] = {"running": running.tolist()}
                save_model(engine, partial, step, write_model, vars(args), full)
            t0 += time.time() - t_pause
            if step == total_steps:
                break
        save_model(engine, partial, step, write_model, vars(args))  # the final model, arguments.json last
    except KeyboardInterrupt:
        interrupted(step, partial)

    # swap it into place atomically (the previous model stays whole until the new one is)
    if master_process:
        publish(partial, args.output_dir)
        print0(f"saved {args.output_dir}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
