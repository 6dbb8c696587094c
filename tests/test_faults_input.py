"""The fault battery's input side: what a user types, feeds or interrupts. Each fault ends in one line that names the
flag, file or folder and the fix, and a non-zero exit; never a traceback, never exit 0 with a wrong result.

Flag checks, loaders and the one-line handler (checkpoint.error_line) are tested in-process, on hand-made inputs (fast);
subprocesses only where the entry point itself is the subject: Ctrl-C during the imports, chat.py's stdin, a disk
that fills up during a run."""

import argparse
import errno
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
from conftest import ROOT, stage_env
from test_faults import PY, arena, error_line, ppo, ppo_main, run, sft, start, stderr_lines, weights

# ----------------------------------------------------------------------------------------------------------------
# Flags out of range, or contradicting each other: one place per stage (checkpoint.check_ranges), argparse's line


def parse_error(capsys, stop: SystemExit, script: str) -> str:
    """argparse's one line (exit 2) for a refused flag."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{script}: error:")]
    assert stop.code == 2 and len(lines) == 1, (stop.code, lines)
    return lines[0]


def stage_main(monkeypatch, module: str, args) -> SystemExit:
    """A stage's main() in this process, for the checks that stop it before any model, engine or folder exists."""
    main = __import__(module).main
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value


def test_check_ranges():
    """The shared helper: each kind of rule, NaN and inf always refused, an unset or absent flag passing."""
    parser = argparse.ArgumentParser(prog="stage")
    for flag in ("--a", "--b", "--c"):
        parser.add_argument(flag, type=float)
    rules = {"a": "[0, 1]", "b": "(0, 1]", "c": "finite and > 0", "absent": ">= 1"}

    def refused(*argv):
        with pytest.raises(SystemExit) as stop:
            checkpoint.check_ranges(parser, parser.parse_args(argv), rules)
        return stop.value.code

    checkpoint.check_ranges(parser, parser.parse_args(["--a", "0", "--b", "1", "--c", "1e-9"]), rules)
    checkpoint.check_ranges(parser, parser.parse_args([]), rules)  # all unset
    for argv in (["--a", "1.5"], ["--a=-0.1"], ["--a", "nan"], ["--b", "0"], ["--c", "0"], ["--c", "inf"]):
        assert refused(*argv) == 2, argv


