"""scripts/sweep.py: a run's row against hand-worked numbers, the table and figure, a 2-run sweep on the toy world."""

import csv
import json
import sys

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402


def rows_of(costs, lams, rewards=None):
    rewards = rewards or [0.0] * len(costs)
    rows = [
        {"step": i + 1, "train/episode_cost": c, "train/lambda": lam, "train/reward": r, "train/unsafe_rate": 0.5}
        for i, (c, lam, r) in enumerate(zip(costs, lams, rewards))
    ]
    return rows + [
        {"step": len(costs), "eval/reward": 1.5, "eval/oracle_harmful_rate": 0.25, "eval/oracle_helpfulness": 3.0}
    ]


def test_summarize_by_hand():
    d = -2.0
    # 10 rollouts of approach (not counted), then 12 above d + 0.5, then 8 at d
    costs = [0.0] * 10 + [-1.0] * 12 + [-2.0] * 8
    lams = [1.0] * 10 + [10.0] * 12 + [3.0] * 8
    row = sweep.summarize(rows_of(costs, lams, rewards=list(range(30))), d, last=10, tol=0.5, lambda_max=10.0)
    assert row["rollouts"] == 30 and row["jc_last"] == pytest.approx((2 * -1.0 + 8 * -2.0) / 10)
    assert row["gap"] == pytest.approx(abs(-1.8 + 2.0))
    assert row["rollouts_above"] == 12 and row["longest_above"] == 12  # the first 10 rollouts are not counted
    assert row["lambda_end"] == 3.0 and row["lambda_peak"] == 10.0 and row["rollouts_at_cap"] == 12
    assert row["reward_last"] == pytest.approx(sum(range(20, 30)) / 10) and row["unsafe_rate_last"] == 0.5
    assert row["oracle_harmful_rate"] == 0.25 and row["oracle_helpfulness"] == 3.0 and row["eval_reward"] == 1.5
    assert not row["holds"]  # close at the end (0.2), but 12 rollouts in a row above d + 0.5
    # the same run with the streak broken in the middle holds d; one ending 0.6 away does not
    costs[16] = -2.0
    assert sweep.summarize(rows_of(costs, lams), d, last=10, tol=0.5, lambda_max=10.0)["holds"]
    assert not sweep.summarize(rows_of([-2.6] * 30, lams), d, last=10, tol=0.5, lambda_max=10.0)["holds"]


def test_table_and_figure(tmp_path):
    results = []
    for rule, jcs in (("pgd", [-2.4, -2.6]), ("sgd-log", [-1.0, -2.0]), (sweep.UNCONSTRAINED, [-0.3, -0.5])):
        for seed, jc in zip((1, 2), jcs):
            d = 0.0 if rule == sweep.UNCONSTRAINED else -2.5
            row = sweep.summarize(rows_of([jc] * 20, [1.0] * 20), d, last=10, tol=0.5, lambda_max=10.0)
            results.append({"rule": rule, "threshold": d, "seed": seed, **row})
    text = sweep.table(results, 0.5)
    lines = text.splitlines()
    assert "| pgd | -2.5 | -2.50 ± 0.14 | 0.10 ± 0.00 | 0.00 ± 0.00 |" in text and lines[2].endswith("| 2/2 |")
    # seed 1 spends its 10 counted rollouts above d + 0.5 (a streak of 10), seed 2 none and ends
    # exactly 0.5 from d, which holds
    assert "| sgd-log | -2.5 | -1.50 ± 0.71 | 1.00 ± 0.71 | 5.00 ± 7.07 |" in text and lines[3].endswith("| 1/2 |")
    assert lines[4].startswith("| lambda=0 | - | -0.40 ± 0.14 | - | - |")  # the reference run comes last
    sweep.plot(results, tmp_path / "sweep.png", all_safe=-5.3)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_two_run_sweep_on_the_toy_world(toy_models, tmp_path):
    """Two runs (two rules, one threshold, one seed) end to end: results.csv/json, the figure, the table."""
    models = tmp_path / "models"
    models.mkdir()
    for role, src in (("sft", "base"), ("rm", "rm"), ("cm", "cm")):
        (models / role).symlink_to(toy_models / src)
    small = [
        "--train_datasets",
        "toy-prompts:0.02",
        "--eval_datasets",
        "toy-eval:0.05",
        "--max_length",
        "32",
        "--per_device_prompt_batch_size",
        "4",
        "--per_device_train_batch_size",
        "2",
    ]
    proc = run_script(
        [
            sys.executable,
            "scripts/sweep.py",
            "--models",
            str(models),
            "--thresholds",
            "-2.5",
            "--rules",
            "sgd-log",
            "pgd",
            "--seeds",
            "3",
            "--rollouts",
            "3",
            "--last",
            "2",
            "--no_reference",
            "--",
            *small,
        ]
    )
    out = models / "sweep"
    results = json.loads((out / "results.json").read_text())
    assert [(r["rule"], r["threshold"], r["seed"], r["rollouts"]) for r in results] == [
        ("pgd", -2.5, 3, 3),
        ("sgd-log", -2.5, 3, 3),
    ]
    for r in results:  # each row is its run's metrics.jsonl, summarised
        rows = [json.loads(line) for line in (out / f"{r['rule']}_d-2.5_s3" / "metrics.jsonl").read_text().splitlines()]
        timing = {k: r.pop(k) for k in ("seconds", "cpu_seconds")}  # measured around the run
        assert r == {
            "rule": r["rule"],
            "threshold": -2.5,
            "seed": 3,
            **sweep.summarize(rows, -2.5, last=2, tol=0.5, lambda_max=10.0),
        }
        assert 0 < timing["cpu_seconds"] and 0 < timing["seconds"]
        assert 0 <= r["oracle_harmful_rate"] <= 1 and 0 <= r["unsafe_rate_last"] <= 1
    with open(out / "results.csv") as f:
        assert [row["rule"] for row in csv.DictReader(f)] == ["pgd", "sgd-log"]
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "| pgd | -2.5 |" in proc.stdout and "2 runs | this call" in proc.stdout
    # run again: both runs are complete, so nothing is re-run and the table is the same
    stamp = (out / "pgd_d-2.5_s3" / "metrics.jsonl").stat().st_mtime_ns
    again = run_script(proc.args)
    assert [
        {k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")}
        for r in json.loads((out / "results.json").read_text())
    ] == results
    assert "| sgd-log | -2.5 |" in again.stdout
    assert (out / "pgd_d-2.5_s3" / "metrics.jsonl").stat().st_mtime_ns == stamp
