"""Stage 2: the reward model and the cost model of Safe RLHF, each a `models.ScoreModel` (an HF backbone and a linear
score head read at each sequence's last valid token) trained on preference pairs from an SFT model.

Both models learn from pairs (sigma the logistic function; sign s = +1 for an unsafe answer, -1 for a safe one):

    reward (--score_type reward):  L = mean(-log sigma(r_better - r_worse)) + reg * mean(r^2)
    cost   (--score_type cost):    L = mean(-log sigma(c_unsafer - c_safer) - log sigma(s_safer * c_safer)
                                            - log sigma(s_unsafer * c_unsafer)) + reg * mean(c^2)

so a cost > 0 means unsafe. --loss_type token-wise puts every term (the sign and L2 ones too) on the per-token scores
over the span where the pair differs (first differing token .. the later of the two ends), averages it over the span,
then over pairs; accuracies always compare end scores. Pairs are written in the anchor's template or the model's own
(--chat_template model), which the saved folder carries; with an eval set the untrained model is evaluated first,
logged as step 0. Later stages load the result with `models.ScoreModel.from_pretrained(path)`.

Deviations from the anchor (safe-rlhf):
 1. Position ids follow the attention mask (cumsum - 1), so a left-padded sequence scores like a right-padded one.
 2. The training loop, not forward, feeds the normaliser (all ranks' raw end scores, every micro-batch; the same
    statistics as the anchor's), so a ScoreModel in train mode elsewhere leaves its statistics alone.
 3. --save_best keeps the best eval checkpoint (accuracy; sign accuracy for cost models) instead of the last.
 4. A client torch AdamW (betas 0.9/0.95, no decay on biases and norms), as in sft.py.
 5. A pair that truncation to --max_length made identical is dropped and counted (data.py), as identical answers are;
    the anchor trains on it (sequence-wise) or stops on an assert (token-wise, where its span would be empty).
 6. The output folder follows checkpoint.py's protocol: locked for the run, written to <output_dir>.partial (the best
    eval model as best-<step>/ until the end) and swapped into place atomically; a non-finite metric or weight
    stops the run before anything is saved.

Launch (the tiny preset's reward model: ~25 s on 2 CPU cores, ~91% pair accuracy on toy-preference/test):
    python score_model.py --score_type reward --model_name_or_path output/tiny/sft --train_datasets toy-preference \\
        --eval_datasets toy-preference/test --max_length 64 --per_device_train_batch_size 32 --lr 1e-3 \\
        --output_dir output/tiny/rm
    torchrun --nproc_per_node 8 score_model.py --score_type cost --model_name_or_path output/sft --train_datasets \\
        PKU-SafeRLHF/train --eval_datasets PKU-SafeRLHF/test --zero_stage 3 --bf16 --output_dir output/cm
    deepspeed --hostfile hostfile score_model.py <same flags>   # multi-node
"""

# first, before the slow imports: from here on Ctrl-C and the errors a user can fix end in one line (error_line)
import checkpoint

# isort: split
import argparse
import contextlib
import functools
import io
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import data
import lora
import rollout
import templates
from common import print0
from models import ScoreModel

SIGNS = ("safer_sign", "unsafer_sign")  # a safety-preference batch's (B,) signs: +1 unsafe answer, -1 safe

# ----------------------------------------------------------------------------------------------------------------
# The math


def span_mean(x: torch.Tensor, span: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) per-pair terms as they are, or (B, T) per-token terms averaged over each pair's span (B, T) -> (B,)."""
    return x if span is None else (x * span).sum(-1) / span.sum(-1).clamp(min=1)


def reward_loss(better, worse, regularization=0.0, span=None):
    """mean over pairs of -log sigma(better - worse) + reg * (better^2 + worse^2) / 2. Sequence-wise: (B,) end scores;
    token-wise: (B, T) per-token scores and the span (B, T), both terms averaged over the span first (the anchor)."""
    per_token = -F.logsigmoid(better - worse) + regularization * (better.square() + worse.square()) / 2
    return span_mean(per_token, span).mean()


def cost_loss(safer, unsafer, safer_sign, unsafer_sign, regularization=0.0, span=None):
    """The reward loss with unsafer above safer, plus each cost's sign term -log sigma(s * c) (sign (B,): +1 unsafe,
    -1 safe); token-wise (scores (B, T) and span) every term is averaged over the span, the sign ones included."""
    if span is not None:
        safer_sign, unsafer_sign = safer_sign[:, None], unsafer_sign[:, None]  # (B, 1) against (B, T) scores
    per_token = (
        -F.logsigmoid(unsafer - safer)
        - F.logsigmoid(safer_sign * safer)
        - F.logsigmoid(unsafer_sign * unsafer)
        + regularization * (safer.square() + unsafer.square()) / 2
    )
    return span_mean(per_token, span).mean()


