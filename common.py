"""The plumbing every training stage shares, written once: distributed set-up and print0, the LR schedule, the
optimizer, the DeepSpeed config and engines, data loaders over a rank's shard, and the metrics line with its sinks.
Nothing here is Safe RLHF: the algorithms stay in the stage files, which read top to bottom with this one beside."""

import argparse
import atexit
import itertools
import json
import math
import os
import socket
import time
import warnings

import torch

import rollout
from checkpoint import check_finite


def is_master() -> bool:
    import torch.distributed as dist

    return dist.get_rank() == 0 if dist.is_available() and dist.is_initialized() else os.environ.get("RANK", "0") == "0"


def print0(*args, **kwargs):
    """print on rank 0 only (every rank runs the same script)."""
    if is_master():
        print(*args, **kwargs, flush=True)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group (a plain `python stage.py` is a world of one; torchrun and deepspeed set the
    variables) and pick this rank's device. Returns (rank, world_size, device)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rollout.silence_library_bars()  # transformers' loading bars in a terminal only, as ours (rank 0)
    import deepspeed
    import torch.distributed as dist

    # ZeRO-3 calls collectives that torch 2.13 deprecates: one warning per call would bury the metrics lines
    warnings.filterwarnings("ignore", ".*is deprecated. Please use `torch.distributed", FutureWarning)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo does it all; avoids a 30 s JIT build on CPU
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def clock(device) -> float:
    """time.time() once the device's queued kernels are done (a CUDA phase's kernels run after Python returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time()


def add_run_arguments(parser, unit: str = "optimizer steps") -> None:
    """The flags every training stage takes for its output, checkpoints, metrics and system (the algorithm's flags
    stay in the stage). unit: what --logging_steps and the intervals count."""
    add = parser.add_argument
    # output and checkpoints (checkpoint.py's protocol)
    add("--output_dir", required=True, help="the final HF folder (written as <output_dir>.partial, then swapped in)")
    add("--logging_steps", type=int, default=1, help=f"{unit} between metrics lines")
    add("--eval_interval", type=int, default=0, help=f"{unit} between evals (0: only at the end)")
    add("--save_interval", type=int, default=0, help=f"{unit} between full checkpoints, checkpoint-<step>/ (0: none)")
    add("--save_total_limit", type=int, help="keep the newest K checkpoints (default: all)")
    add(
        "--resume_from_checkpoint",
        default="auto",
        help="auto: continue from the newest checkpoint in <output_dir>.partial if any; PATH: from that checkpoint; "
        "none: start over (discards the old checkpoints)",
    )
    add("--log_type", choices=["none", "wandb", "tensorboard"], default="none", help="extra metrics sink")
    add("--log_project", default="nano-safe-rlhf", help="wandb project / tensorboard sub-folder")
    # system
    add("--seed", type=int, default=42, help="random seed (data order, subsets, sampling: + rank)")
    add("--trust_remote_code", action="store_true", help="allow custom model code from the folder or hub")
    add("--zero_stage", type=int, choices=[0, 1, 2, 3], default=0, help="DeepSpeed ZeRO stage of the trained models")
    add("--offload", choices=["none", "parameter", "optimizer", "all"], default="none", help="ZeRO offload to CPU")
    add("--bf16", action="store_true", help="bfloat16 weights and compute")
    add_precision_arguments(parser)
    add(
        "--ds_config",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
        help="DeepSpeed systems config (JSON)",
    )
    add("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; ignored")


def add_optimizer_arguments(parser, unit: str, epochs: int, batch: int, accum: int, lr: float, weight_decay: float):
    """The optimisation flags of a stage that learns from a fixed dataset (sft.py, score_model.py, dpo.py), with that
    stage's defaults; unit: what a batch holds ("sequences", "pairs"). Their ranges: checkpoint.TRAIN_RANGES."""
    add = parser.add_argument
    add("--epochs", type=int, default=epochs, help="passes over the train set")
    add("--max_steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)")
    add("--per_device_train_batch_size", type=int, default=batch, help=f"{unit} per micro-batch per rank")
    add("--per_device_eval_batch_size", type=int, default=batch, help=f"{unit} per eval batch per rank")
    add("--gradient_accumulation_steps", type=int, default=accum, help="micro-batches per optimizer step")
    add("--lr", type=float, default=lr, help="peak learning rate")
    add("--lr_scheduler_type", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warmup")
    add("--lr_warmup_ratio", type=float, default=0.03, help="fraction of steps with linear warmup")
    add("--weight_decay", type=float, default=weight_decay, help="AdamW decay (not on biases and norms)")
    add("--gradient_checkpointing", action="store_true", help="recompute activations in backward")


def add_precision_arguments(parser) -> None:
    """--mixed_precision and --threads (every stage, evaluate.py and chat.py too)."""
    add = parser.add_argument
    add(
        "--mixed_precision",
        choices=["no", "bf16", "auto"],
        default="no",
        help="bf16: matmuls in bfloat16 under torch.autocast while weights, gradients, optimizer and saved models stay "
        "fp32 (a small learning rate still moves the model; --bf16 instead makes the weights themselves bf16); auto: "
        "bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with avx512_bf16 or AMX), else fp32",
    )
    add("--threads", type=int, default=None, help="CPU threads (default: OMP_NUM_THREADS, else the idle cores)")


def check_run_arguments(parser, args) -> None:
    """The checks of add_run_arguments' flags: --offload needs the ZeRO stage that partitions what it offloads."""
    if args.zero_stage < {"parameter": 3, "all": 3, "optimizer": 1}.get(args.offload, 0):
        parser.error(f"--offload {args.offload} needs --zero_stage 3 (parameters) or >= 1 (optimizer)")
    check_precision_arguments(parser, args)


def check_precision_arguments(parser, args) -> None:
    if args.bf16 and args.mixed_precision == "bf16":
        parser.error("--bf16 (bf16 weights) and --mixed_precision bf16 (fp32 weights, bf16 compute) exclude each other")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")


def native_bf16(device: torch.device, cpuinfo: str | None = None) -> tuple[bool, str]:
    """(whether the device computes bf16 natively, why): CUDA asks torch; a CPU its /proc/cpuinfo flags (avx512_bf16,
    AMX's amx_bf16, Arm's bf16). Without bf16 units torch emulates bf16 and is slower than fp32."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'has' if ok else 'lacks'} bf16"
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False, "no /proc/cpuinfo to read the CPU's flags from"
    flags = set()
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):  # x86, Arm
            flags.update(line.split(":", 1)[1].split())
    found = [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags]
    return bool(found), f"the CPU has {found[0]}" if found else "the CPU has neither avx512_bf16 nor AMX"


def choose_threads(requested: int | None, local_world_size: int = 1) -> tuple[int, str]:
    """CPU threads for this process: --threads, else OMP_NUM_THREADS, else this rank's share of the cores that other
    work leaves idle now (at least 1). On a shared 2-core machine two threads beside another busy
    process ran 3-8x slower than one; on an idle one they ran 1.3-1.7x faster."""
    if requested:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = busy_cores()
    idle = max(1, min(cores, math.floor(cores - busy + 0.5)))
    return max(1, idle // local_world_size), f"{cores} cores, {busy:.1f} busy, {local_world_size} rank(s) here"


def busy_cores(seconds: float = 0.3) -> float:
    """How many cores other work keeps busy now: /proc/stat's busy share over a short window times the machine's
    cores (the load average lags by a minute: a stage that just ended would still count); 0 where unreadable."""

    def jiffies():
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        (idle0, total0), _, (idle1, total1) = jiffies(), time.sleep(seconds), jiffies()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def compute_setup(args, device: torch.device):
    """Settle the precision and the CPU threads, say both in one line, and return amp(): the context the forward
    passes run in (torch.autocast to bf16, or a no-op)."""
    mode, why = args.mixed_precision, ""
    if mode == "auto":
        native, why = native_bf16(device)
        mode = "bf16" if native and not args.bf16 else "no"
        why = f" ({why}{'; --bf16 weights' if args.bf16 else ''})"
    use_bf16 = mode == "bf16"
    line = "bf16 weights and compute" if args.bf16 else "bf16 autocast, fp32 weights" if use_bf16 else "fp32"
    line = f"precision: {line}{why}"
    if device.type == "cpu":
        threads, how = choose_threads(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(threads)
        line += f" | {threads} CPU thread{'s' * (threads > 1)} ({how})"
    print0(line)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def str2bool(text: str) -> bool:
    """argparse type for the anchor's `--flag True/False` style."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# ----------------------------------------------------------------------------------------------------------------
# Optimisation


def lr_schedule(kind: str, total_steps: int, warmup_ratio: float):
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


def optimizer(model, args, total_steps: int, prefix: str = ""):
    """A client torch AdamW (betas 0.9/0.95, as the anchor; no decay on biases and norms) over the trainable
    parameters (LoRA: the adapters and any trained head), and its LambdaLR schedule, from the flags `<prefix>lr`,
    `<prefix>weight_decay`, `<prefix>lr_scheduler_type`, `<prefix>lr_warmup_ratio` (ppo_lag.py: prefix actor_ or
    critic_). Returns (optimizer, scheduler). DeepSpeed's own FusedAdam/CPUAdam would JIT-compile for ~40 s and need a
    toolchain; the update rule is the same. With --mixed_precision, torch's fused kernel (on CPU 7x faster than the
    default for 135M parameters: 0.07 s a step instead of 0.46; equal to it within float rounding, not bit for bit, so
    the fp32 path keeps the default)."""
    flag = lambda name: getattr(args, prefix + name)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": flag("weight_decay")},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = args.mixed_precision != "no" or None  # None: torch's default (foreach)
    # an empty group (adapters alone have no 1-d one) trips the scheduler
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=flag("lr"), betas=(0.9, 0.95), fused=fused)
    schedule = lr_schedule(flag("lr_scheduler_type"), total_steps, flag("lr_warmup_ratio"))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def ds_config(args, world_size: int, train: bool = True, micro_batch: int | None = None, accum: int | None = None):
    """The DeepSpeed config: --ds_config (the systems settings) with the batch sizes, ZeRO stage, offload and bf16
    of this run. Trained engines use --zero_stage; frozen ones ZeRO-3 when the trained ones do, else none."""
    with open(args.ds_config) as f:
        config = json.load(f)
    micro = micro_batch or args.per_device_train_batch_size
    accum = accum or getattr(args, "gradient_accumulation_steps", 1)
    config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        train_batch_size=micro * accum * world_size,
    )
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = args.zero_stage if train or args.zero_stage == 3 else 0
    offload = getattr(args, "offload", "none")
    zero["offload_param"] = {"device": "cpu" if offload in ("parameter", "all") and zero["stage"] == 3 else "none"}
    zero["offload_optimizer"] = {"device": "cpu" if train and offload in ("optimizer", "all") else "none"}
    config["zero_force_ds_cpu_optimizer"] = False  # we pass a torch AdamW on purpose
    config["bf16"] = {**config.get("bf16", {}), "enabled": args.bf16}
    return config


