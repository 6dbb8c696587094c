"""Kernels vs slow, obvious references (float64 autograd, the per-step GAE loop, a per-row Python index search).

Every case runs on each path that can run it here (all but 11 interpreted cases too slow for CI, see
`test_end_scores`), the path picked by the `device` fixture:
    "triton"             the kernels: on CUDA, or on CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1
                         before triton is imported) with its small CPU blocks, which the small shapes cross;
    "torch"              the CPU fallback (TRITON_INTERPRET unset at call time);
    "interp-gpu-blocks"  without a GPU, for the GPU-sized shapes: the interpreter with the GPU launch config, since
                         those shapes exist to cross the GPU block sizes.
The fixture also replaces the other path's launchers with a tripwire, so a test cannot silently run the wrong one.
fp32 and bf16 run on every path. Tolerances are relative to the reference's own scale (see `check`), so a zero or
rescaled result fails whatever the inputs' scale. Shapes are small: the interpreter is ~1000x slower than torch.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import cross_entropy, end_scores, end_scores_ref, gae, gae_ref, logprobs, logprobs_ref

ROOT = Path(__file__).resolve().parent.parent
ON_GPU = torch.cuda.is_available()
LP, GAE, ES = (importlib.import_module(f"kernels.{m}") for m in ("logprobs", "gae", "end_scores"))
TRITON_FNS = [(LP, "_fwd_triton"), (LP, "_bwd_triton"), (GAE, "_gae_triton"), (ES, "_fwd_triton")]
TORCH_FNS = [(LP, "_fwd_torch"), (LP, "_bwd_torch"), (GAE, "_gae_torch"), (ES, "_fwd_torch")]
INTERP_GPU = "interp-gpu-blocks"

# max |got - want| <= rtol * max |want| + ATOL. Forward passes compute in fp32 from inputs that are exact in fp32
# (bf16 ones included), so they agree to fp32 rounding (measured: <= 1e-6). A bf16 gradient is written in bf16:
# up to 2^-7 = 0.78% of an element where the interpreter truncates (CUDA rounds to nearest: half that), and the
# score head's backward rounds twice (G to bf16, then the product): measured up to 0.77% of max|ref| on CPU. 2% leaves
# room for the GPU's bf16 GEMM reductions and still fails a zero, halved or partial gradient.
RTOL = 1e-5
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
ATOL = 1e-6  # decides only where the reference is ~0 (all-ignored rows)


def grid(shapes, gpu_shape):
    """(path, dtype, shape) cases for the indirect `device` fixture: every path x dtype x shape. The GPU-sized
    shape runs on the interpreter with the GPU launch config when there is no GPU."""
    cases = []
    for path in ("triton", "torch"):
        for dtype in (torch.float32, torch.bfloat16):
            for shape in [*shapes, gpu_shape]:
                p = INTERP_GPU if (path == "triton" and shape == gpu_shape and not ON_GPU) else path
                name = f"{p}-{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}"
                cases.append(pytest.param(p, dtype, shape, id=name))
    return cases


@pytest.fixture(params=["triton", "torch"])
def device(request, monkeypatch):
    """The device to build inputs on; the other path's launchers raise if called."""
    if request.param == "torch":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        banned, dev = TRITON_FNS, "cpu"
    else:
        assert ON_GPU or os.environ.get("TRITON_INTERPRET") == "1", "conftest should turn the interpreter on"
        banned, dev = TORCH_FNS, "cuda" if ON_GPU else "cpu"
    if request.param == INTERP_GPU:  # the launchers ask for the GPU's meta-parameters although tensors are on CPU
        monkeypatch.setattr(LP, "launch_config", lambda V, on_gpu, f=LP.launch_config: f(V, True))
        monkeypatch.setattr(GAE, "launch_config", lambda on_gpu, f=GAE.launch_config: f(True))
        monkeypatch.setattr(ES, "launch_config", lambda on_gpu, f=ES.launch_config: f(True))

    def tripwire(*args, **kwargs):
        raise AssertionError(f"wrong path taken (testing the {request.param} path)")

    for module, name in banned:
        monkeypatch.setattr(module, name, tripwire)
    return dev


