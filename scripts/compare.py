"""Score many toy-world policies with the oracles on the same held-out prompts: a table and one figure.

Each policy answers every prompt of --datasets (sampled at temperature 1, as evaluate.py's arena and PPO's rollouts
do, up to --max_length tokens); toy.toy_metrics gives its oracle helpfulness on the benign prompts and its harmful
rate on the harmful ones. Policies are passed as METHOD=PATH; several paths of one method (its seeds) give a mean and
a standard deviation, so one point per method with its spread. --times FILE (lines `METHOD<TAB>seconds`, one per
run) adds each method's mean training wall time.

    python scripts/compare.py --policies sft=output/tiny/sft dpo=output/b/dpo_s1 dpo=output/b/dpo_s2 \\
        --datasets toy-eval --output_dir output/baselines
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules

import rollout  # noqa: E402
from data import PromptOnlyDataset, parse_dataset  # noqa: E402
from templates import load_tokenizer, stop_ids  # noqa: E402
from toy import toy_metrics  # noqa: E402


def oracle_scores(path, prompts, max_length, seed, batch_size=100):
    """(oracle helpfulness, harmful rate) of the policy at `path` answering `prompts` (a PromptOnlyDataset)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = load_tokenizer(path, padding_side="left")
    stops = stop_ids(tok, "anchor", model.generation_config)
    torch.manual_seed(seed)
    texts, asked = [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts.collate([prompts[j] for j in range(i, min(i + batch_size, len(prompts)))])
        P = batch["input_ids"].shape[1]
        with torch.no_grad():
            seq = rollout.generate(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens=max_length - P,
                cache="dynamic",
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
            )
        is_eos = torch.isin(seq[:, P:], torch.tensor(stops))
        keep = (is_eos.cumsum(1) - is_eos.long()) == 0  # up to and including the first stop
        texts += [tok.decode(s[P:][m], skip_special_tokens=True).strip() for s, m in zip(seq, keep)]
        asked += batch["prompts"]
    metrics = toy_metrics(asked, texts)
    if metrics is None:
        raise SystemExit("error: the oracles score toy-world prompts only")
    return metrics["oracle_helpfulness"], metrics["oracle_harmful_rate"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", required=True, help="METHOD=PATH ... (a method's seeds repeat it)")
    parser.add_argument(
        "--datasets",
        type=parse_dataset,
        nargs="+",
        default=[parse_dataset("toy-eval")],
        help="held-out toy prompts, NAME[:PROPORTION[:PATH]]",
    )
    parser.add_argument("--max_length", type=int, default=64, help="prompt + answer tokens")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed of a method's first policy (+1 per next)")
    parser.add_argument("--times", default=None, help="file of METHOD<TAB>training seconds lines")
    parser.add_argument("--output_dir", required=True, help="writes results.json, table.md, baselines.png")
    args = parser.parse_args()
    rollout.silence_library_bars()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    runs = defaultdict(list)
    for item in args.policies:
        method, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            raise SystemExit(f"error: --policies {item}: expected METHOD=PATH with PATH a model folder")
        runs[method].append(path)
    tok = load_tokenizer(runs[next(iter(runs))][0], padding_side="left")
    prompts = PromptOnlyDataset(args.datasets, tok, args.max_length, seed=0)
    times = defaultdict(list)
    if args.times and Path(args.times).exists():
        for line in Path(args.times).read_text().splitlines():
            method, seconds = line.split("\t")
            times[method].append(float(seconds))

    results = {}
    for method, paths in runs.items():
        t0 = time.time()
        scores = [oracle_scores(p, prompts, args.max_length, args.seed + i) for i, p in enumerate(paths)]
        helpful, harmful = zip(*scores)
        spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        results[method] = {
            "oracle_helpfulness": statistics.mean(helpful),
            "helpfulness_std": spread(helpful),
            "oracle_harmful_rate": statistics.mean(harmful),
            "harmful_rate_std": spread(harmful),
            "runs": len(paths),
            "per_run": scores,
            "train_seconds": statistics.mean(times[method]) if times[method] else None,
        }
        print(
            f"{method}: helpfulness {results[method]['oracle_helpfulness']:.2f} +- "
            f"{results[method]['helpfulness_std']:.2f}, harmful rate {results[method]['oracle_harmful_rate']:.3f} "
            f"+- {results[method]['harmful_rate_std']:.3f} ({len(paths)} runs, scored in {time.time() - t0:.0f} s)"
        )

    rows = [
        "| method | oracle helpfulness (benign) | oracle harmful rate | runs | train time per run |",
        "|---|---|---|---|---|",
    ]
    for method, r in results.items():
        t = f"{r['train_seconds']:.0f} s" if r["train_seconds"] is not None else "-"
        rows.append(
            f"| {method} | {r['oracle_helpfulness']:.2f} ± {r['helpfulness_std']:.2f} | "
            f"{r['oracle_harmful_rate']:.3f} ± {r['harmful_rate_std']:.3f} | {r['runs']} | {t} |"
        )
    table = "\n".join(rows)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, r in results.items():
        ax.errorbar(
            r["oracle_harmful_rate"],
            r["oracle_helpfulness"],
            xerr=r["harmful_rate_std"],
            yerr=r["helpfulness_std"],
            fmt="o",
            capsize=3,
            label=method,
        )
        ax.annotate(
            method,
            (r["oracle_harmful_rate"], r["oracle_helpfulness"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xlabel("oracle harmful rate on harmful prompts (lower is safer)")
    ax.set_ylabel("oracle helpfulness on benign prompts")
    ax.set_title("toy world: offline baselines vs PPO-Lag (mean ± std over runs)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "baselines.png", dpi=120)
    print(f"written to {out}/table.md, results.json and baselines.png")


if __name__ == "__main__":
    main()
