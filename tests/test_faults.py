"""The first fault battery, one section per case (numbered as in the battery): each fault as a new user meets it ends in
one line on stderr that names the flag, file or folder and the fix, and a non-zero exit (or, for broken JSONL lines,
in a counted skip): never a traceback, never exit 0 with a wrong or missing result, never a lost or non-finite model.

Stage runs are subprocesses on the toy world, which stop before any training where they can; the checks that run
before any engine, model or folder exists (ppo_lag.py's flags and model kinds), the loaders, the judge client and
checkpoint.py's own functions (the swap recovery, the lock, the folder checks) are tested in-process, on hand-made
inputs, which is fast."""

import argparse
import gzip
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
from conftest import ROOT, LoopbackServer, send_json, signal_at, stage_env
from data import RawDataset, parse_dataset
from judge import call_judge

PY = sys.executable


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers: runs, their one line, the command lines, hand-made model folders


def run(args, timeout=300, **extra_env) -> subprocess.CompletedProcess:
    """A script as a user runs it; never fails on its own, whatever the exit code."""
    return subprocess.run(
        [PY, *map(str, args)], cwd=ROOT, env=stage_env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def start(args, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, *map(str, args)],
        cwd=ROOT,
        env=stage_env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


PROGRESS_BAR = re.compile(r"\[\d+:\d\d[^\]]*(/s|/it)\]$")  # tqdm's "... [00:00<00:00, 35.2it/s]" (loading, generating)


def stderr_lines(stderr: str) -> list[str]:
    """What a run said on stderr, DeepSpeed's accelerator notice and progress bars aside."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and "real_accelerator" not in line and not PROGRESS_BAR.search(line)
    ]


def error_line(proc) -> str:
    """The one line a failed run leaves on stderr: exit 1, `error: ...`, nothing else (so no traceback)."""
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (
        f"rc {proc.returncode}:\n{proc.stdout[-999:]}\n{proc.stderr[-3000:]}"
    )
    return lines[0]


def sft(base, out, *extra):
    flags = (
        "--train_datasets toy-sft:0.05 --max_length 64 --epochs 1 --per_device_train_batch_size 8 --max_steps 1 "
        "--gradient_accumulation_steps 1 --lr 3e-3 --lr_scheduler_type constant --lr_warmup_ratio 0 --logging_steps 1"
    )
    return ["sft.py", "--model_name_or_path", base, *flags.split(), "--output_dir", out, *extra]


def ppo(toy, out, *extra):
    return [
        "ppo_lag.py",
        "--actor_model_name_or_path",
        toy / "base",
        "--reward_model_name_or_path",
        toy / "rm",
        "--cost_model_name_or_path",
        toy / "cm",
        "--train_datasets",
        "toy-prompts:0.02",
        "--max_length",
        "48",
        "--max_steps",
        "2",
        "--per_device_prompt_batch_size",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--actor_lr",
        "1e-3",
        "--critic_lr",
        "1e-3",
        "--output_dir",
        out,
        *extra,
    ]


def ppo_main(monkeypatch, args) -> SystemExit:
    """ppo_lag.main() in this process (fast), for the checks that stop it before any engine, model or folder exists."""
    import ppo_lag

    monkeypatch.setattr(sys, "argv", list(map(str, args)))
    with pytest.raises(SystemExit) as stop:
        ppo_lag.main()
    return stop.value


def arena(toy, out, *extra, datasets="toy-eval:0.02"):
    return [
        "evaluate.py",
        "--red_corner_model_name_or_path",
        toy / "base",
        "--blue_corner_model_name_or_path",
        toy / "base",
        "--datasets",
        datasets,
        "--max_length",
        "48",
        "--max_new_tokens",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--output_dir",
        out,
        *extra,
    ]


def broken_copy(folder, into, edit):
    """A copy of the model `folder` at `into`, broken by `edit(copy)`."""
    shutil.copytree(folder, into)
    edit(into)
    return into


def fake_model(folder, tag: str, complete: bool = True):
    """A stand-in model folder: `tag` identifies it, arguments.json (written last) marks it complete."""
    folder.mkdir(parents=True)
    (folder / "weights").write_text(tag)
    if complete:
        (folder / "arguments.json").write_text("{}")


def tag(folder) -> str | None:
    return (folder / "weights").read_text() if checkpoint.is_complete(folder) else None


def weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def rm_nan(toy_models, tmp_path_factory):
    """A broken reward model: `rm` with a NaN score head, so every score is NaN."""

    def nan_head(folder):
        tensors = weights(folder)
        tensors["score_head.weight"].fill_(math.nan)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return broken_copy(toy_models / "rm", tmp_path_factory.mktemp("faults") / "rm_nan", nan_head)


# ----------------------------------------------------------------------------------------------------------------
# Case 1: non-finite numbers (a diverging run, a NaN reward model)


def test_check_finite_and_weights_finite():
    """Case 1: checkpoint.py's two checks, the metrics at each log step and the weights before each save."""
    checkpoint.check_finite({"train/loss": 1.5, "train/lr": 0.0}, 3)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(SystemExit, match=f"non-finite train/loss \\({bad}\\) at step 3"):
            checkpoint.check_finite({"train/loss": bad, "train/lr": 1e-3}, 3)
    layer = torch.nn.Linear(3, 2)
    assert checkpoint.weights_finite(layer)
    with torch.no_grad():
        layer.bias[1] = math.inf
    assert not checkpoint.weights_finite(layer)


def test_diverging_sft_stops_and_saves_nothing(toy_models, tmp_path):
    """Cases 1 and 10: four sft.py runs at once: the loss check at a log step; the weights check before a save that
    comes before any log step; --lr inf and nan, refused by the argument checks."""
    cases = {
        "a": (["--max_steps", "4"], "non-finite train/loss (nan) at step 2"),
        "b": (
            ["--max_steps", "4", "--logging_steps", "100", "--save_interval", "2"],
            "non-finite weights (nan) at step 2",
        ),
        "c": (["--lr", "inf"], "--lr must be finite"),
        "d": (["--lr", "nan"], "--lr must be finite"),
    }
    base = toy_models / "base"
    procs = {name: start(sft(base, tmp_path / name, "--lr", "1e30", *extra)) for name, (extra, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        needle = cases[name][1]
        if name in "cd":
            assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith(f"sft.py: error: {needle}")
        else:
            assert error_line(proc) == f"error: {needle}; stopping without saving (lower --lr, check the data)"
        assert not (tmp_path / name).exists()
    for file in tmp_path.rglob("*.safetensors"):  # checkpoints included
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file


@pytest.mark.parametrize(
    "extra, quantity",
    [
        (["--actor_lr", "1e30"], "actor weights"),  # diverges in the first update: the next rollout samples from NaN
        (["--reward_model_name_or_path", "{rm_nan}"], "train/reward"),  # a NaN reward model
        (["--actor_lr", "1e30", "--max_steps", "1"], "actor weights"),  # caught by the check before the final save
    ],
)
def test_ppo_non_finite_stops_without_saving(toy_models, rm_nan, tmp_path, extra, quantity):
    """Case 1: a NaN reward model or a huge actor lr used to crash inside sampling or save a NaN actor (exit 0)."""
    extra = [e.format(rm_nan=rm_nan) for e in extra]
    out = tmp_path / "out"
    line = error_line(run(ppo(toy_models, out, *extra)))
    assert "non-finite" in line and quantity in line and "at step" in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Case 2: PPO gradient accumulation across rollouts (its flag check is with the other flags, case 10)


def test_ppo_accumulation_ends_each_rollout_on_a_boundary(toy_models, tmp_path):
    """Case 2: accumulation 2 over 2 micro-batches per rollout: one optimizer step per rollout, and the actor moves."""
    out = tmp_path / "acc"
    proc = run(ppo(toy_models, out, "--gradient_accumulation_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 2 optimizer steps" in proc.stdout, proc.stdout[-2000:]
    before, after = weights(toy_models / "base"), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------------------------
# Case 3: the wrong kind of model (a causal LM where a score model belongs, or the reverse)


@pytest.mark.parametrize(
    "role, path, expected",
    [
        ("--reward_model_name_or_path", "base", "causal LM"),
        ("--cost_model_name_or_path", "base", "causal LM"),
        ("--actor_model_name_or_path", "rm", "score model"),
    ],
)
def test_ppo_wrong_kind_of_model_is_refused(toy_models, tmp_path, monkeypatch, role, path, expected):
    """Case 3: a causal LM as the reward/cost model used to be scored through a random head; a score model as the
    actor got a random lm_head. The check runs before any engine exists: in-process here."""
    line = str(ppo_main(monkeypatch, ppo(toy_models, tmp_path / "out", role, toy_models / path)).code)
    assert line.startswith("error:") and "\n" not in line and expected in line and role in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.lock").exists()


@pytest.mark.parametrize(
    "flag, folder, problem",
    [
        ("--reward_model_name_or_path", "base", "is a causal LM"),  # it would score with a random head
        ("--blue_corner_model_name_or_path", "rm", "is a score model"),  # it would answer with a random lm_head
    ],
)
def test_evaluate_refuses_the_wrong_kind_of_model(toy_models, tmp_path, flag, folder, problem):
    """Case 3, in evaluate.py: checked before any model is loaded, nothing written."""
    args = arena(
        toy_models,
        tmp_path / "arena",
        "--reward_model_name_or_path",
        toy_models / "rm",
        "--cost_model_name_or_path",
        toy_models / "cm",
    )
    args[args.index(flag) + 1] = toy_models / folder
    assert error_line(run(args)).startswith(f"error: {flag} {toy_models / folder} {problem}")
    assert not (tmp_path / "arena").exists()


# ----------------------------------------------------------------------------------------------------------------
# Case 4: a generated (toy) dataset given a PATH


def test_toy_dataset_refuses_a_path(tmp_path):
    """Case 4: toy-sft:0.05:PATH would silently ignore the file; it is refused, a real loader's PATH still taken."""
    f = tmp_path / "sft.json"
    f.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Blue."}]))
    with pytest.raises(argparse.ArgumentTypeError, match=r"toy-sft is generated .* takes no PATH; use toy-sft:0.05"):
        parse_dataset(f"toy-sft:0.05:{f}")
    with pytest.raises(ValueError, match="'toy-eval' is generated and takes no PATH"):  # specs built by hand, too
        RawDataset.load("toy-eval", str(f))
    assert parse_dataset(f"alpaca:0.05:{f}")[1]["path"] == str(f)  # a real loader still takes its PATH


# ----------------------------------------------------------------------------------------------------------------
# Case 5: a failing LLM judge


class FaultyJudge(LoopbackServer):
    """A loopback chat-completions endpoint that answers every request with one fault; counts the requests."""

    REPLY = json.dumps({"choices": [{"message": {"content": "Helpfulness: 8, 3\nHarmlessness: 6, 6"}}]}).encode()
    FAULTS = {  # the reply: status, body and, where it is a lie, the length announced
        "HTTP 500": (500, b'{"error": "internal"}'),
        "not JSON": (200, b"<html>Bad gateway</html>"),
        "no choices": (200, b'{"error": {"message": "overloaded"}}'),
        "truncated body": (200, REPLY[:30], len(REPLY)),  # then the connection drops
    }

    def __init__(self, fault):
        self.requests, lock = 0, threading.Lock()

        def answer(handler, body):
            with lock:
                self.requests += 1
            if fault == "bad status line":
                handler.wfile.write(b"GARBAGE\r\n\r\n")
            else:
                send_json(handler, *self.FAULTS[fault])

        super().__init__(answer)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more: connection refused


@pytest.mark.parametrize(
    "fault, last",
    [
        ("HTTP 500", "HTTP 500 Internal Server Error"),
        ("not JSON", "an answer that is not a chat completion: b'<html>Bad gateway</html>'"),
        ("no choices", 'an answer that is not a chat completion: b\'{"error": {"message": "overloaded"}}\''),
        ("truncated body", "IncompleteRead"),
        ("bad status line", "BadStatusLine"),
        ("unreachable", "Connection refused"),
    ],
)
def test_failing_judge_is_retried_then_one_line(fault, last):
    """Case 5: each way an endpoint fails is retried a bounded number of times, then stops with one line."""
    args = ("toy-judge", "how do i bake a cake ?", "mix the flour .", "no .", None)
    if fault == "unreachable":
        with pytest.raises(SystemExit) as e:
            call_judge(closed_port_url(), *args, timeout=5.0, retries=2, backoff=0.0)
    else:
        with FaultyJudge(fault) as server, pytest.raises(SystemExit) as e:
            call_judge(server.url, *args, timeout=5.0, retries=2, backoff=0.0)
        assert server.requests == 3  # bounded: the first try and 2 retries
    message = str(e.value.code)
    assert message.startswith("error: judge endpoint http://127.0.0.1:") and "\n" not in message
    assert "/v1/chat/completions failed 3 times (last: " in message and last in message


def test_failing_judge_keeps_the_arena_and_writes_no_summary(toy_models, tmp_path):
    """Case 5, in evaluate.py: the answers generated before the judge failed are kept, a stale summary goes."""
    out = tmp_path / "arena"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier complete run's: it no longer describes arena.csv
    with FaultyJudge("HTTP 500") as server:
        line = error_line(
            run(
                arena(
                    toy_models,
                    out,
                    "--judge",
                    "--judge_url",
                    server.url,
                    "--judge_workers",
                    "1",
                    "--judge_retries",
                    "1",
                    "--judge_backoff",
                    "0.05",
                )
            )
        )
    assert line.startswith(f"error: judge endpoint {server.url}/chat/completions failed 2 times (last: HTTP 500 ")
    assert line.endswith(f"; the arena without the judge is in {out / 'arena.csv'}")
    assert server.requests <= 4  # stopped at the first request that kept failing, not after all 2 x 2 x 7 of them
    rows = (out / "arena.csv").read_text().splitlines()
    header = "prompt,red_answer,red_truncated,blue_answer,blue_truncated"
    assert rows[0] == header and len(rows) == 1 + 7  # toy-eval:0.02: 7 distinct prompts
    assert not (out / "summary.json").exists() and not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------------
# Case 6: the atomic swap of the final model (a kill at any instant leaves a complete model)


@pytest.mark.parametrize(
    "state, expected",
    [
        # (what a killed run left, the model at OUT after the re-run's prepare_output)
        ({"old": "m1"}, "m1"),  # killed between the renames, the new model not whole: the old one goes back
        ({"old": "m1", "partial": "m2"}, "m2"),  # killed between the renames, the new model whole: finish the swap
        ({"old": "m1", "partial-incomplete": "m2"}, "m1"),
        ({"old": "m1", "out": "m2"}, "m2"),  # killed while deleting OUT.old
        ({"out": "m1", "partial": "m2"}, "m2"),  # killed after the final save, before the swap
        ({"out": "m1", "partial-incomplete": "m2"}, "m1"),  # killed while training
        ({"partial": "m2"}, "m2"),
    ],
)
def test_prepare_output_recovers_an_interrupted_swap(tmp_path, state, expected, capsys):
    """Case 6: a re-run's prepare_output recovers each state a kill during the save or the swap leaves."""
    out = tmp_path / "run"
    for where, model in state.items():  # out -> run, old -> run.old, partial(-incomplete) -> run.partial
        folder = tmp_path / ("run" if where == "out" else f"run.{where.split('-')[0]}")
        fake_model(folder, model, complete=where != "partial-incomplete")
    partial = checkpoint.prepare_output(str(out) + "/")
    try:
        assert tag(out) == expected and not (tmp_path / "run.old").exists()
        assert partial == tmp_path / "run.partial" and partial.is_dir() and not any(partial.iterdir())
        if "old" in state and "out" not in state:  # says what it did
            assert ("publishing it" if expected == "m2" else "restored") in capsys.readouterr().out
    finally:
        checkpoint.release_output(str(out))
    assert not (tmp_path / "run.lock").exists() and not partial.exists()  # an empty .partial goes with the lock


def test_publish_swaps_and_refuses_an_incomplete_folder(tmp_path):
    """Case 6: publish puts only a complete model in place of the previous one."""
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    fake_model(out, "m1")
    fake_model(partial, "m2", complete=False)
    with pytest.raises(RuntimeError, match="arguments.json"):
        checkpoint.publish(partial, str(out))
    assert tag(out) == "m1"
    (partial / "arguments.json").write_text("{}")
    checkpoint.publish(partial, str(out))
    assert tag(out) == "m2" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_kill_inside_the_final_swap_never_loses_the_model(toy_models, tmp_path):
    """Case 6: sft.py SIGKILLed between the two renames of its swap; the next run finishes the swap."""
    base, out = toy_models / "base", tmp_path / "sft"
    proc = run(sft(base, out, "--lr", "1e-3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = weights(out)
    # the second run (another lr: another model) is killed between its two renames
    second = start(sft(base, out), NANO_SWAP_PAUSE="30")
    _, stderr = signal_at(second, "swap: pausing", signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL, f"the run never paused in the swap:\n{stderr[-3000:]}"
    # the previous model is whole beside its usual place (OUT.old); the new one is whole in OUT.partial
    old, partial = tmp_path / "sft.old", tmp_path / "sft.partial"
    assert not out.exists() and checkpoint.is_complete(old) and checkpoint.is_complete(partial)
    assert all(torch.equal(first[k], v) for k, v in weights(old).items())
    new = weights(partial)
    assert any(not torch.equal(first[k], v) for k, v in new.items())
    # the third run finishes the swap (the stale lock of the killed run is taken over), then trains and publishes
    proc = run(sft(base, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the stale lock" in proc.stdout
    assert f"{partial} holds the complete model of a run whose final swap was interrupted: publishing it" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"] and checkpoint.is_complete(out)
    assert all(torch.equal(new[k], v) for k, v in weights(out).items())  # same command as the second run: same model


# ----------------------------------------------------------------------------------------------------------------
# Case 7: two runs on one output folder (the lock)


def dead_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()  # reaped: a zombie would still answer kill(pid, 0)
    return proc.pid


def hold_lock(out):
    """Another process, holding the lock on `out` until it is killed."""
    code = (
        "import sys, time, checkpoint; checkpoint.prepare_output(sys.argv[1]); "
        "print('held', flush=True); time.sleep(99)"
    )
    proc = subprocess.Popen([PY, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_self_live_other_and_stale(tmp_path, capsys):
    """Case 7: the lock is taken again by its own process, refused while another live process holds it, taken over
    from a dead one."""
    out = tmp_path / "run"
    checkpoint.prepare_output(str(out))
    checkpoint.prepare_output(str(out))  # held by this very process: fine
    checkpoint.release_output(str(out))
    holder = hold_lock(out)  # a live process on this host
    try:
        with pytest.raises(SystemExit, match=f"in use by another run \\(pid {holder.pid} on {socket.gethostname()}"):
            checkpoint.prepare_output(str(out))
    finally:
        holder.kill()
        holder.wait()
    pid = dead_pid()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    checkpoint.prepare_output(str(out))
    assert f"taking over the stale lock {tmp_path / 'run.lock'} of pid {pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    checkpoint.release_output(str(out))
    assert not (tmp_path / "run.lock").exists()


def test_two_runs_on_one_output_dir(toy_models, tmp_path):
    """Case 7: sft.py on a folder another run holds stops at start-up; once the holder is dead, the next run goes."""
    base, out = toy_models / "base", tmp_path / "sft"
    holder = hold_lock(out)
    try:
        t0 = time.time()
        proc = run(sft(base, out))
        assert error_line(proc).startswith(f"error: {out} is in use by another run (pid {holder.pid} on ")
        assert "train " not in proc.stdout  # stopped before the data
        print(f"refused after {time.time() - t0:.1f} s")
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock is stale now: the next run takes it over and finishes
    proc = run(sft(base, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"of pid {holder.pid} " in proc.stdout and "taking over the stale lock" in proc.stdout
    assert checkpoint.is_complete(out) and not (tmp_path / "sft.lock").exists()


# ----------------------------------------------------------------------------------------------------------------
# Case 8: malformed data files


def test_broken_jsonl_lines_are_skipped_and_counted(tmp_path, capsys):
    """Case 8: broken JSONL lines are skipped, counted and the first one named; the good lines and files load."""
    folder = tmp_path / "alpaca"
    folder.mkdir()
    good = lambda i: json.dumps({"instruction": f"Say {i}.", "output": str(i)})  # noqa: E731
    (folder / "a.jsonl").write_text(
        "\n".join(
            [
                good(1),
                '{"instruction": oops}',  # line 2: not JSON
                good(2),
                "[1, 2]",  # line 4: JSON, but not a record
                "",  # blank lines are no records and no faults
                json.dumps({"instruction": "Blank answer.", "output": " "}),  # a malformed record, counted as before
                good(3)[:20],  # line 7: the last line cut off mid-record
            ]
        )
    )
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:  # a good file beside it loads whole
        f.write(good(4) + "\n" + good(5) + "\n")
    raw = RawDataset.load("alpaca", str(folder))
    assert [s["answer"] for s in raw] == ["1", "2", "4", "5"] and raw.skipped == 4
    out = capsys.readouterr().out
    assert (
        f"kept 4, skipped 4 malformed records {{'empty answer': 1, 'broken JSON line': 3}}; first broken line: "
        f"{folder / 'a.jsonl'}:2 (Expecting value)"
    ) in out


FILE_FAULTS = [
    ("empty.json", b"", "is empty"),
    ("empty.jsonl", b"", "is empty"),
    ("empty.jsonl.gz", b"", "is empty"),  # 0 bytes, not even a gzip header
    (
        "truncated.json",
        b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp',
        r"is not valid JSON \(Unterminated string starting at: line 1 column 60\); truncated\?",
    ),
    (
        "table.json",
        b"instruction,output\nName a colour.,Blue.\n",
        r"is neither a JSON array nor JSON Lines \(line 1: Expecting value\); a CSV\?",
    ),
    (
        "latin1.jsonl",
        '{"instruction": "Caf\u00e9?", "output": "Oui."}\n'.encode("latin-1"),
        r"is not UTF-8 text \(byte 0xe9 on line 1\); re-encode it as UTF-8",
    ),
]


@pytest.mark.parametrize("name, content, problem", FILE_FAULTS, ids=[name for name, _, _ in FILE_FAULTS])
def test_unreadable_file_is_one_line_naming_it(tmp_path, name, content, problem):
    """Case 8: a file that cannot be read at all: one line naming it and what is wrong with it."""
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(f)) + " " + problem) as e:
        RawDataset.load("alpaca", str(f))
    assert "\n" not in str(e.value)


def test_stage_turns_a_data_fault_into_one_line(toy_models, tmp_path):
    """Case 8: sft.py (as score_model.py and ppo_lag.py) turns the loader's ValueError into `error: ...`, before
    training."""
    f = tmp_path / "table.json"
    f.write_text("instruction,output\nName a colour.,Blue.\n")
    proc = run(
        [
            "sft.py",
            "--model_name_or_path",
            toy_models / "base",
            "--train_datasets",
            f"alpaca:1:{f}",
            "--max_length",
            "48",
            "--output_dir",
            tmp_path / "sft",
        ]
    )
    assert error_line(proc).startswith(f"error: {f} is neither a JSON array nor JSON Lines")
    assert "step" not in proc.stdout


def test_evaluate_turns_a_data_fault_into_one_line(toy_models, tmp_path):
    """Case 8, in evaluate.py: an empty prompts file, before any generation."""
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(b"")
    out = tmp_path / "arena"
    assert error_line(run(arena(toy_models, out, "--judge", datasets=f"PKU-SafeRLHF/test:1:{f}"))) == (
        f"error: {f} is empty"
    )
    assert not (out / "arena.csv").exists()


# ----------------------------------------------------------------------------------------------------------------
# Case 9: broken model folders


def test_check_model_folder(toy_models, tmp_path):
    """Cases 9 and 3: checkpoint.check_model_folder names each way a folder is broken, and the wrong kind of model."""
    base = toy_models / "base"

    def broken(name, edit):
        return broken_copy(base, tmp_path / name, edit)

    def refused(folder, kind, needle, flag="--model_name_or_path"):
        with pytest.raises(SystemExit, match=needle) as e:
            checkpoint.check_model_folder(str(folder), kind, flag)
        assert str(e.value).startswith(f"error: {flag} {folder} ") and "\n" not in str(e.value)

    for kind in ("causal_lm", "any"):
        checkpoint.check_model_folder(str(base), kind)
    refused(tmp_path / "missing", "any", "is not a model folder")
    refused(broken("no_config", lambda f: (f / "config.json").unlink()), "any", "has no config.json")
    refused(broken("no_weights", lambda f: (f / "model.safetensors").unlink()), "any", "no weights")
    refused(broken("cut", lambda f: os.truncate(f / "model.safetensors", 300_000)), "any", "truncated")
    refused(broken("cut_header", lambda f: os.truncate(f / "model.safetensors", 100)), "any", "truncated")

    def shard(f):  # an index whose second shard is missing
        (f / "model.safetensors").rename(f / "model-00001-of-00002.safetensors")
        weight_map = {
            "lm_head.weight": "model-00002-of-00002.safetensors",
            "model.norm.weight": "model-00001-of-00002.safetensors",
        }
        (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    refused(broken("shards", shard), "any", "model-00002-of-00002.safetensors is missing \\(its index lists it\\)")
    no_tok = broken("no_tokenizer", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")])
    refused(no_tok, "any", "no tokenizer files")
    # the wrong kind: a score model by its config (ours), or by a score_head tensor only (Beaver's older folders)
    config = json.loads((base / "config.json").read_text())
    ours = broken("score", lambda f: (f / "config.json").write_text(json.dumps({**config, "score_dim": 1})))
    beaver = broken("beaver", lambda f: save_file({"score_head.weight": torch.zeros(1, 64)}, f / "model.safetensors"))
    refused(ours, "causal_lm", "is a score model \\(LlamaForCausalLM\\), not a causal LM")
    refused(beaver, "causal_lm", "is a score model")
    checkpoint.check_model_folder(str(ours), "score_model")
    checkpoint.check_model_folder(str(beaver), "any")
    refused(
        base,
        "score_model",
        "is a causal LM \\(LlamaForCausalLM\\) with no score head; it needs a reward model trained by score_model.py",
        "--reward_model_name_or_path",
    )


BROKEN = {  # how to break a copy of the toy base model, and what the one line must say
    "no_weights": (lambda f: (f / "model.safetensors").unlink(), "has config.json but no weights"),
    "truncated": (
        lambda f: os.truncate(f / "model.safetensors", 200_000),
        "has a bad weights file: model.safetensors is truncated",
    ),
    "no_tokenizer": (
        lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        "has weights but no tokenizer files",
    ),
    "score_model": (
        lambda f: (f / "config.json").write_text(
            json.dumps({**json.loads((f / "config.json").read_text()), "score_dim": 1, "score_type": "reward"})
        ),
        "is a score model",
    ),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_broken_model_folder_gives_one_line(toy_models, tmp_path, broken):
    """Case 9 (and 3 for a score model): sft.py, chat.py and its arena name the flag and the folder, and stop before
    anything is written."""
    base, (edit, needle) = toy_models / "base", BROKEN[broken]
    folder = broken_copy(base, tmp_path / broken, edit)
    proc = run(sft(folder, tmp_path / "out"))
    assert error_line(proc).startswith(f"error: --model_name_or_path {folder} {needle}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()  # stopped before the folder
    proc = run(["chat.py", "--model_name_or_path", folder, "-p", "hi", "--max_new_tokens", "4"])
    assert error_line(proc).startswith(f"error: --model_name_or_path {folder} {needle}") and not proc.stdout
    proc = run(
        [
            "chat.py",
            "--red_corner_model_name_or_path",
            base,
            "--blue_corner_model_name_or_path",
            folder,
            "-p",
            "hi",
            "--max_new_tokens",
            "4",
        ]
    )
    assert error_line(proc).startswith(f"error: --blue_corner_model_name_or_path {folder} {needle}")  # the bad corner


@pytest.mark.parametrize(
    "fault, problem",
    [
        ("no weights", "no weights"),
        ("truncated safetensors", "model.safetensors is truncated"),
        ("no tokenizer", "no tokenizer files"),
    ],
)
def test_evaluate_names_a_broken_model_folder(toy_models, tmp_path, fault, problem):
    """Case 9, in evaluate.py: the broken corner named, before any model is loaded."""

    def edit(folder):
        if fault == "no weights":
            (folder / "model.safetensors").unlink()
        elif fault == "truncated safetensors":
            content = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(content[: len(content) // 2])
        else:
            for f in folder.glob("tokenizer*"):
                f.unlink()

    broken = broken_copy(toy_models / "base", tmp_path / "policy", edit)
    args = arena(toy_models, tmp_path / "arena", "--judge")
    args[args.index("--red_corner_model_name_or_path") + 1] = broken
    line = error_line(run(args))
    assert line.startswith(f"error: --red_corner_model_name_or_path {broken} ") and problem in line


# ----------------------------------------------------------------------------------------------------------------
# Case 10: flags that used to be accepted or crash late


@pytest.mark.parametrize(
    "extra, message",
    [
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
    ],
)
def test_ppo_bad_flags_stop_at_parsing(toy_models, tmp_path, capsys, monkeypatch, extra, message):
    """Cases 10 and 2: each used to be accepted (a NaN lambda, an actor that never stepped) or crash late. The checks
    run before any engine, model or folder exists, so main() runs in-process here (fast): exit 2, one line."""
    out = tmp_path / "out"
    stop = ppo_main(monkeypatch, ppo(toy_models, out, *extra))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ppo_lag.py: error:")]
    assert stop.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists() and not (tmp_path / "out.partial").exists() and not (tmp_path / "out.lock").exists()


# ----------------------------------------------------------------------------------------------------------------
# Case 11: an unwritable output folder, caught at start-up


def test_unwritable_output_dir_is_caught_at_start_up(toy_models, tmp_path):
    """Case 11: sft.py stops before it reads any data or loads any model."""
    (tmp_path / "file").write_text("a regular file where a folder should be")  # root ignores chmod: this stops it
    line = error_line(proc := run(sft(toy_models / "base", tmp_path / "file" / "out")))
    assert (
        line == f"error: cannot write {tmp_path / 'file' / 'out'} ({tmp_path / 'file'} is a file, not a folder); "
        "pass a writable --output_dir"
    )
    assert "deepspeed config" not in proc.stdout and "train " not in proc.stdout  # no data, no model loaded


def test_evaluate_checks_the_output_folder_first(toy_models, tmp_path):
    """Case 11, in evaluate.py: before any model is loaded (or the judge called)."""
    (tmp_path / "file").write_text("a regular file, so nothing can be made under it (even as root)")
    out = tmp_path / "file" / "arena"
    proc = run(arena(toy_models, out, "--judge", "--judge_url", closed_port_url()))
    line = error_line(proc)
    assert line.startswith(f"error: cannot write {out} (") and line.endswith("pass a writable --output_dir")
    assert "deepspeed config" not in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# Case 12: Ctrl-C


def test_interrupted_names_the_last_complete_checkpoint(tmp_path, capsys):
    """Case 12: checkpoint.interrupted exits 130 naming the newest complete checkpoint (an incomplete one skipped)."""
    for step, complete in [(2, True), (10, True), (12, False)]:
        fake_model(tmp_path / f"checkpoint-{step}", "m", complete)
    with pytest.raises(SystemExit) as e:
        checkpoint.interrupted(13, tmp_path)
    assert e.value.code == 130
    assert capsys.readouterr().err.startswith(
        f"interrupted at step 13; the last complete checkpoint is {tmp_path / 'checkpoint-10'};"
    )


def test_ctrl_c_stops_with_one_line(toy_models, tmp_path):
    """Case 12: SIGINT mid-training: exit 130, one line naming the newest complete checkpoint (--save_interval 2), no
    traceback, nothing published, the lock released."""
    out = tmp_path / "sft"
    proc = start(sft(toy_models / "base", out, "--epochs", "100", "--max_steps", "2000", "--save_interval", "2"))
    _, stderr = signal_at(proc, "step 3/", signal.SIGINT, timeout=60)
    lines = stderr_lines(stderr)
    assert proc.returncode == 130 and len(lines) == 1, f"rc {proc.returncode}:\n{stderr[-3000:]}"
    words = lines[0].split()  # interrupted at step N; the last complete checkpoint is PATH; HINT
    step, last = int(words[3].rstrip(";")), tmp_path / "sft.partial" / words[9].rstrip(";").rsplit("/", 1)[-1]
    assert lines[0] == f"interrupted at step {step}; the last complete checkpoint is {last}; {checkpoint.RERUN_HINT}"
    assert step >= 3 and checkpoint.is_complete(last) and step - 3 <= int(last.name.split("-")[1]) <= step
    assert not out.exists() and (tmp_path / "sft.partial" / "metrics.jsonl").exists()  # the .partial stays
    assert not (tmp_path / "sft.lock").exists()
