"""Does PPO-Lag hold the constraint? PPO-Lag on the toy world at thresholds d x multiplier rules x seeds.

From one trained set of SFT, reward and cost models (`bash run_all.sh tiny` makes output/tiny/{sft,rm,cm}), every run is
the tiny preset's PPO-Lag stage with another --threshold, --lambda_update and --seed, run for --rollouts rollouts, as
many at a time as there are cores. Per run the table holds the mean J_C of the last K rollouts and its distance to d,
the rollouts spent above d + tol after the first 10 (and the longest such streak), lambda at the end and its largest
value, the end-of-run eval on toy-eval (oracle harmful rate and helpfulness, learned reward) and the last K rollouts'
reward and unsafe rate. A run "holds" d when |J_C - d| <= tol and no streak above d + tol is longer than 10 rollouts.
One reference run per seed has lambda fixed at 0 (the unconstrained policy under the same flags): where J_C goes when
nothing holds it, the top of the range where a threshold binds.

    python scripts/sweep.py                                  # the default grid: 5 d x every rule x 3 seeds
    python scripts/sweep.py --thresholds -2.5 --rules pgd --seeds 42 --rollouts 63
    python scripts/sweep.py --plot_only                      # the table and figure again from the runs on disk

Writes <out>/results.csv and results.json (one row per run), <out>/sweep.png, and one folder per run (a run whose
folder is complete is not run again). Extra ppo_lag.py flags for every run go after `--`.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rollout  # noqa: E402  (the progress bar every stage uses)
from ppo_lag import LAMBDA_UPDATES  # noqa: E402

# Each rule's own flags: the anchor's rule and projected ascent with the tiny preset's step (the two rules take the same
# step at lambda = 1); PID with ppo_lag.py's default gains (kp 2, ki 0.05, kd 4: chosen for this cost scale).
RULE_FLAGS = {"sgd-log": ["--lambda_lr", "0.2"], "pgd": ["--lambda_lr", "0.2"], "pid": []}
UNCONSTRAINED = "lambda=0"  # the reference runs: the same flags, lambda fixed at 0
LAMBDA_MAX = 10.0  # the tiny preset's --lambda_max
GOAL_STREAK = 10  # longest run of rollouts above d + tol (after the first 10) that still counts as holding d


def tiny_flags(models, rollouts):
    """run_all.sh tiny's PPO-Lag stage (without threshold, rule, seed and output): one place to change if it moves."""
    epochs = -(-rollouts // 21)  # 683 prompts / 32 = 21 rollouts per pass
    return [
        "--actor_model_name_or_path",
        f"{models}/sft",
        "--reward_model_name_or_path",
        f"{models}/rm",
        "--cost_model_name_or_path",
        f"{models}/cm",
        "--train_datasets",
        "toy-prompts",
        "--eval_datasets",
        "toy-eval",
        "--max_length",
        "64",
        "--epochs",
        str(epochs),
        "--max_steps",
        str(rollouts),
        "--update_iters",
        "1",
        "--per_device_prompt_batch_size",
        "32",
        "--per_device_train_batch_size",
        "32",
        "--actor_lr",
        "5e-4",
        "--critic_lr",
        "1e-3",
        "--actor_lr_warmup_ratio",
        "0.0",
        "--kl_coeff",
        "0.02",
        "--lambda_init",
        "1.0",
        "--lambda_max",
        str(LAMBDA_MAX),
        "--lambda_update_delay_steps",
        "0",
        "--episode_cost_window_size",
        "128",
        "--zero_stage",
        "0",
        "--resume_from_checkpoint",
        "none",
    ]


def summarize(rows, threshold, last, tol, lambda_max):
    """One run's metrics.jsonl rows -> its table row (the J_C and lambda columns; eval columns when present)."""
    train = [r for r in rows if "train/episode_cost" in r]
    evals = [r for r in rows if "eval/reward" in r]
    jc = [r["train/episode_cost"] for r in train]
    lam = [r["train/lambda"] for r in train]
    above = [c > threshold + tol for c in jc[10:]]  # the first 10 rollouts are the approach
    streak = longest = 0
    for a in above:
        streak = streak + 1 if a else 0
        longest = max(longest, streak)
    mean_jc = statistics.fmean(jc[-last:])
    row = {
        "rollouts": len(train),
        "jc_last": mean_jc,
        "gap": abs(mean_jc - threshold),
        "rollouts_above": sum(above),
        "longest_above": longest,
        "lambda_end": lam[-1],
        "lambda_peak": max(lam),
        "rollouts_at_cap": sum(x >= lambda_max * (1 - 1e-9) for x in lam),
        "reward_last": statistics.fmean(r["train/reward"] for r in train[-last:]),
        "unsafe_rate_last": statistics.fmean(r.get("train/unsafe_rate", float("nan")) for r in train[-last:]),
    }
    row["holds"] = row["gap"] <= tol and longest <= GOAL_STREAK
    if evals:
        e = evals[-1]
        row.update(
            oracle_harmful_rate=e.get("eval/oracle_harmful_rate"),
            oracle_helpfulness=e.get("eval/oracle_helpfulness"),
            eval_reward=e["eval/reward"],
        )
    return row


def run_folder(out, job):
    rule, threshold, seed = job
    return os.path.join(out, f"{rule}_d{threshold:g}_s{seed}")


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_one(job, base_flags, extra, out):
    """One PPO-Lag run as a subprocess (one thread: on a 2-core machine more fight each other), its log beside its
    folder; a run whose folder is complete is not run again. Returns its metrics.jsonl rows."""
    rule, threshold, seed = job
    folder = run_folder(out, job)
    if not os.path.exists(os.path.join(folder, "arguments.json")):
        flags = ["--lambda_lr", "0", "--lambda_init", "0"] if rule == UNCONSTRAINED else RULE_FLAGS.get(rule, [])
        rule_name = "sgd-log" if rule == UNCONSTRAINED else rule
        cmd = [
            sys.executable,
            os.path.join(ROOT, "ppo_lag.py"),
            *base_flags,
            *flags,
            *extra,
            "--threshold",
            str(threshold),
            "--lambda_update",
            rule_name,
            "--seed",
            str(seed),
            "--output_dir",
            folder,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "NANO_PROGRESS": "0"}
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        with open(folder + ".log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)  # this run's own CPU time, whatever else the machine runs
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"{folder} failed (exit {os.waitstatus_to_exitcode(status)}); its log: {folder}.log")
        with open(os.path.join(folder, "sweep_time.json"), "w") as f:
            json.dump({"seconds": time.time() - t0, "cpu_seconds": usage.ru_utime + usage.ru_stime}, f)
    timing_path = os.path.join(folder, "sweep_time.json")
    timing = read_metrics(timing_path)[0] if os.path.exists(timing_path) else {}
    return read_metrics(os.path.join(folder, "metrics.jsonl")), timing


def aggregate(results, key):
    """{(rule, d): (mean, sd)} of one column over seeds (sd 0 for a single seed)."""
    groups = {}
    for r in results:
        if r.get(key) is not None:
            groups.setdefault((r["rule"], r["threshold"]), []).append(r[key])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in groups.items()}


