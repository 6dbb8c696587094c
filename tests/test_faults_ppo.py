"""Faults in ppo_lag.py (issue 11): non-finite numbers, accumulation that crosses rollouts, the wrong kind of model,
and flags that used to be accepted or crash late. Subprocess runs on the toy world."""

import os
import subprocess
import sys

import pytest
import torch

import data
from conftest import ROOT

PY = sys.executable


@pytest.fixture(scope="module")
def ppo_models(tmp_path_factory):
    from score_model import ScoreModel

    root = tmp_path_factory.mktemp("ppo_faults")
    data.make_toy_model(str(root / "base"))
    tokenizer = data.load_tokenizer(str(root / "base"))
    for seed, (name, score_type) in enumerate((("rm", "reward"), ("cm", "cost"))):
        torch.manual_seed(seed)
        model = ScoreModel.from_pretrained(str(root / "base"), score_type=score_type)
        model.save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    torch.manual_seed(0)
    model = ScoreModel.from_pretrained(str(root / "base"), score_type="reward")
    model.score_head.weight.data.fill_(float("nan"))  # a broken reward model: every score is NaN
    model.save_pretrained(str(root / "rm_nan"))
    tokenizer.save_pretrained(str(root / "rm_nan"))
    return root


def ppo(root, out, *extra):
    return [PY, "ppo_lag.py", "--actor_model_name_or_path", root / "base", "--reward_model_name_or_path", root / "rm",
            "--cost_model_name_or_path", root / "cm", "--train_datasets", "toy-prompts:0.02", "--max_length", "48",
            "--max_steps", "2", "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "2",
            "--actor_lr", "1e-3", "--critic_lr", "1e-3", "--output_dir", out, *extra]  # fmt: skip


def run(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(list(map(str, args)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "real_accelerator" not in line]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert lines and lines[-1].startswith(("error:", "ppo_lag.py: error:")), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


@pytest.mark.parametrize("extra, quantity", [
    (["--actor_lr", "1e30"], "actor weights"),  # diverges in the first update: the next rollout samples from NaN
    (["--reward_model_name_or_path", "{rm_nan}"], "train/reward"),  # a NaN reward model
    (["--actor_lr", "1e30", "--max_steps", "1"], "actor weights"),  # caught by the check before the final save
])  # fmt: skip
def test_non_finite_stops_without_saving(ppo_models, tmp_path, extra, quantity):
    """Case 1: a NaN reward model or a huge actor lr used to crash inside sampling or save a NaN actor (exit 0)."""
    extra = [e.format(rm_nan=ppo_models / "rm_nan") for e in extra]
    out = tmp_path / "out"
    line = error_line(run(ppo(ppo_models, out, *extra)))
    assert "non-finite" in line and quantity in line and "at step" in line, line
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "nan"], "--threshold"),
    (["--episode_cost_window_size", "0"], "--episode_cost_window_size"),
    (["--epochs", "0"], "--epochs"),
    (["--lambda_lr", "-0.1"], "--lambda_lr"),
    (["--offload", "optimizer"], "--offload"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--actor_lr", "-0.001"], "--actor_lr must be >= 0"),  # (argparse reads "-1e-5" as a flag)
    (["--critic_lr", "inf"], "--critic_lr"),
    (["--lambda_max", "0"], "--lambda_max"),
    (["--temperature", "0"], "--temperature"),
    (["--num_return_sequences", "0"], "--num_return_sequences"),
    (["--gradient_accumulation_steps", "3"], "--gradient_accumulation_steps"),  # case 2: 2 micro-batches a rollout
])  # fmt: skip
def test_bad_flags_stop_at_parsing(ppo_models, tmp_path, capsys, monkeypatch, extra, message):
    """Cases 2 and 10: each used to be accepted (a NaN lambda, an actor that never stepped) or crash late. The checks
    run before any engine, model or folder exists, so main() runs in-process here (fast): exit 2, one line."""
    import ppo_lag

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(a) for a in ppo(ppo_models, out, *extra)[1:]])
    with pytest.raises(SystemExit) as stop:
        ppo_lag.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ppo_lag.py: error:")]
    assert stop.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists() and not (tmp_path / "out.partial").exists() and not (tmp_path / "out.lock").exists()


def test_accumulation_ends_each_rollout_on_a_boundary(ppo_models, tmp_path):
    """Case 2: accumulation 2 over 2 micro-batches per rollout: one optimizer step per rollout, and the actor moves."""
    out = tmp_path / "acc"
    proc = run(ppo(ppo_models, out, "--gradient_accumulation_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 2 optimizer steps" in proc.stdout, proc.stdout[-2000:]
    from safetensors.torch import load_file

    before, after = load_file(ppo_models / "base" / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("role, path, expected", [
    ("--reward_model_name_or_path", "base", "causal LM"),
    ("--cost_model_name_or_path", "base", "causal LM"),
    ("--actor_model_name_or_path", "rm", "score model"),
])  # fmt: skip
def test_wrong_kind_of_model_is_refused(ppo_models, tmp_path, monkeypatch, role, path, expected):
    """Case 3: a causal LM as the reward/cost model used to be scored through a random head; a score model as the
    actor got a random lm_head. The check runs before any engine exists: in-process here."""
    import ppo_lag

    monkeypatch.setattr(sys, "argv", [str(a) for a in ppo(ppo_models, tmp_path / "out", role, ppo_models / path)[1:]])
    with pytest.raises(SystemExit) as stop:
        ppo_lag.main()
    line = str(stop.value.code)
    assert line.startswith("error:") and "\n" not in line and expected in line and role in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.lock").exists()
