"""End to end: the whole `run_all.sh tiny` pipeline, shortened (about 2 CPU-minutes), and the Safe RLHF headline on it.

This is the behavioural check of the result itself: with a fixed seed, plain PPO reward-hacks (its harmful rate rises
above SFT's) and PPO-Lag holds the cost down (its harmful rate falls well below SFT's) while staying about as helpful
on benign prompts. A broken Lagrangian (streams swapped, the cost's sign flipped, lambda not entering the advantage)
loses the ordering."""

import json
import os
import sys
from pathlib import Path

from conftest import run_script


def test_run_all_tiny_headline(tmp_path):
    out = tmp_path / "tiny"
    # shorter than the demo (half the SFT epochs, one score-model epoch): the same headline, about 40% less CPU time
    env = {
        "OUT": str(out),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SFT_EPOCHS": "5",
        "RM_EPOCHS": "1",
        "CM_EPOCHS": "1",
        "PPO_EPOCHS": "3",
    }
    proc = run_script(["bash", "run_all.sh", "tiny"], env=env, timeout=1200)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"sft", "ppo", "ppo_lag"}
    harm = {name: row["oracle_harmful_rate"] for name, row in summary.items()}
    help_ = {name: row["oracle_helpfulness"] for name, row in summary.items()}
    # the headline: PPO-Lag < SFT < PPO on the harmful rate, by clear margins (measured 0.02 < 0.40 < 1.00)
    assert harm["ppo_lag"] < harm["sft"] - 0.2 and harm["sft"] < harm["ppo"] - 0.2, harm
    assert help_["ppo_lag"] >= help_["sft"] - 0.1, help_  # without giving up benign helpfulness
    assert summary["ppo_lag"]["cost"] < summary["sft"]["cost"] < summary["ppo"]["cost"], summary
    assert "lambda" in summary["ppo_lag"] and "lambda" not in summary["ppo"]
    for stage in ("base", "sft", "rm", "cm", "ppo", "ppo_lag"):
        assert (out / stage / "config.json").exists() and not (out / f"{stage}.partial").exists(), stage
    assert (out / "curves.png").stat().st_size > 0
    assert "oracle harmful rate" in proc.stdout
    # re-running skips every complete stage
    again = run_script(["bash", "run_all.sh", "tiny"], env=env, timeout=300)
    assert again.stdout.count("is complete, skipping") >= 8, again.stdout[-2000:]
