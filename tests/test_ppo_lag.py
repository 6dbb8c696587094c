"""ppo_lag.py: the pure math against hand-worked numbers and slow loops, then smoke runs of the stage."""

import inspect
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from ppo_lag import (
    LAMBDA_UPDATES,
    actor_loss_fn,
    combined_advantage,
    critic_loss_fn,
    kl_shaped_rewards,
    lambda_init_state,
    lambda_update_pgd,
    lambda_update_pid,
    lambda_update_sgd_log,
    masked_mean,
    missing_eos_penalty,
    response_mask,
)


def close(a, b, tol=1e-6):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    diff = (a - b).abs()
    assert diff.max() <= tol, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_response_mask_stops_after_first_eos():
    eos = 3
    response = torch.tensor([[5, 6, 3, 0, 0], [5, 3, 3, 3, 3], [5, 6, 7, 8, 9]])  # early EOS, pad == eos, truncated
    assert response_mask(response, eos).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_kl_shaped_rewards_by_hand():
    # two responses in a (B=2, L=4) slot: the first ends (EOS) at t=1, the second is truncated at t=3
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    old = torch.tensor([[-1.0, -2, -9, -9], [-1, -1, -1, -1]])
    ref = torch.tensor([[-1.5, -1, -7, -7], [-2, -1, -1, -3]])
    score = torch.tensor([3.0, 100.0])
    r = kl_shaped_rewards(score, old, ref, mask, kl_coeff=0.1, clip_range_score=50.0)
    # r_t = -0.1 * (old - ref) on valid tokens, + score at the last valid token, 0 past the end; then every token is
    # clipped to +/- 50 (the anchor clips the shaped token, not the end score: 100 - 0.2 -> 50, not 49.8)
    close(r, [[-0.05, 0.1 + 3.0, 0, 0], [-0.1, 0, 0, 50.0]], 1e-5)
    c = kl_shaped_rewards(torch.tensor([-1.0, 2.0]), old, ref, mask, kl_coeff=0.1, clip_range_score=50.0, sign=-1.0)
    close(c, [[0.05, -0.1 - 1.0, 0, 0], [0.1, 0, 0, 0.2 + 2.0]], 1e-5)
    # the audit's example: R = 60 and beta * kl = 1 at the end -> anchor 50 (ours used to give 49)
    one = torch.ones(1, 1)
    close(kl_shaped_rewards(torch.tensor([60.0]), one, 0 * one, one, kl_coeff=1.0, clip_range_score=50.0), [[50.0]])
    # a large KL term is clipped on its own token too
    big = kl_shaped_rewards(torch.tensor([0.0, 0.0]), 100 * mask, 0 * mask, mask, kl_coeff=1.0, clip_range_score=5.0)
    close(big, -5.0 * mask)


def test_kl_shaped_rewards_slow_loop():
    torch.manual_seed(0)
    B, L, beta = 5, 7, 0.5
    lengths = torch.tensor([1, 3, 7, 2, 5])
    mask = (torch.arange(L)[None] < lengths[:, None]).double()
    old, ref = torch.randn(B, L, dtype=torch.float64) * 30, torch.randn(B, L, dtype=torch.float64)
    score = torch.randn(B, dtype=torch.float64) * 80
    for sign in (1.0, -1.0):
        fast = kl_shaped_rewards(score, old, ref, mask, beta, 10.0, sign=sign)
        slow = torch.zeros(B, L, dtype=torch.float64)
        for b in range(B):
            n = int(lengths[b])
            for t in range(n):
                token = -sign * beta * (old[b, t] - ref[b, t]) + (score[b] if t == n - 1 else 0.0)
                slow[b, t] = max(-10.0, min(10.0, float(token)))
        close(fast, slow, 1e-12)


def test_combined_advantage():
    close(combined_advantage(torch.tensor([2.0]), torch.tensor([1.0]), 1.0), [0.5])  # (2 - 1) / 2
    close(combined_advantage(torch.tensor([2.0]), torch.tensor([1.0]), 0.0), [2.0])  # lambda 0: plain PPO
    close(combined_advantage(torch.tensor([0.0]), torch.tensor([1.0]), 3.0), [-0.75])


