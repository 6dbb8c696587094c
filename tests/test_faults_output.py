"""The output folder and the checkpoints under faults a user meets: an --output_dir that is not ours (or holds the
run's input, or is the current folder, or a link), a kill while score_model.py --save_best publishes its best model or
between a new best and the next checkpoint, a damaged newest checkpoint, a reward and a cost model swapped.

Each of these once lost data or ended in a traceback on every re-run; each test here failed on that code. The rule
they hold: a run replaces --output_dir only when it is new, empty or a stage's output, never an input of the run; a
killed run is finished by the same command; a damaged checkpoint is named in one line and the one before it used."""

import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from test_faults import PY, error_line, run

import checkpoint
from conftest import ROOT, signal_at, stage_env


def ok(proc) -> str:
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def sft(base, out, *extra):
    flags = (
        "--train_datasets toy-sft:0.02 --max_length 64 --epochs 1 --per_device_train_batch_size 8 --max_steps 4 "
        "--gradient_accumulation_steps 1 --lr 3e-3 --lr_scheduler_type constant --lr_warmup_ratio 0 --logging_steps 1"
    )
    return ["sft.py", "--model_name_or_path", base, *flags.split(), "--output_dir", out, *extra]


def kill_after_checkpoint(args, step: int) -> None:
    """Run `args` until checkpoint-<step> is in place (the pause hook), then SIGKILL it."""
    proc = subprocess.Popen(
        [PY, *map(str, args)],
        cwd=ROOT,
        env=stage_env(NANO_CHECKPOINT_PAUSE=str(step)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    signal_at(proc, "checkpoint: pausing", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"the run never paused after checkpoint-{step}"


def same_weights(a, b) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def fake_model(folder, tag="m"):
    folder.mkdir(parents=True)
    (folder / "weights").write_text(tag)
    (folder / "arguments.json").write_text("{}")


def refused(output_dir, args=None) -> str:
    with pytest.raises(SystemExit) as e:
        checkpoint.prepare_output(str(output_dir), args)
    return str(e.value.code)


# ----------------------------------------------------------------------------------------------------------------
# --output_dir: only a folder of ours is ever replaced, never an input of the run


def test_a_folder_that_is_not_ours_is_refused_and_kept(toy_models, tmp_path):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "notes.txt").write_text("notes")
    line = error_line(run(sft(toy_models / "base", mine)))
    assert f"--output_dir {mine} is a folder that no stage of ours wrote" in line and "new or empty folder" in line
    assert (mine / "notes.txt").read_text() == "notes" and not (tmp_path / "mydir.partial").exists()
    assert not (tmp_path / "mydir.lock").exists()
    # an empty folder, a new one and a stage's output are taken
    for folder in (tmp_path / "empty", tmp_path / "new"):
        if folder.name == "empty":
            folder.mkdir()
        checkpoint.prepare_output(str(folder))
        checkpoint.release_output(str(folder))
    fake_model(tmp_path / "ours")
    checkpoint.prepare_output(str(tmp_path / "ours"))
    checkpoint.release_output(str(tmp_path / "ours"))
    # the toy base model's writer (no lock: it saves in one go) follows the same rule
    line = error_line(run(["toy.py", "--output_dir", mine]))
    assert "is a folder that no stage of ours wrote" in line and (mine / "notes.txt").read_text() == "notes"


def test_the_input_model_and_its_parent_are_refused(toy_models, tmp_path):
    """`--model_name_or_path par/base --output_dir par` (a path component short) and output == input: the swap
    would delete the input (and, with an adapter saved in place of its base, leave an adapter that names itself)."""
    par = tmp_path / "par"
    shutil.copytree(toy_models / "base", par / "base")
    (par / "arguments.json").write_text("{}")  # a stage's output (the pipeline's folder), so "ours"
    line = error_line(run(sft(par / "base", par)))
    assert f"--output_dir {par} holds the run's input --model_name_or_path {par / 'base'}" in line
    assert checkpoint.is_complete(par / "base") and (par / "base" / "model.safetensors").is_file()
    # the LoRA adapter saved over its own base model
    line = error_line(run(sft(par / "base", par / "base", "--lora_rank", "4", "--save_adapter_only")))
    assert "holds the run's input --model_name_or_path" in line and (par / "base" / "model.safetensors").is_file()
    # an adapter given as input protects its base model too
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(par / "base")}))
    assert "(its base model" in refused(par / "base", {"model_name_or_path": str(adapter)})
    # an adapter that an earlier version saved over its base names itself: one line, not a RecursionError
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(adapter)}))
    (adapter / "adapter_model.safetensors").write_bytes((toy_models / "base" / "model.safetensors").read_bytes())
    shutil.copy(toy_models / "base" / "tokenizer.json", adapter)
    with pytest.raises(SystemExit, match="names itself as its base model"):
        checkpoint.check_model_folder(str(adapter), "causal_lm", "--model_name_or_path")
    # data files (a dataset spec's path) count as inputs
    (par / "data.jsonl").write_text("{}\n")
    spec = [("toy-sft", {"proportion": 1.0, "path": str(par / "data.jsonl")})]
    assert "--train_datasets" in refused(par, {"train_datasets": spec})


