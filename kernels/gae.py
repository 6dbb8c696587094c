"""Generalised advantage estimation (Schulman et al. 2016) for (B, T) rollouts in one launch.

Exact semantics (those of safe-rlhf's `get_advantages_and_returns`, plus masked outputs), with m = mask:

    r_t = rewards_t * m_t,   V_t = values_t * m_t,   V_T = 0,   A_T = 0          (masked past the end)
    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}                                    (for t = T-1 down to 0)
    advantages = A * m,   returns = A * m + V                                    (both 0 where m = 0)

mask is (B, T) bool/int/float, nonzero on the response tokens (the actions); as in the anchor, A runs through
masked steps inside a row (a hole) unreset. Computed in fp32 whatever the input dtypes; outputs are fp32 and
carry no gradient (they are regression and policy targets).

The peers run this as a Python loop over t: T steps of ~6 tiny kernels each (2048 steps -> ~12k launches).
The recurrence is first-order linear, A_t = f_t(A_{t+1}) with f_t(x) = delta_t + c x, c = gamma * lam, and
affine maps compose associatively: f_t o f_{t+1} = (c * c, delta_t + c * delta_{t+1}) as (slope, offset).
So a tile of BLOCK_T steps is one parallel scan, and only the value A at the tile's edge is carried from
tile to tile. Memory: reads 3 and writes 2 (B, T) tensors, nothing else; a few KB of registers per program.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import use_triton

TORCH_TILE = 64  # torch path: time steps per tile (a (L, L) matrix of powers of c)


# ----------------------------------------------------------------------------------------------------------
# The reference: the per-step Python loop of every peer. It is the spec.


def gae_ref(rewards, values, mask, gamma, lam):
    m = (mask != 0).float()
    r, v = rewards.float() * m, values.float() * m
    T = r.size(1)
    adv, last = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        last = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv * m, adv * m + v


# ----------------------------------------------------------------------------------------------------------
# Triton kernel: one program per BLOCK_B rows, a loop over time tiles from the end, a scan inside each tile.


@triton.jit
def _compose(a_later, b_later, a_now, b_now):
    # (slope, offset) of f_now o f_later, where f(x) = offset + slope * x
    return a_now * a_later, b_now + a_now * b_later


@triton.jit
def _gae_kernel(
    rewards_ptr,  # (B, T) any float dtype, strides (stride_rb, stride_rt)
    values_ptr,  # (B, T) any float dtype, strides (stride_vb, stride_vt)
    mask_ptr,  # (B, T) uint8 (a bool view) / int / float, strides (stride_mb, stride_mt); nonzero = valid
    adv_ptr,  # (B, T) fp32, contiguous: advantages, written here
    ret_ptr,  # (B, T) fp32, contiguous: returns, written here
    B,
    T,
    stride_rb,
    stride_rt,
    stride_vb,
    stride_vt,
    stride_mb,
    stride_mt,
    gamma,
    lam,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
    j = tl.arange(0, BLOCK_T)  # scan position inside a tile; j = 0 is the tile's LATEST time step
    c = gamma * lam
    carry = tl.zeros([BLOCK_B], dtype=tl.float32)  # A at the step just after the current tile (A_T = 0)
    for k in range(tl.cdiv(T, BLOCK_T)):
        # 1) the tile's time steps, in decreasing order, and the (B, t) / (B, t+1) addresses
        t = T - 1 - k * BLOCK_T - j  # (BLOCK_T,)
        ok = (rows[:, None] < B) & (t[None, :] >= 0)  # (BLOCK_B, BLOCK_T)
        ok_next = ok & (t[None, :] + 1 < T)
        r_off = rows[:, None] * stride_rb + t[None, :] * stride_rt
        v_off = rows[:, None] * stride_vb + t[None, :] * stride_vt
        m_off = rows[:, None] * stride_mb + t[None, :] * stride_mt
        # 2) masked rewards and values (fp32), V_{t+1} = 0 past the end of the sequence
        m = (tl.load(mask_ptr + m_off, mask=ok, other=0) != 0).to(tl.float32)
        m_next = (tl.load(mask_ptr + m_off + stride_mt, mask=ok_next, other=0) != 0).to(tl.float32)
        r = tl.load(rewards_ptr + r_off, mask=ok, other=0.0).to(tl.float32) * m
        v = tl.load(values_ptr + v_off, mask=ok, other=0.0).to(tl.float32) * m
        v_next = tl.load(values_ptr + v_off + stride_vt, mask=ok_next, other=0.0).to(tl.float32) * m_next
        # 3) delta_t = r_t + gamma V_{t+1} - V_t, then A_t = delta_t + c A_{t+1} as a scan of affine maps
        delta = r + gamma * v_next - v
        slope, offset = tl.associative_scan((tl.zeros_like(delta) + c, delta), axis=1, combine_fn=_compose)
        adv = offset + slope * carry[:, None]  # slope = c^(steps to the tile's end), offset = A with A_after = 0
        # 4) carry A at the tile's earliest step (j = BLOCK_T - 1) into the next tile
        carry = tl.sum(tl.where(j[None, :] == BLOCK_T - 1, adv, 0.0), axis=1)
        out_off = rows[:, None] * T + t[None, :]
        tl.store(adv_ptr + out_off, adv * m, mask=ok)
        tl.store(ret_ptr + out_off, adv * m + v, mask=ok)


def launch_config(on_gpu):
    """Meta-parameters. GPU: 4 rows x 256 steps = 1024 elements per tile for 4 warps (8 per thread), loaded with
    contiguous addresses along t; T / 256 sequential tiles (8 at T = 2048) bound each program's latency, and
    B / 4 programs (16 at B = 64) are plenty for 1.5 MB of data. The interpreter gets small tiles so that the
    tests' small T crosses tile boundaries."""
    if on_gpu:
        return {"BLOCK_B": 4, "BLOCK_T": 256, "num_warps": 4}
    return {"BLOCK_B": 2, "BLOCK_T": 16, "num_warps": 1}


