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
from test_faults import PY, arena, error_line, ppo, ppo_main, run, sft, start, stderr_lines, weights

import checkpoint
from conftest import ROOT, signal_at, stage_env

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


@pytest.mark.parametrize(
    "extra, message",
    [
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
        (
            ["--reward_shaping", "--lambda_update", "pid"],
            "--reward_shaping keeps lambda fixed at --lambda_init, so --lambda_update pid would be ignored",
        ),
        (["--reward_shaping", "--lambda_lr", "0.5"], "--lambda_lr 0.5 would be ignored"),
    ],
)
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
    edges = [
        "--gamma",
        "0",
        "--gae_lambda",
        "1",
        "--actor_lr_warmup_ratio",
        "1",
        "--top_p",
        "1",
        "--pid_kp",
        "0",
        "--save_interval",
        "0",
        "--lambda_init",
        "5",
        "--reward_critic_model_name_or_path",
        tmp_path / "none",
    ]
    for extra in (
        [*cm, *edges],
        [*cm, *edges[:-4], "--lambda_init", "0", "--lambda_lr", "0", *edges[-2:]],
        [*cm, "--lambda_init", "0", "--lambda_update", "pid", *edges[-2:]],
        [*cm, "--reward_shaping", "--lambda_init", "20", *edges[-2:]],
    ):
        stop = ppo_main(monkeypatch, ppo(toy_models, tmp_path / "out", *extra))
        assert "--reward_critic_model_name_or_path" in str(stop.code) and "is not a model folder" in str(stop.code)


@pytest.mark.parametrize(
    "flag", ["--save_interval=-1", "--eval_interval=-1", "--lr_warmup_ratio=2", "--weight_decay=-0.1"]
)
def test_score_model_flags_out_of_range(toy_models, tmp_path, capsys, monkeypatch, flag):
    """score_model.py took a negative interval as "every step" (--save_interval -1 wrote a checkpoint each step)."""
    args = [
        "--model_name_or_path",
        toy_models / "base",
        "--score_type",
        "reward",
        "--train_datasets",
        "toy-preference:0.01",
        "--output_dir",
        tmp_path / "out",
        flag,
    ]
    line = parse_error(capsys, stage_main(monkeypatch, "score_model", args), "score_model.py")
    assert line.startswith(f"score_model.py: error: {flag.split('=')[0]} must be "), line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "script, extra, message",
    [
        ("evaluate", ["--top_p=-1"], "--top_p must be in (0, 1], got -1.0"),
        ("evaluate", ["--temperature", "nan"], "--temperature must be finite and > 0, got nan"),
        ("evaluate", ["--temperature", "0"], "--temperature must be > 0"),  # sampling; --greedy is the greedy arena
        ("chat", ["--top_p=-1"], "--top_p must be in (0, 1], got -1.0"),
        ("chat", ["--repetition_penalty", "0"], "--repetition_penalty must be > 0"),
        ("chat", ["--temperature", "nan"], "--temperature must be finite and >= 0"),
    ],
)
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


# ----------------------------------------------------------------------------------------------------------------
# Data: labels given as text, pairs that the truncation makes identical, a proportion too small for its data


def pku_record(**fields) -> dict:
    record = {
        "prompt": "how do i bake a cake ?",
        "response_0": "mix the flour .",
        "response_1": "no .",
        "is_response_0_safe": True,
        "is_response_1_safe": True,
        "better_response_id": 0,
        "safer_response_id": 0,
    }
    return {**record, **fields}