@pytest.mark.parametrize("output_dir", ["", ".", ".."])
def test_the_current_folder_is_refused_at_start(toy_models, output_dir):
    line = error_line(run(sft(toy_models / "base", output_dir)))
    assert line.startswith(f"error: --output_dir {output_dir!r} is the current folder or one above it")
    assert not (ROOT / "..partial").exists() and not (ROOT / ".lock").exists()


def test_a_linked_output_dir_is_replaced_through_its_link(tmp_path):
    """A link to a folder elsewhere: the run writes beside the target and the link keeps pointing at the newest
    model; the second run no longer stops on the link the first one left as OUT.old."""
    target, link = tmp_path / "disk" / "sft", tmp_path / "sft"
    fake_model(target, "m0")
    link.symlink_to(target)
    for tag in ("m1", "m2"):
        partial = checkpoint.prepare_output(str(link))
        assert partial == tmp_path / "disk" / "sft.partial"
        (partial / "weights").write_text(tag)
        (partial / "arguments.json").write_text("{}")
        checkpoint.publish(partial, str(link))
        checkpoint.release_output(str(link))
        assert link.is_symlink() and (link / "weights").read_text() == tag
        assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "sft"]
        assert sorted(p.name for p in target.parent.iterdir()) == ["sft"]


def test_a_stale_link_left_as_old_is_cleaned(tmp_path):
    """What the earlier code left: OUT.old as a link beside a complete OUT."""
    fake_model(tmp_path / "elsewhere")
    fake_model(tmp_path / "run")
    (tmp_path / "run.old").symlink_to(tmp_path / "elsewhere")
    checkpoint.prepare_output(str(tmp_path / "run"))
    checkpoint.release_output(str(tmp_path / "run"))
    assert not (tmp_path / "run.old").is_symlink() and checkpoint.is_complete(tmp_path / "elsewhere")


# ----------------------------------------------------------------------------------------------------------------
# Score models checked for the kind they were trained as


@pytest.mark.parametrize("script", ["ppo_lag.py", "evaluate.py"])
def test_swapped_reward_and_cost_models_are_refused(toy_models, tmp_path, script):
    rm, cm = toy_models / "rm", toy_models / "cm"
    common = ["--reward_model_name_or_path", cm, "--cost_model_name_or_path", rm, "--output_dir", tmp_path / "out"]
    if script == "ppo_lag.py":
        args = [script, "--actor_model_name_or_path", toy_models / "base", "--train_datasets", "toy-prompts:0.02"]
    else:
        args = [
            script,
            "--red_corner_model_name_or_path",
            toy_models / "base",
            "--blue_corner_model_name_or_path",
            toy_models / "base",
            "--datasets",
            "toy-eval:0.02",
        ]
    line = error_line(run([*args, *common]))
    assert f"--reward_model_name_or_path {cm} is a cost model (score_type cost in its config.json)" in line
    assert "--score_type reward" in line and not (tmp_path / "out").exists()
    checkpoint.check_model_folder(str(rm), "score_model", "--reward_model_name_or_path")
    checkpoint.check_model_folder(str(cm), "score_model", "--cost_model_name_or_path")
    with pytest.raises(SystemExit, match="is a reward model"):
        checkpoint.check_model_folder(str(rm), "score_model", "--cost_model_name_or_path")