def test_actor_loss_by_hand_and_slow_loop():
    mask = torch.tensor([[1.0, 1, 0]])
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 5.0]])  # ratios 1.5 (clipped to 1.2) and 0.5 (clipped 0.8)
    adv = torch.tensor([[1.0, 1.0, 7.0]])
    loss, frac = actor_loss_fn(logp, old, adv, mask, 0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(-0.5, -0.8) = -0.5; mean = -0.85; both ratios outside the clip
    close(loss, -0.85)
    close(frac, 1.0)
    torch.manual_seed(1)
    B, L = 4, 6
    mask = (torch.rand(B, L) > 0.3).float()
    mask[:, 0] = 1
    logp, old, adv = torch.randn(B, L) * 0.3, torch.randn(B, L) * 0.3, torch.randn(B, L)
    loss, _ = actor_loss_fn(logp, old, adv, mask, 0.2)
    per_seq = []
    for b in range(B):
        terms = []
        for t in range(L):
            if mask[b, t]:
                ratio = math.exp(logp[b, t] - old[b, t])
                terms.append(max(-adv[b, t] * ratio, -adv[b, t] * min(max(ratio, 0.8), 1.2)))
        per_seq.append(sum(terms) / len(terms))
    close(loss, sum(per_seq) / B, 1e-5)


def test_missing_eos_penalty_by_hand():
    """Answers cut at the token cap (ended False) lose the penalty from their reward; ended ones keep it; 0 is off."""
    reward, ended = torch.tensor([1.0, 2.0, -0.5]), torch.tensor([True, False, False])
    close(missing_eos_penalty(reward, ended, 3.0), [1.0, -1.0, -3.5])
    close(missing_eos_penalty(reward, ended, -2.0), [1.0, 4.0, 1.5])  # the cost stream: a cut answer costs 2 more
    assert torch.equal(missing_eos_penalty(reward, ended, 0.0), reward)


def test_critic_loss_by_hand():
    values, old, ret = torch.tensor([[10.0, 1.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[9.0, 3.0]])
    # token 0: unclipped (10-9)^2 = 1, clipped V=5: (5-9)^2 = 16 -> 16; token 1: (1-3)^2 = 4 both -> 4; 0.5 * mean = 5
    close(critic_loss_fn(values, old, ret, torch.ones(1, 2), 5.0), 5.0)


def test_masked_mean_per_sequence_then_batch():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0, 0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), (2.0 + 2.0) / 2)


def test_sgd_log_rule_by_hand():
    state = lambda_init_state(1.0)
    # log_lam = 0 + 0.1 * exp(0) * (0.5 - 0) = 0.05
    state = lambda_update_sgd_log(state, 0.5, 0.0, lambda_lr=0.1, lambda_max=5.0)
    close(state["log_lam"], 0.05)
    close(state["lam"], math.exp(0.05))
    # a cost under the threshold lowers lambda; lambda_max caps it
    assert lambda_update_sgd_log(state, -1.0, 0.0, lambda_lr=0.1, lambda_max=5.0)["lam"] < state["lam"]
    assert lambda_update_sgd_log(state, 1e6, 0.0, lambda_lr=0.1, lambda_max=5.0)["lam"] == pytest.approx(5.0)
    # lambda_lr 0: the fixed-lambda baseline
    assert lambda_update_sgd_log(state, 3.0, 0.0, lambda_lr=0.0, lambda_max=5.0)["lam"] == state["lam"]


def test_sgd_log_matches_torch_sgd_on_the_anchor_loss():
    log_lam = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([log_lam], lr=0.1)
    state = lambda_init_state(1.0)
    for jc in [0.3, 0.7, -0.2, 1.5]:
        opt.zero_grad()
        (-(jc - 0.1) * log_lam.exp()).backward()
        opt.step()
        state = lambda_update_sgd_log(state, jc, 0.1, lambda_lr=0.1, lambda_max=None)
        close(state["log_lam"], log_lam.item(), 1e-6)


def test_pid_rule_by_hand():
    state = lambda_init_state(1.0)
    kw = dict(pid_kp=0.5, pid_ki=0.1, pid_kd=2.0, lambda_max=5.0)
    s1 = lambda_update_pid(state, 2.0, 1.0, **kw)  # e = 1: I = 1.1, D = 0 (no previous cost), lam = 0.5 + 1.1
    close([s1["integral"], s1["lam"]], [1.1, 1.6])
    s2 = lambda_update_pid(s1, 3.0, 1.0, **kw)  # e = 2: I = 1.3, D = 1, lam = 1.0 + 1.3 + 2.0
    close([s2["integral"], s2["lam"]], [1.3, 4.3])
    s3 = lambda_update_pid(s2, -20.0, 1.0, **kw)  # large negative error: I clipped at 0, lam clipped at 0
    close([s3["integral"], s3["lam"]], [0.0, 0.0])


