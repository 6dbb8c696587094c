"""Faults a new user meets (issue 11), as they meet them: a diverging run, a kill inside the final swap, two runs on one
folder, broken model folders, an unwritable output folder, Ctrl-C. Each stage run is a subprocess on the toy world;
checkpoint.py's own functions (recovery from each interrupted-swap state, the lock, the folder checks) are tested
in-process first, on hand-made folders."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import data
from conftest import ROOT

PY = sys.executable


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "base"
    data.make_toy_model(str(path))
    return path


def env(**extra):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    e.pop("TRITON_INTERPRET", None)  # stage scripts run the torch paths on CPU
    return e


def run(args, timeout=300, **extra_env):
    return subprocess.run(
        [PY, *map(str, args)], cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def start(args, **extra_env):
    return subprocess.Popen(
        [PY, *map(str, args)], cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def error_line(proc) -> str:
    """The one line a failed run leaves on stderr (DeepSpeed's accelerator notice aside); no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "real_accelerator" not in line]
    assert proc.returncode != 0 and len(lines) == 1, f"rc {proc.returncode}:\n{proc.stdout[-999:]}\n{proc.stderr}"
    return lines[0]


def sft(base, out, *extra):
    flags = (
        "--train_datasets toy-sft:0.05 --max_length 64 --epochs 1 --per_device_train_batch_size 8 --max_steps 1 "
        "--gradient_accumulation_steps 1 --lr 3e-3 --lr_scheduler_type constant --lr_warmup_ratio 0 --logging_steps 1"
    )
    return ["sft.py", "--model_name_or_path", base, *flags.split(), "--output_dir", out, *extra]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def fake_model(folder, tag: str, complete: bool = True):
    """A stand-in model folder: `tag` identifies it, arguments.json (written last) marks it complete."""
    folder.mkdir(parents=True)
    (folder / "weights").write_text(tag)
    if complete:
        (folder / "arguments.json").write_text("{}")


def tag(folder) -> str | None:
    return (folder / "weights").read_text() if checkpoint.is_complete(folder) else None


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


# ----------------------------------------------------------------------------------------------------------------
# checkpoint.py in-process: recovery from each state a kill during the swap leaves, the lock, the folder checks


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
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    fake_model(out, "m1")
    fake_model(partial, "m2", complete=False)
    with pytest.raises(RuntimeError, match="arguments.json"):
        checkpoint.publish(partial, str(out))
    assert tag(out) == "m1"
    (partial / "arguments.json").write_text("{}")
    checkpoint.publish(partial, str(out))
    assert tag(out) == "m2" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_lock_self_live_other_and_stale(tmp_path, capsys):
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


def test_interrupted_names_the_last_complete_checkpoint(tmp_path, capsys):
    for step, complete in [(2, True), (10, True), (12, False)]:
        fake_model(tmp_path / f"checkpoint-{step}", "m", complete)
    with pytest.raises(SystemExit) as e:
        checkpoint.interrupted(13, tmp_path)
    assert e.value.code == 130
    assert capsys.readouterr().err.startswith(
        f"interrupted at step 13; the last complete checkpoint is {tmp_path / 'checkpoint-10'};"
    )


def test_check_finite_and_weights_finite():
    checkpoint.check_finite({"train/loss": 1.5, "train/lr": 0.0}, 3)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(SystemExit, match=f"non-finite train/loss \\({bad}\\) at step 3"):
            checkpoint.check_finite({"train/loss": bad, "train/lr": 1e-3}, 3)
    layer = torch.nn.Linear(3, 2)
    assert checkpoint.weights_finite(layer)
    with torch.no_grad():
        layer.bias[1] = math.inf
    assert not checkpoint.weights_finite(layer)


def test_check_model_folder(toy_base, tmp_path):
    from safetensors.torch import save_file

    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(toy_base, folder)
        edit(folder)
        return folder

    def refused(folder, kind, needle, flag="--model_name_or_path"):
        with pytest.raises(SystemExit, match=needle) as e:
            checkpoint.check_model_folder(str(folder), kind, flag)
        assert str(e.value).startswith(f"error: {flag} {folder} ") and "\n" not in str(e.value)

    for kind in ("causal_lm", "any"):
        checkpoint.check_model_folder(str(toy_base), kind)
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
    config = json.loads((toy_base / "config.json").read_text())
    ours = broken("score", lambda f: (f / "config.json").write_text(json.dumps({**config, "score_dim": 1})))
    beaver = broken("beaver", lambda f: save_file({"score_head.weight": torch.zeros(1, 64)}, f / "model.safetensors"))
    refused(ours, "causal_lm", "is a score model \\(LlamaForCausalLM\\), not a causal LM")
    refused(beaver, "causal_lm", "is a score model")
    checkpoint.check_model_folder(str(ours), "score_model")
    checkpoint.check_model_folder(str(beaver), "any")
    refused(
        toy_base,
        "score_model",
        "is a causal LM \\(LlamaForCausalLM\\) with no score head; it needs a reward model trained by score_model.py",
        "--reward_model_name_or_path",
    )


# ----------------------------------------------------------------------------------------------------------------
# The stages, as users run them


def test_1_diverging_sft_stops_and_saves_nothing(toy_base, tmp_path):
    # four runs at once: the loss check at a log step; the weights check before a save that comes before any log
    # step; --lr inf and nan, refused by the argument checks
    cases = {
        "a": (["--max_steps", "4"], "non-finite train/loss (nan) at step 2"),
        "b": (
            ["--max_steps", "4", "--logging_steps", "100", "--save_interval", "2"],
            "non-finite weights (nan) at step 2",
        ),
        "c": (["--lr", "inf"], "--lr must be finite"),
        "d": (["--lr", "nan"], "--lr must be finite"),
    }
    procs = {name: start(sft(toy_base, tmp_path / name, "--lr", "1e30", *extra)) for name, (extra, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        needle = cases[name][1]
        if name in "cd":
            assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith(f"sft.py: error: {needle}")
        else:
            assert error_line(proc) == f"error: {needle}; stopping without saving (lower --lr, check the data)"
        assert not (tmp_path / name).exists()
    from safetensors.torch import load_file

    for file in tmp_path.rglob("*.safetensors"):  # checkpoints included
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file


def test_6_kill_inside_the_final_swap_never_loses_the_model(toy_base, tmp_path):
    out = tmp_path / "sft"
    proc = run(sft(toy_base, out, "--lr", "1e-3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = weights(out)
    # the second run (another lr: another model) is killed between its two renames
    second = start(sft(toy_base, out), NANO_SWAP_PAUSE="30")
    for line in second.stdout:
        if line.startswith("swap: pausing"):
            second.send_signal(signal.SIGKILL)
            break
    second.wait()
    assert second.returncode == -signal.SIGKILL, f"the run never paused in the swap:\n{second.stderr.read()[-3000:]}"
    # the previous model is whole beside its usual place (OUT.old); the new one is whole in OUT.partial
    old, partial = tmp_path / "sft.old", tmp_path / "sft.partial"
    assert not out.exists() and checkpoint.is_complete(old) and checkpoint.is_complete(partial)
    assert all(torch.equal(first[k], v) for k, v in weights(old).items())
    new = weights(partial)
    assert any(not torch.equal(first[k], v) for k, v in new.items())
    # the third run finishes the swap (the stale lock of the killed run is taken over), then trains and publishes
    proc = run(sft(toy_base, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the stale lock" in proc.stdout
    assert f"{partial} holds the complete model of a run whose final swap was interrupted: publishing it" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"] and checkpoint.is_complete(out)
    assert all(torch.equal(new[k], v) for k, v in weights(out).items())  # same command as the second run: same model


def test_7_two_runs_on_one_output_dir(toy_base, tmp_path):
    out = tmp_path / "sft"
    holder = hold_lock(out)
    try:
        t0 = time.time()
        proc = run(sft(toy_base, out))
        assert error_line(proc).startswith(f"error: {out} is in use by another run (pid {holder.pid} on ")
        assert "train " not in proc.stdout  # stopped before the data
        print(f"refused after {time.time() - t0:.1f} s")
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock is stale now: the next run takes it over and finishes
    proc = run(sft(toy_base, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"of pid {holder.pid} " in proc.stdout and "taking over the stale lock" in proc.stdout
    assert checkpoint.is_complete(out) and not (tmp_path / "sft.lock").exists()


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
def test_9_broken_model_folder_gives_one_line(toy_base, tmp_path, broken):
    folder, (edit, needle) = tmp_path / broken, BROKEN[broken]
    shutil.copytree(toy_base, folder)
    edit(folder)
    proc = run(sft(folder, tmp_path / "out"))
    assert error_line(proc).startswith(f"error: --model_name_or_path {folder} {needle}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()  # stopped before the folder
    proc = run(["chat.py", "--model_name_or_path", folder, "-p", "hi", "--max_new_tokens", "4"])
    assert error_line(proc).startswith(f"error: --model_name_or_path {folder} {needle}") and not proc.stdout
    proc = run(
        [
            "chat.py",
            "--red_corner_model_name_or_path",
            toy_base,
            "--blue_corner_model_name_or_path",
            folder,
            "-p",
            "hi",
            "--max_new_tokens",
            "4",
        ]
    )  # arena: the bad corner is named
    assert error_line(proc).startswith(f"error: --blue_corner_model_name_or_path {folder} {needle}")


def test_11_unwritable_output_dir_is_caught_at_start_up(toy_base, tmp_path):
    (tmp_path / "file").write_text("a regular file where a folder should be")  # root ignores chmod: this stops it
    proc = run(sft(toy_base, tmp_path / "file" / "out"))
    line = error_line(proc)
    assert (
        line == f"error: cannot write {tmp_path / 'file' / 'out'} ({tmp_path / 'file'} is a file, not a folder); "
        "pass a writable --output_dir"
    )
    assert "deepspeed config" not in proc.stdout and "train " not in proc.stdout  # no data, no model loaded


def test_12_ctrl_c_stops_with_one_line(toy_base, tmp_path):
    out = tmp_path / "sft"
    proc = start(sft(toy_base, out, "--epochs", "100", "--max_steps", "2000", "--save_interval", "2"))
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    lines = [line for line in stderr.splitlines() if line.strip() and "real_accelerator" not in line]
    assert proc.returncode == 130 and len(lines) == 1, f"rc {proc.returncode}:\n{stderr[-3000:]}"
    words = lines[0].split()  # interrupted at step N; the last complete checkpoint is PATH; HINT
    step, last = int(words[3].rstrip(";")), tmp_path / "sft.partial" / words[9].rstrip(";").rsplit("/", 1)[-1]
    assert lines[0] == f"interrupted at step {step}; the last complete checkpoint is {last}; {checkpoint.RERUN_HINT}"
    assert step >= 3 and checkpoint.is_complete(last) and step - 3 <= int(last.name.split("-")[1]) <= step
    assert not out.exists() and (tmp_path / "sft.partial" / "metrics.jsonl").exists()  # the .partial stays
    assert not (tmp_path / "sft.lock").exists()