def engine(model, config: dict, optimizer_and_scheduler=None):
    """A DeepSpeed engine: trained with (optimizer, scheduler), else frozen (no gradients, eval mode)."""
    import deepspeed

    if optimizer_and_scheduler is None:
        model.requires_grad_(False)
        frozen = deepspeed.initialize(model=model, config=config)[0]
        frozen.eval()  # (DeepSpeedEngine.eval returns None)
        return frozen
    opt, sched = optimizer_and_scheduler
    return deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)[0]


def sharded_loader(dataset, batch_size: int, rank: int, world_size: int, seed: int, shuffle=True, drop_last=False):
    """(sampler, loader) over this rank's shard. DistributedSampler pads each rank to the same count, so every rank
    runs the same number of forwards (ZeRO-3 gathers collectively and would hang otherwise). The loader gets its own
    generator: each iter() of a loader otherwise draws from the global one, which drives dropout and sampling, and a
    resumed run would draw again where the uninterrupted one did not."""
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed)
    collate = getattr(dataset, "collate", None) or dataset.dataset.collate  # a random_split Subset: its dataset's
    loader = torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last, generator=torch.Generator()
    )
    return sampler, loader


def supervised_loaders(args, train_dataset, eval_dataset, rank: int, world_size: int, unit: str, note: str = ""):
    """The loaders of a stage that learns from a fixed dataset (sft.py, score_model.py, dpo.py) and its length in
    optimizer steps, printed in one line: (train_sampler, train_loader, eval_loader or None, steps_per_epoch,
    total_steps). --eval_split_ratio holds out a seeded slice of the train set; the train set must fill one global
    batch; the eval loader keeps its order."""
    if getattr(args, "eval_split_ratio", None):
        n_eval = max(1, round(args.eval_split_ratio * len(train_dataset)))
        train_dataset, eval_dataset = torch.utils.data.random_split(
            train_dataset, [len(train_dataset) - n_eval, n_eval], generator=torch.Generator().manual_seed(args.seed)
        )
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch = micro * accum * world_size
    if len(train_dataset) < global_batch:
        raise SystemExit(
            f"error: {len(train_dataset)} train {unit} < one global batch of {global_batch} "
            f"(= {micro} per device x {accum} accumulation x {world_size} ranks); lower the batch flags"
        )
    train_sampler, train_loader = sharded_loader(train_dataset, micro, rank, world_size, args.seed)
    eval_loader = None
    if eval_dataset:
        size = args.per_device_eval_batch_size
        eval_loader = sharded_loader(eval_dataset, size, rank, world_size, args.seed, shuffle=False)[1]
    steps_per_epoch = len(train_loader) // accum
    total_steps = args.epochs * steps_per_epoch
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    warmup_steps = 0 if args.lr_scheduler_type == "constant" else int(args.lr_warmup_ratio * total_steps)
    print0(
        f"train {len(train_dataset):,} {unit}, eval {len(eval_dataset or []):,} | global batch {global_batch} = "
        f"{micro} x {accum} accum x {world_size} ranks | {total_steps} steps, {warmup_steps} warmup{note}"
    )
    return train_sampler, train_loader, eval_loader, steps_per_epoch, total_steps


