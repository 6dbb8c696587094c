"""Benchmark: each kernel against the plain PyTorch every peer runs. Not a test; never in CI.

    python kernels/bench.py            # realistic shapes (CPU: a few minutes on 2 cores)
    python kernels/bench.py --quick    # shrunken shapes
    python kernels/bench.py --only lm_head  # one kernel's rows

Whole models (generation vs training time, a PPO actor micro-batch's and a PPO-Lag step's memory) are measured by
scripts/bench.py, outside kernels/: nothing here imports a stage.

Baselines: log-probs = full `log_softmax(logits.float())` + `gather` (safe-rlhf, DeepSpeed-Chat, trlX,
ColossalChat), and the same two lines under `torch.compile` (row "compile": the strongest peer a user gets for
free; its compile time is excluded from the timings and printed beside the row); GAE = the per-step Python loop;
end-score = per-token linear head + a per-row `nonzero()`; lm_head+logprobs (forward + backward from the last hidden
state) = `hidden @ W^T` then the peer's log-probs, beside "unfused" (`hidden @ W^T` then
kernels.logprobs: ppo_lag.py's default) and ours, kernels.linear_logprobs (ppo_lag.py --fused_logprobs); its GB/s
column counts only hidden, weight and their gradients (the call is GEMM-bound), so read its time and memory.
Columns: time per call (the best of --repeats: other processes on a shared CPU only ever add time), effective
GB/s (the bytes a call must move at least, inputs read once and outputs written once, over the time; the same
byte count for both rows), peak extra memory (above the inputs, outputs included), and on a GPU the fraction
of the HBM peak (H100 3.35 TB/s, H200 4.8 TB/s). Speedup and memory ratio are baseline / ours.

Peak memory. GPU: `torch.cuda.max_memory_allocated()` after a reset, minus what was allocated before the call.
CPU: torch has no CPU allocator statistics and tracemalloc does not see its buffers, so each measurement runs
in a fresh subprocess that builds the inputs, makes a warm-up call, resets the kernel's resident-set high-water
mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), makes one more call and reports VmHWM - VmRSS-before:
the real peak of resident memory the call added, whoever allocated it. The subprocess runs with a fixed 1 MiB
glibc mmap threshold, so every large buffer is mapped when allocated and unmapped when freed and RSS follows
the live tensors (timings are taken in the parent, with the default allocator). CPU timings on a shared machine
are noisy (torch's OpenMP threads stall when another process holds a core), hence the best of several calls,
and more for cheap kernels; `--threads 1` is steadier.
"""

import argparse
import ctypes
import functools
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# `python kernels/bench.py` from anywhere: the repository root goes on the path before kernels/ is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
kernels = importlib.import_module("kernels")
end_scores, gae, logprobs, linear_logprobs = kernels.end_scores, kernels.gae, kernels.logprobs, kernels.linear_logprobs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, by device-name substring

# ----------------------------------------------------------------------------------------------------------
# Baselines: what the peers do.