@pytest.mark.parametrize("extra, message", [
    (["--gamma=-1"], "--gamma must be in [0, 1], got -1.0"),
    (["--gamma", "2"], "--gamma must be in [0, 1], got 2.0"),
    (["--gae_lambda", "1.5"], "--gae_lambda must be in [0, 1]"),
    (["--actor_lr_warmup_ratio", "2"], "--actor_lr_warmup_ratio must be in [0, 1]"),
    (["--critic_lr_warmup_ratio=-0.5"], "--critic_lr_warmup_ratio must be in [0, 1]"),
    (["--actor_weight_decay=-1"], "--actor_weight_decay must be >= 0"),
    (["--pid_kp=-1"], "--pid_kp must be >= 0"),
    (["--save_interval=-1"], "--save_interval must be >= 0"),
    (["--eval_interval=-1"], "--eval_interval must be >= 0"),
    (["--top_p=-1"], "--top_p must be in (0, 1]"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be > 0"),
    (["--lambda_init", "100"], "--lambda_init 100.0 is above --lambda_max 5.0"),
    (["--lambda_init", "0"], "--lambda_init 0 can never move under --lambda_update sgd-log"),
    (["--reward_shaping", "--lambda_update", "pid"], "--reward_shaping keeps lambda fixed at --lambda_init, so "
                                                     "--lambda_update pid would be ignored"),
    (["--reward_shaping", "--lambda_lr", "0.5"], "--lambda_lr 0.5 would be ignored"),
])  # fmt: skip
def test_ppo_flags_out_of_range_or_contradictory(toy_models, tmp_path, capsys, monkeypatch, extra, message):
    """PPO-Lag's flags that used to be accepted: a discount or warm-up outside [0, 1], negative decays, gains and
    intervals (-1 meant "every step"), sampling flags left to transformers, lambda_init above lambda_max (lambda 100
    trained the actor while the delay lasted) or at 0 with sgd-log (lambda could never move), and the multiplier's
    flags that --reward_shaping silently ignored."""
    args = ppo(toy_models, tmp_path / "out", "--cost_model_name_or_path", toy_models / "cm", *extra)
    line = parse_error(capsys, ppo_main(monkeypatch, args), "ppo_lag.py")
    assert message in line, line
    assert not list(tmp_path.iterdir())


def test_ppo_flags_in_range_still_pass(toy_models, tmp_path, monkeypatch):
    """The checks refuse only the bad values: the edges of each range, lambda 0 when it is meant to stay fixed
    (--lambda_lr 0) or moved by PID, and --reward_shaping with its own flag, go on to the next check (the tokenizers,
    stopped here by a missing critic folder)."""
    cm = ["--cost_model_name_or_path", toy_models / "cm"]
    edges = ["--gamma", "0", "--gae_lambda", "1", "--actor_lr_warmup_ratio", "1", "--top_p", "1", "--pid_kp", "0",
             "--save_interval", "0", "--lambda_init", "5", "--reward_critic_model_name_or_path", tmp_path / "none"]
    for extra in ([*cm, *edges], [*cm, *edges[:-4], "--lambda_init", "0", "--lambda_lr", "0", *edges[-2:]],
                  [*cm, "--lambda_init", "0", "--lambda_update", "pid", *edges[-2:]],
                  [*cm, "--reward_shaping", "--lambda_init", "20", *edges[-2:]]):  # fmt: skip
        stop = ppo_main(monkeypatch, ppo(toy_models, tmp_path / "out", *extra))
        assert "--reward_critic_model_name_or_path" in str(stop.code) and "is not a model folder" in str(stop.code)


@pytest.mark.parametrize("flag", ["--save_interval=-1", "--eval_interval=-1", "--lr_warmup_ratio=2",
                                  "--weight_decay=-0.1"])  # fmt: skip
def test_score_model_flags_out_of_range(toy_models, tmp_path, capsys, monkeypatch, flag):
    """score_model.py took a negative interval as "every step" (--save_interval -1 wrote a checkpoint each step)."""
    args = ["--model_name_or_path", toy_models / "base", "--score_type", "reward", "--train_datasets",
            "toy-preference:0.01", "--output_dir", tmp_path / "out", flag]  # fmt: skip
    line = parse_error(capsys, stage_main(monkeypatch, "score_model", args), "score_model.py")
    assert line.startswith(f"score_model.py: error: {flag.split('=')[0]} must be "), line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script, extra, message", [
    ("evaluate", ["--top_p=-1"], "--top_p must be in (0, 1], got -1.0"),
    ("evaluate", ["--temperature", "nan"], "--temperature must be finite and > 0, got nan"),
    ("evaluate", ["--temperature", "0"], "--temperature must be > 0"),  # sampling; --greedy is the greedy arena
    ("chat", ["--top_p=-1"], "--top_p must be in (0, 1], got -1.0"),
    ("chat", ["--repetition_penalty", "0"], "--repetition_penalty must be > 0"),
    ("chat", ["--temperature", "nan"], "--temperature must be finite and >= 0"),
])  # fmt: skip
def test_sampling_flags_checked_before_any_model(toy_models, tmp_path, capsys, monkeypatch, script, extra, message):
    """evaluate.py and chat.py left --top_p, --repetition_penalty and a NaN temperature to transformers: a traceback
    once the models were loaded. chat.py's temperature 0 is greedy, as its help says; evaluate.py has --greedy."""
    if script == "evaluate":
        args = arena(toy_models, tmp_path / "arena", "--judge", *extra)[1:]
    else:
        args = ["--model_name_or_path", toy_models / "base", "-p", "hi", *extra]
    line = parse_error(capsys, stage_main(monkeypatch, script, args), f"{script}.py")
    assert message in line, line
    assert not list(tmp_path.iterdir())


def test_evaluate_greedy_ignores_the_sampling_flags(toy_models, tmp_path, monkeypatch):
    """--greedy never samples: a temperature of 0 is no fault there (the run goes on to the models: one missing)."""
    args = arena(toy_models, tmp_path / "arena", "--judge", "--greedy", "--temperature", "0")[1:]
    args[args.index("--blue_corner_model_name_or_path") + 1] = tmp_path / "none"
    assert "is not a model folder" in str(stage_main(monkeypatch, "evaluate", args).code)