def resumed_batches(loader, sampler, epochs: int, start_epoch: int = 0, skip: int = 0):
    """(epoch, position in the epoch, batch) for every batch of every epoch, from where a resumed run stood: an
    epoch's order depends on (seed, epoch) only, so a resume skips `skip` batches into epoch `start_epoch`."""
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        for position, batch in enumerate(itertools.islice(loader, skip, None), start=skip + 1):
            yield epoch, position, batch
        skip = 0


# ----------------------------------------------------------------------------------------------------------------
# The metrics line and its sinks


def metrics_logger(run_dir, args, total_steps: int):
    """log(step, metrics, head=None): all-reduced metrics (floats or 0-d tensors) -> a non-finite one stops the run
    (every rank together), then on rank 0 one printed line `step s/total | name value | ...`, one metrics.jsonl row
    in run_dir, and the --log_type sink (wandb or tensorboard under run_dir/tensorboard/<log_project>)."""
    sink = None
    if is_master() and args.log_type == "wandb":
        import wandb

        sink = wandb.init(project=args.log_project, config=vars(args)).log
    elif is_master() and args.log_type == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard", args.log_project))
        atexit.register(writer.close)  # flushes the last events
        sink = lambda metrics, step: [writer.add_scalar(k, v, step) for k, v in metrics.items()]

    def fmt(key, value):
        return (
            f"{key} {value:,.0f}"
            if key.startswith("perf/")
            else f"{key} {value:.2e}"
            if key.endswith("/lr")
            else (f"{key} {value:.4g}")
        )

    def log(step, metrics, head=None):
        metrics = {k: v.item() if torch.is_tensor(v) else v for k, v in metrics.items()}
        check_finite(metrics, step)
        print0(" | ".join([head or f"step {step}/{total_steps}"] + [fmt(k, v) for k, v in metrics.items()]))
        if is_master():
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if sink:
                sink(metrics, step=step)

    return log