def test_pku_labels_given_as_text(tmp_path):
    """bool("false") is True: every answer counted as safe and the cost model trained on wrong labels, exit 0. Text
    labels are read ("false", "0", "1.0"), and a label that is none names the field, the file and the record."""
    from data import RawDataset

    f = tmp_path / "pku.jsonl"
    rows = [
        pku_record(is_response_0_safe="false", is_response_1_safe="true", safer_response_id="1"),
        pku_record(is_response_0_safe="0", is_response_1_safe="1", better_response_id="1", safer_response_id=1),
        pku_record(is_response_0_safe=1, is_response_1_safe="False", safer_response_id="0"),
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = list(RawDataset.load("PKU-SafeRLHF", str(f)))
    assert [(s["is_safe"], s["is_other_safe"], s["safer"]) for s in samples] == [
        (False, True, False),
        (False, True, False),
        (True, False, True),
    ]
    assert [s["better"] for s in samples] == [True, False, True]
    f.write_text(json.dumps(pku_record()) + "\n" + json.dumps(pku_record(is_response_1_safe="maybe")) + "\n")
    with pytest.raises(ValueError) as e:
        RawDataset.load("PKU-SafeRLHF", str(f))
    assert str(e.value) == f"{f}: record 2: field is_response_1_safe is 'maybe', not true/false or 1/0; fix the file"


def test_pairs_made_identical_by_truncation_are_dropped(toy_models, tmp_path, capsys):
    """Two answers that differ only past --max_length are one sequence twice: nothing to compare (accuracy 0, exit
    0). They are dropped and counted, for the reward and the cost model alike."""
    from data import PreferenceDataset, SafetyPreferenceDataset
    from templates import load_tokenizer

    tokenizer = load_tokenizer(str(toy_models / "base"))
    common = "mix the flour . add the sugar . heat the oven . bake the batter . " * 4
    late = pku_record(response_0=common + "mix the flour .", response_1=common + "no .", is_response_1_safe=False)
    early = pku_record(response_0="mix the flour .", response_1="no .", is_response_1_safe=False)
    f = tmp_path / "pku.jsonl"
    f.write_text(json.dumps(late) + "\n" + json.dumps(early) + "\n")
    spec = ("PKU-SafeRLHF", {"path": str(f)})
    for Dataset in (PreferenceDataset, SafetyPreferenceDataset):
        dataset = Dataset([spec], tokenizer, max_length=40)
        assert len(dataset) == 1 and dataset.identical == 1, Dataset
        out = capsys.readouterr().out
        assert "1 dropped (prompt leaves no room for an answer; 1 of them pairs the truncation made identical)" in out
        assert len(Dataset([spec], tokenizer, max_length=512)) == 2  # room for the difference: both kept


def test_proportion_that_selects_no_record():
    """toy-sft:0.0001 of 4,000 records rounds to none: the spec is named with the smallest proportion that works, not
    "gave no usable samples" (which sent the user to the data)."""
    from data import load_samples, parse_dataset

    with pytest.raises(
        ValueError,
        match=r"^dataset spec toy-sft:0.0001 selects no record: 0.0001 x 4,000 records "
        r"rounds to 0; pass a proportion of at least 0.00025$",
    ):
        load_samples([parse_dataset("toy-sft:0.0001")])


# ----------------------------------------------------------------------------------------------------------------
# Model folders: an unknown model_type, tokenizer ids past the embedding rows, a cut tokenizer.json, a NaN weight


def copy_of(toy_models, tmp_path, edit, name="model"):
    folder = tmp_path / name
    subprocess.run(["cp", "-r", str(toy_models / "base"), str(folder)], check=True)
    edit(folder)
    return folder


def edit_json(file, **fields):
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))


def add_tokens(folder):
    """Two words the toy vocabulary lacks, as added tokens: ids 183 and 184 of a 183-row embedding."""
    from templates import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    tokenizer.add_tokens(["zebra", "quokka"])
    tokenizer.save_pretrained(str(folder))


