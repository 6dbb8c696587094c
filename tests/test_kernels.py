"""Kernels vs slow, obvious references (float64 autograd, the per-step GAE loop, a per-row Python index search).

Every case runs on each path that can run it here (all but 11 interpreted cases too slow for CI, see
`test_end_scores`), the path picked by the `device` fixture:
    "triton"             the kernels: on CUDA, or on CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1
                         before triton is imported) with its small CPU blocks, which the small shapes cross;
    "torch"              the CPU fallback (TRITON_INTERPRET unset at call time);
    "interp-gpu-blocks"  without a GPU, for the GPU-sized shapes: the interpreter with the GPU launch config, since
                         those shapes exist to cross the GPU block sizes.
The fixture also replaces the other path's launchers with a tripwire, so a test cannot silently run the wrong one.
fp32 and bf16 run on every path. The log-prob forward's two algorithms and its autotuning (GPU only) have their
own tests after `test_logprobs_torch_chunks`. Tolerances are relative to the reference's own scale (see `check`), so
a zero or rescaled result fails whatever the inputs' scale. Shapes are small: the interpreter is ~1000x slower than
torch.
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


# The two forward algorithms and the autotuner (kernels/logprobs.py's docstring). Rows built to break the lane-wise
# update: a dropped rescale, exp(d) for exp(-|d|), a missing final exp(m - M), a -inf start (nan from -inf - -inf).


def lp_meta(lanewise, block, warps=1):
    """(forward, backward) meta-parameters, as `launch_config` returns them."""
    return {"BLOCK_V": block, "num_warps": warps, "LANEWISE": lanewise}, {"BLOCK_V": block, "num_warps": warps}


def hard_rows(V, block):
    """(name, logits row) pairs, fp32 on CPU, for a vocabulary of a few `block`-wide slices and a partial last one."""
    g = torch.Generator().manual_seed(9)
    noise = lambda scale: torch.randn(V, generator=g) * scale
    ramp = torch.linspace(-8.0, 8.0, V)
    first, last, lead, holes = noise(3), noise(3), noise(3), noise(3)
    first[0], last[-1], lead[:block], holes[::3] = 25.0, 25.0, float("-inf"), float("-inf")
    return [
        ("random", noise(3)),
        ("max in the first slice", first),
        ("max in the last, partial slice", last),
        ("rising: the max moves every slice, every lane rescales", ramp + noise(0.1)),
        ("falling: the max comes first", -ramp + noise(0.1)),
        ("spread 1e4: one-hot softmax", noise(1e4)),
        ("offset +1e4", noise(3) + 1e4),
        ("offset -1e4", noise(3) - 1e4),
        ("first slice masked (-inf)", lead),
        ("every third entry masked", holes),
        ("all equal: uniform", torch.zeros(V)),
        ("all -inf: no distribution", torch.full((V,), float("-inf"))),
    ]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the all -inf row (numpy)
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # its lse = log 0 = -inf
@pytest.mark.parametrize("device", ["triton"], indirect=True)
@pytest.mark.parametrize("lanewise", [False, True], ids=["reductions", "lanewise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_algorithms(device, monkeypatch, lanewise, dtype, temperature):
    """Both forward algorithms (and the backward after them) on `hard_rows`, strided, each row against the float64
    reference: within RTOL of the row's scale plus what fp32 can resolve at the row's largest logit (log p = x - lse
    cancels there: a few ulps of 1e4 is 1e-3)."""
    block = 64
    monkeypatch.setattr(LP, "launch_config", lambda V, on_gpu: lp_meta(lanewise, block))
    V = 3 * block + 13
    names, rows = zip(*hard_rows(V, block))
    B, T = 3, len(rows) // 3
    buffer = torch.zeros(B, T, V + 3, dtype=dtype, device=device)
    buffer[..., :V] = torch.stack(rows).view(B, T, V).to(dtype)
    logits = buffer[..., :V].requires_grad_()  # strided: rows V + 3 apart
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(10)).to(device)
    labels.view(-1)[1], labels.view(-1)[2], labels.view(-1)[4] = 0, V - 1, -100  # the max; the last entry; ignored
    labels.view(-1)[8], labels.view(-1)[9] = block + 1, 1  # finite entries of the rows with masked ones
    grad_out = torch.randn(B, T, device=device)
    got = logprobs(logits, labels, temperature)
    (got_grad,) = torch.autograd.grad(got, logits, grad_out)
    want = slow_logprobs(logits, labels, temperature)
    (want_grad,) = torch.autograd.grad(want, logits, grad_out.double())
    x, got, want = logits.detach().flatten(0, 1), got.flatten(), want.flatten()
    got_grad, want_grad, g = got_grad.flatten(0, 1), want_grad.flatten(0, 1), grad_out.flatten()
    for r, name in enumerate(names):
        if name.startswith("all -inf"):  # nan as the reference (and as before), not a number that looks valid
            assert got[r].isnan() and want[r].isnan() and got_grad[r].isnan().all(), name
            continue
        fp32 = 4 * torch.finfo(torch.float32).eps * x[r][x[r].isfinite()].abs().max().item() / temperature
        check(got[r], want[r], f"{name}: logprobs", atol=ATOL + fp32)
        check(got_grad[r], want_grad[r], f"{name}: d logits", GRAD_RTOL[dtype], ATOL + fp32 * abs(g[r].item()))
    assert got[4] == 0 and (got_grad[4] == 0).all(), "an ignored label: log-prob 0, no gradient"


def test_tuning_candidates():
    """What the autotuner may pick: powers of two the kernels accept, 8 to 32 elements per thread, both algorithms
    on the same sizes, the backward on those sizes, at most 16 each, the fixed GPU config among them (so tuning
    can only keep or beat it), and exactly these handed to triton.autotune."""
    fwd, bwd = LP.tuning_candidates(), LP.tuning_candidates(backward=True)
    assert 2 <= len(fwd) <= 16 and 1 <= len(bwd) <= 16
    assert len({tuple(c.items()) for c in fwd}) == len(fwd) and len({tuple(c.items()) for c in bwd}) == len(bwd)
    for c in fwd + bwd:
        block, warps = c["BLOCK_V"], c["num_warps"]
        assert block & (block - 1) == 0 and 1024 <= block <= 8192, c
        assert warps in (4, 8, 16) and 8 <= block // (32 * warps) <= 32, c
    sizes = lambda cs: sorted((c["BLOCK_V"], c["num_warps"]) for c in cs)
    assert sizes(c for c in fwd if c["LANEWISE"]) == sizes(c for c in fwd if not c["LANEWISE"]) == sizes(bwd)
    assert all(set(c) == {"BLOCK_V", "num_warps"} for c in bwd)
    fixed_fwd, fixed_bwd = LP.launch_config(128256, True)
    assert fixed_fwd in fwd and fixed_bwd in bwd
    for tuner, cands in ((LP._fwd_tuned, fwd), (LP._bwd_tuned, bwd)):
        assert [{**cfg.kwargs, "num_warps": cfg.num_warps} for cfg in tuner.configs] == cands
        assert tuner.keys == ["V"]


@pytest.mark.parametrize("device", ["triton"], indirect=True)
def test_every_tuning_candidate(device, monkeypatch):
    """Every config the autotuner may pick gives the reference's numbers, at a V that ends in a partial slice for
    each BLOCK_V. The interpreter ignores num_warps: on CPU one run per (algorithm, BLOCK_V), on a GPU every one."""
    monkeypatch.setattr(LP, "TUNE_MIN_V", 10**9)  # the fixed-config launch, fed each candidate in turn
    torch.manual_seed(11)
    B, T, V = 2, 3, 9000  # test_logprobs' GPU-sized shape: on a GPU, the kernels its autotuning compiled
    logits = (torch.randn(B, T, V, device=device) * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=device)
    grad_out = torch.randn(B, T, device=device)
    want = slow_logprobs(logits, labels, 1.0)
    (want_grad,) = torch.autograd.grad(want, logits, grad_out.double())
    distinct = lambda meta: tuple(v for k, v in meta.items() if ON_GPU or k != "num_warps")
    fwd_seen, bwd_seen = set(), set()
    for fwd_meta in LP.tuning_candidates():
        bwd_meta = {k: v for k, v in fwd_meta.items() if k != "LANEWISE"}  # the backward's candidates: same sizes
        if distinct(fwd_meta) in fwd_seen:
            continue
        fwd_seen.add(distinct(fwd_meta))
        monkeypatch.setattr(LP, "launch_config", lambda V, on_gpu, m=(fwd_meta, bwd_meta): m)
        got = logprobs(logits, labels)
        check(got, want, f"logprobs with {fwd_meta}")
        if distinct(bwd_meta) not in bwd_seen:
            bwd_seen.add(distinct(bwd_meta))
            (got_grad,) = torch.autograd.grad(got, logits, grad_out)
            check(got_grad, want_grad, f"d logits with {bwd_meta}", GRAD_RTOL[torch.bfloat16])
    assert bwd_seen == {distinct(c) for c in LP.tuning_candidates(backward=True)}


@pytest.mark.skipif(ON_GPU, reason="on a GPU the real autotuner runs: test_logprobs at V = 9000, test_autotuned_on_gpu")
def test_autotuner_plumbing(monkeypatch):
    """The autotuned launch path, run here under a stand-in timer (the interpreter cannot time): every candidate
    runs on the same output buffers, then the pick once more; the numbers left behind are the reference's (the
    kernels store, never accumulate), and `chosen_configs` names the pick."""
    runs = []

    def fake_bench(kernel_call, quantiles):  # the last candidate is the fastest
        kernel_call()
        runs.append(None)
        return [1000.0 - len(runs)] * len(quantiles)

    fwd, bwd = LP.tuning_candidates(), LP.tuning_candidates(backward=True)
    # no disk cache here: a second run of the suite would read the first one's pick and time nothing
    tuner = lambda kernel, candidates: LP._tuner(kernel, candidates, do_bench=fake_bench, cache_results=False)  # noqa: E731
    monkeypatch.setattr(LP, "_fwd_tuned", tuner(LP._logprobs_fwd_kernel, fwd))
    monkeypatch.setattr(LP, "_bwd_tuned", tuner(LP._logprobs_bwd_kernel, bwd))
    monkeypatch.setattr(LP, "autotunes", lambda logits: logits.size(-1) >= LP.TUNE_MIN_V)  # CPU allowed, here only
    torch.manual_seed(12)
    V = LP.TUNE_MIN_V + 8
    logits = (torch.randn(1, 2, V) * 3).to(torch.bfloat16).requires_grad_()
    labels, grad_out = torch.randint(0, V, (1, 2)), torch.randn(1, 2)
    got = logprobs(logits, labels, 0.7)
    assert len(runs) == len(fwd)
    (got_grad,) = torch.autograd.grad(got, logits, grad_out)
    assert len(runs) == len(fwd) + len(bwd)
    want = slow_logprobs(logits, labels, 0.7)
    (want_grad,) = torch.autograd.grad(want, logits, grad_out.double())
    check(got, want, "logprobs after tuning")
    check(got_grad, want_grad, "d logits after tuning", GRAD_RTOL[torch.bfloat16])
    assert LP.chosen_configs() == {f"forward V={V} bfloat16": fwd[-1], f"backward V={V} bfloat16": bwd[-1]}
    logprobs(logits, labels)  # the same key: no second tuning
    assert len(runs) == len(fwd) + len(bwd)


def test_autotune_rule(monkeypatch):
    """Tuned: CUDA tensors of a real vocabulary; not in the interpreter, not below TUNE_MIN_V, not with
    NANO_AUTOTUNE=0 (the fixed config, the same summation order on every machine)."""
    from types import SimpleNamespace

    def fake(is_cuda, V):
        return SimpleNamespace(is_cuda=is_cuda, size=lambda dim: V)

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("NANO_AUTOTUNE", raising=False)
    assert LP.autotunes(fake(True, 128256)) and not LP.autotunes(fake(True, LP.TUNE_MIN_V - 1))
    assert not LP.autotunes(fake(False, 128256))
    monkeypatch.setenv("NANO_AUTOTUNE", "0")
    assert not LP.autotunes(fake(True, 128256))
    monkeypatch.setenv("NANO_AUTOTUNE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not LP.autotunes(fake(True, 128256))


@pytest.mark.skipif(ON_GPU, reason="CPU only: on a GPU, CPU tensors take the torch path")
def test_no_autotuning_on_cpu(monkeypatch):
    """In the interpreter a real vocabulary still takes the fixed config: nothing is timed, nothing is chosen."""

    def tripwire(*args, **kwargs):
        raise AssertionError("autotuned on CPU")

    monkeypatch.setattr(LP._fwd_tuned, "run", tripwire)
    monkeypatch.setattr(LP._bwd_tuned, "run", tripwire)
    V = LP.TUNE_MIN_V
    logits, labels = torch.randn(1, 1, V, requires_grad=True), torch.randint(0, V, (1, 1))
    got = logprobs(logits, labels)
    (got_grad,) = torch.autograd.grad(got.sum(), logits)
    want = slow_logprobs(logits, labels, 1.0)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    check(got, want, "logprobs")
    check(got_grad, want_grad, "d logits")
    assert LP.chosen_configs() == {}


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA: the autotuner times kernels on the GPU")
def test_autotuned_on_gpu():
    """On CUDA a real vocabulary is autotuned (test_logprobs' V and dtype: timed already when the file runs), the
    numbers are right, and the picks are candidates."""
    V = 9000
    logits = torch.randn(2, 3, V, device="cuda").to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (2, 3), device="cuda")
    got = logprobs(logits, labels)
    (got_grad,) = torch.autograd.grad(got.sum(), logits)
    want = slow_logprobs(logits, labels, 1.0)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    check(got, want, "logprobs")
    check(got_grad, want_grad, "d logits", GRAD_RTOL[torch.bfloat16])
    chosen = LP.chosen_configs()
    assert chosen[f"forward V={V} bfloat16"] in LP.tuning_candidates(), chosen
    assert chosen[f"backward V={V} bfloat16"] in LP.tuning_candidates(backward=True), chosen


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
lp_fwd, lp_bwd = LP.launch_config(128256, True)
lanewise = {**max(LP.tuning_candidates(), key=lambda c: (c["LANEWISE"], c["BLOCK_V"] // c["num_warps"]))}
jobs = [  # (kernel, pointer dtypes where not fp32, meta-parameters of the GPU launch)
    (LP._logprobs_fwd_kernel, {"logits_ptr": "*bf16", "labels_ptr": "*i64"}, lp_fwd),
    (LP._logprobs_fwd_kernel, {"logits_ptr": "*bf16", "labels_ptr": "*i64"}, lanewise),  # the most per thread
    (LP._logprobs_bwd_kernel, {"logits_ptr": "*bf16", "labels_ptr": "*i64", "grad_ptr": "*bf16"}, lp_bwd),
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
