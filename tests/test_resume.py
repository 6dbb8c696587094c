"""Resume after a kill. For sft.py and ppo_lag.py (PPO-Lag with a cost model, PTX, a wrapping episode-cost
window) on the toy world: run N steps uninterrupted; run the same command with --save_interval, SIGKILL it (every
process) right after the checkpoint at N/2 is in place, run the same command again: the final weights equal the
uninterrupted run's bitwise, and so do the metrics lines after the resume point (lambda and J_C included). Then the
refusals (a changed flag, another world size, a bad path) and --resume_from_checkpoint none / PATH.

What breaks these tests: forgetting the RNG states (dropout masks, sampling, PPO minibatch order), the optimizer or
LR-scheduler state, the data position, the PTX position, lambda, the episode-cost window, or the running loss sums."""

import json
import shutil
import socket
import subprocess
import sys

import psutil
import pytest
import torch

import checkpoint
import templates
import toy
from conftest import ROOT, stage_env

PY = sys.executable


def env(**extra):
    return stage_env(**extra)


def start(args, **extra_env):
    return subprocess.Popen(
        list(map(str, args)),
        cwd=ROOT,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, rc=0):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == rc, f"{' '.join(proc.args)}: rc {proc.returncode}\n{out[-4000:]}"
    return out


def run(args, rc=0):
    return finish(start(args), rc)


def start_killed(args, step):
    """Start `args` with the test hook that pauses right after checkpoint-<step> is renamed into place."""
    return start(args, NANO_CHECKPOINT_PAUSE=str(step))


def kill_at_pause(proc):
    """SIGKILL the run and every process under it (torchrun's workers live in their own sessions) in the pause."""
    for line in proc.stdout:
        if line.startswith("checkpoint: pausing"):
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.kill()
            break
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    assert proc.returncode == -9, f"the run never paused after its checkpoint (rc {proc.returncode}):\n{rest[-3000:]}"