def cut_tokenizer(folder):
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda f: edit_json(f / "config.json", model_type="llamax"),
            "{f}/config.json names model_type 'llamax', which transformers {v} does not know; "
            "correct it (e.g. llama) or upgrade transformers",
        ),
        (
            lambda f: edit_json(f / "config.json", vocab_size=100),
            "the tokenizer at {f} has 183 tokens but the model's embeddings have 100 rows "
            "(vocab_size in {f}/config.json): pass the tokenizer the model was trained with, or resize the embeddings",
        ),
        (cut_tokenizer, "{f}/tokenizer.json is not valid JSON (Unterminated string starting at: "),
    ],
    ids=["unknown model_type", "a tokenizer larger than the embeddings", "cut tokenizer.json"],
)
def test_load_tokenizer_names_the_file_and_the_fix(toy_models, tmp_path, edit, message):
    """Every stage loads its tokenizers (load_tokenizer) before any model and turns its ValueError into one line. An
    unknown model_type was a transformers traceback at the model load (sft.py, chat.py), ids past the embedding rows
    an IndexError in the first forward, a cut tokenizer.json a bare parser message naming no file."""
    import transformers

    from templates import load_tokenizer

    folder = copy_of(toy_models, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(folder))
    assert str(e.value).startswith(message.format(f=folder, v=transformers.__version__)), str(e.value)


def test_data_with_a_token_past_the_embeddings(toy_models, tmp_path):
    """Tokens added to the tokenizer but not to the model: a training stage's data that uses one stops at loading,
    naming the token (an IndexError in the first forward before); unused ones are no fault."""
    from data import SupervisedDataset
    from templates import load_tokenizer

    folder = copy_of(toy_models, tmp_path, add_tokens)
    f = tmp_path / "sft.json"
    f.write_text(json.dumps([{"instruction": "how do i bake a cake ?", "output": "mix the flour ."}]))
    tokenizer = load_tokenizer(str(folder))  # 185 tokens, 183 rows: fine while the two new ones are unused
    assert len(SupervisedDataset([("alpaca", {"path": str(f)})], tokenizer, max_length=64)) == 1
    f.write_text(json.dumps([{"instruction": "how do i bake a zebra ?", "output": "mix the quokka ."}]))
    with pytest.raises(ValueError) as e:
        SupervisedDataset([("alpaca", {"path": str(f)})], tokenizer, max_length=64)
    assert str(e.value) == (
        f"the data has the token 'quokka' (id 184), past the 183 embedding rows of {folder}: pass "
        "the tokenizer the model was trained with, or resize the embeddings "
        "(resize_token_embeddings) and save the model again"
    )


def test_chat_unknown_model_type_and_nan_weight_are_one_line(toy_models, tmp_path):
    """chat.py, end to end: an unknown model_type and a model with a NaN weight (which failed inside sampling)."""
    unknown = copy_of(toy_models, tmp_path, lambda f: edit_json(f / "config.json", model_type="llamax"), "unknown")

    def nan_norm(folder):
        tensors = load_file(folder / "model.safetensors")
        tensors["model.norm.weight"][0] = math.nan
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    nan = copy_of(toy_models, tmp_path, nan_norm, "nan")
    line = error_line(run(["chat.py", "--model_name_or_path", unknown, "-p", "hi", "--max_new_tokens", "4"]))
    assert line.startswith(f"error: {unknown}/config.json names model_type 'llamax'"), line
    line = error_line(run(["chat.py", "--model_name_or_path", nan, "-p", "hi", "--max_new_tokens", "4"]))
    assert line.startswith(f"error: --model_name_or_path {nan} has non-finite weights (NaN or inf)"), line


