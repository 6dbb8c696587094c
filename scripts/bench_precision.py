"""fp32 against bf16 autocast (--mixed_precision no / bf16), stage by stage, on the smol preset's own models, data and
shapes: each stage's command as run_all.sh writes it, shortened to a few steps, run once per precision, the two runs
of a stage back to back (a shared machine drifts slowly). Not a test; never in CI.

    bash run_all.sh smol                                        # the models it reads (output/smol/{base,sft,rm,cm})
    python scripts/bench_precision.py --smol_dir output/smol    # about 12 minutes on 2 cores

Prints one table: SFT and score-model throughput (tokens/s over the steps after the first), a PPO-Lag rollout of 8
prompts split into generate / score / update (its second rollout: the first pays one-time costs), and an arena of 17
prompts (the whole command's seconds, model loading included), each fp32 | bf16 | fp32 time / bf16 time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def run(cmd: list[str], threads: int) -> float:
    """Run a stage; returns its wall seconds; stops on failure with the stage's last output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:1])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.time() - t0


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smol_dir", default="output/smol", help="a finished `run_all.sh smol` output folder")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads of every stage")
    p.add_argument("--data", default=str(DATA), help="the folder with alpaca/, hh-rlhf/, pku-saferlhf-derived/")
    args = p.parse_args()
    smol, data = Path(args.smol_dir), Path(args.data)
    alpaca, hh = data / "alpaca/alpaca_5000.json", data / "hh-rlhf/helpful-base-test.jsonl.gz"
    pku, redteam = data / "pku-saferlhf-derived/pku_seferlhf_realign_dpo_5k.json", data / "safe-rlhf-eval/problem.json"
    for path in (smol / "base", smol / "sft", smol / "rm", smol / "cm", alpaca, hh, pku, redteam):
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist; run `bash run_all.sh smol` (or pass --smol_dir, --data)")
    common = ["--chat_template", "model", "--max_length", "256", "--seed", "42"]
    train = [*common, "--epochs", "1", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    train += ["--logging_steps", "1", "--max_steps", "4"]
    train += ["--lr_scheduler_type", "constant", "--lr_warmup_ratio", "0"]
    stages = {
        "SFT (tokens/s)": [
            "sft.py",
            "--model_name_or_path",
            smol / "base",
            "--train_datasets",
            f"alpaca:0.004:{alpaca}",
        ]
        + train
        + ["--lr", "1e-5"],
        "reward model (tokens/s)": ["score_model.py", "--score_type", "reward", "--model_name_or_path", smol / "sft"]
        + ["--train_datasets", f"hh-rlhf-helpful-preference%1/2:0.03:{hh}", *train, "--lr", "1e-4"],
        "cost model (tokens/s)": ["score_model.py", "--score_type", "cost", "--model_name_or_path", smol / "sft"]
        + ["--train_datasets", f"safe-unsafe-pairs/train%1/2:0.01:{pku}", *train, "--lr", "1e-4"],
        "PPO-Lag rollout (s)": ["ppo_lag.py", "--actor_model_name_or_path", smol / "sft"]
        + ["--reward_model_name_or_path", smol / "rm", "--cost_model_name_or_path", smol / "cm"]
        + ["--train_datasets", f"safe-unsafe-pairs/train:1.0:{pku}", *common, "--max_steps", "2"]
        + ["--per_device_prompt_batch_size", "8", "--per_device_train_batch_size", "2", "--missing_eos_penalty", "2"],
        "arena of 17 prompts (s)": ["evaluate.py", "--red_corner_model_name_or_path", smol / "sft"]
        + ["--blue_corner_model_name_or_path", smol / "sft", "--reward_model_name_or_path", smol / "rm"]
        + ["--cost_model_name_or_path", smol / "cm", "--datasets", f"prompts:0.2:{redteam}", *common]
        + ["--per_device_eval_batch_size", "16"],
    }
    print(f"{'stage':<26}{'fp32':>22}{'bf16 autocast':>22}{'ratio':>8}   ({args.threads} threads)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in stages.items():
            got = {}
            for precision in ("no", "bf16"):
                out = Path(tmp) / f"{cmd[0]}-{precision}"
                argv = [str(c) for c in cmd] + ["--mixed_precision", precision, "--output_dir", str(out)]
                argv += ["--threads", str(args.threads)]
                seconds = run(argv, args.threads)
                if cmd[0] == "evaluate.py":
                    got[precision] = [seconds]
                elif cmd[0] == "ppo_lag.py":  # the second rollout: the first allocates Adam's states and caches
                    last = [r for r in rows(out) if "time/generate" in r][-1]
                    got[precision] = [last[f"time/{k}"] for k in ("generate", "score", "update")]
                else:  # steps 2..4
                    got[precision] = [
                        statistics.median(r["perf/tok_per_sec"] for r in rows(out)[1:] if "perf/tok_per_sec" in r)
                    ]
            fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
            ratio = sum(got["no"]) / sum(got["bf16"])
            if name.endswith("(tokens/s)"):
                ratio = 1 / ratio  # throughput: bf16 / fp32
            print(f"{name:<26}{fmt(got['no']):>22}{fmt(got['bf16']):>22}{ratio:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
