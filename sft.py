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
import itertools
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path

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
# The math


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens: logits (B,T,V) at t predict labels (B,T) at t+1."""
    return cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=IGNORE_INDEX)


def lr_lambda(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """LR multiplier: linear warmup 0 -> 1 over warmup_steps, then cosine/linear decay to 0 or constant."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)  # transformers' and the anchor's rule
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress) if kind == "linear" else 1.0


# ----------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    parser.add_argument(
        "--train_datasets", type=parse_dataset, nargs="+", required=True, help="NAME[:PROPORTION[:PATH]] ..."
    )
    parser.add_argument(
        "--eval_datasets", type=parse_dataset, nargs="+", default=None, help="NAME[:PROPORTION[:PATH]] ..."
    )
    parser.add_argument("--eval_split_ratio", type=float, default=None, help="hold out this fraction of train for eval")
    parser.add_argument("--max_length", type=int, default=512, help="tokens per sequence (answers truncated)")
    parser.add_argument(
        "--chat_template",
        type=parse_chat_template,
        default="anchor",
        help=f"how conversations are written (and saved with the model): {CHAT_TEMPLATE_HELP}",
    )
    # model
    parser.add_argument("--model_name_or_path", required=True, help="HF model folder or hub id")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow custom model code from the folder/hub")
    lora.add_arguments(parser)
    parser.add_argument("--save_adapter_only", action="store_true", help="save the LoRA adapter folder, not merged")
    # optimisation
    parser.add_argument("--epochs", type=int, default=3, help="passes over the train set")
    parser.add_argument(
        "--max_steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)"
    )
    parser.add_argument("--per_device_train_batch_size", type=int, default=4, help="sequences per micro-batch per rank")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=4, help="sequences per eval batch per rank")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    parser.add_argument(
        "--lr_scheduler_type", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warmup"
    )
    parser.add_argument("--lr_warmup_ratio", type=float, default=0.03, help="fraction of steps with linear warmup")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decay (not on biases and norms)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument(
        "--fused_logprobs",
        action="store_true",
        help="the loss straight from the last hidden state "
        "(kernels/linear_logprobs.py): no (B, T, V) logits nor their gradient",
    )
    # logging
    parser.add_argument("--output_dir", required=True, help="final HF folder (written via <output_dir>.partial)")
    parser.add_argument("--logging_steps", type=int, default=10, help="optimizer steps between metrics lines")
    parser.add_argument(
        "--eval_interval", type=int, default=0, help="optimizer steps between evals (0: only at the end)"
    )
    parser.add_argument(
        "--save_interval", type=int, default=0, help="steps between full checkpoints, checkpoint-<step>/ (0: none)"
    )
    parser.add_argument(
        "--save_total_limit", type=int, default=None, help="keep the newest K checkpoints (default: all)"
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        default="auto",
        help="auto: continue from the newest checkpoint in <output_dir>.partial if any; PATH: from that checkpoint; "
        "none: start over (discards the old checkpoints)",
    )
    parser.add_argument(
        "--log_type", choices=["none", "wandb", "tensorboard"], default="none", help="extra metrics sink"
    )
    parser.add_argument("--log_project", default="nano-safe-rlhf", help="wandb project / tensorboard sub-folder")
    # system
    parser.add_argument("--seed", type=int, default=42, help="seed for data order and subsets")
    parser.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=0, help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload", choices=["none", "parameter", "optimizer", "all"], default="none", help="to CPU")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute")
    parser.add_argument("--ds_config", default=str(Path(__file__).with_name("ds_config.json")), help="DeepSpeed JSON")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; ignored")
    args = parser.parse_args()
    checkpoint.check_ranges(parser, args, checkpoint.TRAIN_RANGES)
    if args.eval_split_ratio is not None and (args.eval_datasets or not 0 < args.eval_split_ratio < 1):
        parser.error("--eval_split_ratio must be in (0, 1) and cannot be combined with --eval_datasets")
    if args.zero_stage < {"parameter": 3, "all": 3, "optimizer": 1}.get(args.offload, 0):
        parser.error(f"--offload {args.offload} needs --zero_stage 3 (parameters) or >= 1 (optimizer)")
    lora.check_arguments(parser, args)
    if args.save_adapter_only and not args.lora_rank:
        parser.error("--save_adapter_only saves a LoRA adapter: pass --lora_rank > 0")
    check_model_folder(args.model_name_or_path, "causal_lm", "--model_name_or_path")  # before any process group
    from transformers import AutoModelForCausalLM

    rollout.silence_library_bars()  # "Loading weights" / "Writing model shards": in a terminal only, as our own bars

    # distributed preamble: a plain `python sft.py` is a world of one
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed
    import torch.distributed as dist

    # ZeRO-3 on torch 2.13
    warnings.filterwarnings("ignore", ".*is deprecated. Please use `torch.distributed", FutureWarning)

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a 30 s JIT compile on CPU
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    master_process = rank == 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    torch.manual_seed(args.seed)

    def print0(*a, **k):
        if master_process:
            print(*a, **k, flush=True)

    partial = Path(f"{os.path.normpath(args.output_dir)}.partial")
    if master_process:  # lock <output_dir>, check it can be written, recover an interrupted swap: before slow work
        partial = prepare_output(args.output_dir, vars(args), args.resume_from_checkpoint)
    # the checkpoint to continue from, if any; refused (one line) when a flag that changes the result differs. The
    # eval flags may differ: evaluation draws no random numbers, so it cannot move training
    eval_flags = ("eval_interval", "eval_datasets", "per_device_eval_batch_size")
    resume_dir = find_resume(partial, args.resume_from_checkpoint, vars(args), eval_flags)

    # data; data.py reports on every rank, keep rank 0's copy
    try:
        tokenizer = load_tokenizer(args.model_name_or_path, padding_side="right", chat_template=args.chat_template)
        with contextlib.nullcontext() if master_process else contextlib.redirect_stdout(io.StringIO()):
            kwargs = dict(max_length=args.max_length, seed=args.seed, chat_template=args.chat_template)
            train_dataset = SupervisedDataset(args.train_datasets, tokenizer, **kwargs)
            eval_dataset = args.eval_datasets and SupervisedDataset(args.eval_datasets, tokenizer, **kwargs)
    except ValueError as e:  # no EOS token, no chat template, no usable samples, nothing fits max_length, ...
        raise SystemExit(f"error: {e}") from None
    collate = train_dataset.collate
    if args.eval_split_ratio:
        n_eval = max(1, round(args.eval_split_ratio * len(train_dataset)))
        train_dataset, eval_dataset = torch.utils.data.random_split(
            train_dataset, [len(train_dataset) - n_eval, n_eval], generator=torch.Generator().manual_seed(args.seed)
        )
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch = micro * accum * world_size
    if len(train_dataset) < global_batch:
        raise SystemExit(
            f"error: {len(train_dataset)} train samples < one global batch of {global_batch} "
            f"(= {micro} per device x {accum} accumulation x {world_size} ranks); lower the batch flags"
        )
    # DistributedSampler pads each rank to the same count (repeating a few samples), so every rank runs the same
    # number of forwards: ZeRO-3 gathers parameters collectively and would hang otherwise
    # the loaders get their own generators: each iter() of a loader otherwise draws from the global one, which drives
    # dropout, and a resumed run would draw again where the uninterrupted one did not
    train_sampler = torch.utils.data.DistributedSampler(train_dataset, world_size, rank, shuffle=True, seed=args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_dataset, micro, sampler=train_sampler, collate_fn=collate, generator=torch.Generator()
    )
    eval_loader = None
    if eval_dataset is not None:
        eval_sampler = torch.utils.data.DistributedSampler(eval_dataset, world_size, rank, shuffle=False)
        eval_loader = torch.utils.data.DataLoader(
            eval_dataset,
            args.per_device_eval_batch_size,
            sampler=eval_sampler,
            collate_fn=collate,
            generator=torch.Generator(),
        )
    steps_per_epoch = len(train_loader) // accum
    total_steps = args.epochs * steps_per_epoch
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    # as transformers' schedulers (the anchor's): int(ratio * steps) warm-up steps, none for "constant"
    warmup_steps = 0 if args.lr_scheduler_type == "constant" else int(args.lr_warmup_ratio * total_steps)
    print0(
        f"train {len(train_dataset):,} samples, eval {len(eval_dataset or []):,} | global batch "
        f"{global_batch} = {micro} x {accum} accum x {world_size} ranks | {total_steps} steps, {warmup_steps} warmup"
    )

    # model, optimizer, engine
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = lora.from_pretrained(  # an adapter folder: its base with the adapter folded in
        AutoModelForCausalLM.from_pretrained,
        args.model_name_or_path,
        dtype=dtype,
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
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]  # matrices decay; biases, norms not
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],  # adapters alone have no 1-d group: an empty one trips the scheduler
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, total_steps, warmup_steps, args.lr_scheduler_type)
    )
    with open(args.ds_config) as f:
        ds_config = json.load(f)
    ds_config.update(
        train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, train_batch_size=global_batch
    )
    zero = ds_config.setdefault("zero_optimization", {})
    zero["stage"] = args.zero_stage
    zero["offload_param"] = {"device": "cpu" if args.offload in ("parameter", "all") else "none"}
    zero["offload_optimizer"] = {"device": "cpu" if args.offload in ("optimizer", "all") else "none"}
    if args.offload in ("optimizer", "all"):
        ds_config["zero_force_ds_cpu_optimizer"] = False  # we pass a torch optimizer on purpose
    ds_config["bf16"] = {**ds_config.get("bf16", {}), "enabled": args.bf16}
    print0(f"deepspeed config: {json.dumps(ds_config)}")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    if args.log_type == "wandb" and master_process:
        import wandb

        wandb.init(project=args.log_project, config=vars(args))
    if args.log_type == "tensorboard" and master_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(partial / "tensorboard" / args.log_project)

    def log(step, metrics):
        metrics = {k: v.item() if torch.is_tensor(v) else v for k, v in metrics.items()}
        check_finite(metrics, step)  # all-reduced values: every rank stops together
        fmt = lambda k, v: (
            f"{k} {v:,.0f}" if k.startswith("perf/") else f"{k} {v:.2e}" if k.endswith("/lr") else f"{k} {v:.4f}"
        )
        print0(" | ".join([f"step {step}/{total_steps}"] + [fmt(k, v) for k, v in metrics.items()]))
        if master_process:
            with open(partial / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if args.log_type == "wandb":
                wandb.log(metrics, step=step)
            elif args.log_type == "tensorboard":
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)

    def loss_of(batch):
        """The batch's masked next-token cross-entropy: from the logits (B, T, V), or with --fused_logprobs from the
        log-probs the lm_head gives for one forward (kernels.head_gives_logprobs), the same number."""
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if not args.fused_logprobs:
            return sft_loss(engine(**inputs).logits, batch["labels"])
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # t predicts t + 1
        with head_gives_logprobs(engine, targets):
            return mean_nll(engine(**inputs).logits, targets, IGNORE_INDEX)  # the "logits" are log p(target): (B, T)

    def evaluate():
        engine.eval()
        totals = torch.zeros(2, device=engine.device)  # (sum of token losses, answer tokens)
        with torch.no_grad():
            for batch in rollout.progress(eval_loader, desc="eval", unit="batch"):  # rank 0, terminal (rollout.py)
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
                totals += torch.stack([loss_of(batch).float() * n, n.float()])
        dist.all_reduce(totals)
        engine.train()
        loss = totals[0] / totals[1]
        return {"eval/loss": loss, "eval/perplexity": loss.exp()}

    def save(path, loop_state=None):
        """An ordinary HF folder, arguments.json last; under ZeRO-3 all ranks gather the partitioned weights into
        rank 0's copy. Never a non-finite model: the check takes one host sync per save. With `loop_state`, a full
        checkpoint-<step>/ in `path`: the engine's DeepSpeed state, RNG states and the loop state too."""
        finite = torch.tensor(float(weights_finite(engine.module)), device=engine.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # a NaN in one rank's ZeRO partition stops every rank
        check_finite({"weights": 1.0 if finite.item() else math.nan}, step)
        state_dict = (
            engine._zero3_consolidated_16bit_state_dict() if args.zero_stage == 3 else engine.module.state_dict()
        )

        def write_model(folder):
            lora.save_pretrained(engine.module, folder, state_dict, args.save_adapter_only)  # LoRA: merged by default
            tokenizer.save_pretrained(folder)
            save_chat_template(tokenizer, args.chat_template, folder)  # the template it was trained in, for serving

        if loop_state is not None:
            rank_state = {"running": running.tolist()}  # this rank's sums since the last metrics line
            save_checkpoint(
                path, step, {"model": engine}, loop_state, write_model, vars(args), args.save_total_limit, rank_state
            )
            return
        if master_process:
            write_model(path)
            with open(Path(path) / "arguments.json", "w") as f:
                json.dump(vars(args), f, indent=2)
        dist.barrier()

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
            log(0, evaluate())  # compare the later ones with
            t0 = time.time()
        for epoch in range(start_epoch, args.epochs):
            train_sampler.set_epoch(epoch)  # the epoch's order depends on (seed, epoch) only: a resume skips into it
            for position, batch in enumerate(itertools.islice(train_loader, skip, None), start=skip + 1):
                if bar is None:
                    steps_to_line = min(args.logging_steps - step % args.logging_steps, total_steps - step)
                    bar = rollout.progress(total=steps_to_line * accum - micro_step % accum, desc="train", unit="mb")
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                # 1) forward and masked next-token cross-entropy
                loss = loss_of(batch)
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
                    log(
                        step, {**stats, "train/epoch": step / steps_per_epoch, "perf/tok_per_sec": running[2] / elapsed}
                    )
                    running.zero_()
                t_pause = time.time()  # eval and save time does not count against throughput
                eval_now = args.eval_interval and step % args.eval_interval == 0 or step == total_steps
                if eval_loader is not None and eval_now:
                    log(step, evaluate())
                if args.save_interval and step % args.save_interval == 0 and step < total_steps:
                    save(partial, {"epoch": epoch, "position": position, "micro_step": micro_step})
                t0 += time.time() - t_pause
                if step == total_steps:
                    break
            skip = 0
            if step == total_steps:
                break
        save(partial)  # the final model, arguments.json last
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
