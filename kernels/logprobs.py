"""Token log-probabilities `log softmax(logits / temperature)[label]` without a (B, T, V) fp32 copy.

Every PPO step needs log pi(y_t) for the actor (twice: old and current) and the reference model, and SFT/PTX
need the same number for their cross-entropy. The usual code is
`torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])`, which materialises a (B, T, V) fp32
tensor: 8 x 2048 x 128256 x 4 B = 8.4 GB (plus the fp32 upcast of bf16 logits, as much again), to keep
B*T numbers. One row needs only its max m and its log-sum-exp, which a single pass over the vocabulary
computes online (Milakov & Gimelshein 2018):

    m_k = max(m_{k-1}, max_j x_j),   s_k = s_{k-1} * exp(m_{k-1} - m_k) + sum_j exp(x_j - m_k)
    log p(y) = x_y - (m + log s),    x = logits / temperature

The Triton forward has two algorithms for that pass, one program per row either way:
- per-slice reductions (the one above; the fixed config everywhere): each BLOCK_V slice does a block-wide max
  and a block-wide sum. Two cross-warp reductions, each with its barriers, per slice serialise the loop: HBM idles
  between a slice's loads and the next. Measured on an H200 (bf16), before it took exp2 of raw differences and a
  finite start: 56% of HBM peak at 8x1024x32000, 67% at 4x2048x128256 (fp32: 81%).
- lane-wise (LANEWISE=True): every lane of the slice keeps its own running max m and sum s, updated with ONE exp
  per element and no reduction inside the loop, d = x - m, e = exp(-|d|), s = (s e + 1 if d > 0 else s + e),
  m = max(m, x); after the loop one reduction, M = max m, S = sum s exp(m - M), lse = M + log S. Built to keep
  loads streaming; NO GPU figure exists for it yet.
On CUDA with a real vocabulary (V >= TUNE_MIN_V) the GPU itself picks the algorithm, slice width and warp count:
`triton.autotune` times `tuning_candidates()` on the first call per (V, dtype), on that call's tensors (seconds:
24 kernels to compile; time a warmed-up call), and keeps the fastest for the process (`chosen_configs()`); the
timings go to triton's cache directory, so later runs on the machine (a resume) pick the same config without timing.
NANO_AUTOTUNE=0 keeps the fixed config on a GPU too (the same summation order on every machine).
Smaller V, and the interpreter on CPU (which cannot time), use the fixed `launch_config`. Every candidate
computes the same sums in another order: results agree to fp32 rounding.
Both algorithms start the max at the most negative finite fp32, so masked (-inf) logits, even a whole leading
slice of them, add nothing (the per-slice kernel used to start at -inf, and such a row came out nan). A row of
only -inf logits has no distribution: nan for a valid label (lse = -inf), as torch.log_softmax gives, and nan
gradients, as before (an ignored label still reads 0).

Backward: d log p(y) / d logits_v = (onehot(y)_v - softmax_v) / temperature, with softmax recomputed block by
block (Triton: from the saved log-sum-exp, B*T fp32; torch: per chunk of rows), written straight into a
gradient of the logits' dtype.
Memory: Triton path O(B*T) extra (out + lse); torch path O(CHUNK_BYTES) extra: rows go through in chunks
of CHUNK_BYTES / (4 V) rows: one or two chunk-sized fp32 temporaries (16 MiB each) instead of one of B*T*V.
Labels outside [0, V) (e.g. -100) are ignored: their log-prob is 0 and they get no gradient.
"""

import os

import numpy as np
import torch
import triton
import triton.language as tl

from kernels._dispatch import use_triton

CHUNK_BYTES = 16 * 2**20  # torch path: the size of one fp32 (rows, V) temporary


# ----------------------------------------------------------------------------------------------------------
# The reference: slow and obvious, what every peer computes. It is the spec.