def check(got, want, what, rtol=RTOL, atol=ATOL):
    """max |got - want| <= rtol * max |want| + atol: the error against the reference's own scale, so that a
    zero, halved or sign-flipped result fails unless the reference itself is ~0."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff, scale = (got - want).abs(), want.abs().max().item()
    bound = rtol * scale + atol
    msg = f"max abs diff {diff.max():.3e} > {bound:.3e} = {rtol:.0e} * max|ref| {scale:.3e} + {atol:.0e}"
    assert diff.max().item() <= bound, f"{what}: {msg} (mean abs diff {diff.mean():.3e})"


# ----------------------------------------------------------------------------------------------------------
# log-probs


def slow_logprobs(logits, labels, temperature):
    """float64 log_softmax + gather; labels outside [0, V) give 0."""
    V = logits.size(-1)
    valid = (labels >= 0) & (labels < V)
    lp = torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, labels.clamp(0, V - 1)[..., None])
    return lp.squeeze(-1) * valid


@pytest.mark.parametrize(
    "device,dtype,shape", grid([(1, 1, 7), (2, 3, 33), (3, 5, 1000)], (2, 3, 9000)), indirect=["device"]
)
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs(device, shape, scale, dtype, temperature):
    torch.manual_seed(0)
    B, T, V = shape
    logits = (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=device)
    labels[0, -1] = -100  # ignored: log-prob 0, no gradient
    labels[1:2] = -100  # a fully ignored row (when B > 1)
    grad_out = torch.randn(B, T, device=device)
    got = logprobs(logits, labels, temperature=temperature)
    (got_grad,) = torch.autograd.grad(got, logits, grad_out)
    want = slow_logprobs(logits, labels, temperature)
    (want_grad,) = torch.autograd.grad(want, logits, grad_out.double())
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    check(got, want, "logprobs")
    check(got_grad, want_grad, "d logits", GRAD_RTOL[dtype])
    ignored = labels == -100
    assert (got[ignored] == 0).all() and (got_grad[ignored] == 0).all()


@pytest.mark.parametrize("layout", ["sliced", "permuted"])
def test_logprobs_non_contiguous(device, layout):
    torch.manual_seed(1)
    B, T, V = 2, 6, 300
    if layout == "sliced":  # logits[:, :-1] of a padded buffer, as in `logprobs(logits[:, :-1], ids[:, 1:])`
        logits = torch.randn(B, T + 1, V + 5, device=device)[:, :-1, :V]
    else:  # vocabulary not the fastest axis
        logits = torch.randn(V, T, B, device=device).permute(2, 1, 0)
    logits.requires_grad_()
    labels = torch.randint(0, V, (T, B), device=device).T
    grad_out = torch.randn(B, T, device=device)
    got = logprobs(logits, labels)
    (got_grad,) = torch.autograd.grad(got, logits, grad_out)
    want = slow_logprobs(logits, labels, 1.0)
    (want_grad,) = torch.autograd.grad(want, logits, grad_out.double())
    check(got, want, "logprobs")
    check(got_grad, want_grad, "d logits")


def test_cross_entropy(device):
    torch.manual_seed(2)
    logits = (torch.randn(3, 4, 50, device=device) * 3).requires_grad_()
    labels = torch.randint(0, 50, (3, 4), device=device)
    labels[0, :2] = labels[2, 3] = -100
    loss = cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    check(loss, ref, "cross-entropy")
    check(grad, ref_grad, "d logits")
    all_ignored = cross_entropy(logits, torch.full_like(labels, -100))
    assert all_ignored.item() == 0.0, "an all-ignored batch gives 0, not nan"


@pytest.mark.parametrize("chunk_rows", [1, 4, 13])  # rows < T (t-slices), rows >= T (b-slices, ragged last)
def test_logprobs_torch_chunks(monkeypatch, chunk_rows):
    """The fallback's row chunking (both kinds of slices) gives the same numbers."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(LP, "CHUNK_BYTES", chunk_rows * 4 * 40)
    torch.manual_seed(3)
    logits = torch.randn(5, 6, 40).requires_grad_()
    labels = torch.randint(0, 40, (5, 6))
    grad_out = torch.randn(5, 6)
    got = logprobs(logits, labels, 1.3)
    (got_grad,) = torch.autograd.grad(got, logits, grad_out)
    want = slow_logprobs(logits, labels, 1.3)
    (want_grad,) = torch.autograd.grad(want, logits, grad_out.double())
    check(got, want, "logprobs")
    check(got_grad, want_grad, "d logits")