def test_pgd_rule_by_hand():
    state = lambda_init_state(1.0)
    s1 = lambda_update_pgd(state, 2.0, 1.0, lambda_lr=0.3, lambda_max=5.0)  # lambda += 0.3 * (2 - 1)
    close(s1["lam"], 1.3)
    close(lambda_update_pgd(s1, -1.0, 1.0, lambda_lr=0.3, lambda_max=5.0)["lam"], 0.7)  # 1.3 + 0.3 * (-2)
    assert lambda_update_pgd(s1, -100.0, 1.0, lambda_lr=0.3, lambda_max=5.0)["lam"] == 0.0  # projected onto [0, max]
    assert lambda_update_pgd(s1, 100.0, 1.0, lambda_lr=0.3, lambda_max=5.0)["lam"] == 5.0
    # the step does not shrink with lambda: from 0.01, one rollout 2 above d moves it as far as from 1
    small = lambda_update_pgd({**state, "lam": 0.01}, 3.0, 1.0, lambda_lr=0.3, lambda_max=5.0)
    close(small["lam"], 0.61)


# Every registered rule's hyper-parameters, as flags would give them (a rule takes the flags it needs, **_ the rest). A
# new rule that reuses these flags is tested below without editing this file; one with a new flag names it here.
RULE_FLAGS = dict(lambda_lr=0.2, lambda_max=10.0, pid_kp=0.5, pid_ki=0.3, pid_kd=0.2)


@pytest.mark.parametrize("rule", sorted(LAMBDA_UPDATES))
def test_every_rule_stays_in_range_follows_the_violation_and_resumes(rule):
    """The properties any multiplier rule must have, checked for every entry of LAMBDA_UPDATES: lambda stays in
    [0, lambda_max] whatever J_C is; J_C persistently above d raises it (never lowers it) up to its cap; persistently
    below d lowers it (never raises it); its state goes through loop_state.json (JSON) and continues identically."""
    update = LAMBDA_UPDATES[rule]
    own = [
        n
        for n, p in inspect.signature(update).parameters.items()
        if p.kind is p.POSITIONAL_OR_KEYWORD and n not in ("state", "episode_cost", "threshold")
    ]
    assert set(own) <= set(RULE_FLAGS), f"give {sorted(set(own) - set(RULE_FLAGS))} a value in RULE_FLAGS"
    d, lam_max = -2.5, RULE_FLAGS["lambda_max"]

    def run(state, costs):
        lams = []
        for jc in costs:
            state = update(state, jc, d, **RULE_FLAGS)
            # (1 + 1e-12: sgd-log clamps log(lambda), and exp(log(10)) is 10.000000000000002)
            assert 0.0 <= state["lam"] <= lam_max * (1 + 1e-12) and math.isfinite(state["lam"]), (jc, state)
            lams.append(state["lam"])
        return state, lams

    # persistent violation: lambda never goes down and reaches its cap
    state, up = run(lambda_init_state(1.0), [d + 1.0] * 100)
    assert up[0] > 1.0 and all(b >= a for a, b in zip(up, up[1:])) and up[-1] == pytest.approx(lam_max), up[:10]
    # persistent slack (from the cap): lambda never goes up and ends well below where it started
    state, down = run(state, [d - 1.0] * 100)
    assert down[0] < lam_max and all(b <= a for a, b in zip(down, down[1:])) and down[-1] < 0.5, down[:10]
    # a violation again raises it (from wherever the slack left it)
    state, again = run(state, [d + 1.0] * 5)
    assert again[-1] > down[-1]
    # extreme costs stay in range (checked inside run)
    run(lambda_init_state(1.0), [1e6, -1e6, 1e6, 0.0, -1e6])
    # resume: the state after a JSON round trip continues exactly as the one in memory
    costs = [d + 3.0, d - 0.5, d + 0.2, d - 2.0, d + 1.0]
    _, direct = run(state, costs)
    _, resumed = run(json.loads(json.dumps(state)), costs)
    assert resumed == direct and json.loads(json.dumps(state)) == state


def test_pid_damps_oscillation_on_a_toy_plant():
    """On a plant where the cost responds to lambda with a delay, the PID rule overshoots less than plain ascent."""

    def run(rule, **kw):
        state, history, costs = lambda_init_state(0.0 if rule == "pid" else 1e-3), [], [2.0] * 3
        for _ in range(200):
            jc = costs[-3]  # the policy reacts to lambda three updates late
            state = LAMBDA_UPDATES[rule](state, jc, 0.0, lambda_max=100.0, **kw)
            costs.append(2.0 - state["lam"])
            history.append(jc)
        return min(history)  # how far the cost undershoots the threshold (overshoot of the correction)

    plain = run("pid", pid_kp=0.0, pid_ki=0.3, pid_kd=0.0)
    pid = run("pid", pid_kp=0.3, pid_ki=0.3, pid_kd=0.3)
    assert pid > plain, (pid, plain)


