"""--mixed_precision and --threads (common.compute_setup): bf16 detection from the CPU's flags and its fallback, the
forced modes, the thread choice; and a run that shows what mixed precision is for: with fp32 master weights a small
learning rate still moves the saved model, where --bf16 weights round the same updates away."""

import argparse
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import toy
from conftest import run_script

AMD_EPYC = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    "cpuinfo, native, why",
    [
        (AMD_EPYC, True, "the CPU has avx512_bf16"),
        (SAPPHIRE_RAPIDS, True, "the CPU has amx_bf16"),
        (GRAVITON3, True, "the CPU has bf16"),
        (OLD_XEON, False, "the CPU has neither avx512_bf16 nor AMX"),
        ("", False, "the CPU has neither avx512_bf16 nor AMX"),
    ],
)
def test_native_bf16_reads_the_cpu_flags(cpuinfo, native, why):
    assert common.native_bf16(torch.device("cpu"), cpuinfo) == (native, why)


def precision_args(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--bf16", action="store_true")
    common.add_precision_arguments(parser)
    args = parser.parse_args(argv)
    common.check_precision_arguments(parser, args)
    return args


def autocast_on(amp) -> bool:
    with amp():
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize(
    "flags, cpu, on, line",
    [
        (
            ["--mixed_precision", "auto"],
            AMD_EPYC,
            True,
            "precision: bf16 autocast, fp32 weights (the CPU has avx512_bf16)",
        ),
        (["--mixed_precision", "auto"], OLD_XEON, False, "precision: fp32 (the CPU has neither avx512_bf16 nor AMX)"),
        (["--mixed_precision", "bf16"], OLD_XEON, True, "precision: bf16 autocast, fp32 weights |"),  # forced
        (["--mixed_precision", "no"], AMD_EPYC, False, "precision: fp32 |"),  # forced, and the default
        ([], AMD_EPYC, False, "precision: fp32 |"),
        (["--bf16", "--mixed_precision", "auto"], AMD_EPYC, False, "precision: bf16 weights and compute (the CPU"),
    ],
)
def test_compute_setup_says_the_precision_in_one_line(flags, cpu, on, line, monkeypatch, capsys):
    real = common.native_bf16  # its parser, fed a fake /proc/cpuinfo
    monkeypatch.setattr(common, "native_bf16", lambda device: real(device, cpu))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    amp = common.compute_setup(precision_args(*flags), torch.device("cpu"))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(line), out
    assert "1 CPU thread (OMP_NUM_THREADS)" in out
    assert autocast_on(amp) is on
    torch.set_num_threads(threads)


def test_bf16_weights_and_bf16_autocast_exclude_each_other():
    with pytest.raises(SystemExit):
        precision_args("--bf16", "--mixed_precision", "bf16")
    with pytest.raises(SystemExit):
        precision_args("--threads", "0")


def test_thread_choice(monkeypatch):
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert common.choose_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert common.choose_threads(None)[1] == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    for busy, ranks, want in [(0.0, 1, 4), (1.0, 1, 3), (3.9, 1, 1), (8.0, 1, 1), (0.2, 2, 2)]:
        monkeypatch.setattr(common, "busy_cores", lambda busy=busy: busy)
        threads, why = common.choose_threads(None, ranks)
        assert threads == want and f"4 cores, {busy:.1f} busy" in why, (busy, ranks, threads)


def test_busy_cores_sees_a_busy_core():
    import threading

    stop = threading.Event()
    spin = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    spin.start()
    try:
        busy = common.busy_cores(0.3)
    finally:
        stop.set()
        spin.join()
    assert 0.5 <= busy <= torch.get_num_threads() + (common.os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------------
# A small learning rate survives in the saved model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "base"
    toy.make_toy_model(str(path))
    return path


def sft(base, out, *extra):
    flags = (
        "--train_datasets toy-sft:0.02 --max_length 64 --epochs 1 --per_device_train_batch_size 8 "
        "--gradient_accumulation_steps 1 --lr 1e-6 --lr_scheduler_type constant --lr_warmup_ratio 0 --logging_steps 1 "
        "--max_steps 3"
    )
    proc = run_script(
        [sys.executable, "sft.py", "--model_name_or_path", str(base), *flags.split(), "--output_dir", str(out), *extra]
    )
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout, losses, load_file(out / "model.safetensors")


def changed_share(a: dict, b: dict) -> float:
    return sum((a[k] != b[k].to(a[k].dtype)).sum().item() for k in a) / sum(v.numel() for v in a.values())


def test_mixed_precision_keeps_a_small_lr_update(base, tmp_path):
    start = load_file(base / "model.safetensors")
    out32, loss32, fp32 = sft(base, tmp_path / "fp32")
    out_mixed, loss_mixed, mixed = sft(base, tmp_path / "mixed", "--mixed_precision", "bf16")
    _, _, bf16 = sft(base, tmp_path / "bf16", "--bf16")
    assert "precision: fp32" in out32 and "precision: bf16 autocast, fp32 weights" in out_mixed
    # the forward really ran in bf16: the same batches give other losses, within bf16's rounding
    assert loss_mixed != loss32 and loss_mixed == pytest.approx(loss32, abs=0.05)
    # saved in fp32, and the lr-1e-6 steps moved (nearly) every weight, as in fp32
    assert {v.dtype for v in mixed.values()} == {torch.float32}
    assert changed_share(start, mixed) > 0.9 and changed_share(start, fp32) > 0.9
    # bf16 weights: the same updates are below half a rounding step and vanish
    assert {v.dtype for v in bf16.values()} == {torch.bfloat16}
    assert changed_share({k: v.to(torch.bfloat16) for k, v in start.items()}, bf16) < 0.1


def test_model_calls_under_autocast_come_out_fp32_and_close(toy_models):
    """What the stages compute inside amp(): token log-probs (the logits path and the fused head, the kernels' CPU
    fallbacks) and score-model end scores come out fp32, finite and near their fp32 values; fused == unfused."""
    from transformers import AutoModelForCausalLM

    from kernels.linear_logprobs import token_logprobs
    from models import ScoreModel

    lm = AutoModelForCausalLM.from_pretrained(toy_models / "base").eval()
    rm = ScoreModel.from_pretrained(str(toy_models / "rm")).eval()
    ids = torch.randint(3, lm.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    inputs = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        want = token_logprobs(lm, inputs, 4)
        want_end = rm(ids, mask).end_scores
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain, fused = token_logprobs(lm, inputs, 4), token_logprobs(lm, inputs, 4, fused=True)
            end = rm(ids, mask).end_scores
    for got in (plain, fused, end):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(plain, want, atol=0.05, rtol=0.02)
    torch.testing.assert_close(fused, plain, atol=0.05, rtol=0.02)
    torch.testing.assert_close(end, want_end, atol=0.05, rtol=0.02)
