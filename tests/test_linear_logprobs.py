"""kernels.linear_logprobs (log-probs from the last hidden state, chunked) against a float64 autograd reference, on
both paths (the Triton kernels, interpreted on CPU, and the torch fallback); and its memory promise: no tensor as
large as the (B, T, V) logits ever exists, checked by watching every op's output."""

import importlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.linear_logprobs import chunk_rows, linear_logprobs, linear_logprobs_ref

LP = importlib.import_module("kernels.logprobs")


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Which log-prob launchers run; the other path's raise if called."""
    if request.param == "torch":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        banned = ["_fwd_triton", "_bwd_triton"]
    else:
        assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
        banned = ["_fwd_torch", "_bwd_torch"]

    def tripwire(*a, **k):
        raise AssertionError(f"wrong path taken (testing {request.param})")

    for name in banned:
        monkeypatch.setattr(LP, name, tripwire)
    return request.param


def reference(hidden, weight, labels, temperature, grad):
    """float64: the whole logits, log_softmax, gather; labels outside [0, V) give 0. Returns (out, dh, dw)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()  # always: the reference's dW is ignored for a frozen head
    V = w.size(0)
    valid = (labels >= 0) & (labels < V)
    lp = torch.log_softmax(h @ w.t() / temperature, -1).gather(-1, labels.clamp(0, V - 1)[..., None])[..., 0] * valid
    dh, dw = torch.autograd.grad(lp, (h, w), grad.double())
    return lp, dh, dw


def close(got, want, rtol, what):
    got, want = got.detach().double(), want.detach().double()
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rtol * scale + 1e-6, f"{what}: max abs err {err:.3e} vs max|ref| {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("rows", [4, 7, 64])  # several chunks with a partial last one; one chunk for all 14 rows
@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])  # frozen: dH made in forward
def test_matches_reference(path, dtype, temperature, rows, frozen):
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 8, 16, 300
    base = torch.randn(B, T + 1, D, generator=g)
    hidden = base.to(dtype)[:, :-1].requires_grad_()  # non-contiguous, as `hidden[:, P - 1 : -1]` is
    hidden.retain_grad()
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 3).to(dtype).requires_grad_(not frozen)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2], labels[1, -1] = -100, V  # ignored: 0 and no gradient
    grad = torch.randn(B, T, generator=g)
    out = linear_logprobs(hidden, weight, labels, temperature, rows=rows)
    out.backward(grad)
    want, dh, dw = reference(hidden, weight, labels, temperature, grad)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    # fp32: the logits come from an fp32 GEMM (rounding ~1e-6 relative); bf16: the logits and gradients are
    # rounded to bf16 (2^-8), and dW sums bf16-rounded chunks
    rtol = 1e-5 if dtype == torch.float32 else 3e-2
    close(out, want, rtol if dtype == torch.float32 else 1e-2, "log-probs")
    close(hidden.grad, dh, rtol, "d hidden")
    if not frozen:
        close(weight.grad, dw, rtol, "d weight")
    assert out[0, 2] == 0 and out[1, -1] == 0


def test_same_as_unfused_path(path):
    """Equal to lm_head then kernels.logprobs (what ppo_lag.py computes without --fused_logprobs), to fp32 rounding,
    including the gradients of a tied weight used twice."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 12, generator=g, requires_grad=True)
    weight = torch.randn(40, 12, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (3, 5), generator=g)
    fused = linear_logprobs(hidden, weight, labels, rows=2)
    unfused = linear_logprobs_ref(hidden, weight, labels)
    close(fused, unfused, 1e-5, "log-probs")
    (a_h, a_w), (b_h, b_w) = (
        torch.autograd.grad(x.sum() + weight.square().sum(), (hidden, weight)) for x in (fused, unfused)
    )
    close(a_h, b_h, 1e-5, "d hidden")
    close(a_w, b_w, 1e-5, "d weight (the tied term added)")