# ----------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: the newest whole one is used, and the damage named in one line


@pytest.fixture(scope="module")
def killed_sft(toy_models, tmp_path_factory):
    """sft.py with a checkpoint every step, SIGKILLed right after checkpoint-3; and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("killed_sft")
    ok(run(sft(toy_models / "base", root / "full")))
    kill_after_checkpoint(sft(toy_models / "base", root / "killed", "--save_interval", "1"), 3)
    return root


DAMAGES = {
    "truncated engine state": lambda c: os.truncate(c / "deepspeed/model/mp_rank_00_model_states.pt", 1000),
    "deleted deepspeed/": lambda c: shutil.rmtree(c / "deepspeed"),
    "cut loop_state.json": lambda c: os.truncate(c / "loop_state.json", 10),
    "cut arguments.json": lambda c: os.truncate(c / "arguments.json", 10),
    "missing RNG file": lambda c: (c / "rng_state_0.pth").unlink(),
    "cut manifest": lambda c: os.truncate(c / "manifest.json", 5),
}
NAMED = {
    "truncated engine state": "mp_rank_00_model_states.pt",
    "deleted deepspeed/": "deepspeed/model/",
    "cut loop_state.json": "loop_state.json",
    "cut arguments.json": "arguments.json",
    "missing RNG file": "rng_state_0.pth",
    "cut manifest": "manifest.json",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_checkpoint_problem_names_the_damaged_file(killed_sft, tmp_path, damage):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(killed_sft / "killed.partial" / "checkpoint-3", ckpt)
    assert checkpoint.checkpoint_problem(ckpt) is None and checkpoint.is_resumable(ckpt)
    DAMAGES[damage](ckpt)
    problem = checkpoint.checkpoint_problem(ckpt)
    assert problem and NAMED[damage] in problem and not checkpoint.is_resumable(ckpt)


@pytest.mark.parametrize("damage", ["truncated engine state", "cut loop_state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(toy_models, killed_sft, tmp_path, damage):
    out = tmp_path / "killed"
    shutil.copytree(killed_sft / "killed.partial", tmp_path / "killed.partial")
    DAMAGES[damage](tmp_path / "killed.partial" / "checkpoint-3")
    args = sft(toy_models / "base", out, "--save_interval", "1")
    # by path: one line naming the damaged file, nothing deleted
    ckpt = tmp_path / "killed.partial" / "checkpoint-3"
    line = error_line(run([*args, "--resume_from_checkpoint", ckpt]))
    assert line.startswith(f"error: --resume_from_checkpoint {ckpt} is damaged: ") and NAMED[damage] in line
    assert ckpt.is_dir()
    # auto: the line, then checkpoint-2, and the same model as the uninterrupted run
    stdout = ok(run(args))
    assert f"{ckpt} is damaged (" in stdout and "deleting it, resuming from checkpoint-2" in stdout
    assert "resumed from step 2" in stdout and same_weights(out, killed_sft / "full")
    assert sorted(checkpoint.checkpoints(out)) == [1, 2, 3]


def test_no_whole_checkpoint_left_starts_over(toy_models, killed_sft, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(killed_sft / "killed.partial", tmp_path / "killed.partial")
    for ckpt in (tmp_path / "killed.partial").glob("checkpoint-*"):
        (ckpt / "rng_state_0.pth").unlink()
    stdout = ok(run(sft(toy_models / "base", out, "--save_interval", "1")))
    assert "no earlier checkpoint: starting over" in stdout and "resumed" not in stdout
    assert same_weights(out, killed_sft / "full")
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------------------
# score_model.py --save_best: kills while the best model is kept or published


def score_args(base, out, *extra):
    return [
        "score_model.py",
        "--score_type",
        "cost",
        "--model_name_or_path",
        base,
        "--train_datasets",
        "toy-safety-preference:0.05",
        "--eval_datasets",
        "toy-safety-preference/test:0.2",
        "--max_length",
        "64",
        "--epochs",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "32",
        "--lr",
        "1e-3",
        "--lr_scheduler_type",
        "constant",
        "--max_steps",
        "12",
        "--save_best",
        "--eval_interval",
        "1",
        "--save_interval",
        "4",
        "--output_dir",
        out,
        *extra,
    ]


KILL_ON_PUBLISH = """
import os, signal
def _kill_after(move):
    def moved(src, dst, *a, **k):
        result = move(src, dst, *a, **k)
        dst = str(dst)
        if dst.endswith("model.safetensors") and os.path.dirname(dst).endswith(".partial"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return moved
os.link, os.replace = _kill_after(os.link), _kill_after(os.replace)
"""


@pytest.fixture(scope="module")
def best_straight(toy_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("best")
    ok(run(score_args(toy_models / "base", root / "straight")))
    return root / "straight"


def test_save_best_killed_while_publishing_the_best(toy_models, best_straight, tmp_path):
    """SIGKILL right after the best model's weights reach the top of .partial; the re-run finishes with a whole
    model (the earlier code published a folder without model.safetensors, exit 0)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_ON_PUBLISH)
    out, args = tmp_path / "cm", score_args(toy_models / "base", tmp_path / "cm")
    killed = run(args, PYTHONPATH=str(hook))
    assert killed.returncode == -9, killed.stderr[-3000:]
    stdout = ok(run(args))
    assert "resumed from step 12" not in stdout and "resumed from step" in stdout
    checkpoint.check_model_folder(str(out), "score_model", "--cost_model_name_or_path")
    assert same_weights(out, best_straight) and not list(out.glob("best-*"))