def peer_logprobs(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def peer_gae(rewards, values, mask, gamma, lam):
    values, rewards = values * mask, rewards * mask
    T = rewards.size(1)
    last, reversed_adv = 0.0, []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    adv = torch.stack(reversed_adv[::-1], dim=1)
    return adv, adv + values


def peer_end_scores(hidden, mask, weight, bias):
    scores = F.linear(hidden, weight, bias)  # (B, T, D) in hidden's dtype
    end_index = torch.cat([m.nonzero()[-1] for m in mask])  # one host sync per row
    return scores[torch.arange(hidden.size(0), device=hidden.device), end_index].float(), scores.float()


# ----------------------------------------------------------------------------------------------------------
# Cases: (name, shape, dtype) -> inputs, the two callables, and the minimal bytes a call moves.


def make_case(name, shape, dtype, device):
    """({impl: callable} in print order, peer first and ours last; the minimal bytes a call moves)."""
    dt, g = DTYPES[dtype], torch.Generator(device).manual_seed(0)
    size = torch.tensor([], dtype=dt).element_size()
    if name.startswith("logprobs"):
        B, T, V = shape
        logits = torch.randn(shape, generator=g, device=device, dtype=dt)
        labels = torch.randint(0, V, (B, T), generator=g, device=device)
        nbytes = B * T * V * size + B * T * (8 + 4)
        compiled = torch.compile(peer_logprobs, dynamic=False)  # a fresh wrapper per case: compiled for its shape
        fns = {"peer": peer_logprobs, "compile": compiled, "ours": logprobs}
        if name == "logprobs fwd":
            return {impl: functools.partial(fn, logits, labels) for impl, fn in fns.items()}, nbytes
        logits.requires_grad_()
        grad = torch.randn(B, T, generator=g, device=device)

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(logits, labels), logits, grad)

        impls = {impl: fwd_bwd(fn) for impl, fn in fns.items()}
        return impls, nbytes + B * T * V * size * 2  # + re-read, grad write
    if name.startswith("lm_head"):  # the actor's log-prob path from the last hidden state, forward + backward
        B, T, D, V = shape
        hidden = torch.randn(B, T, D, generator=g, device=device, dtype=dt).requires_grad_()
        weight = (torch.randn(V, D, generator=g, device=device, dtype=dt) / D**0.5).requires_grad_()
        labels = torch.randint(0, V, (B, T), generator=g, device=device)
        grad = torch.randn(B, T, generator=g, device=device)

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(), (hidden, weight), grad)

        impls = {
            "peer": fwd_bwd(lambda: peer_logprobs(hidden @ weight.t(), labels)),
            "unfused": fwd_bwd(lambda: logprobs(hidden @ weight.t(), labels)),  # ppo_lag.py by default
            "ours": fwd_bwd(lambda: linear_logprobs(hidden, weight, labels)),  # ppo_lag.py --fused_logprobs
        }
        # the least a call moves: hidden and weight read, their gradients written (the logits need not exist)
        return impls, 2 * (B * T * D + V * D) * size + B * T * (8 + 4)
    if name == "gae":
        rewards = torch.randn(shape, generator=g, device=device, dtype=dt)
        values = torch.randn(shape, generator=g, device=device, dtype=dt)
        mask = torch.ones(shape, dtype=torch.bool, device=device)
        mask[:, shape[1] * 3 // 4 :] = False
        nbytes = shape[0] * shape[1] * (2 * size + 1 + 2 * 4)
        impls = {
            "peer": lambda: peer_gae(rewards, values, mask, 1.0, 0.95),
            "ours": lambda: gae(rewards, values, mask, 1.0, 0.95),
        }
        return impls, nbytes
    B, T, H = shape  # end scores, D = 1 (a score model's head)
    hidden = torch.randn(shape, generator=g, device=device, dtype=dt)
    weight = torch.randn(1, H, generator=g, device=device, dtype=dt) / H**0.5
    bias = torch.zeros(1, device=device, dtype=dt)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return_all = name == "end_scores (all)"
    ours = functools.partial(end_scores, hidden, mask, weight, bias, return_all=return_all)
    nbytes = B * T * H * size + B * T * (1 + 4) if return_all else B * H * size + B * T + B * 4
    return {"peer": lambda: peer_end_scores(hidden, mask, weight, bias), "ours": ours}, nbytes


# ----------------------------------------------------------------------------------------------------------
# Measurement.


def proc_status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def best_time(fn, device, repeats):
    """Best seconds per call, after a warm-up call (which compiles kernels, starts thread pools); and the seconds
    the warm-up call took (for torch.compile: the compile time)."""
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    if device == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times), first
    for _ in range(max(repeats, min(100, int(1.0 / first)))):  # cheap calls: more tries
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), first