def test_only_the_needed_gradient(path):
    """A frozen lm_head (LoRA actor) gets no weight gradient computed, and a frozen hidden none either."""
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    labels = torch.randint(0, 50, (2, 3))
    linear_logprobs(hidden, weight, labels).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    weight.requires_grad_()
    out = linear_logprobs(hidden.detach(), weight, labels)
    (dw,) = torch.autograd.grad(out.sum(), weight)
    assert dw.abs().sum() > 0


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor (in bytes) any op produced while active. Bytes, not elements: Triton's interpreter
    hands each kernel argument over as a uint8 view of its storage."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_never_holds_the_whole_logits(path):
    """Forward and backward: no op output larger than one (rows, V) chunk, where the unfused path makes (B, T, V)."""
    B, T, D, V, rows = 4, 16, 8, 256, 8
    hidden = torch.randn(B, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    with LargestOutput() as fused:
        linear_logprobs(hidden, weight, labels, rows=rows).sum().backward()
    with LargestOutput() as unfused:
        linear_logprobs_ref(hidden, weight, labels).sum().backward()
    assert unfused.largest >= B * T * V * 4  # the watch sees the big tensors when they exist
    assert fused.largest <= max(rows, D) * V * 4, f"{fused.largest} bytes > one fp32 chunk ({rows} x {V})"


def test_chunk_rows():
    assert chunk_rows(128256, 2, 256 * 2**20) == 1024  # 1046 rows of bf16 logits, down to whole 64-row tiles
    assert chunk_rows(32000, 4, 2**20) == 8  # fewer than 64 fit: as many as fit
    assert chunk_rows(10**9, 4, 2**20) == 1


def tiny_llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            **config,
        )
    )


def test_head_gives_logprobs(path):
    """Inside the context the model's forward returns next-token log-probs as .logits (all positions, or the last k
    with logits_to_keep), equal to the logits path, gradients included; outside, logits again."""
    from kernels import head_gives_logprobs, logprobs

    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    want = logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    (want_grad,) = torch.autograd.grad(want.sum(), model.model.norm.weight)
    with head_gives_logprobs(model, targets):
        got = model(input_ids=ids).logits  # (2, 9)
        last = model(input_ids=ids, logits_to_keep=4).logits  # positions 5..8
    close(got[:, :-1], want, 1e-5, "log-probs")
    assert got.shape == (2, 9) and (got[:, -1] == 0).all()  # the last position has no target
    close(last, got[:, -4:], 1e-5, "log-probs of the last 4 positions")
    (grad,) = torch.autograd.grad(got.sum(), model.model.norm.weight)
    close(grad, want_grad, 1e-4, "gradient through the model")
    assert model(input_ids=ids).logits.shape == (2, 9, 97)  # the head's own forward is back


def test_fused_head_problem():
    from kernels import fused_head_problem

    assert fused_head_problem(tiny_llama()) is None
    model = tiny_llama()
    model.lm_head = torch.nn.Linear(16, 97, bias=True)
    assert "bias-free linear" in fused_head_problem(model)
    assert "scales its logits" in fused_head_problem(tiny_llama(logit_scale=0.5))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_frozen_head_backward_has_no_gemm(path):
    """A frozen head's backward is one multiply (dH = g U): no matrix product, while a trained head's recomputes
    the logits and forms dH and dW (3 products per chunk)."""
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 40, (2, 6))
    for frozen, products in ((True, 0), (False, 3 * 3)):
        weight = torch.randn(40, 8, requires_grad=not frozen)
        out = linear_logprobs(hidden, weight, labels, rows=4)  # 12 rows: 3 chunks
        with CountOps() as ops:
            out.sum().backward()
        gemms = [n for n in ops.names if n.split(".")[0].rstrip("_") in ("mm", "addmm", "matmul", "bmm")]
        assert len(gemms) == products, (frozen, gemms, [n for n in ops.names if "mm" in n or "mul" in n])