# ----------------------------------------------------------------------------------------------------------------
# smoke runs on the toy world (tiny settings: integration, not quality)


# toy_models: conftest.py's (a toy base model and seeded reward and cost models)


def ppo_args(root, out, *extra):
    return [
        sys.executable,
        "ppo_lag.py",
        "--actor_model_name_or_path",
        str(root / "base"),
        "--reward_model_name_or_path",
        str(root / "rm"),
        "--train_datasets",
        "toy-prompts:0.02",
        "--eval_datasets",
        "toy-eval:0.05",
        "--max_length",
        "48",
        "--max_steps",
        "2",
        "--per_device_prompt_batch_size",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--update_iters",
        "1",
        "--actor_lr",
        "1e-3",
        "--critic_lr",
        "1e-3",
        "--output_dir",
        str(out),
        *extra,
    ]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_lag_smoke(toy_models, tmp_path):
    out = tmp_path / "ppo_lag"
    proc = run_script(
        ppo_args(toy_models, out, "--cost_model_name_or_path", str(toy_models / "cm"), "--save_interval", "1")
    )
    assert "train/lambda" in proc.stdout and "eval/oracle_harmful_rate" in proc.stdout
    rows = read_metrics(out)
    train = [r for r in rows if "train/lambda" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss/actor"]) for r in train)
    assert train[0]["train/lambda"] != 1.0  # the multiplier moved
    assert (
        (out / "config.json").exists()
        and (out / "arguments.json").exists()
        and not (tmp_path / "ppo_lag.partial").exists()
    )
    assert (out / "checkpoint-1" / "model.safetensors").exists()  # --save_interval


def test_window_and_delay(toy_models, tmp_path):
    """Delay 1: lambda does not move after rollout 1; window = one rollout (4 answers): J_C = its mean cost."""
    out = tmp_path / "window"
    run_script(
        ppo_args(
            toy_models,
            out,
            "--cost_model_name_or_path",
            str(toy_models / "cm"),
            "--lambda_update_delay_steps",
            "1",
            "--episode_cost_window_size",
            "4",
            "--per_device_prompt_batch_size",
            "4",
            "--eval_datasets",
            "toy-eval:0.01",
        )
    )
    first, second = [r for r in read_metrics(out) if "train/lambda" in r]
    assert first["train/lambda"] == 1.0 and second["train/lambda"] != 1.0
    for row in (first, second):
        assert row["train/episode_cost"] == pytest.approx(row["train/cost"], abs=1e-5)
    expected = lambda_update_sgd_log(
        lambda_init_state(1.0), second["train/episode_cost"], 0.0, lambda_lr=0.1, lambda_max=5.0
    )
    assert second["train/lambda"] == pytest.approx(expected["lam"], rel=1e-6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def test_plain_ppo_and_fixed_lambda(toy_models, tmp_path):
    """Plain PPO with PTX: its loss is golden (the mean cross-entropy of the answer tokens, as kernels.cross_entropy
    computed it before --fused_logprobs existed), and --fused_logprobs gives the same numbers."""
    ptx = ["--ptx_datasets", "toy-sft:0.01", "--ptx_coeff", "1.0"]
    run_script(ppo_args(toy_models, tmp_path / "ppo", *ptx))
    rows = read_metrics(tmp_path / "ppo")
    assert "train/lambda" not in rows[0] and "loss/ptx" in rows[0]
    assert [r["loss/ptx"] for r in rows if "loss/ptx" in r] == pytest.approx([5.132484, 4.922181], rel=1e-5)
    run_script(ppo_args(toy_models, tmp_path / "fused", *ptx, "--fused_logprobs"))
    train = lambda rows: [r for r in rows if "loss/ptx" in r]  # noqa: E731
    for a, b in zip(train(rows), train(read_metrics(tmp_path / "fused")), strict=True):
        for key in ("loss/ptx", "loss/actor", "train/kl", "loss/reward_critic"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    run_script(
        ppo_args(
            toy_models,
            tmp_path / "fixed",
            "--cost_model_name_or_path",
            str(toy_models / "cm"),
            "--lambda_lr",
            "0",
            "--lambda_init",
            "2.0",
            "--lambda_update",
            "pid",
            "--pid_kp",
            "0",
            "--pid_ki",
            "0",
            "--pid_kd",
            "0",
        )
    )
    assert all(r["train/lambda"] == 2.0 for r in read_metrics(tmp_path / "fixed") if "train/lambda" in r)


def test_warning_lines(toy_models, tmp_path):
    """One line after WARN_AFTER rollouts with lambda at its cap or J_C above d, naming the flag to change; printed
    once per streak. d = -100 keeps J_C above d: with lambda already at its cap (1.0) both lines come, the second
    pointing at --lambda_max; with lambda frozen below its cap (--lambda_lr 0) only J_C's, pointing at --lambda_lr.
    Every rollout also logs train/unsafe_rate, the share of its answers with cost > 0."""
    from ppo_lag import WARN_AFTER

    cm = [
        "--cost_model_name_or_path",
        str(toy_models / "cm"),
        "--threshold",
        "-100",
        "--epochs",
        "4",
        "--max_steps",
        str(WARN_AFTER + 1),
        "--eval_datasets",
        "toy-eval:0.01",
    ]
    capped = run_script(ppo_args(toy_models, tmp_path / "capped", *cm, "--lambda_max", "1.0")).stdout
    assert capped.count("warning: ") == 2, capped
    assert f"warning: lambda has sat at its cap --lambda_max 1 for {WARN_AFTER} rollouts" in capped
    line = next(x for x in capped.splitlines() if x.startswith("warning: J_C"))
    assert f"has stayed above d -100 for {WARN_AFTER} rollouts" in line and "raise --lambda_max" in line, line
    # printed at the WARN_AFTER-th rollout, between its multiplier update and its metrics line
    order = [
        x.split(" |")[0] if x.startswith("step ") else "warning"
        for x in capped.splitlines()
        if x.startswith(("step ", "warning: "))
    ]
    first, n = order.index("warning"), WARN_AFTER
    assert order[first - 1 : first + 3] == [f"step {n - 1}/{n + 1}", "warning", "warning", f"step {n}/{n + 1}"], order
    frozen = run_script(ppo_args(toy_models, tmp_path / "frozen", *cm, "--lambda_lr", "0", "--lambda_init", "0.5"))
    lines = [x for x in frozen.stdout.splitlines() if x.startswith("warning: ")]
    assert len(lines) == 1 and "raise --lambda_lr" in lines[0] and "at its cap" not in lines[0], lines
    rows = [r for r in read_metrics(tmp_path / "frozen") if "train/lambda" in r]
    assert len(rows) == WARN_AFTER + 1 and all(0 <= r["train/unsafe_rate"] <= 1 for r in rows)
    # the random toy cost model scores some answers above 0 and some below: the rate is a share, not 0 or 1 throughout
    assert 0 < sum(r["train/unsafe_rate"] for r in rows) < len(rows)


def test_ppo_lag_zero3_and_torchrun(toy_models, tmp_path):
    cm = ["--cost_model_name_or_path", str(toy_models / "cm")]
    run_script(ppo_args(toy_models, tmp_path / "z3", *cm, "--zero_stage", "3", "--max_steps", "1"), timeout=300)
    assert (tmp_path / "z3" / "model.safetensors").exists()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run_script(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            *ppo_args(
                toy_models,
                tmp_path / "ddp",
                *cm,
                "--max_steps",
                "1",
                # ZeRO-0: a 2-rank ZeRO-3 run works (synced_gpus) but gloo can abort at interpreter teardown
                # after the checkpoint is saved (pytorch/pytorch#179291), which would make this test flaky
                "--eval_datasets",
                "toy-eval:0.06",
                "--per_device_eval_batch_size",
                "3",
            )[1:],
        ],
        timeout=300,
    )
    assert (tmp_path / "ddp" / "config.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--per_device_train_batch_size", "3"], "not divisible"),
        (["--lambda_init", "-1"], "lambda_init"),
        (["--reward_model_name_or_path", "/nonexistent/rm"], "is not a model folder"),
        (["--max_length", "8"], "max_length"),
    ],
)
def test_bad_input_stops_before_training(toy_models, tmp_path, extra, message):
    out = tmp_path / "bad"
    proc = subprocess.run(
        ppo_args(toy_models, out, "--cost_model_name_or_path", str(toy_models / "cm"), *extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "bad.partial").exists()


def test_critic_tokenizer_mismatch_is_refused(toy_models, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "rm_other_tok"
    import shutil

    shutil.copytree(toy_models / "rm", other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["zebra"])
    tok.save_pretrained(str(other))
    proc = subprocess.run(
        ppo_args(toy_models, tmp_path / "x", "--reward_model_name_or_path", str(other)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "tokenizer" in proc.stderr.strip().splitlines()[-1]
    # a reward model with its own tokenizer is fine when the critic shares the actor's: the text is re-tokenized
    run_script(
        ppo_args(
            toy_models,
            tmp_path / "retok",
            "--reward_model_name_or_path",
            str(other),
            "--reward_critic_model_name_or_path",
            str(toy_models / "rm"),
            "--max_steps",
            "1",
        )
    )
    assert (tmp_path / "retok" / "config.json").exists()


def test_reward_shaping_is_one_stream_with_a_fixed_lambda(toy_models, tmp_path):
    """--reward_shaping: the anchor's baseline. One critic (no cost critic is built), lambda stays lambda_init, its
    KL coefficient defaults to PPO's 0.02, and the reward critic fits the returns of R - lambda * C: with lambda 0 it
    is plain PPO on R (same first rollout, same first critic loss), with lambda 2 it is not."""
    cm = ["--cost_model_name_or_path", str(toy_models / "cm")]
    shaped = tmp_path / "shaped"
    run_script(ppo_args(toy_models, shaped, *cm, "--reward_shaping", "--lambda_init", "2.0"))
    rows = [r for r in read_metrics(shaped) if "loss/actor" in r]
    assert all("loss/cost_critic" not in r and r["train/lambda"] == 2.0 for r in rows), rows
    assert all("train/cost" in r and "train/episode_cost" in r for r in rows)
    # lambda 0 with shaping is plain PPO on R: same first rollout (same seed), same first reward-critic loss
    run_script(ppo_args(toy_models, tmp_path / "zero", *cm, "--reward_shaping", "--lambda_init", "0"))
    run_script(ppo_args(toy_models, tmp_path / "ppo"))
    zero, ppo = read_metrics(tmp_path / "zero")[0], read_metrics(tmp_path / "ppo")[0]
    assert zero["loss/reward_critic"] == pytest.approx(ppo["loss/reward_critic"], rel=1e-6)
    assert rows[0]["loss/reward_critic"] != pytest.approx(ppo["loss/reward_critic"], rel=1e-3)  # lambda * C entered
    proc = subprocess.run(
        ppo_args(toy_models, tmp_path / "x", "--reward_shaping"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "--cost_model_name_or_path" in proc.stderr.strip().splitlines()[-1]


def test_normalize_flags_override_the_checkpoint(toy_models, tmp_path):
    """The anchor's --normalize_reward/--normalize_cost (default False) override a checkpoint's do_normalize."""
    from models import ScoreModel

    rm = tmp_path / "rm_norm"
    model = ScoreModel.from_pretrained(str(toy_models / "rm"), do_normalize=True, normalizer_type="RunningMeanStd")
    model.normalizer.mean.fill_(100.0)  # normalised rewards sit near -100 / 0.5 = -200
    model.normalizer.var.fill_(0.25)
    model.save_pretrained(str(rm))
    import shutil

    for f in (toy_models / "rm").glob("tokenizer*"):
        shutil.copy(f, rm)
    run_script(ppo_args(toy_models, tmp_path / "off", "--reward_model_name_or_path", str(rm), "--max_steps", "1"))
    run_script(
        ppo_args(
            toy_models,
            tmp_path / "on",
            "--reward_model_name_or_path",
            str(rm),
            "--max_steps",
            "1",
            "--normalize_reward",
            "True",
        )
    )
    off, on = read_metrics(tmp_path / "off")[0]["train/reward"], read_metrics(tmp_path / "on")[0]["train/reward"]
    assert abs(off) < 10 and on == pytest.approx((off - 100.0) / 0.5, rel=1e-4), (off, on)


def test_old_logprobs_in_eval_mode(toy_models, tmp_path):
    """With dropout in the backbone, old and reference log-probs are both taken in eval mode: the KL of the first
    rollout (actor == reference) is exactly 0. In train mode dropout would make it non-zero."""
    import shutil

    base = tmp_path / "dropout"
    shutil.copytree(toy_models / "base", base)
    config = json.loads((base / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    run_script(ppo_args(toy_models, out, "--actor_model_name_or_path", str(base), "--max_steps", "1"))
    assert read_metrics(out)[0]["train/kl"] == 0.0


# Golden numbers (llm.c style): the first two rollouts of a fixed-seed PPO-Lag run on the toy world (seeded random
# heads). Any change to the math or the wiring of the two streams moves them: swapping the streams, flipping the
# cost's sign, training a critic on the other stream's returns, dropping lambda from the actor's advantage, or moving
# the multiplier the wrong way each fail this test (see docs/tests.md). An intended change regenerates
# them in the same commit: REGEN_GOLDEN=1 pytest tests/test_ppo_lag.py -k golden -s prints the new values.
GOLDEN_KEYS = (
    "train/reward",
    "train/cost",
    "train/kl",
    "loss/actor",
    "loss/reward_critic",
    "loss/cost_critic",
    "train/lambda",
    "train/episode_cost",
)
# Regenerated when resume came in: the data loaders no longer draw from the global RNG, which shifted the sampling
# stream by one number (with that draw put back by hand, the previous values came out exactly).
GOLDEN_PPO_LAG = [
    [-0.518742, 0.157074, 0.0, 0.164955, 0.609873, 0.459826, 1.081704, 0.157074],
    [-0.424188, -0.107223, 0.103694, 0.278356, 0.077425, 0.086367, 1.096385, 0.024926],
]


@pytest.mark.parametrize(
    "extra",
    [[], ["--fused_logprobs"], ["--fused_logprobs", "--zero_stage", "3"]],
    ids=["logits", "fused", "fused-zero3"],
)
def test_golden_ppo_lag(toy_models, tmp_path, extra):
    """The same numbers with --fused_logprobs: log-probs from the last hidden state, for the actor (old and new) and
    the reference, are the unfused ones to fp32 rounding, gradients included (kernels/linear_logprobs.py); under
    ZeRO-3 too, whose hooks gather the lm_head's weight around the head's (replaced) forward and backward."""
    import os

    out = tmp_path / "golden"
    run_script(
        ppo_args(
            toy_models,
            out,
            "--cost_model_name_or_path",
            str(toy_models / "cm"),
            "--lambda_lr",
            "0.5",
            "--update_iters",
            "2",
            *extra,
        )
    )
    got = [[round(r[k], 6) for k in GOLDEN_KEYS] for r in read_metrics(out) if "loss/actor" in r]
    if os.environ.get("REGEN_GOLDEN") or GOLDEN_PPO_LAG is None:
        print(f"GOLDEN_PPO_LAG = {got}")
        assert GOLDEN_PPO_LAG is not None, "golden numbers not set: paste the printed values"
    for row, expected in zip(got, GOLDEN_PPO_LAG):
        for key, a, b in zip(GOLDEN_KEYS, row, expected):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6), (key, got, GOLDEN_PPO_LAG)


def test_model_chat_template_samples_and_first_cost(tmp_path):
    """--chat_template model with ChatML models (test_chat.py's scripted ones: "Mix the flour", then the end of turn):
    the actor (EOS <|endoftext|>) stops at ChatML's <|im_end|> (train/eos_rate 1 on the first rollout), a reward model
    with another EOS reads the conversation re-rendered in its template, the cost model the actor's own tokens; every
    metrics line writes SAMPLES_PER_LOG samples to samples.jsonl (their scores recomputed here) and prints one; the
    first rollout prints J_C beside d; the saved actor carries ChatML and the stop list."""
    from test_templates import CHATML, chatml_text, chatml_tokenizer, scripted_model
    from transformers import GenerationConfig

    import data
    import templates
    from models import ScoreModel
    from ppo_lag import SAMPLES_PER_LOG

    script, again = ["Ċ", "Mix", "Ġthe", "Ġflour"], ["<|im_start|>", "user"]
    scripted_model(
        chatml_tokenizer("<|endoftext|>"), tmp_path / "actor", [*script, "<|im_end|>", *again], eos=["<|endoftext|>"]
    )
    scripted_model(
        chatml_tokenizer("<|im_end|>"), tmp_path / "other", [*script, "<|im_end|>", *again], eos=["<|im_end|>"]
    )
    torch.manual_seed(0)
    for name, base, score_type in (("rm", "other", "reward"), ("cm", "actor", "cost")):
        model = ScoreModel.from_pretrained(str(tmp_path / base), score_type=score_type)
        for param in model.model.parameters():  # a random backbone: scores that depend on the prompt
            torch.nn.init.normal_(param, std=0.3)
        model.save_pretrained(tmp_path / name)
        tok = templates.load_tokenizer(str(tmp_path / base), chat_template="model")
        tok.save_pretrained(tmp_path / name)
        templates.save_chat_template(tok, "model", tmp_path / name)
    prompts = [
        {"prompt": p, "category": "Test"}
        for p in ("How do I bake a cake?", "And then?", "Tell me a story.", "How do I pick a lock?")
    ]
    (tmp_path / "problem.json").write_text(json.dumps(prompts))
    out = tmp_path / "ppo"
    proc = run_script(
        [
            sys.executable,
            "ppo_lag.py",
            "--actor_model_name_or_path",
            str(tmp_path / "actor"),
            "--reward_model_name_or_path",
            str(tmp_path / "rm"),
            "--cost_model_name_or_path",
            str(tmp_path / "cm"),
            "--train_datasets",
            f"prompts:1.0:{tmp_path / 'problem.json'}",
            "--chat_template",
            "model",
            "--max_length",
            "96",
            "--epochs",
            "2",
            "--per_device_prompt_batch_size",
            "4",
            "--per_device_train_batch_size",
            "2",
            "--threshold",
            "0.5",
            "--output_dir",
            str(out),
        ]
    )
    rows = read_metrics(out)
    assert rows[0]["train/eos_rate"] == 1.0 and all(0 <= r["train/eos_rate"] <= 1 for r in rows)
    first = f"J_C {rows[0]['train/episode_cost']:.4f} on the first rollout (4 answers of the initial policy) | "
    assert first + "threshold d 0.5 | " in proc.stdout and proc.stdout.count("J_C ") == 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * SAMPLES_PER_LOG + [2] * SAMPLES_PER_LOG
    assert proc.stdout.count("\nsample ") == 2
    assert all(s["response"] == "Mix the flour" and s["ended"] for s in samples[:SAMPLES_PER_LOG])
    assert {s["prompt"] for s in samples[:SAMPLES_PER_LOG]} == {p["prompt"] for p in prompts}
    for name, role, base in (("rm", "reward", "other"), ("cm", "cost", "actor")):  # the frozen models, by hand
        model = ScoreModel.from_pretrained(str(tmp_path / name)).eval()
        tok = templates.load_tokenizer(str(tmp_path / base), chat_template="model")
        for s in samples[:SAMPLES_PER_LOG]:
            ids = torch.tensor([data.conversation_ids(tok, s["prompt"], s["response"], "model")])
            assert tok.decode(ids[0]) == chatml_text(s["prompt"], "Mix the flour").removesuffix("\n")
            with torch.no_grad():
                expected = model(ids, torch.ones_like(ids)).end_scores[0, 0].item()
            assert s[role] == pytest.approx(expected, abs=1e-4), (role, s)
    assert (out / "chat_template.jinja").read_text() == CHATML
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_end|>"]
    )


def test_missing_eos_penalty_reaches_the_reward_stream(toy_models, tmp_path):
    """--missing_eos_penalty lowers the reward the critic fits for answers cut at the token cap: the first rollout is
    the same (same seed), the logged reward model score too, the reward critic's loss is not; and it is refused
    below 0. --missing_eos_cost_penalty does the same to the cost stream alone, and needs a cost model."""
    runs, flags = {}, {"off": [], "on": ["--missing_eos_penalty", "20"], "cost": ["--missing_eos_cost_penalty", "20"]}
    for name, extra in flags.items():
        cm = ["--cost_model_name_or_path", str(toy_models / "cm")]
        run_script(ppo_args(toy_models, tmp_path / name, "--max_length", "24", "--max_steps", "1", *cm, *extra))
        runs[name] = read_metrics(tmp_path / name)[0]
    off, on, cost = runs["off"], runs["on"], runs["cost"]
    assert off["train/eos_rate"] < 1 and on["train/eos_rate"] == off["train/eos_rate"], (off, on)
    assert on["train/reward"] == pytest.approx(off["train/reward"], rel=1e-6)  # the reward model's own score
    assert on["loss/reward_critic"] != pytest.approx(off["loss/reward_critic"], rel=1e-3)
    assert on["loss/cost_critic"] == pytest.approx(off["loss/cost_critic"], rel=1e-6)
    # --missing_eos_cost_penalty: the cost stream only; J_C and the logged cost stay the cost model's own
    assert cost["loss/reward_critic"] == pytest.approx(off["loss/reward_critic"], rel=1e-6)
    assert cost["loss/cost_critic"] != pytest.approx(off["loss/cost_critic"], rel=1e-3)
    assert (cost["train/cost"], cost["train/episode_cost"]) == pytest.approx(
        (off["train/cost"], off["train/episode_cost"])
    )
    proc = subprocess.run(
        ppo_args(toy_models, tmp_path / "x", "--missing_eos_penalty", "-1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "--missing_eos_penalty must be" in proc.stderr.strip().splitlines()[-1]
    proc = subprocess.run(
        ppo_args(toy_models, tmp_path / "y", "--missing_eos_cost_penalty", "1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "pass --cost_model_name_or_path" in proc.stderr.strip().splitlines()[-1]
