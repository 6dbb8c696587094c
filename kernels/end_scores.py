"""Score-head reduction: the score of each sequence at its last valid token, with no host sync.

A reward / cost model scores a sequence with a linear head on the hidden state of its last real token:
    end = last index e_b with attention_mask[b, e_b] != 0,   end_scores[b] = hidden[b, e_b] @ weight.T + bias
and a critic reads the per-token scores hidden @ weight.T + bias as its values. The anchor finds e_b with a
per-row `nonzero()` whose size depends on the data, so every row costs a GPU -> host sync. Here
e_b = max_t (t if mask[b, t] else 0) is a reduction, computed on the device inside the kernel; it handles left
and right padding alike. An all-masked row gets e_b = 0 (the score of token 0).

Memory: end scores only read the mask (B*T) and the B end rows of hidden (B*H), not the (B, T, H) tensor;
per-token scores (`return_all`) read hidden once per output column d (D = 1 for score models) and write
(B, T, D) fp32, never a whole fp32 copy of hidden (B*T*H*4 bytes: 537 MB at 16 x 2048 x 4096; the torch path
upcasts CHUNK_BYTES slices). Scores are fp32 (fp32 accumulation) whatever the input dtype.
The backward is two small GEMMs, done by torch on every device:
    G = dL/dscores + scatter of dL/dend at (b, e_b),   dhidden = G @ weight,   dweight = G^T hidden,   dbias = sum G
"""

import torch
import triton
import triton.language as tl

from kernels._dispatch import use_triton

CHUNK_BYTES = 16 * 2**20  # torch path: size of one fp32 (rows, H) slice of hidden for the per-token scores


# ----------------------------------------------------------------------------------------------------------
# The reference: the per-token scores, then each row's last valid index the obvious way. It is the spec.


def end_scores_ref(hidden, attention_mask, weight, bias=None, return_all=False):
    scores = hidden.float() @ weight.float().T  # (B, T, D)
    if bias is not None:
        scores = scores + bias.float()
    T = attention_mask.size(1)
    end = torch.tensor([max([t for t in range(T) if row[t] != 0], default=0) for row in attention_mask.tolist()])
    end_scores = scores[torch.arange(scores.size(0)), end.to(scores.device)]  # (B, D)
    return (end_scores, scores) if return_all else end_scores


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: end scores, one program per (row b, head output d); per-token scores, one program per
# (b, tile of BLOCK_T tokens, d).