def _gae_triton(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    meta = launch_config(rewards.is_cuda)
    strides = (*rewards.stride(), *values.stride(), *mask.stride())
    _gae_kernel[(triton.cdiv(B, meta["BLOCK_B"]),)](
        rewards, values, mask, adv, ret, B, T, *strides, float(gamma), float(lam), **meta
    )
    return adv, ret


# ----------------------------------------------------------------------------------------------------------
# Torch fallback: the same two levels. Pad T to K tiles of L steps (zero deltas after the end change nothing).
# Inside all tiles at once, the scan is one matmul with the (L, L) upper-triangular W[i, k] = c^(k - i)
# (entries <= max(1, c^L): no overflow, unlike a cumsum of c^-t). Across tiles, A at each tile's first step
# follows the same recurrence with slope c^L: K Python steps on (B,) columns (K = 32 at T = 2048), not T.


def _gae_torch(rewards, values, mask, gamma, lam):
    m = (mask != 0).float()
    r, v = rewards.float() * m, values.float() * m
    B, T = r.shape
    L, K = TORCH_TILE, -(-T // TORCH_TILE)
    delta = r + gamma * F.pad(v[:, 1:], (0, 1)) - v  # (B, T), V_T = 0
    delta = F.pad(delta, (0, K * L - T)).view(B, K, L)
    c = gamma * lam
    pw = (c ** torch.arange(L + 1, dtype=torch.float64, device=r.device)).float()  # c^0 .. c^L
    i = torch.arange(L, device=r.device)
    W = torch.where(i[None, :] >= i[:, None], pw[(i[None, :] - i[:, None]).clamp(min=0)], 0.0)  # (L, L)
    local = delta @ W.T  # (B, K, L): A_t if the tile were followed by A = 0
    heads = torch.zeros(B, K + 1, device=r.device)  # A at the first step of each tile; heads[:, K] = A_T = 0
    for k in reversed(range(K)):
        heads[:, k] = local[:, k, 0] + pw[L] * heads[:, k + 1]
    adv = (local + pw[L - i] * heads[:, 1:, None]).view(B, K * L)[:, :T]  # + c^(L - i) * A after the tile
    return adv * m, adv * m + v


# ----------------------------------------------------------------------------------------------------------
# The public function.


@torch.no_grad()
def gae(rewards, values, mask, gamma: float, lam: float):
    """(advantages, returns), each (B, T) fp32, for (B, T) rewards, values, mask; see the module docstring.

    One launch; any strides; T = 1 and all-zero mask rows work (their outputs are 0).
    """
    assert rewards.dim() == 2 and rewards.shape == values.shape == mask.shape, (rewards.shape, values.shape)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads uint8 everywhere
    if use_triton(rewards):
        return _gae_triton(rewards, values, mask, gamma, lam)
    return _gae_torch(rewards, values, mask, gamma, lam)