def peak_memory(fn, device):
    """Extra bytes at the peak of one call above what existed before it, after a warm-up call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = proc_status("VmRSS")
    fn()
    return proc_status("VmHWM") - before


def peak_memory_in_subprocess(job, threads):
    """CPU: a fresh process per measurement, so that no other buffer, freed or alive, hides in the numbers."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)] + (["--threads", str(threads)] if threads else [])
    # TRITON_INTERPRET=0: the torch fallbacks, as a CPU user runs them. A fixed 1 MiB mmap threshold: glibc
    # then maps every large buffer on allocation and unmaps it on free, so RSS follows the live tensors. (Only
    # here: it also costs page faults on every allocation, so the timings are taken in this process.)
    env = {**os.environ, "TRITON_INTERPRET": "0", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)  # its stderr goes in our error
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shrunken shapes (a minute on a 2-core CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 20 GPU, 3+ CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 is steadier when busy)")
    p.add_argument("--only", default=None, help="only the kernel rows whose name starts with this (e.g. lm_head)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = p.parse_args()
    gpu = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:  # internal: print the peak memory of one (name, shape, dtype, impl) on the CPU
        name, shape, dtype, impl = json.loads(args.worker)
        print(peak_memory(make_case(name, shape, dtype, "cpu")[0][impl], "cpu"))
        return
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "0"  # the torch fallbacks, as a CPU user runs them
    repeats = args.repeats or (20 if gpu else 3)
    q = args.quick
    cases = [
        ("logprobs fwd", (4, 512, 32000) if q else (8, 1024, 32000), "bf16"),
        ("logprobs fwd", (4, 512, 32000) if q else (8, 1024, 32000), "fp32"),  # the CPU memory target
        ("logprobs fwd", (1, 1024, 128256) if q else (4, 2048, 128256), "bf16"),
        ("logprobs fwd+bwd", (4, 512, 32000) if q else (8, 1024, 32000), "bf16"),
        # the full shape on a GPU (B, T, hidden, vocab); a CPU gets a smaller one (its GEMMs are slow)
        (
            "lm_head+logprobs",
            (2, 512, 256, 32000) if q else (8, 2048, 2048, 128256) if gpu else (4, 1024, 256, 32000),
            "bf16",
        ),
        ("gae", (64, 512) if q else (64, 2048), "fp32"),
        ("end_scores (all)", (4, 512, 4096) if q else (16, 2048, 4096), "bf16"),
        ("end_scores (end)", (4, 512, 4096) if q else (16, 2048, 4096), "bf16"),
    ]
    cases = [c for c in cases if c[0].startswith(args.only or "")]
    peak_bw = next((bw for k, bw in HBM_PEAK.items() if gpu and k in torch.cuda.get_device_name()), None)
    if gpu:
        where = torch.cuda.get_device_name()
    else:
        threads = args.threads or torch.get_num_threads()
        where = f"CPU, {threads} threads, torch fallbacks, load {os.getloadavg()[0]:.1f}"
    calls = f"best of {repeats} calls" if gpu else f"best of {repeats}+ calls"
    print(f"# {where}; {calls}; peak = extra memory above the inputs; ratios = peer / this row")
    print("# compile = torch.compile(log_softmax + gather), its compile time excluded from the timings (shown after)")
    header = f"{'kernel':<18} {'shape':<19} {'dtype':<5} {'impl':<7} {'time ms':>9} {'GB/s':>8} {'peak MB':>9}"
    header += f" {'%HBM':>5}" if peak_bw else ""
    print(header + f" {'speedup':>8} {'mem ratio':>9}")
    results = {}
    for name, shape, dtype in cases:
        row = {}
        fns, nbytes = make_case(name, shape, dtype, args.device)
        for impl, fn in fns.items():
            t, first = best_time(fn, args.device, repeats)
            if gpu:
                peak = peak_memory(fn, "cuda")
            else:
                peak = peak_memory_in_subprocess([name, shape, dtype, impl], args.threads)
            row[impl] = t, peak, nbytes
            line = f"{name:<18} {'x'.join(map(str, shape)):<19} {dtype:<5} {impl:<7} {t * 1e3:9.2f}"
            line += f" {nbytes / t / 1e9:8.1f} {peak / 2**20:9.1f}"
            line += f" {nbytes / t / peak_bw:5.0%}" if peak_bw else ""
            if impl != "peer":
                line += f" {row['peer'][0] / t:7.3g}x {row['peer'][1] / max(peak, 1):8.3g}x"
            if impl == "ours" and "unfused" in row:
                (tu, mu, _) = row["unfused"]
                line += f"   (vs unfused: {tu / t:.3g}x speed, {mu / max(peak, 1):.3g}x less memory)"
            line += f"   (compile {first:.1f} s, excluded)" if impl == "compile" else ""
            if impl == "ours" and gpu and name.startswith("logprobs"):
                line += f"   (first call {first:.1f} s, autotuning included, excluded)"
            print(line, flush=True)
        results[(name, shape, dtype)] = row
    tuned = importlib.import_module("kernels.logprobs").chosen_configs()  # (kernels.logprobs is the function)
    for key, config in tuned.items():  # on a GPU: what the log-prob autotuner picked (its time is in "first call")
        print(f"log-prob kernel autotuned: {key}: {config}")
    # the speed targets
    print()
    checks = []
    for (name, shape, dtype), row in results.items():
        (tp, mp, nbytes), (to, mo, _) = row["peer"], row["ours"]
        label = f"{name} {'x'.join(map(str, shape))} {dtype}"
        if gpu and name == "logprobs fwd+bwd":  # the target read literally: time(compile) / time(ours)
            checks.append((f"{label}: >= 2.5x torch.compile's speed", row["compile"][0] >= 2.5 * to))
        if not gpu and name == "logprobs fwd" and dtype == "fp32" and shape == (8, 1024, 32000):
            checks.append((f"{label}: torch fallback peak <= 1/8 of the baseline's", mp >= 8 * mo))
        if gpu and name == "logprobs fwd" and dtype == "bf16":
            checks.append((f"{label}: >= 2x the baseline", tp >= 2 * to))
            if peak_bw:
                checks.append((f"{label}: >= 80% of HBM bandwidth", nbytes / to >= 0.8 * peak_bw))
        if name == "lm_head+logprobs" and not q:  # the stretch: <= 1/4 of the unfused path's peak, no slower (GPU)
            (tu, mu, _) = row["unfused"]
            checks.append((f"{label}: peak <= 1/4 of lm_head + kernels.logprobs", mu >= 4 * mo))
            if gpu:
                checks.append((f"{label}: no slower than lm_head + kernels.logprobs", to <= tu))
        if gpu and name == "gae":
            checks.append((f"{label}: >= 50x the Python loop", tp >= 50 * to))
        if gpu and name.startswith("end_scores"):
            checks.append((f"{label}: no slower than the baseline", to <= tp))
    for what, ok in checks:
        print(f"target: {what}: {'met' if ok else 'NOT met'}")
    if q:
        print("(--quick: the targets are checked at the full shapes only)")


if __name__ == "__main__":
    main()