@triton.jit
def _end_scores_kernel(
    hidden_ptr,  # (B, T, H) any float dtype, strides (stride_hb, stride_ht, stride_hh)
    mask_ptr,  # (B, T) attention mask: uint8 (a bool view) / int / float, strides (stride_mb, stride_mt)
    weight_ptr,  # (D, H) any float dtype, strides (stride_wd, stride_wh)
    bias_ptr,  # (D,) any float dtype; unused (any pointer) when HAS_BIAS is False
    end_ptr,  # (B, D) fp32, contiguous: end scores, written here
    idx_ptr,  # (B,) int64: the end index e_b, written here by the d = 0 program (saved for backward)
    T,
    H,
    D,
    stride_hb,
    stride_ht,
    stride_hh,
    stride_mb,
    stride_mt,
    stride_wd,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1)
    # 1) e_b = max over t of (t if mask[b, t] != 0 else 0): an on-device reduction, no host sync
    ts = tl.arange(0, BLOCK_T)
    best = tl.zeros([BLOCK_T], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        m = tl.load(mask_ptr + b * stride_mb + (t0 + ts) * stride_mt, mask=t0 + ts < T, other=0)
        best = tl.maximum(best, tl.where(m != 0, t0 + ts, 0))
    e = tl.max(best, axis=0).to(tl.int64)
    # 2) score = hidden[b, e] . weight[d] in fp32, BLOCK_H features at a time
    hs = tl.arange(0, BLOCK_H)
    h_row = hidden_ptr + b * stride_hb + e * stride_ht
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        in_h = h0 + hs < H
        h = tl.load(h_row + (h0 + hs) * stride_hh, mask=in_h, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + d * stride_wd + (h0 + hs) * stride_wh, mask=in_h, other=0.0).to(tl.float32)
        acc += h * w
    score = tl.sum(acc, axis=0)
    if HAS_BIAS:
        score += tl.load(bias_ptr + d).to(tl.float32)
    # 3) write the score, and the index once per row
    tl.store(end_ptr + b * D + d, score)
    tl.store(idx_ptr + b, e, mask=d == 0)


@triton.jit
def _token_scores_kernel(
    hidden_ptr,  # (B, T, H) any float dtype, strides (stride_hb, stride_ht, stride_hh)
    weight_ptr,  # (D, H) any float dtype, strides (stride_wd, stride_wh)
    bias_ptr,  # (D,) or unused when HAS_BIAS is False
    scores_ptr,  # (B, T, D) fp32, contiguous: per-token scores, written here
    T,
    H,
    D,
    stride_hb,
    stride_ht,
    stride_hh,
    stride_wd,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) token positions of this tile
    d = tl.program_id(2)
    hs = tl.arange(0, BLOCK_H)
    # 1) a (BLOCK_T, BLOCK_H) fp32 accumulator of hidden * weight[d], one H slice at a time (a GEMV)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        in_h = h0 + hs < H
        ptrs = hidden_ptr + b * stride_hb + t[:, None] * stride_ht + (h0 + hs)[None, :] * stride_hh
        h = tl.load(ptrs, mask=(t[:, None] < T) & in_h[None, :], other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + d * stride_wd + (h0 + hs) * stride_wh, mask=in_h, other=0.0).to(tl.float32)
        acc += h * w[None, :]
    # 2) reduce over features, add the bias, write (B, T, D) fp32
    score = tl.sum(acc, axis=1)
    if HAS_BIAS:
        score += tl.load(bias_ptr + d).to(tl.float32)
    tl.store(scores_ptr + (b * T + t) * D + d, score, mask=t < T)


def launch_config(on_gpu):
    """Meta-parameters of (end kernel, per-token kernel). GPU: the end kernel is latency-bound (B*D tiny
    programs), so wide 1024-slices keep its loops short. The per-token kernel streams hidden: 16 tokens x 256
    features (8 KB of bf16) per step with 4 warps, 16-byte loads along H, 32 accumulators per thread, and
    B*T/16 programs (2048 at 16 x 2048). The interpreter gets small blocks so that small test shapes cross
    block boundaries."""
    if on_gpu:
        return {"BLOCK_T": 1024, "BLOCK_H": 1024, "num_warps": 4}, {"BLOCK_T": 16, "BLOCK_H": 256, "num_warps": 4}
    return {"BLOCK_T": 16, "BLOCK_H": 16, "num_warps": 1}, {"BLOCK_T": 8, "BLOCK_H": 16, "num_warps": 1}


def _fwd_triton(hidden, mask, weight, bias, return_all):
    B, T, H = hidden.shape
    D = weight.size(0)
    end = torch.empty(B, D, dtype=torch.float32, device=hidden.device)
    idx = torch.empty(B, dtype=torch.int64, device=hidden.device)
    end_meta, token_meta = launch_config(hidden.is_cuda)
    has_bias = bias is not None
    bias_arg = bias if has_bias else end  # any pointer; never read when has_bias is False
    strides = (*hidden.stride(), *mask.stride(), *weight.stride())
    _end_scores_kernel[(B, D)](
        hidden, mask, weight, bias_arg, end, idx, T, H, D, *strides, HAS_BIAS=has_bias, **end_meta
    )
    if not return_all:
        return end, idx, None
    scores = torch.empty(B, T, D, dtype=torch.float32, device=hidden.device)
    strides = (*hidden.stride(), *weight.stride())
    _token_scores_kernel[(B, triton.cdiv(T, token_meta["BLOCK_T"]), D)](
        hidden, weight, bias_arg, scores, T, H, D, *strides, HAS_BIAS=has_bias, **token_meta
    )
    return end, idx, scores


# ----------------------------------------------------------------------------------------------------------
# Torch fallback: the index by a masked max (no nonzero, no .item()), a gather of the B end rows, and the
# per-token scores over chunks of T so that the fp32 upcast of hidden stays CHUNK_BYTES-sized.


def _fwd_torch(hidden, mask, weight, bias, return_all):
    B, T, H = hidden.shape
    w = weight.float()
    b = bias.float() if bias is not None else torch.zeros(weight.size(0), device=hidden.device)
    idx = torch.where(mask != 0, torch.arange(T, device=mask.device), 0).amax(dim=1)  # (B,)
    end = hidden[torch.arange(B, device=hidden.device), idx].float() @ w.T + b  # (B, D)
    if not return_all:
        return end, idx, None
    scores = torch.empty(B, T, weight.size(0), dtype=torch.float32, device=hidden.device)
    step = max(1, CHUNK_BYTES // (4 * H * B))
    for t0 in range(0, T, step):
        scores[:, t0 : t0 + step] = hidden[:, t0 : t0 + step].float() @ w.T + b
    return end, idx, scores


# ----------------------------------------------------------------------------------------------------------
# Autograd (backward in torch on both paths) and the public function.


class _EndScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, weight, bias, return_all):
        fwd = _fwd_triton if use_triton(hidden) else _fwd_torch
        end, idx, scores = fwd(hidden, mask, weight, bias, return_all)
        ctx.save_for_backward(hidden, weight, idx)
        ctx.bias_dtype, ctx.return_all = bias.dtype if bias is not None else None, return_all
        return (end, scores) if return_all else end

    @staticmethod
    def backward(ctx, grad_end, grad_scores=None):
        hidden, weight, idx = ctx.saved_tensors
        rows = torch.arange(hidden.size(0), device=hidden.device)
        need_h, _, need_w, need_b, _ = ctx.needs_input_grad
        grad_h = grad_w = grad_b = None
        if ctx.return_all:  # dense G (B, T, D): the per-token grads plus the end grads at (b, e_b)
            G = grad_scores.float().index_put((rows, idx), grad_end.float(), accumulate=True)
            if need_h:  # in hidden's dtype (GEMMs accumulate in fp32): no (B, T, H) fp32 temporary
                grad_h = G.to(hidden.dtype) @ weight.to(hidden.dtype)
            if need_w:
                grad_w = torch.einsum("btd,bth->dh", G.to(hidden.dtype), hidden).to(weight.dtype)
            if need_b:
                grad_b = G.sum(dim=(0, 1))
        else:  # sparse: only the B end rows of hidden get a gradient
            g = grad_end.float()  # (B, D)
            if need_h:
                grad_h = torch.zeros_like(hidden)
                grad_h[rows, idx] = (g @ weight.float()).to(hidden.dtype)
            if need_w:
                grad_w = (g.T @ hidden[rows, idx].float()).to(weight.dtype)
            if need_b:
                grad_b = g.sum(dim=0)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, None, grad_w, grad_b, None


def end_scores(hidden, attention_mask, weight, bias=None, return_all: bool = False):
    """End scores (B, D) fp32 at each row's last token with attention_mask != 0 (index 0 for an all-masked row);
    with return_all also the per-token scores (B, T, D) fp32. Differentiable w.r.t. hidden, weight and bias.

    hidden: (B, T, H) any float dtype and strides; attention_mask: (B, T) bool/int/float, left or right padded;
    weight: (D, H) (an nn.Linear(H, D).weight); bias: (D,) or None. No host sync on any path.
    """
    assert hidden.dim() == 3 and attention_mask.shape == hidden.shape[:2] and weight.size(1) == hidden.size(2)
    if attention_mask.dtype == torch.bool:
        attention_mask = attention_mask.view(torch.uint8)  # same bytes; Triton loads uint8 everywhere
    return _EndScores.apply(hidden, attention_mask, weight, bias, return_all)