def rows(out, key):
    """The metrics lines holding `key`, without the timing fields (wall-clock, never reproducible)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))} for r in lines if key in r]


def assert_same_weights(a, b):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"weights differ from the uninterrupted run: max |diff| {diff}"
    print(f"largest weight difference {diff}")


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The toy base model, a copy with attention dropout (so that SFT consumes random numbers), a reward and a cost
    model with seeded random heads."""
    from models import ScoreModel

    root = tmp_path_factory.mktemp("resume")
    toy.make_toy_model(str(root / "base"))
    shutil.copytree(root / "base", root / "dropout")
    config = json.loads((root / "dropout" / "config.json").read_text())
    (root / "dropout" / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    tokenizer = templates.load_tokenizer(str(root / "base"))
    for seed, (name, score_type) in enumerate((("rm", "reward"), ("cm", "cost"))):
        torch.manual_seed(seed)
        ScoreModel.from_pretrained(str(root / "base"), score_type=score_type).save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    return root


# ----------------------------------------------------------------------------------------------------------------
# checkpoint.py in-process: which checkpoint is chosen, what is refused, what is cleaned


def fake_checkpoint(folder, step, args, world_size=1, complete=True):
    folder.mkdir(parents=True)
    (folder / "loop_state.json").write_text(json.dumps({"step": step, "world_size": world_size, "rank_state": [{}]}))
    if complete:
        (folder / "arguments.json").write_text(json.dumps(args))


def test_find_resume_chooses_checks_and_cleans(tmp_path, capsys):
    args = {
        "lr": 0.003,
        "seed": 42,
        "train_datasets": [["toy-sft", {"proportion": 0.05, "path": None}]],
        "output_dir": "a",
        "logging_steps": 1,
        "eval_interval": 0,
    }
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    for step in (2, 4, 6):
        fake_checkpoint(partial / f"checkpoint-{step}", step, args)
    fake_checkpoint(partial / "checkpoint-8", 8, args, complete=False)  # killed while saving
    fake_checkpoint(partial / "checkpoint-10.tmp", 10, args)
    (partial / "model.safetensors").write_text("half of a final save")
    fake_checkpoint(partial / "best-3", 3, args)  # score_model.py's --save_best copy: complete, kept
    fake_checkpoint(partial / "best-5", 5, args, complete=False)  # killed while writing it
    lines = [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3, 4, 5, 6, 7)]
    (partial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "tra')

    # auto keeps the complete folders and the logs, and nothing else
    assert checkpoint.prepare_output(str(out), args, "auto") == partial
    kept = ["best-3", "checkpoint-2", "checkpoint-4", "checkpoint-6", "metrics.jsonl"]
    assert sorted(p.name for p in partial.iterdir()) == kept
    # a changed flag is refused in one line naming it, old -> new; flags that cannot change the result may differ
    changed = {**args, "lr": 0.001, "seed": 1, "output_dir": "b", "logging_steps": 5, "eval_interval": 3}
    with pytest.raises(SystemExit) as e:
        checkpoint.find_resume(partial, "auto", changed)
    assert str(e.value) == (
        f"error: cannot resume from {partial / 'checkpoint-6'}: flags differ from the run that saved it: "
        "--lr 0.003 -> 0.001, --seed 42 -> 1, --eval_interval 0 -> 3; re-run with the saved flags, or pass "
        "--resume_from_checkpoint none to start over"
    )
    assert checkpoint.find_resume(partial, "auto", changed, ignored=("seed", "lr", "eval_interval")) is not None
    fake_checkpoint(tmp_path / "two_ranks", 6, args, world_size=2)
    with pytest.raises(SystemExit, match="it was saved by 2 processes and this run has 1 .*resume with 2 processes"):
        checkpoint.find_resume(partial, str(tmp_path / "two_ranks"), args)
    with pytest.raises(SystemExit, match="--resume_from_checkpoint .*checkpoint-8 is not a complete checkpoint"):
        checkpoint.find_resume(partial, str(partial / "checkpoint-8"), args)
    # auto: the newest; the metrics are cut back to its step (the kill cut the last line)
    assert checkpoint.find_resume(partial, "auto", args) == partial / "checkpoint-6"
    assert [json.loads(r)["step"] for r in (partial / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    # a PATH to an older one: the newer checkpoints and metrics lines go, with a line saying so
    assert checkpoint.find_resume(partial, str(partial / "checkpoint-2"), args) == partial / "checkpoint-2"
    assert sorted(checkpoint.checkpoints(partial)) == [2] and "deleting" in capsys.readouterr().out
    assert [json.loads(r)["step"] for r in (partial / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    checkpoint.release_output(str(out))
    # none: discarded, and said so
    assert checkpoint.prepare_output(str(out), args, "none") == partial and not any(partial.iterdir())
    assert f"discarding 1 checkpoint(s) in {partial} (--resume_from_checkpoint none): starting over" in (
        capsys.readouterr().out
    )
    assert checkpoint.find_resume(partial, "auto", args) is None
    checkpoint.release_output(str(out))


# ----------------------------------------------------------------------------------------------------------------
# sft.py


def sft_args(base, out, *extra):
    # 72 train samples in micro-batches of 8 -> 9 per epoch, 2 per step: step 5 takes the last micro-batch of epoch 0
    # and the first of epoch 1; cosine with warm-up; a metrics line every 3 steps (so the checkpoint at 4 carries
    # running sums); attention dropout in the base model makes every step draw random numbers
    flags = (
        "--train_datasets toy-sft:0.02 --eval_split_ratio 0.1 --max_length 64 --epochs 2 --per_device_train_batch_size "
        "8 --gradient_accumulation_steps 2 --lr 3e-3 --lr_scheduler_type cosine --lr_warmup_ratio 0.2 --logging_steps 3"
    )
    return [PY, "sft.py", "--model_name_or_path", base, *flags.split(), "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def sft_runs(models, tmp_path_factory):
    """The uninterrupted run (8 steps) and, beside it, the same run with checkpoints every 2 steps (the newest 2
    kept) and evals every step, killed right after checkpoint-4."""
    root = tmp_path_factory.mktemp("sft_runs")
    full = start(sft_args(models / "dropout", root / "full"))
    killed = start_killed(sft_args(models / "dropout", root / "killed", *SFT_SAVE), 4)
    kill_at_pause(killed)
    finish(full)
    return root


SFT_SAVE = ["--save_interval", "2", "--save_total_limit", "2", "--eval_interval", "1"]


def copy_partial(root, tmp_path, name):
    shutil.copytree(root / "killed.partial", tmp_path / f"{name}.partial")
    return tmp_path / name


def test_sft_resume_after_kill_is_bitwise(models, sft_runs, tmp_path):
    out = copy_partial(sft_runs, tmp_path, "sft")
    partial = tmp_path / "sft.partial"
    ckpt = partial / "checkpoint-4"
    assert sorted(checkpoint.checkpoints(partial)) == [2, 4]
    state = json.loads((ckpt / "loop_state.json").read_text())
    assert state["epoch"] == 0 and state["position"] == 8 and state["micro_step"] == 8 and state["world_size"] == 1
    assert (ckpt / "deepspeed" / "model" / "mp_rank_00_model_states.pt").is_file() and (
        ckpt / "rng_state_0.pth"
    ).is_file()
    checkpoint.check_model_folder(str(ckpt), "causal_lm")  # the intermediate model is an ordinary HF folder
    # what a later kill would have left: a metrics line past the checkpoint, a cut one, a half-written checkpoint
    with open(partial / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "train/loss": 0.0}) + '\n{"step": 6, "train/lo')
    (partial / "checkpoint-6.tmp").mkdir()
    stdout = run(sft_args(models / "dropout", out, *SFT_SAVE))
    assert "resumed from step 4" in stdout
    full = sft_runs / "full"
    assert_same_weights(out, full)
    assert rows(out, "train/loss") == rows(full, "train/loss")  # steps 3, 6, 8: the one at 6 spans the resume
    assert rows(out, "eval/loss")[-1] == rows(full, "eval/loss")[-1]
    assert [r["step"] for r in rows(out, "eval/loss")] == list(range(9))  # step 0, then one per step, none repeated
    assert sorted(checkpoint.checkpoints(out)) == [4, 6]  # --save_total_limit 2


def test_sft_refuses_a_changed_flag_resumes_from_a_path_and_starts_over(models, sft_runs, tmp_path):
    out = copy_partial(sft_runs, tmp_path, "sft")
    ckpt = tmp_path / "sft.partial" / "checkpoint-4"
    stdout = run(sft_args(models / "dropout", out, *SFT_SAVE, "--lr", "1e-3", "--seed", "7"), rc=1)
    assert stdout.splitlines()[-1] == (
        f"error: cannot resume from {ckpt}: flags differ from the run that saved it: --lr 0.003 -> 0.001, --seed "
        "42 -> 7; re-run with the saved flags, or pass --resume_from_checkpoint none to start over"
    )
    assert checkpoint.is_resumable(ckpt) and "train " not in stdout  # nothing deleted, stopped before the data
    stdout = run(sft_args(models / "dropout", out, *SFT_SAVE, "--resume_from_checkpoint", str(tmp_path / "nope")), rc=1)
    assert "is not a complete checkpoint" in stdout.splitlines()[-1]
    # an older checkpoint by path (the newer one is deleted): the same model again
    stdout = run(
        sft_args(models / "dropout", out, *SFT_SAVE, "--resume_from_checkpoint", str(ckpt.with_name("checkpoint-2")))
    )
    assert "resumed from step 2" in stdout and f"deleting {ckpt}" in stdout
    assert_same_weights(out, sft_runs / "full")
    # none: starts over (and says it discards the checkpoints); the same flags give the same model
    shutil.rmtree(out)
    copy_partial(sft_runs, tmp_path, "none")
    stdout = run(sft_args(models / "dropout", tmp_path / "none", *SFT_SAVE, "--resume_from_checkpoint", "none"))
    assert "discarding 2 checkpoint(s)" in stdout and "resumed" not in stdout
    assert [r["step"] for r in rows(tmp_path / "none", "train/loss")] == [3, 6, 8]
    assert_same_weights(tmp_path / "none", sft_runs / "full")


# ----------------------------------------------------------------------------------------------------------------
# ppo_lag.py


def ppo_args(root, out, *extra, launcher=(PY,)):
    # the PTX set (6 samples, 3 batches of 2) wraps around every 1.5 rollouts; the window (6 costs) every 1.5
    return [
        *launcher,
        "ppo_lag.py",
        "--actor_model_name_or_path",
        root / "base",
        "--reward_model_name_or_path",
        root / "rm",
        "--cost_model_name_or_path",
        root / "cm",
        "--train_datasets",
        "toy-prompts:0.02",
        "--max_length",
        "40",
        "--per_device_prompt_batch_size",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--actor_lr",
        "1e-3",
        "--critic_lr",
        "1e-3",
        "--episode_cost_window_size",
        "6",
        "--ptx_datasets",
        "toy-sft:0.0015",
        "--ptx_coeff",
        "0.5",
        "--output_dir",
        out,
        *extra,
    ]


def check_ppo_resume(full_args, resumed_args, step, full, out):
    """Uninterrupted and killed runs side by side, then the resume; weights and metrics after the resume point."""
    uninterrupted, killed = start(full_args), start_killed(resumed_args, step)
    kill_at_pause(killed)
    finish(uninterrupted)
    ckpt = out.with_name(f"{out.name}.partial") / f"checkpoint-{step}"
    assert {p.name for p in (ckpt / "deepspeed").iterdir()} >= {"actor", "reward_critic", "cost_critic"}
    state = json.loads((ckpt / "loop_state.json").read_text())
    assert set(state["lam_state"]) >= {"log_lam", "lam"} and len(state["rank_state"][0]["episode_costs"]) == min(
        6, 4 * step
    )
    stdout = run(resumed_args)
    assert f"resumed from step {step}" in stdout
    assert_same_weights(out, full)
    after = [r for r in rows(full, "loss/actor") if r["step"] > step]
    assert after and [r for r in rows(out, "loss/actor") if r["step"] > step] == after
    assert all("train/lambda" in r and "train/episode_cost" in r and "loss/ptx" in r for r in after)
    assert rows(out, "eval/reward") and rows(out, "eval/reward")[-1] == rows(full, "eval/reward")[-1]
    return stdout


def test_ppo_lag_resume_after_kill_is_bitwise(models, tmp_path):
    full, out = tmp_path / "full", tmp_path / "ppo"
    common = ["--max_steps", "4", "--eval_datasets", "toy-eval:0.02"]
    # the resumed run evaluates every rollout: evaluation samples from its own stream and cannot move training
    check_ppo_resume(
        ppo_args(models, full, *common),
        ppo_args(models, out, *common, "--save_interval", "2", "--eval_interval", "1"),
        2,
        full,
        out,
    )


def test_ppo_lag_resume_zero3(models, tmp_path):
    full, out = tmp_path / "full", tmp_path / "z3"
    common = ["--max_steps", "2", "--zero_stage", "3", "--eval_datasets", "toy-eval:0.01"]
    check_ppo_resume(
        ppo_args(models, full, *common), ppo_args(models, out, *common, "--save_interval", "1"), 1, full, out
    )


def test_ppo_lag_resume_torchrun_two_ranks(models, tmp_path):
    # ZeRO-2: each rank holds its own optimizer partition (and its own window, RNG); ZeRO-3 under 2 ranks works too,
    # but gloo can abort at teardown after a ZeRO-3 save (see test_ppo_lag.py), which would make this test flaky
    full, out = tmp_path / "full", tmp_path / "ddp"
    common = ["--max_steps", "2", "--zero_stage", "2", "--eval_datasets", "toy-eval:0.01"]

    def torchrun():
        return (PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port())

    resumed = ppo_args(models, out, *common, "--save_interval", "1", launcher=torchrun())
    uninterrupted, killed = start(ppo_args(models, full, *common, launcher=torchrun())), start_killed(resumed, 1)
    kill_at_pause(killed)
    finish(uninterrupted)
    ckpt = tmp_path / "ddp.partial" / "checkpoint-1"
    assert (ckpt / "rng_state_1.pth").is_file()
    assert len(list((ckpt / "deepspeed" / "actor").glob("*optim_states.pt"))) == 2  # one partition per rank
    # another world size is refused before any model is loaded
    stdout = run(ppo_args(models, out, *common, "--save_interval", "1"), rc=1)
    assert stdout.splitlines()[-1].startswith(
        f"error: cannot resume from {ckpt}: it was saved by 2 processes and this run has 1"
    )
    stdout = run(resumed[:6] + [port()] + resumed[7:])
    assert stdout.count("resumed from step 1") == 1  # rank 0 says it
    assert_same_weights(out, full)
    after = [r for r in rows(full, "loss/actor") if r["step"] > 1]
    assert [r for r in rows(out, "loss/actor") if r["step"] > 1] == after and "train/episode_cost" in after[0]