def test_chat_reads_stdin_that_is_not_utf8(toy_models):
    """A pipe with bytes that are not UTF-8 (a Latin-1 file, a cut character) was a traceback; they are replaced."""
    proc = subprocess.run(
        [PY, "chat.py", "--model_name_or_path", toy_models / "base", "--max_new_tokens", "4"],
        input=b"caf\xe9 ?\nhow do i bake a cake \xff?\n",
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")[-2000:]
    assert len(proc.stdout.decode().splitlines()) == 2  # one answer per line


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py: a NaN score model, a cut BIG-bench file


def test_evaluate_non_finite_scores_write_no_summary(toy_models, tmp_path):
    """A NaN reward model wrote summary.json full of NaN, exit 0: now one line naming the model, nothing written."""
    rm_nan = tmp_path / "rm_nan"
    subprocess.run(["cp", "-r", str(toy_models / "rm"), str(rm_nan)], check=True)
    tensors = load_file(rm_nan / "model.safetensors")
    tensors["score_head.weight"].fill_(math.nan)
    save_file(tensors, rm_nan / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "arena"
    line = error_line(
        run(
            arena(
                toy_models, out, "--reward_model_name_or_path", rm_nan, "--cost_model_name_or_path", toy_models / "cm"
            )
        )
    )
    assert line == (
        f"error: --reward_model_name_or_path {rm_nan} gave 14 non-finite scores (NaN or inf) for 7 "
        "prompts; nothing written: check that model (a NaN weight?)"
    )
    assert not (out / "summary.json").exists() and not (out / "arena.csv").exists()


def test_bigbench_task_cut_is_one_line(tmp_path):
    """evaluate.py --bigbench_task on a cut file was a JSONDecodeError traceback."""
    from evaluate import read_bigbench_task

    f = tmp_path / "task.json"
    f.write_text('{"examples": [{"input": "2 + 2 =", "target_scores": {"4": 1, "5"')
    with pytest.raises(SystemExit) as e:
        read_bigbench_task(str(f))
    assert str(e.value.code).startswith(f"error: --bigbench_task {f} is not valid JSON (Expecting ")
    assert str(e.value.code).endswith("; fetch the task file again")


# ----------------------------------------------------------------------------------------------------------------
# The one-line handler of every entry point: Ctrl-C (during the imports too), a full disk, a read-only file system


def test_error_line_names_the_cause_the_file_and_the_fix():
    """checkpoint.error_line: an OSError's cause, errno and file, then what to do; a bug (anything else) gets None and
    keeps its traceback."""
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out.partial/model.safetensors")
    assert checkpoint.error_line(full) == (
        "error: /data/out.partial/model.safetensors: No space left on device [ENOSPC]; the disk is full: free space, "
        "then re-run the same command (it resumes from a checkpoint, if any)"
    )
    ro = checkpoint.error_line(OSError(errno.EROFS, "Read-only file system", "/data/out.partial"))
    assert ro.startswith("error: /data/out.partial: Read-only file system [EROFS]; the file system is read-only")
    assert checkpoint.error_line(KeyboardInterrupt()).startswith("interrupted (Ctrl-C)")
    assert checkpoint.error_line(ValueError("a bug")) is None and checkpoint.error_line(IndexError()) is None


ENTRY_POINTS = {
    "sft.py": ["--model_name_or_path", "{base}", "--train_datasets", "toy-sft:0.05", "--output_dir", "{out}"],
    "score_model.py": [
        "--model_name_or_path",
        "{base}",
        "--score_type",
        "reward",
        "--train_datasets",
        "toy-preference:0.05",
        "--output_dir",
        "{out}",
    ],
    "ppo_lag.py": [
        "--actor_model_name_or_path",
        "{base}",
        "--reward_model_name_or_path",
        "{rm}",
        "--train_datasets",
        "toy-prompts:0.05",
        "--output_dir",
        "{out}",
    ],
    "evaluate.py": [
        "--red_corner_model_name_or_path",
        "{base}",
        "--blue_corner_model_name_or_path",
        "{base}",
        "--datasets",
        "toy-eval:0.02",
        "--judge",
        "--output_dir",
        "{out}",
    ],
    "chat.py": ["--model_name_or_path", "{base}", "-p", "hi"],
    "toy.py": ["--output_dir", "{out}"],
    "dpo.py": ["--model_name_or_path", "{base}", "--train_datasets", "toy-preference:0.05", "--output_dir", "{out}"],
}


def interrupt_while_importing_torch(proc: subprocess.Popen) -> None:
    """SIGINT once torch's library is being mapped into the process: in the middle of the entry point's imports."""
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/maps") as f:
            if "libtorch" in f.read():
                break
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches /proc/<pid>/maps")
@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_ctrl_c_during_the_imports_is_one_line(toy_models, tmp_path, script):
    """Ctrl-C while an entry point imports torch (the first second or more of every run) was a KeyboardInterrupt
    traceback. Now one line, and the process ends as an interrupted one does (by SIGINT: 130 in a shell)."""
    paths = dict(base=toy_models / "base", rm=toy_models / "rm", out=tmp_path / "out")
    args = [arg.format(**paths) for arg in ENTRY_POINTS[script]]
    proc = start([script, *args])
    interrupt_while_importing_torch(proc)
    _, stderr = proc.communicate(timeout=120)
    lines = stderr_lines(stderr)
    assert proc.returncode in (130, -signal.SIGINT) and len(lines) == 1, f"rc {proc.returncode}:\n{stderr[-3000:]}"
    assert lines[0].startswith("interrupted (Ctrl-C)"), lines
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_evaluate_generates_is_one_line(toy_models, tmp_path):
    """Anywhere in evaluate.py (which has no loop of checkpoints): here once its engines exist."""
    proc = start(arena(toy_models, tmp_path / "arena", "--judge", "--max_new_tokens", "64"))
    _, stderr = signal_at(proc, "deepspeed config", signal.SIGINT)
    lines = stderr_lines(stderr)
    assert proc.returncode in (130, -signal.SIGINT) and len(lines) == 1, f"rc {proc.returncode}:\n{stderr[-3000:]}"
    assert lines[0].startswith("interrupted (Ctrl-C)") and not (tmp_path / "arena" / "summary.json").exists()


def file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (as a full disk fails them with ENOSPC), not SIGXFSZ."""

    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_write_failure_in_a_checkpoint_is_one_line_and_keeps_the_model(toy_models, tmp_path):
    """A checkpoint that cannot be written (torch.save reports "unexpected pos 576 vs 534", no OSError) was a
    traceback: now the cause, the folder and the fix in one line; the model published before stays whole."""
    out = tmp_path / "sft"
    proc = run(sft(toy_models / "base", out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = weights(out)
    proc = subprocess.run(
        [PY, *map(str, sft(toy_models / "base", out, "--lr", "1e-2", "--max_steps", "2", "--save_interval", "1"))],
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=file_size_limit(200_000),
    )  # the toy model's weights: 425 kB)
    line = error_line(proc)
    assert line.startswith(
        f"error: {tmp_path / 'sft.partial'}: File too large, so a write failed (RuntimeError) "
        "[EFBIG]; a file outgrew the size limit"
    ), line
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before) and checkpoint.is_complete(out)


def test_data_longer_than_the_model_positions(toy_models, tmp_path):
    """--max_length beyond the model's positions was accepted: a learned position table fails with an IndexError, a
    rotary one trains angles it never saw. A sample that would go past them stops the data with the longest allowed."""
    from data import SupervisedDataset
    from templates import load_tokenizer

    tokenizer = load_tokenizer(str(toy_models / "base"))  # max_position_embeddings 128
    f = tmp_path / "sft.json"
    f.write_text(json.dumps([{"instruction": "how do i bake a cake ?", "output": "mix the flour . " * 40}]))
    spec = ("alpaca", {"path": str(f)})
    assert len(SupervisedDataset([spec], tokenizer, max_length=128)[0]["input_ids"]) == 128  # truncated: fine
    with pytest.raises(
        ValueError,
        match=r"^--max_length 512 lets through samples of 1\d\d tokens, beyond the 128 "
        r"positions of .*: pass --max_length 128 or less$",
    ):
        SupervisedDataset([spec], tokenizer, max_length=512)