# ----------------------------------------------------------------------------------------------------------
# GAE


def slow_gae(rewards, values, mask, gamma, lam):
    """The per-step loop every peer runs, in float64."""
    m = (mask != 0).double()
    r, v = rewards.double() * m, values.double() * m
    B, T = r.shape
    adv = torch.zeros_like(r)
    last = torch.zeros(B, dtype=torch.float64, device=r.device)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else 0.0
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv * m, adv * m + v


def response_mask(B, T, device, dtype):
    """Row kinds cycle: right-padded, all-masked, prompt + response + padding, response to the end."""
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b in range(B):
        kind, start, stop = b % 4, (b * 7) % max(T // 2, 1), T - (b * 3) % max(T // 3, 1)
        if kind == 0:
            mask[b, : max(stop, 1)] = True
        elif kind == 2:
            mask[b, start:stop] = True
        elif kind == 3:
            mask[b, start:] = True
    return mask.to(dtype)


@pytest.mark.parametrize("device,dtype,shape", grid([(1, 1), (3, 37), (5, 100)], (9, 700)), indirect=["device"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae(device, shape, scale, dtype, gamma, lam):
    torch.manual_seed(4)
    B, T = shape
    rewards = (torch.randn(shape, device=device) * scale).to(dtype)
    values = (torch.randn(shape, device=device) * scale).to(dtype)
    mask = response_mask(B, T, device, torch.bool)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = slow_gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32
    check(adv, want_adv, "advantages")
    check(ret, want_ret, "returns")
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_gae_mask_dtypes_and_strides(device, mask_dtype):
    torch.manual_seed(5)
    B, T = 6, 45
    rewards = torch.randn(T, B, device=device).T  # non-contiguous views
    values = torch.randn(B, 2 * T, device=device)[:, ::2]
    mask = response_mask(B, T, device, mask_dtype)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    want_adv, want_ret = slow_gae(rewards, values, mask, 1.0, 0.95)
    check(adv, want_adv, "advantages")
    check(ret, want_ret, "returns")


# ----------------------------------------------------------------------------------------------------------
# end scores


def slow_end_scores(hidden, mask, weight, bias):
    """float64 per-token scores, and each row's last valid index found by a Python loop (0 if none)."""
    scores = hidden.double() @ weight.double().T
    if bias is not None:
        scores = scores + bias.double()
    ends = []
    for row in mask.tolist():
        valid = [t for t, m in enumerate(row) if m]
        ends.append(valid[-1] if valid else 0)
    return torch.stack([scores[b, e] for b, e in enumerate(ends)]), scores


def attention_mask(B, T, padding, device, dtype):
    """Row 1 (when B > 1) is all masked; the others have random lengths, padded on the given side."""
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b in range(B):
        n = 0 if (b == 1) else 1 + (b * 5 + 3) % T
        if padding == "right":
            mask[b, :n] = True
        else:
            mask[b, T - n :] = True
    return mask.to(dtype)


# B, T, H, D. The GPU-sized shape crosses the GPU blocks: 1024 tokens and features in the end kernel, 16 x 256
# in the per-token kernel (the torch path's slices of T are checked in `test_end_scores_torch_chunks`).
ES_SHAPES, ES_GPU_SHAPE = [(1, 1, 5, 1), (3, 9, 37, 1), (4, 20, 70, 3)], (2, 1100, 1100, 2)
ONE_CASE = (torch.bfloat16, 1.0, True)  # (dtype, scale, with_bias) of the one interpreted GPU-blocks per-token case


@pytest.mark.parametrize("device,dtype,shape", grid(ES_SHAPES, ES_GPU_SHAPE), indirect=["device"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("return_all", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_end_scores(device, shape, scale, dtype, return_all, with_bias, request):
    if return_all and request.node.callspec.params["device"] == INTERP_GPU and (dtype, scale, with_bias) != ONE_CASE:
        pytest.skip(
            "interpreted per-token kernel with the GPU blocks at the GPU-sized shape: 3-6 s a case, so one case "
            "(bf16, scale 1, bias) runs here and a GPU runs them all"
        )
    torch.manual_seed(6)
    B, T, H, D = shape
    padding = "left" if (H + int(return_all) + int(with_bias)) % 2 else "right"
    mask = attention_mask(B, T, padding, device, [torch.long, torch.bool, torch.float32][(B + int(return_all)) % 3])
    hidden = (torch.randn(T, B, H, device=device) * scale).to(dtype).transpose(0, 1).requires_grad_()  # strided
    weight = (torch.randn(D, H, device=device) / H**0.5).to(dtype).requires_grad_()
    bias = torch.randn(D, device=device).to(dtype).requires_grad_() if with_bias else None
    params = [hidden, weight] + ([bias] if with_bias else [])
    g_end, g_all = torch.randn(B, D, device=device), torch.randn(B, T, D, device=device)

    out = end_scores(hidden, mask, weight, bias, return_all=return_all)
    want_end, want_all = slow_end_scores(hidden, mask, weight, bias)
    if return_all:
        got_end, got_all = out
        check(got_all, want_all, "per-token scores")
        got = torch.autograd.grad([got_end, got_all], params, [g_end, g_all])
        want = torch.autograd.grad([want_end, want_all], params, [g_end.double(), g_all.double()])
    else:
        got_end = out
        got = torch.autograd.grad(got_end, params, g_end)
        want = torch.autograd.grad(want_end, params, g_end.double())
    assert got_end.dtype == torch.float32
    check(got_end, want_end, "end scores")
    for name, g, w in zip(["d hidden", "d weight", "d bias"], got, want, strict=False):
        assert g.dtype == dtype, name
        check(g, w, name, GRAD_RTOL[dtype])


@pytest.mark.parametrize("chunk_rows", [1, 3, 7])  # T-slices of 1 token, ragged ones, the whole of T at once
def test_end_scores_torch_chunks(monkeypatch, chunk_rows):
    """The fallback's per-token scores go through T in slices of CHUNK_BYTES / (4 B H) tokens: same numbers."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    B, T, H, D = 3, 7, 10, 2
    monkeypatch.setattr(ES, "CHUNK_BYTES", chunk_rows * 4 * B * H)
    torch.manual_seed(8)
    hidden, weight, bias = torch.randn(B, T, H), torch.randn(D, H), torch.randn(D)
    mask = attention_mask(B, T, "right", "cpu", torch.long)
    got_end, got_all = end_scores(hidden, mask, weight, bias, return_all=True)
    want_end, want_all = slow_end_scores(hidden, mask, weight, bias)
    check(got_end, want_end, "end scores")
    check(got_all, want_all, "per-token scores")


def test_module_references_agree_with_the_slow_ones():
    """The `*_ref` functions in kernels/ are the documented spec; they must say what these tests say."""
    torch.manual_seed(7)
    logits, labels = torch.randn(2, 3, 20) * 3, torch.randint(0, 20, (2, 3))
    labels[1, 2] = -100
    check(logprobs_ref(logits, labels, 0.8), slow_logprobs(logits, labels, 0.8), "logprobs_ref")
    rewards, values, mask = torch.randn(4, 30), torch.randn(4, 30), response_mask(4, 30, "cpu", torch.float32)
    got, want = gae_ref(rewards, values, mask, 0.99, 0.95), slow_gae(rewards, values, mask, 0.99, 0.95)
    check(got[0], want[0], "gae_ref advantages")
    check(got[1], want[1], "gae_ref returns")
    hidden, weight, bias = torch.randn(3, 7, 10), torch.randn(2, 10), torch.randn(2)
    mask = attention_mask(3, 7, "left", "cpu", torch.long)
    got, want = end_scores_ref(hidden, mask, weight, bias, True), slow_end_scores(hidden, mask, weight, bias)
    check(got[0], want[0], "end_scores_ref end scores")
    check(got[1], want[1], "end_scores_ref per-token scores")


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA: the sync debug mode watches CUDA streams")
def test_no_host_sync():
    """The forward passes (and the log-prob backward) never wait for the GPU: CUDA's sync debug mode raises."""
    dev = "cuda"
    logits = torch.randn(2, 5, 300, device=dev, requires_grad=True)
    labels = torch.randint(0, 300, (2, 5), device=dev)
    hidden, weight = torch.randn(3, 7, 40, device=dev), torch.randn(1, 40, device=dev)
    mask = attention_mask(3, 7, "left", dev, torch.long)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logprobs(logits, labels).sum().backward()
        cross_entropy(logits, labels)
        gae(torch.randn(3, 7, device=dev), torch.randn(3, 7, device=dev), mask, 1.0, 0.95)
        end_scores(hidden, mask, weight, None, return_all=True)
        end_scores(hidden, mask, weight)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------------------------------------
# A fresh process without the interpreter and without CUDA: imports work and every call takes the torch path.
# Then the kernels compile for a real GPU (sm_90; ptxas ships with triton): the interpreter does not catch every
# compile error. One subprocess (about 5 s) serves both tests.

FRESH_PROCESS = """
import importlib, torch
from kernels import cross_entropy, end_scores, end_scores_ref, gae, gae_ref, logprobs, logprobs_ref
x = torch.randn(2, 3, 11, requires_grad=True)
logprobs(x, torch.randint(0, 11, (2, 3))).sum().backward()
cross_entropy(x, torch.full((2, 3), -100))
gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), 1.0, 0.95)
end_scores(torch.randn(2, 3, 4), torch.ones(2, 3), torch.randn(1, 4), None, return_all=True)
print("cpu ok", flush=True)
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(f"no ahead-of-time compiler in triton {triton.__version__}: {e}")
    raise SystemExit(3)
LP, GAE, ES = (importlib.import_module(f"kernels.{m}") for m in ("logprobs", "gae", "end_scores"))
scalars = {"inv_temp": "fp32", "gamma": "fp32", "lam": "fp32"}
end_meta, token_meta = ES.launch_config(on_gpu=True)
jobs = [  # (kernel, pointer dtypes where not fp32, meta-parameters of the GPU launch)
    (LP._logprobs_fwd_kernel, {"logits_ptr": "*bf16", "labels_ptr": "*i64"}, LP.launch_config(128256, True)),
    (LP._logprobs_bwd_kernel, {"logits_ptr": "*bf16", "labels_ptr": "*i64", "grad_ptr": "*bf16"},
     LP.launch_config(128256, True)),
    (GAE._gae_kernel, {"rewards_ptr": "*bf16", "mask_ptr": "*u8"}, GAE.launch_config(True)),
    (ES._end_scores_kernel, {"hidden_ptr": "*bf16", "mask_ptr": "*i64", "idx_ptr": "*i64"},
     {**end_meta, "HAS_BIAS": True}),
    (ES._token_scores_kernel, {"hidden_ptr": "*bf16"}, {**token_meta, "HAS_BIAS": True}),
]
for fn, types, meta in jobs:
    warps = meta.pop("num_warps")
    sig = {a: "constexpr" if a in meta else types.get(a) or scalars.get(a) or ("*fp32" if a.endswith("_ptr") else "i32")
           for a in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps})
print("sm_90 ok")
"""


@pytest.fixture(scope="module")
def fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-c", FRESH_PROCESS]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_cpu_without_interpreter(fresh_process):
    assert "cpu ok" in fresh_process.stdout, fresh_process.stderr[-3000:]


def test_kernels_compile_for_sm90(fresh_process):
    if fresh_process.returncode == 3:  # an installed triton other than the pinned one
        pytest.skip(fresh_process.stdout.strip().splitlines()[-1])
    assert fresh_process.returncode == 0 and "sm_90 ok" in fresh_process.stdout, fresh_process.stderr[-3000:]