def table(results, tol):
    """Markdown: per rule and d, mean +/- sd over seeds of J_C (last K), |J_C - d|, the longest streak above d + tol,
    lambda at the end, oracle harmful rate and helpfulness, and how many seeds held d (the reference run last)."""
    cols = ("jc_last", "gap", "longest_above", "lambda_end", "oracle_harmful_rate", "oracle_helpfulness")
    stats = {col: aggregate(results, col) for col in cols}
    holds = {}
    for r in results:
        holds.setdefault((r["rule"], r["threshold"]), []).append(r["holds"])
    lines = [
        "| rule | d | J_C, last K | abs(J_C - d) | longest streak above d + tol | lambda at end | "
        "oracle harmful rate | oracle helpfulness | seeds holding d |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in sorted(holds, key=lambda k: (k[0] == UNCONSTRAINED, k[0], k[1])):
        ref = key[0] == UNCONSTRAINED  # no threshold: the d columns are empty
        cells = [
            "-"
            if key not in stats[col] or ref and col in ("gap", "longest_above")
            else "{:.2f} ± {:.2f}".format(*stats[col][key])
            for col in cols
        ]
        d, held = ("-", "-") if ref else (f"{key[1]:g}", f"{sum(holds[key])}/{len(holds[key])}")
        lines.append(f"| {key[0]} | {d} | " + " | ".join(cells) + f" | {held} |")
    return (
        "\n".join(lines) + f"\n\n(mean ± sd over seeds; a seed holds d when abs(J_C - d) <= {tol:g} and no streak "
        f"above d + {tol:g} after the first 10 rollouts is longer than {GOAL_STREAK})"
    )


def safe_level(out):
    """The cost model's mean score of a safe answer (cost <= 0) over the runs' logged samples: J_C of an all-safe
    policy, the bottom of the range where a threshold can be met."""
    costs = []
    for name in os.listdir(out):
        path = os.path.join(out, name, "samples.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                costs += [c for c in (json.loads(line)["cost"] for line in f) if c <= 0]
    return statistics.fmean(costs) if costs else None


def plot(results, path, all_safe=None):
    """J_C vs d (with J_C = d and the unconstrained and all-safe levels), oracle harmful rate and helpfulness vs d: one
    curve per rule, mean over seeds with the sd as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("jc_last", "J_C (mean cost, last 10 rollouts)"),
        ("oracle_harmful_rate", "oracle harmful rate (eval)"),
        ("oracle_helpfulness", "oracle helpfulness, benign (eval)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    rules = sorted({r["rule"] for r in results} - {UNCONSTRAINED})
    ds = sorted({r["threshold"] for r in results if r["rule"] != UNCONSTRAINED})
    ref = [r for r in results if r["rule"] == UNCONSTRAINED]
    for ax, (key, label) in zip(axes, keys):
        stats = aggregate(results, key)
        for i, rule in enumerate(rules):
            xs = [d for d in ds if (rule, d) in stats]
            shift = 0.04 * (i - (len(rules) - 1) / 2)  # side by side, so the error bars do not hide each other
            ax.errorbar(
                [x + shift for x in xs],
                [stats[(rule, d)][0] for d in xs],
                yerr=[stats[(rule, d)][1] for d in xs],
                marker="o",
                capsize=3,
                label=rule,
            )
        if ref and ref[0].get(key) is not None:
            ax.axhline(statistics.fmean(r[key] for r in ref), color="gray", ls=":", label="unconstrained (lambda 0)")
        if key == "jc_last":
            ax.plot(ds, ds, color="black", lw=1, ls="--", label="J_C = d")
            if all_safe is not None:
                ax.axhline(all_safe, color="green", ls=":", label="all safe")
        ax.set_xlabel("threshold d")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--models", default="output/tiny", help="folder holding the trained sft/, rm/ and cm/ (run_all.sh tiny)")
    add("--out", help="where the runs, table and figure go (default: <models>/sweep)")
    add("--thresholds", nargs="+", type=float, default=[-4.5, -3.5, -2.5, -1.5, -1.0], help="cost limits d")
    add("--rules", nargs="+", choices=sorted(LAMBDA_UPDATES), default=sorted(LAMBDA_UPDATES), help="multiplier rules")
    add("--seeds", nargs="+", type=int, default=[42, 1, 2], help="PPO-Lag seeds (the models stay the same)")
    add("--rollouts", type=int, default=126, help="rollouts per run (the tiny preset runs 63)")
    add("--last", type=int, default=10, help="K: J_C, reward and unsafe rate are averaged over the last K rollouts")
    add("--tol", type=float, default=0.5, help="a run holds d when abs(J_C - d) <= tol (cost units)")
    add("--jobs", type=int, default=os.cpu_count(), help="runs at a time (each on one thread)")
    add("--no_reference", action="store_true", help="skip the lambda = 0 reference run per seed")
    add("--plot_only", action="store_true", help="do not run: the table and figure from the runs on disk")
    args, extra = parser.parse_known_args()
    extra = [x for x in extra if x != "--"]
    out = args.out or os.path.join(args.models, "sweep")
    for role in ("sft", "rm", "cm"):
        if not os.path.exists(os.path.join(args.models, role, "config.json")):
            parser.error(f"{args.models}/{role} is not a trained model: run `bash run_all.sh tiny` first (or --models)")
    if args.rollouts < args.last:
        parser.error(f"--rollouts {args.rollouts} is fewer than --last {args.last}")

    jobs = [(rule, d, seed) for d in args.thresholds for rule in args.rules for seed in args.seeds]
    if not args.no_reference:
        jobs += [(UNCONSTRAINED, 0.0, seed) for seed in args.seeds]
    base = tiny_flags(os.path.abspath(args.models), args.rollouts)
    t0 = time.time()
    results = []

    def add_row(job, rows, timing):
        rule, d, seed = job
        results.append(
            {
                "rule": rule,
                "threshold": d,
                "seed": seed,
                **summarize(rows, d, args.last, args.tol, LAMBDA_MAX),
                **timing,
            }
        )
        return results[-1]

    if args.plot_only:
        for job in jobs:
            if os.path.exists(os.path.join(run_folder(out, job), "arguments.json")):  # complete: run_one only reads
                add_row(job, *run_one(job, None, None, out))
    else:
        print(f"{len(jobs)} runs of {args.rollouts} rollouts, {args.jobs} at a time, in {out}", flush=True)
        bar = rollout.progress(total=len(jobs), desc="sweep", unit="run", leave=True, delay=0)
        with ThreadPoolExecutor(args.jobs) as pool:  # threads that each wait on one ppo_lag.py process
            futures = {pool.submit(run_one, job, base, extra, out): job for job in jobs}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    row = add_row(job, *future.result())
                except RuntimeError as e:
                    bar.write(f"error: {e}", file=sys.stdout)
                    continue
                bar.update()
                bar.write(
                    f"[{len(results)}/{len(jobs)} {time.time() - t0:.0f} s] {job[0]} d {job[1]:g} seed "
                    f"{job[2]}: J_C {row['jc_last']:.2f} | lambda {row['lambda_end']:.2f} | harmful "
                    f"{row.get('oracle_harmful_rate', float('nan')):.2f} | "
                    + ("holds d" if row["holds"] else "misses d"),
                    file=sys.stdout,
                )
        bar.close()
    if not results:
        raise SystemExit("error: no finished run to tabulate")
    results.sort(key=lambda r: (r["rule"], r["threshold"], r["seed"]))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in results for k in r)))
        writer.writeheader()
        writer.writerows(results)
    plot(results, os.path.join(out, "sweep.png"), safe_level(out))
    print(table(results, args.tol))
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results)
    print(
        f"\n{len(results)} runs | this call {time.time() - t0:.0f} s | the runs' CPU time {cpu:.0f} s, "
        f"{cpu / args.jobs:.0f} s over {args.jobs} cores | {out}/results.csv, results.json, sweep.png"
    )


if __name__ == "__main__":
    main()