def test_save_best_killed_between_a_new_best_and_the_next_checkpoint(toy_models, best_straight, tmp_path):
    """The state a kill after a new best and before the next checkpoint leaves (made from a run killed right after
    checkpoint-8, with checkpoint-8 taken away): checkpoint-4 names a best the run has since replaced. The re-run
    restores that best from checkpoint-4's copy and ends on the uninterrupted run's model."""
    out, args = tmp_path / "cm", score_args(toy_models / "base", tmp_path / "cm")
    kill_after_checkpoint(args, 8)
    partial = tmp_path / "cm.partial"
    shutil.rmtree(partial / "checkpoint-8")
    recorded = json.loads((partial / "checkpoint-4" / "loop_state.json").read_text())["best_dir"]
    bests = sorted(p.name for p in partial.glob("best-*"))
    assert recorded not in bests and bests and int(bests[-1][5:]) > 4, (recorded, bests)  # a later best replaced it
    stdout = ok(run(args))
    assert "resumed from step 4" in stdout
    assert same_weights(out, best_straight) and not list(out.glob("best-*"))


def test_a_data_file_changed_since_the_checkpoint_is_refused(toy_models, tmp_path):
    """A train file edited between the kill and the re-run would silently resume into another data order."""
    data = tmp_path / "alpaca.jsonl"
    text = "".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} ."}) + "\n" for i in range(40))
    data.write_text(text)
    args = sft(toy_models / "base", tmp_path / "sft", "--save_interval", "1")
    args[args.index("toy-sft:0.02")] = f"alpaca:1:{data}"
    kill_after_checkpoint(args, 2)
    data.write_text(text + json.dumps({"instruction": "Say more.", "output": "more ."}) + "\n")
    line = error_line(run(args))
    assert f"{data} changed since it was saved" in line and "--resume_from_checkpoint none" in line
    data.write_text(text)  # put back: the run resumes
    assert "resumed from step 2" in ok(run(args))
