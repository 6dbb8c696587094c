"""Token log-probabilities `log softmax(logits / temperature)[label]` without a (B, T, V) fp32 copy.

Every PPO step needs log pi(y_t) for the actor (twice: old and current) and the reference model, and SFT/PTX
need the same number for their cross-entropy. The usual code is
`torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])`, which materialises a (B, T, V) fp32
tensor: 8 x 2048 x 128256 x 4 B = 8.4 GB (plus the fp32 upcast of bf16 logits, as much again), to keep
B*T numbers. One row needs only its max m and its log-sum-exp, which a single pass over the vocabulary
computes online (Milakov & Gimelshein 2018):

    m_k = max(m_{k-1}, max_j x_j),   s_k = s_{k-1} * exp(m_{k-1} - m_k) + sum_j exp(x_j - m_k)
    log p(y) = x_y - (m + log s),    x = logits / temperature

Backward: d log p(y) / d logits_v = (onehot(y)_v - softmax_v) / temperature, with softmax recomputed block by
block (Triton: from the saved log-sum-exp, B*T fp32; torch: per chunk of rows), written straight into a
gradient of the logits' dtype.
Memory: Triton path O(B*T) extra (out + lse); torch path O(CHUNK_BYTES) extra: rows go through in chunks
of CHUNK_BYTES / (4 V) rows: one or two chunk-sized fp32 temporaries (16 MiB each) instead of one of B*T*V.
Labels outside [0, V) (e.g. -100) are ignored: their log-prob is 0 and they get no gradient.
"""

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


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # (B, T, V) bf16/fp16/fp32, any strides: row (b, t) starts at b*stride_b + t*stride_t
    labels_ptr,  # (B, T) int64, contiguous: the token whose log-prob we want
    out_ptr,  # (B, T) fp32, contiguous: log p(label), 0 for ignored labels
    lse_ptr,  # (B, T) fp32, contiguous: log-sum-exp of logits / temperature, saved for backward
    T, V, stride_b, stride_t, stride_v,
    inv_temp,  # 1 / temperature
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: B*T*V overflows int32 at 128k vocabularies
    x_row = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    cols = tl.arange(0, BLOCK_V)
    # 1) online max and sum-exp over the vocabulary, one BLOCK_V slice at a time, in fp32
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(x_row + (v0 + cols).to(tl.int64) * stride_v, mask=v0 + cols < V, other=float("-inf"))
        x = x.to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    # 2) gather the label's logit (one scalar load); ignored labels read column 0 and are zeroed
    y = tl.load(labels_ptr + row)
    valid = (y >= 0) & (y < V)
    x_y = tl.load(x_row + tl.where(valid, y, 0) * stride_v).to(tl.float32) * inv_temp
    # 3) write log p(y) and the log-sum-exp
    tl.store(out_ptr + row, tl.where(valid, x_y - lse, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # (B, T, V) any float dtype, any strides (as in forward)
    labels_ptr,  # (B, T) int64, contiguous
    lse_ptr,  # (B, T) fp32, contiguous: from forward
    grad_out_ptr,  # (B, T) fp32, contiguous: dL / d log p(y)
    grad_ptr,  # (B, T, V) contiguous, the logits' dtype: dL / d logits, written here
    T, V, stride_b, stride_t, stride_v,
    inv_temp,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    g_row = grad_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    # 1) per-row scalars; the chain rule through x = logits / temperature gives the extra inv_temp
    y = tl.load(labels_ptr + row)
    g = tl.load(grad_out_ptr + row) * inv_temp
    g = tl.where((y >= 0) & (y < V), g, 0.0)
    lse = tl.load(lse_ptr + row)
    # 2) recompute softmax slice by slice and write g * (onehot - softmax)
    for v0 in range(0, V, BLOCK_V):
        in_v = v0 + cols < V
        x = tl.load(x_row + (v0 + cols).to(tl.int64) * stride_v, mask=in_v, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(x - lse)
        d = g * (tl.where(v0 + cols == y, 1.0, 0.0) - p)
        tl.store(g_row + v0 + cols, d.to(grad_ptr.dtype.element_ty), mask=in_v)


def launch_config(V, on_gpu):
    """Meta-parameters. On a GPU a 4096-wide slice is 8 KB (bf16) of loads in flight per program with 8 warps
    (16 elements per thread, vectorised 16-byte loads), and B*T programs fill every SM. The interpreter runs
    programs one after another in numpy, so small slices keep test shapes crossing slice boundaries."""
    if on_gpu:
        return {"BLOCK_V": min(4096, triton.next_power_of_2(V)), "num_warps": 8}
    return {"BLOCK_V": min(256, triton.next_power_of_2(V)), "num_warps": 1}


def _fwd_triton(logits, labels, inv_temp):
    B, T, V = logits.shape
    out = torch.empty(B, T, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(out)
    _logprobs_fwd_kernel[(B * T,)](
        logits, labels.contiguous(), out, lse, T, V, *logits.stride(), inv_temp, **launch_config(V, logits.is_cuda)
    )
    return out, lse


def _bwd_triton(logits, labels, lse, grad_out, inv_temp):
    B, T, V = logits.shape
    grad = torch.empty(B, T, V, dtype=logits.dtype, device=logits.device)
    grad_out, meta = grad_out.float().contiguous(), launch_config(V, logits.is_cuda)
    _logprobs_bwd_kernel[(B * T,)](
        logits, labels.contiguous(), lse, grad_out, grad, T, V, *logits.stride(), inv_temp, **meta
    )
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
    return -(lp * keep).sum() / keep.sum().clamp(min=1)  # ... and masked out of the mean