def logprobs_ref(logits, labels, temperature=1.0):
    V = logits.size(-1)
    valid = (labels >= 0) & (labels < V)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V) fp32: the memory we avoid
    picked = logp.gather(-1, labels.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(valid, picked, torch.zeros_like(picked))


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: one program per (b, t) row, a loop over the vocabulary in BLOCK_V slices.

# The running max starts at the most negative finite fp32, not -inf: -inf - (-inf) = nan would poison a row whose
# first slice is all -inf (masked vocabulary entries). No finite logit lies below it, so nothing is lost.
_NEG_BIG = tl.constexpr(-3.4028234663852886e38)
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(z) = exp2(z * log2 e): one multiply, folded with 1 / temperature


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # (B, T, V) bf16/fp16/fp32, any strides: row (b, t) starts at b*stride_b + t*stride_t
    labels_ptr,  # (B, T) int64, contiguous: the token whose log-prob we want
    out_ptr,  # (B, T) fp32, contiguous: log p(label), 0 for ignored labels
    lse_ptr,  # (B, T) fp32, contiguous: log-sum-exp of logits / temperature, saved for backward
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    inv_temp,  # 1 / temperature
    BLOCK_V: tl.constexpr,
    LANEWISE: tl.constexpr,  # the algorithm: per-lane running max and sum (True) or per-slice reductions (False)
):
    row = tl.program_id(0).to(tl.int64)  # int64: B*T*V overflows int32 at 128k vocabularies
    x_row = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    cols = tl.arange(0, BLOCK_V)
    # Max and sums are kept in raw logit units and the difference is scaled once, exp(inv_temp * (x - m)) =
    # exp2(c * (x - m)): the subtraction of two nearby logits is exact, and a scaled-then-subtracted pair is not.
    c = inv_temp * _LOG2E
    # 1) online max and sum-exp over the vocabulary, one BLOCK_V slice at a time, in fp32
    if LANEWISE:
        # Each lane keeps its own running max m and sum s (of exp(c * (x - m)) over the elements it saw): one exp
        # per element and no cross-warp reduction (nor its barriers) inside the loop, so loads keep streaming.
        # With d = x - m, exp(-|d|) is the new element's term when d <= 0 and the old sum's rescale when d > 0.
        m = tl.full([BLOCK_V], _NEG_BIG, tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(x_row + (v0 + cols).to(tl.int64) * stride_v, mask=v0 + cols < V, other=float("-inf"))
            x = x.to(tl.float32)
            d = x - m
            e = tl.exp2(-c * tl.abs(d))
            s = tl.where(d > 0, s * e + 1.0, s + e)
            m = tl.maximum(m, x)
        # one reduction per row: bring every lane's sum to the row's max
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp2(c * (m - m_row)), axis=0)
    else:
        # Milakov & Gimelshein: a block-wide max and sum per slice
        m_row = _NEG_BIG
        s_row = 0.0
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(x_row + (v0 + cols).to(tl.int64) * stride_v, mask=v0 + cols < V, other=float("-inf"))
            x = x.to(tl.float32)
            m_new = tl.maximum(m_row, tl.max(x, axis=0))
            s_row = s_row * tl.exp2(c * (m_row - m_new)) + tl.sum(tl.exp2(c * (x - m_new)), axis=0)
            m_row = m_new
    # a row of only -inf keeps m_row = _NEG_BIG and s_row = 0: lse = -inf and log p = -inf - (-inf) = nan, as
    # torch.log_softmax gives (the kernel gave nan there before too, through a nan lse)
    lse = m_row * inv_temp + tl.log(s_row)
    # 2) gather the label's logit (one scalar load); ignored labels read column 0 and are zeroed
    y = tl.load(labels_ptr + row)
    valid = (y >= 0) & (y < V)
    x_y = tl.load(x_row + tl.where(valid, y, 0) * stride_v).to(tl.float32) * inv_temp
    # 3) write log p(y) and the log-sum-exp: plain stores, so running the kernel again (autotuning does) is harmless
    tl.store(out_ptr + row, tl.where(valid, x_y - lse, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # (B, T, V) any float dtype, any strides (as in forward)
    labels_ptr,  # (B, T) int64, contiguous
    lse_ptr,  # (B, T) fp32, contiguous: from forward
    grad_out_ptr,  # (B, T) fp32, contiguous: dL / d log p(y)
    grad_ptr,  # (B, T, V) contiguous, the logits' dtype: dL / d logits, written here
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    g_row = grad_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    # 1) per-row scalars; the chain rule through x = logits / temperature gives the extra inv_temp
    y = tl.load(labels_ptr + row)
    g = tl.load(grad_out_ptr + row) * inv_temp
    g = tl.where((y >= 0) & (y < V), g, 0.0)
    lse = tl.load(lse_ptr + row)
    # 2) recompute softmax slice by slice and write g * (onehot - softmax). exp(x * inv_temp - lse) stays in natural
    # units: pre-scaling by log2 e would save one multiply in a loop bound by 4 bytes of traffic per element, at the
    # cost of one more rounding (of lse * log2 e, a few ulps of |lse|) inside every p.
    for v0 in range(0, V, BLOCK_V):
        in_v = v0 + cols < V
        x = tl.load(x_row + (v0 + cols).to(tl.int64) * stride_v, mask=in_v, other=float("-inf"))
        p = tl.exp(x.to(tl.float32) * inv_temp - lse)  # masked lanes: 0, not exp(-lse), which overflows at lse < -88
        d = g * (tl.where(v0 + cols == y, 1.0, 0.0) - p)
        tl.store(g_row + v0 + cols, d.to(grad_ptr.dtype.element_ty), mask=in_v)  # plain stores: idempotent


def launch_config(V, on_gpu):
    """Fixed meta-parameters (forward, backward): every launch but the autotuned ones (see `autotunes`). On a GPU a
    4096-wide slice is 8 KB (bf16) of loads in flight per program with 8 warps (16 elements per thread, vectorised
    16-byte loads), and B*T programs fill every SM; the forward uses the per-slice reductions, the algorithm that
    has run on a GPU (the lane-wise one is chosen only by timing it). The interpreter runs programs one after another in
    numpy, so small slices keep test shapes crossing slice boundaries."""
    block = min(4096 if on_gpu else 256, triton.next_power_of_2(V))
    bwd = {"BLOCK_V": block, "num_warps": 8 if on_gpu else 1}
    return {**bwd, "LANEWISE": False}, bwd


# Autotuning (CUDA only, V >= TUNE_MIN_V): a real vocabulary is large enough that the best slice width, warp count
# and forward algorithm depend on the GPU, so the GPU times the candidates on the first call's tensors and keeps the
# fastest per (V, dtypes) for the rest of the process. Smaller V (the GPU kernel tests) keeps the fixed config.
TUNE_MIN_V = 8192


def tuning_candidates(backward=False):
    """Meta-parameter dicts the autotuner times. 8 to 32 fp32 elements per thread and slice (BLOCK_V / (32 *
    num_warps)): fewer is under a 16-byte vector load of bf16 and leaves too little in flight, more risks spilling
    the lane-wise algorithm's two running vectors (32 already take 121 registers on sm_90, no spill). 8 (BLOCK_V,
    num_warps) pairs, times both forward algorithms: 16 forward and 8 backward candidates. Any V works with any of
    them (the last slice is masked)."""
    sizes = [(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8, 16)]
    pairs = [(block, warps) for block, warps in sizes if 8 <= block // (32 * warps) <= 32]
    if backward:
        return [{"BLOCK_V": block, "num_warps": warps} for block, warps in pairs]
    return [{"LANEWISE": lw, "BLOCK_V": block, "num_warps": warps} for lw in (False, True) for block, warps in pairs]


def _tuner(kernel, candidates, cache_results=True, **options):
    """`kernel` autotuned over `candidates`, keyed by V (and, as triton always does, the tensors' dtypes). Both
    kernels only store into their outputs (no accumulation), so the timing runs leave correct results behind."""
    configs = [
        triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"]) for c in candidates
    ]
    # cache_results: the timings are written to triton's cache directory and read back by later processes, so a
    # resumed or repeated run on the same machine picks the same config and sums in the same order as the first
    return triton.autotune(configs=configs, key=["V"], cache_results=cache_results, **options)(kernel)


_fwd_tuned = _tuner(_logprobs_fwd_kernel, tuning_candidates())
_bwd_tuned = _tuner(_logprobs_bwd_kernel, tuning_candidates(backward=True))


def autotunes(logits):
    """The rule: autotune on CUDA, for real vocabularies, never in the interpreter (it cannot time anything), and not
    with NANO_AUTOTUNE=0 (the fixed config: the same summation order on every machine)."""
    if os.environ.get("NANO_AUTOTUNE") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return logits.is_cuda and logits.size(-1) >= TUNE_MIN_V


def chosen_configs():
    """{"forward V=128256 bfloat16": {"LANEWISE": True, "BLOCK_V": 4096, "num_warps": 8}, ...}: the config the
    autotuner picked for each key so far in this process (empty before the first tuned call, and on CPU)."""
    chosen = {}
    for name, tuner in (("forward", _fwd_tuned), ("backward", _bwd_tuned)):
        for key, config in tuner.cache.items():  # key: (V, then the tensor arguments' dtypes, logits' first)
            dtype = next(str(k).removeprefix("torch.") for k in key[1:] if str(k).startswith("torch."))
            chosen[f"{name} V={key[0]} {dtype}"] = {**config.kwargs, "num_warps": config.num_warps}
    return chosen


def _fwd_triton(logits, labels, inv_temp):
    B, T, V = logits.shape
    out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(out)
    args = (logits, labels.contiguous(), out, lse, T, V, *logits.stride(), inv_temp)
    # the interpreter computes in numpy, which warns where the forward overflows on purpose (c * |x - m| = inf while
    # m is still _NEG_BIG; exp2(-inf) = 0 is the wanted term); a GPU rounds to inf silently, as IEEE says
    with np.errstate(over="ignore"):
        if autotunes(logits):
            _fwd_tuned[(B * T,)](*args)
        else:
            _logprobs_fwd_kernel[(B * T,)](*args, **launch_config(V, logits.is_cuda)[0])
    return out, lse


def _bwd_triton(logits, labels, lse, grad_out, inv_temp):
    B, T, V = logits.shape
    grad = torch.empty(B, T, V, dtype=logits.dtype, device=logits.device)
    args = (logits, labels.contiguous(), lse, grad_out.float().contiguous(), grad, T, V, *logits.stride(), inv_temp)
    if autotunes(logits):
        _bwd_tuned[(B * T,)](*args)
    else:
        _logprobs_bwd_kernel[(B * T,)](*args, **launch_config(V, logits.is_cuda)[1])
    return grad


# ----------------------------------------------------------------------------------------------------------
# Torch fallback (CPU without the interpreter): the same math on chunks of rows, so the extra memory is a few
# CHUNK_BYTES temporaries whatever B*T*V is. Chunks are views (b-slices, or t-slices of one b), never copies.


def _chunks(B, T, rows):
    if rows >= T:
        for b0 in range(0, B, rows // T):
            yield slice(b0, b0 + rows // T), slice(None)
    else:
        for b in range(B):
            for t0 in range(0, T, rows):
                yield slice(b, b + 1), slice(t0, t0 + rows)


def _scaled(x, inv_temp):
    return x if inv_temp == 1.0 else x.float() * inv_temp


def _fwd_torch(logits, labels, inv_temp):
    B, T, V = logits.shape
    out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
    for bs, ts in _chunks(B, T, max(1, CHUNK_BYTES // (4 * V))):
        y = labels[bs, ts]
        valid = (y >= 0) & (y < V)
        logp = torch.log_softmax(_scaled(logits[bs, ts], inv_temp), dim=-1, dtype=torch.float32)  # (b, t, V) fp32
        out[bs, ts] = torch.where(valid, logp.gather(-1, torch.where(valid, y, 0)[..., None])[..., 0], 0.0)
        del logp  # before the next chunk's exists: one fp32 chunk alive (two while a bf16 chunk is upcast)
    return out, None  # the torch backward recomputes softmax per chunk: no log-sum-exp to keep


def _bwd_torch(logits, labels, lse, grad_out, inv_temp):
    B, T, V = logits.shape
    grad = torch.empty(B, T, V, dtype=logits.dtype, device=logits.device)
    for bs, ts in _chunks(B, T, max(1, CHUNK_BYTES // (4 * V))):
        y = labels[bs, ts]
        valid = (y >= 0) & (y < V)
        g = torch.where(valid, grad_out[bs, ts].float() * inv_temp, 0.0)[..., None]  # (b, t, 1)
        d = torch.softmax(_scaled(logits[bs, ts], inv_temp), dim=-1, dtype=torch.float32).mul_(-g)  # (b, t, V)
        grad[bs, ts] = d.scatter_add_(-1, torch.where(valid, y, 0)[..., None], g)  # g * (onehot - softmax)
        del d
    return grad


# ----------------------------------------------------------------------------------------------------------
# Autograd and the public functions.


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature):
        ctx.triton = use_triton(logits)
        ctx.inv_temp = 1.0 / temperature
        out, lse = (_fwd_triton if ctx.triton else _fwd_torch)(logits, labels, ctx.inv_temp)
        ctx.save_for_backward(logits, labels, lse)  # references, no copies; lse is B*T fp32 (or None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        grad = (_bwd_triton if ctx.triton else _bwd_torch)(logits, labels, lse, grad_out, ctx.inv_temp)
        return grad, None, None


def logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[labels] -> (B, T) fp32, differentiable w.r.t. logits.

    logits: (B, T, V) bf16/fp16/fp32, any strides (pass `logits[:, :-1]` directly, it is not copied);
    labels: (B, T) integer, aligned with logits (shift before calling). Labels outside [0, V) give 0, no grad.
    """
    assert logits.dim() == 3 and labels.shape == logits.shape[:2], (logits.shape, labels.shape)
    return _LogProbs.apply(logits, labels, float(temperature))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy over labels != ignore_index (the SFT / PTX loss), on top of `logprobs`.

    Same as `F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index)` except that an
    all-ignored batch gives 0 (not nan), and no (B, T, V) fp32 tensor exists. No host sync.
    """
    keep = labels != ignore_index
    lp = logprobs(logits, torch.where(keep, labels, 0))  # ignored labels are clamped for the gather ...
    return mean_nll(lp, labels, ignore_index)  # ... and masked out of the mean


def mean_nll(logp: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """-mean of the log-probs (B, T) over labels != ignore_index; 0 for an all-ignored batch. The reduction of
    `cross_entropy`, for log-probs that come from elsewhere (kernels.linear_logprobs)."""
    keep = labels != ignore_index
    return -(logp * keep).sum() / keep.sum().clamp(min=1)