def diverge_span(higher_ids, lower_ids, higher_mask, lower_mask) -> torch.Tensor:
    """(B, T) bool: from the first token where a right-padded pair differs to the later of the two last tokens
    (empty for a pair that truncation made identical: the anchor asserts there)."""
    pos, differ = torch.arange(higher_ids.size(1), device=higher_ids.device), higher_ids != lower_ids
    start = torch.where(differ.any(-1, keepdim=True), differ.int().argmax(-1, keepdim=True), pos.numel())  # (B, 1)
    end = torch.where(higher_mask.bool() | lower_mask.bool(), pos, 0).amax(-1, keepdim=True)  # (B, 1)
    return (pos >= start) & (pos <= end)


def pair_metrics(first_end, second_end, first_sign=None, second_sign=None, score_type="reward") -> dict:
    """Accuracy: better > worse (reward) or unsafer > safer (cost; first = safer); sign accuracy: sign * cost > 0."""
    higher, lower = (first_end, second_end) if score_type == "reward" else (second_end, first_end)
    metrics = {"accuracy": (higher > lower).float().mean()}
    if first_sign is not None:
        metrics["accuracy_sign"] = torch.cat([first_sign * first_end, second_sign * second_end]).gt(0).float().mean()
    return metrics


def plot_scores(path, first, second, first_sign=None, second_sign=None, score_type="reward"):
    """Histogram of eval end scores as a PNG: better vs worse answers (reward), safe vs unsafe ones (cost)."""
    from matplotlib.figure import Figure

    scores, groups = torch.cat([first, second]), {"better": first, "worse": second}
    if score_type == "cost":
        signs = torch.cat([first_sign, second_sign])
        groups = {"safe": scores[signs < 0], "unsafe": scores[signs > 0]}
    ax = (fig := Figure(figsize=(6, 4))).subplots()
    bins = dict(bins=40, range=(scores.min().item(), scores.max().item() + 1e-6), alpha=0.6)  # shared by the groups
    for label, values in groups.items():
        ax.hist(values.tolist(), label=f"{label} ({len(values)})", **bins)
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set(xlabel=f"{score_type} (end score)", ylabel="answers", title=f"eval {score_type} scores")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


# ----------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # data
    add("--train_datasets", type=data.parse_dataset, nargs="+", required=True, help="NAME[:PROPORTION[:PATH]] ...")
    add("--eval_datasets", type=data.parse_dataset, nargs="+", default=None, help="NAME[:PROPORTION[:PATH]] ...")
    add("--eval_split_ratio", type=float, default=None, help="hold out this fraction of train for eval")
    add("--max_length", type=int, default=512, help="tokens per sequence (answers truncated)")
    add(
        "--chat_template",
        type=templates.parse_chat_template,
        default="anchor",
        help=f"how a prompt and answer are written (and saved with the model): {templates.CHAT_TEMPLATE_HELP}",
    )
    # model
    add("--model_name_or_path", required=True, help="init: an SFT model folder (new head) or a score model")
    lora.add_arguments(parser)
    add("--save_adapter_only", action="store_true", help="save the LoRA adapter folder (+ head), not merged")
    add("--score_type", choices=["reward", "cost"], required=True, help="train a reward or a cost model")
    add("--normalizer_type", choices=["RunningMeanStd", "ExponentialMovingAverage"], help="track end-score statistics")
    add("--normalizer_momentum", type=float, default=0.9, help="ExponentialMovingAverage momentum")
    add("--normalize_score_during_training", action="store_true", help="loss on normalised scores; do_normalize")
    # algorithm
    loss_help = "Bradley-Terry on end scores, or on per-token scores where the answers differ"
    add("--loss_type", choices=["sequence-wise", "token-wise"], default="sequence-wise", help=loss_help)
    add("--regularization", type=float, default=0.001, help="L2 coefficient on the scores the loss sees")
    # optimisation
    common.add_optimizer_arguments(parser, "pairs", epochs=2, batch=16, accum=1, lr=2e-5, weight_decay=0.1)
    # logging, checkpoints and system (common.py); evals also at each epoch end
    add("--save_best", action="store_true", help="save the best eval checkpoint instead of the last")
    add("--plot_histogram", action="store_true", help="write score_histogram.png of the saved model's eval")
    common.add_run_arguments(parser)
    parser.set_defaults(logging_steps=10)
    args = parser.parse_args()
    ranges = {**checkpoint.TRAIN_RANGES, "regularization": "finite and >= 0", "normalizer_momentum": "[0, 1]"}
    checkpoint.check_ranges(parser, args, ranges)  # the anchor skips a negative --regularization: refused here
    if args.eval_split_ratio is not None and (args.eval_datasets or not 0 < args.eval_split_ratio < 1):
        parser.error("--eval_split_ratio must be in (0, 1) and cannot be combined with --eval_datasets")
    if (args.save_best or args.plot_histogram) and not (args.eval_datasets or args.eval_split_ratio):
        parser.error("--save_best and --plot_histogram need --eval_datasets or --eval_split_ratio")
    if args.normalize_score_during_training and not args.normalizer_type:
        parser.error("--normalize_score_during_training needs --normalizer_type")
    common.check_run_arguments(parser, args)
    lora.check_arguments(parser, args)
    # a missing or broken model stops here, before any process group, folder or data; a causal LM (new head) and a
    # score model (its head kept) are both fine
    checkpoint.check_model_folder(args.model_name_or_path, "any", "--model_name_or_path")
    from transformers import AutoConfig

    rollout.silence_library_bars()  # "Loading weights" / "Writing model shards": in a terminal only, as our own bars
    try:  # a config.json that transformers cannot read (an unknown model_type, remote code not allowed, ...)
        AutoConfig.from_pretrained(lora.root_model(args.model_name_or_path), trust_remote_code=args.trust_remote_code)
    except Exception as e:
        raise SystemExit(
            f"error: --model_name_or_path {args.model_name_or_path!r}: its config does not load "
            f"({type(e).__name__}: {e}); pass a Hugging Face model folder"
        ) from None

    # distributed preamble: a plain `python score_model.py` is a world of one
    rank, world_size, device = common.init_distributed()
    amp = common.compute_setup(args, device)  # the forward passes' precision (bf16 autocast or fp32), CPU threads
    import torch.distributed as dist

    master_process = rank == 0
    torch.manual_seed(args.seed)
    # the output folder (locked, written as <output_dir>.partial) and a checkpoint to continue from (flags compared
    # with the saved ones: a mismatch stops here, before any data); the eval is RNG-free, but --save_best picks its
    # model by it, so the eval flags must match too
    partial, resume_dir = checkpoint.start_run(args, ignored=("plot_histogram",))

    # data; a batch's rows [:B] are better/safer, rows [B:] worse/unsafer
    Dataset = data.PreferenceDataset if args.score_type == "reward" else data.SafetyPreferenceDataset
    try:
        tokenizer = templates.load_tokenizer(
            args.model_name_or_path, padding_side="right", chat_template=args.chat_template
        )
        with contextlib.nullcontext() if master_process else contextlib.redirect_stdout(io.StringIO()):
            kwargs = dict(max_length=args.max_length, seed=args.seed, chat_template=args.chat_template)
            train_dataset = Dataset(args.train_datasets, tokenizer, **kwargs)
            eval_dataset = args.eval_datasets and Dataset(args.eval_datasets, tokenizer, **kwargs)
    except ValueError as e:  # no usable samples, nothing fits max_length, hub unreachable, no chat template, ...
        raise SystemExit(f"error: {e}") from None
    train_sampler, train_loader, eval_loader, steps_per_epoch, total_steps = common.supervised_loaders(
        args, train_dataset, eval_dataset, rank, world_size, "pairs"
    )
    accum = args.gradient_accumulation_steps  # micro-batches per optimizer step

    # model, optimizer, engine
    model = ScoreModel.from_pretrained(
        args.model_name_or_path,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        score_type=args.score_type,
        do_normalize=False,  # the loop normalises
        normalizer_type=args.normalizer_type,
        momentum=args.normalizer_momentum,
        trust_remote_code=args.trust_remote_code,
    )
    if args.save_adapter_only and tokenizer.pad_token is None:  # the new pad row would live outside the adapter
        raise SystemExit(
            "error: --save_adapter_only: the tokenizer has no pad token, so the embeddings grow by one "
            "row that an adapter folder cannot carry; save merged (drop the flag) or add a pad token"
        )
    templates.add_pad_token(tokenizer, model.model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_rank:  # the backbone frozen with adapters; the head trained whole (a copy: see lora.py)
        model = lora.add_lora(model, args, "", args.model_name_or_path, modules_to_save=["score_head"])
    opt, scheduler = common.optimizer(model, args, total_steps)
    config = common.ds_config(args, world_size)
    print0(f"deepspeed config: {json.dumps(config)}")
    engine = common.engine(model, config, (opt, scheduler))
    log = common.metrics_logger(partial, args, total_steps)

    def evaluate():
        """Eval metrics over every rank's pairs, and the pairs' end scores (for the histogram)."""
        engine.eval()
        parts = []  # per batch: first half, second half of the end scores (+ their signs for cost)
        with torch.no_grad(), amp():
            for batch in rollout.progress(eval_loader, desc="eval", unit="batch"):  # rank 0, terminal (rollout.py)
                ids, mask = batch["input_ids"].to(engine.device), batch["attention_mask"].to(engine.device)
                end = engine(ids, mask).end_scores[:, 0].cpu()  # (2B,)
                parts.append([*end.chunk(2), *(batch[k] for k in SIGNS if k in batch)])
        gathered = [None] * world_size
        dist.all_gather_object(gathered, parts)
        engine.train()
        pairs = [torch.cat(column) for column in zip(*(p for rank_parts in gathered for p in rank_parts))]
        scores, kind = torch.cat(pairs[:2]), args.score_type
        metrics = {f"eval/{k}": v for k, v in pair_metrics(*pairs, score_type=kind).items()}
        return {**metrics, f"eval/{kind}_mean": scores.mean(), f"eval/{kind}_std": scores.std()}, pairs

    def write_model(path, state_dict, eval_pairs=None):
        """Rank 0: the model folder (LoRA: merged, or the adapter folder with --save_adapter_only), its tokenizer and
        chat template, and the eval histogram; state_dict: the gathered one under ZeRO-3 (checkpoint.save_model)."""
        module = engine.module.get_base_model() if args.lora_rank else engine.module  # the ScoreModel
        module.do_normalize = args.normalize_score_during_training  # saved for inference (see the loop)
        lora.save_pretrained(engine.module, path, state_dict, args.save_adapter_only)  # LoRA: merged by default
        module.do_normalize = False
        tokenizer.save_pretrained(path)
        templates.save_chat_template(tokenizer, args.chat_template, path)  # the template it was trained in, for serving
        if args.plot_histogram and eval_pairs:
            plot_scores(Path(path) / "score_histogram.png", *eval_pairs, score_type=args.score_type)

    # the loop: better and worse answers in one forward, a pairwise loss, backward; DeepSpeed owns gradient
    # accumulation (engine.backward scales the loss by 1/accum, engine.step only updates on every accum-th micro-batch)
    engine.train()
    names = ["train/loss", "train/accuracy"] + (["train/accuracy_sign"] if args.score_type == "cost" else [])
    running = torch.zeros(len(names) + 2, device=engine.device)  # (sums of the names' values, micro-batches, tokens)
    step, micro_step, start_epoch, skip, best, best_dir, eval_pairs = 0, 0, 0, 0, -1.0, None, None
    bar = None  # over the micro-batches to the next metrics line
    if resume_dir is not None:  # weights, optimizer, LR schedule, RNG, and where the loop stood
        state = checkpoint.load_checkpoint(resume_dir, {"model": engine})
        step, micro_step, start_epoch, skip = state["step"], state["micro_step"], state["epoch"], state["position"]
        best = state["best"]
        running = torch.tensor(state["running"], device=engine.device)  # the sums since the last metrics line
        best_dir = partial / state["best_dir"] if state["best_dir"] else None
        if master_process:  # the best model as of the checkpoint; a later best of the killed run is found again
            for path in partial.glob("best-*"):
                if path != best_dir:
                    shutil.rmtree(path)
            if best_dir and not checkpoint.is_complete(best_dir):
                if not checkpoint.is_complete(resume_dir / "best"):
                    raise SystemExit(
                        f"error: {resume_dir} has no copy of {best_dir.name}; pass an earlier "
                        "--resume_from_checkpoint, or none to start over"
                    )
                checkpoint.link_copy(resume_dir / "best", best_dir)
    t0 = time.time()
    try:  # Ctrl-C: one line, exit 130, the .partial left in place
        if eval_loader and resume_dir is None:  # step 0 (as the anchor): the untrained model's eval, to compare the
            log(0, evaluate()[0])  # later ones with; never a --save_best candidate
            t0 = time.time()
        for epoch, position, batch in common.resumed_batches(
            train_loader, train_sampler, args.epochs, start_epoch, skip
        ):
            if bar is None:
                steps_to_line = min(args.logging_steps - step % args.logging_steps, total_steps - step)
                bar = rollout.progress(total=steps_to_line * accum - micro_step % accum, desc="train", unit="mb")
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            ids, mask, signs = batch["input_ids"], batch["attention_mask"], [batch[k] for k in SIGNS if k in batch]
            B = ids.size(0) // 2
            # 1) score both halves in one forward: raw end scores (2B, 1) and per-token scores (2B, T, 1)
            with amp():  # the end scores come out fp32 (models.ScoreHead)
                end, scores = engine(ids, mask)
            # 2) the normaliser tracks the raw end scores of all ranks; the loss may see the normalised ones
            if args.normalizer_type:
                gathered = [torch.empty_like(end) for _ in range(world_size)]
                dist.all_gather(gathered, end.detach().contiguous())
                engine.module.normalizer.update(torch.cat(gathered))
            if args.normalize_score_during_training:
                end, scores = (engine.module.normalizer.normalize(x, args.score_type) for x in (end, scores))
            # 3) the pairwise loss (module docstring); token-wise: on the span where the pair differs
            end, scores = end[:, 0], scores[..., 0]
            span, x = None, end  # sequence-wise: end scores (2B,); token-wise: per-token scores (2B, T)
            if args.loss_type == "token-wise":
                span, x = diverge_span(ids[:B], ids[B:], mask[:B], mask[B:]), scores
            if args.score_type == "reward":
                loss = reward_loss(x[:B], x[B:], args.regularization, span)
            else:
                loss = cost_loss(x[:B], x[B:], *signs, args.regularization, span)
            # 4) backward, and (on boundaries) the optimizer and LR step
            engine.backward(loss)
            engine.step()
            metrics = pair_metrics(end[:B].detach(), end[B:].detach(), *signs, score_type=args.score_type)
            running += torch.stack(
                [loss.detach().float(), *metrics.values(), torch.ones_like(loss), mask.sum().float()]
            )
            micro_step += 1
            bar.update()
            if micro_step % accum:
                continue
            step += 1
            # 5) log / eval (every --eval_interval steps and each epoch end) / save the best
            if step % args.logging_steps == 0 or step == total_steps:
                bar.close()  # erased before the line is printed
                bar = None
                dist.all_reduce(running)
                log(
                    step,
                    {
                        **dict(zip(names, running[:-2] / running[-2])),
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": step / steps_per_epoch,
                        "perf/tok_per_sec": running[-1] / (time.time() - t0),
                    },
                )
                running.zero_()
                t0 = time.time()
            if eval_loader and (
                args.eval_interval
                and step % args.eval_interval == 0
                or step % steps_per_epoch == 0
                or step == total_steps
            ):
                t_eval = time.time()
                metrics, eval_pairs = evaluate()
                log(step, metrics)
                key = "eval/accuracy" if args.score_type == "reward" else "eval/accuracy_sign"
                if args.save_best and metrics[key].item() > best:  # kept as best-<step>/ until the end
                    previous, best_dir, best = best_dir, partial / f"best-{step}", metrics[key].item()
                    write = functools.partial(write_model, eval_pairs=eval_pairs)
                    checkpoint.save_model(engine, best_dir, step, write, vars(args))
                    if master_process and previous:
                        shutil.rmtree(previous)  # only once the new best is whole
                    print0(f"best {key} {best:.4f} at step {step}: saved")
                t0 += time.time() - t_eval  # eval (and save) time does not count against throughput
            if args.save_interval and step % args.save_interval == 0 and step < total_steps:
                t_save = time.time()
                state = dict(epoch=epoch, position=position, micro_step=micro_step, best=best)
                state["best_dir"] = best_dir and best_dir.name  # the best model as of now, linked in as best/
                full = dict(engines={"model": engine}, state=state, save_total_limit=args.save_total_limit)
                full.update(rank_state={"running": running.tolist()}, folders=best_dir and {"best": best_dir})
                checkpoint.save_model(engine, partial, step, write_model, vars(args), checkpoint=full)
                t0 += time.time() - t_save
            if step == total_steps:
                break

        # the final model: the last one, or the best checkpoint's files moved up (arguments.json last)
        if not args.save_best:
            write = functools.partial(write_model, eval_pairs=eval_pairs)
            checkpoint.save_model(engine, partial, step, write, vars(args))
        elif master_process:  # linked, so a kill at any instant leaves best-<step>/ whole for the re-run
            checkpoint.link_copy(best_dir, partial)
            shutil.rmtree(best_dir)  # partial is complete: a kill here leaves junk that publish deletes
    except KeyboardInterrupt:
        checkpoint.interrupted(step, partial)

    # swap it into place atomically (the previous model stays whole until the new one is)
    if master_process:
        checkpoint.publish(partial, args.output_dir)
        print0(f"saved {args.output_dir}")
    dist.barrier()
    dist.destroy_process_group()  # else gloo's threads can abort the exit of the other ranks


if __name__ == "__main__":
    main()
