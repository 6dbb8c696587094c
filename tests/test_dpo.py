"""dpo.py: the DPO loss against a slow fp64 reference written from the anchor's per-pair loop (divergence at the first
token, at the last, pairs of different lengths, left and right padding), SafeDPO's objective against its own
reference, then runs of the script on the toy world: golden numbers, the wiring (a first loss of exactly log 2),
resume after a kill, LoRA, ZeRO-3 and --fused_logprobs, the SACPO recipe, a real preference file, bad input.

What breaks these tests: better and worse swapped, the reference dropped, spans summed from 0 instead of the
divergence index, beta outside the sigmoid or on one side only, the pad token or the first differing token counted."""

import json
import math
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_resume import assert_same_weights, finish, kill_at_pause, rows, start, start_killed

import data
import templates
from conftest import SHARED_DATA, run_script
from dpo import SafeDPODataset, dpo_loss, pair_spans, safedpo_margin, safedpo_order, token_logprobs
from toy import make_toy_model

PY = sys.executable
LOG2 = math.log(2.0)

# ----------------------------------------------------------------------------------------------------------------
# The slow reference: the anchor's loop, one pair at a time, in fp64, on the real tokens of each sequence


def ref_sequence_logp(logits, ids, start):
    """sum_{t = start..len-1} log softmax(logits[t - 1])[ids[t]]: the sequence's log-prob from token `start` on
    (token 0 has no prediction). logits (L, V), ids (L,): one sequence's real positions."""
    total = logits.new_zeros(())
    for t in range(max(start, 1), len(ids)):
        total = total + torch.log_softmax(logits[t - 1], -1)[ids[t]]
    return total


def ref_dpo(logits, ref_logits, ids, mask, beta, margins=None):
    """The anchor's per-pair loop (dpo/trainer.py, `loss`): rows [:B] better, [B:] worse; the divergence index is the
    first position where the two differ; each log-prob summed from there to the sequence's own last token."""
    B = ids.size(0) // 2
    losses, better_rewards, worse_rewards = [], [], []
    for i in range(B):
        seqs = []
        for row in (i, B + i):
            real = mask[row].bool()
            seqs.append((ids[row][real], logits[row][real], ref_logits[row][real]))
        (bi, bl, brl), (wi, wl, wrl) = seqs
        n = min(len(bi), len(wi))
        diverge = next((t for t in range(n) if bi[t] != wi[t]), n)
        better_log_ratio = ref_sequence_logp(bl, bi, diverge) - ref_sequence_logp(brl, bi, diverge)
        worse_log_ratio = ref_sequence_logp(wl, wi, diverge) - ref_sequence_logp(wrl, wi, diverge)
        logit = beta * (better_log_ratio - worse_log_ratio) - (0.0 if margins is None else margins[i])
        losses.append(-F.logsigmoid(logit))
        better_rewards.append(beta * better_log_ratio.detach())
        worse_rewards.append(beta * worse_log_ratio.detach())
    return torch.stack(losses).mean(), torch.stack(better_rewards), torch.stack(worse_rewards)


def pairs(lengths, diverge, V=13, left=False, seed=0):
    """input_ids and attention_mask (2B, T) for pairs with given (better, worse) lengths and divergence index: a
    shared prefix of `diverge` tokens, then different tokens; padded on the right (or left) with id 0."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for (lb, lw), d in zip(lengths, diverge):
        prefix = torch.randint(1, V, (d,), generator=g)
        b = torch.cat([prefix, torch.randint(1, V, (lb - d,), generator=g)])
        w = torch.cat([prefix, torch.randint(1, V, (lw - d,), generator=g)])
        if d < min(lb, lw) and b[d] == w[d]:
            w[d] = b[d] % (V - 1) + 1
        seqs.append((b, w))
    rows_ = [b for b, _ in seqs] + [w for _, w in seqs]
    return data.pad(rows_, 0, left), data.pad([torch.ones_like(r) for r in rows_], 0, left).bool()


CASES = {  # (better, worse) lengths and the divergence index of each pair
    "first token": ([(5, 5), (6, 4)], [0, 0]),
    "last token": ([(6, 6), (3, 3)], [5, 2]),
    "different lengths": ([(3, 8), (9, 4), (7, 7)], [1, 2, 3]),
    "one a prefix of the other": ([(4, 7), (6, 3)], [4, 3]),
}


def vectorised(logits, ref_logits, ids, mask, beta, margin=None):
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731  (a causal LM that answers these logits)
    ref = lambda **kw: SimpleNamespace(logits=ref_logits)  # noqa: E731
    B = ids.size(0) // 2
    b_span, w_span = pair_spans(ids[:B], ids[B:], mask[:B], mask[B:])
    span = torch.cat([b_span, w_span])
    logp = (token_logprobs(model, ids, mask) * span).sum(-1)
    ref_logp = (token_logprobs(ref, ids, mask) * span).sum(-1)
    return dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], beta, margin)


@pytest.mark.parametrize("left", [False, True], ids=["right padding", "left padding"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_dpo_loss_matches_anchor_loop(case, left, beta):
    lengths, diverge = CASES[case]
    ids, mask = pairs(lengths, diverge, left=left)
    torch.manual_seed(1)
    logits = (3 * torch.randn(*ids.shape, 13, dtype=torch.float64)).requires_grad_()
    ref_logits = 3 * torch.randn(*ids.shape, 13, dtype=torch.float64)
    want, want_better, want_worse = ref_dpo(logits, ref_logits, ids, mask, beta)
    (want_grad,) = torch.autograd.grad(want, logits)
    fast = logits.detach().float().requires_grad_()
    loss, metrics = vectorised(fast, ref_logits.float(), ids, mask, beta)
    loss.backward()
    errors = {
        "loss": abs(loss.item() - want.item()),
        "grad": (fast.grad.double() - want_grad).abs().max().item(),
        "better reward": (metrics["better_sample_reward"].double() - want_better).abs().max().item(),
        "worse reward": (metrics["worse_sample_reward"].double() - want_worse).abs().max().item(),
    }
    print(f"{case}, {'left' if left else 'right'} padding, beta {beta}: max errors {errors}")
    assert errors["loss"] < 1e-5 and errors["grad"] < 1e-5, errors
    assert errors["better reward"] < 1e-4 and errors["worse reward"] < 1e-4, errors
    assert torch.equal(metrics["reward_accuracy"], (want_better > want_worse).float())
    assert torch.allclose(metrics["reward_margin"].double(), want_better - want_worse, atol=1e-4)
    # padding moves no number
    other_ids, other_mask = pairs(lengths, diverge, left=not left)
    assert (
        pair_spans(ids[: len(lengths)], ids[len(lengths) :], mask[: len(lengths)], mask[len(lengths) :])[0].sum()
        == pair_spans(
            other_ids[: len(lengths)], other_ids[len(lengths) :], other_mask[: len(lengths)], other_mask[len(lengths) :]
        )[0].sum()
    )


def test_spans_hand_worked():
    # better: 7 8 9 2 (eos 2), worse: 7 8 5 5 2; right padded with 0. They differ from position 2 on.
    ids = torch.tensor([[7, 8, 9, 2, 0], [7, 8, 5, 5, 2]])
    mask = ids != 0
    b, w = pair_spans(ids[:1], ids[1:], mask[:1], mask[1:])
    assert b.int().tolist() == [[0, 0, 1, 1, 0]] and w.int().tolist() == [[0, 0, 1, 1, 1]]
    # identical pair: empty spans, so log-ratios 0 and the loss log 2 with no gradient
    b, w = pair_spans(ids[:1], ids[:1], mask[:1], mask[:1])
    assert not b.any() and not w.any()


def test_loss_hand_worked():
    # h = (-1 - -2) - (-3 - -1) = 3; beta 0.5: loss = -log sigma(1.5) = 0.201413
    loss, m = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert m["better_sample_reward"].item() == pytest.approx(0.5)
    assert m["worse_sample_reward"].item() == pytest.approx(-1)
    assert m["reward_margin"].item() == pytest.approx(1.5) and m["reward_accuracy"].item() == 1.0
    assert m["reward"].item() == pytest.approx(-0.5)


# ----------------------------------------------------------------------------------------------------------------
# SafeDPO against its own reference


def ref_safedpo(better_logp, worse_logp, ref_better, ref_worse, better_unsafe, worse_unsafe, beta, delta):
    """SafeDPO (arXiv 2505.20065) per pair, written from the paper: T swaps a pair whose preferred answer is unsafe
    (h_w = 1) and dispreferred safe (h_l = 0); then -log sigma(beta * h - (h_l - h_w) * Delta)."""
    total = 0.0
    for i in range(len(better_logp)):
        w = (better_logp[i], ref_better[i], better_unsafe[i])
        l_ = (worse_logp[i], ref_worse[i], worse_unsafe[i])
        if w[2] == 1 and l_[2] == 0:
            w, l_ = l_, w
        h = (w[0] - w[1]) - (l_[0] - l_[1])
        total += -math.log(1 / (1 + math.exp(-(beta * h - (l_[2] - w[2]) * delta))))
    return total / len(better_logp)


def test_safedpo_matches_reference():
    torch.manual_seed(0)
    n = 16
    logp = torch.randn(4, n, dtype=torch.float64) * 3
    flags = [(0, 0), (0, 1), (1, 0), (1, 1)] * 4
    better_unsafe, worse_unsafe = torch.tensor([f[0] for f in flags]), torch.tensor([f[1] for f in flags])
    for beta, delta in ((0.1, 0.0), (0.1, 2.0), (1.0, 5.0)):
        want = ref_safedpo(*logp.tolist(), better_unsafe.tolist(), worse_unsafe.tolist(), beta, delta)
        # dpo.py applies T in the dataset (preprocess) and the margin in the loss
        swap = torch.tensor([safedpo_order(bool(b), bool(w)) for b, w in flags])
        pick = lambda a, b, swap=swap: torch.where(swap, b, a)  # noqa: E731
        bl, wl, rb, rw = pick(logp[0], logp[1]), pick(logp[1], logp[0]), pick(logp[2], logp[3]), pick(logp[3], logp[2])
        bu, wu = pick(better_unsafe, worse_unsafe), pick(worse_unsafe, better_unsafe)
        loss, _ = dpo_loss(bl, wl, rb, rw, beta, safedpo_margin(bu, wu, delta))
        print(f"SafeDPO beta {beta} Delta {delta}: |error| {abs(loss.item() - want):.2e}")
        assert loss.item() == pytest.approx(want, abs=1e-10)
    assert safedpo_margin(torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 0, 1]), 2.0).tolist() == [2, -2, 0, 0]


def test_safedpo_dataset_applies_the_transformation(toy):
    tokenizer = templates.load_tokenizer(str(toy / "base"))
    ds = SafeDPODataset([("toy-safe-rlhf", {"proportion": 0.05, "path": None})], tokenizer, 64)
    raw = data.load_samples([("toy-safe-rlhf", {"proportion": 0.05, "path": None})], 42)
    assert len(ds) == len(raw) > 300
    swapped = 0
    for s, d in zip(raw, ds.data):
        better_first = s["better"]
        b_unsafe, w_unsafe = (not s["is_safe"], not s["is_other_safe"])[:: 1 if better_first else -1]
        if b_unsafe and not w_unsafe:  # T: the safe answer becomes the preferred one
            swapped += 1
            assert (d["better_unsafe"], d["worse_unsafe"]) == (0, 1)
        else:
            assert (d["better_unsafe"], d["worse_unsafe"]) == (int(b_unsafe), int(w_unsafe))
    assert swapped > 10


# ----------------------------------------------------------------------------------------------------------------
# Runs of the script


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy base model, and a copy with attention dropout (so that training consumes random numbers)."""
    root = tmp_path_factory.mktemp("dpo")
    make_toy_model(str(root / "base"))
    shutil.copytree(root / "base", root / "dropout")
    config = json.loads((root / "dropout" / "config.json").read_text())
    (root / "dropout" / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    return root


def dpo_args(
    model, out, *extra, data_flags="--train_datasets toy-preference:0.02 --eval_datasets toy-preference/test:0.1"
):
    flags = (
        f"{data_flags} --max_length 64 --epochs 1 --per_device_train_batch_size 8 --per_device_eval_batch_size "
        "25 --lr 1e-2 --lr_scheduler_type constant --lr_warmup_ratio 0 --logging_steps 1 --scale_coeff 0.5"
    )
    model = ["--model_name_or_path", str(model)]
    return [PY, "dpo.py", *model, *flags.split(), "--output_dir", str(out), *map(str, extra)]


def train_rows(out):
    return [
        r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r
    ]


def test_run_golden_numbers_and_wiring(toy, tmp_path):
    out = tmp_path / "dpo"
    proc = run_script(dpo_args(toy / "base", out, "--max_steps", 8))
    assert "step 8/8 | train/loss" in proc.stdout and "eval/reward_accuracy" in proc.stdout
    train = train_rows(out)
    evals = [
        r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r
    ]
    # the policy starts as the reference: the first micro-batch's log-ratios are 0, its loss exactly log 2
    assert train[0]["train/loss"] == pytest.approx(LOG2, abs=1e-6) and train[0]["train/reward_margin"] == 0
    assert evals[0]["eval/loss"] == pytest.approx(LOG2, abs=1e-6) and evals[0]["step"] == 0
    # golden: fixed seed, fixed init; regenerate deliberately when the data or the loop changes on purpose
    got = {k: [round(r[f"train/{k}"], 4) for r in train[:4]] for k in ("loss", "reward_margin", "reward_accuracy")}
    print(got)
    assert got["loss"] == pytest.approx(GOLDEN["loss"], abs=2e-3)
    assert got["reward_margin"] == pytest.approx(GOLDEN["reward_margin"], abs=2e-3)
    assert got["reward_accuracy"] == pytest.approx(GOLDEN["reward_accuracy"], abs=1e-6)
    # it learns the preference: held-out accuracy and loss move the right way
    assert evals[-1]["eval/reward_accuracy"] > 0.6 and evals[-1]["eval/reward_margin"] > 0
    assert evals[-1]["eval/reward_margin"] == pytest.approx(
        evals[-1]["eval/better_sample_reward"] - evals[-1]["eval/worse_sample_reward"], abs=1e-4
    )
    assert json.loads((out / "arguments.json").read_text())["scale_coeff"] == 0.5
    assert (out / "model.safetensors").exists() and not (tmp_path / "dpo.partial").exists()


GOLDEN = {
    "loss": [0.6931, 0.4544, 0.4691, 0.2782],
    "reward_margin": [0.0, 0.8873, 1.1903, 2.4769],
    "reward_accuracy": [0.0, 0.875, 0.75, 0.875],
}


def test_resume_after_kill_is_bit_equal(toy, tmp_path):
    args = lambda out: dpo_args(toy / "dropout", out, "--max_steps", 6, "--save_interval", 3)  # noqa: E731
    finish(start(args(tmp_path / "whole")))
    killed = start_killed(args(tmp_path / "resumed"), 3)
    kill_at_pause(killed)
    out = finish(start(args(tmp_path / "resumed")))
    assert "resum" in out.lower()
    assert_same_weights(tmp_path / "whole", tmp_path / "resumed")
    whole, resumed = rows(tmp_path / "whole", "train/loss"), rows(tmp_path / "resumed", "train/loss")
    assert whole == resumed[-len(whole) :] and len(whole) == 6


def test_lora_reference_is_the_adapter_off(toy, tmp_path):
    out = tmp_path / "lora"
    run_script(dpo_args(toy / "base", out, "--max_steps", 4, "--lora_rank", 4, "--lora_alpha", 8))
    train = train_rows(out)
    assert train[0]["train/loss"] == pytest.approx(LOG2, abs=1e-6)  # B = 0 at the start: policy == reference
    assert train[-1]["train/reward_margin"] != 0
    from safetensors.torch import load_file

    start_w, end_w = load_file(toy / "base" / "model.safetensors"), load_file(out / "model.safetensors")
    assert start_w.keys() == end_w.keys()  # merged: an ordinary folder
    assert any(not torch.equal(start_w[k], end_w[k]) for k in start_w)


def test_zero3_and_fused_logprobs_match_zero0(toy, tmp_path):
    run_script(dpo_args(toy / "base", tmp_path / "z0", "--max_steps", 3))
    run_script(dpo_args(toy / "base", tmp_path / "z3", "--max_steps", 3, "--zero_stage", 3, "--fused_logprobs"))
    a, b = train_rows(tmp_path / "z0"), train_rows(tmp_path / "z3")
    assert [r["train/loss"] for r in a] == pytest.approx([r["train/loss"] for r in b], abs=1e-4)
    assert [r["train/reward_margin"] for r in a] == pytest.approx([r["train/reward_margin"] for r in b], abs=1e-4)


def test_safety_label_and_safedpo_runs(toy, tmp_path):
    run_script(
        dpo_args(
            toy / "base",
            tmp_path / "safer",
            "--max_steps",
            3,
            "--label",
            "safer",
            data_flags="--train_datasets toy-safety-preference:0.02 --eval_datasets toy-safety-preference/test:0.1",
        )
    )
    proc = run_script(
        dpo_args(
            toy / "base",
            tmp_path / "safedpo",
            "--max_steps",
            3,
            "--objective",
            "safedpo",
            "--safety_margin",
            2.0,
            data_flags="--train_datasets toy-safe-rlhf:0.02",
        )
    )
    # SafeDPO's first micro-batch: log-ratios 0, so the loss is the mean of -log sigma(-(h_l - h_w) Delta) > log 2
    assert train_rows(tmp_path / "safedpo")[0]["train/loss"] > LOG2 and "safedpo on the better label" in proc.stdout


def test_sacpo_two_steps(toy, tmp_path):
    """SACPO: DPO on helpfulness (beta), then DPO on safety from that model, its own reference, with beta / lambda."""
    run_script(dpo_args(toy / "base", tmp_path / "helpful", "--max_steps", 3))
    run_script(
        dpo_args(
            tmp_path / "helpful",
            tmp_path / "sacpo",
            "--max_steps",
            3,
            "--label",
            "safer",
            "--scale_coeff",
            0.5 / 2.0,
            data_flags="--train_datasets toy-safety-preference:0.02 --eval_datasets toy-safety-preference/test:0.1",
        )
    )
    first_eval = json.loads((tmp_path / "sacpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_eval["eval/loss"] == pytest.approx(LOG2, abs=1e-6)  # the reference is the step-1 model itself


@pytest.mark.parametrize(
    "spec,label",
    [
        ("safe-unsafe-pairs/train:0.02:{}/pku-saferlhf-derived/pku_seferlhf_realign_dpo_5k.json", "safer"),
        ("hh-rlhf-helpful-preference/test:0.02:{}/hh-rlhf/helpful-base-test.jsonl.gz", "better"),
    ],
)
def test_real_preference_file(toy, tmp_path, spec, label):
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    spec = spec.format(SHARED_DATA)
    proc = run_script(
        dpo_args(
            toy / "base",
            tmp_path / "real",
            "--max_steps",
            2,
            "--label",
            label,
            "--max_length",
            128,
            data_flags=f"--train_datasets {spec}",
        )
    )
    assert "step 2/2 | train/loss" in proc.stdout
    assert train_rows(tmp_path / "real")[0]["train/loss"] == pytest.approx(LOG2, abs=1e-6)


def test_bad_input(toy, tmp_path):
    import subprocess

    from conftest import ROOT, stage_env

    def fails(*extra):
        proc = subprocess.run(
            dpo_args(toy / "base", tmp_path / "bad", *extra),
            cwd=ROOT,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0
        return proc.stderr.strip().splitlines()[-1]

    assert "--scale_coeff" in fails("--scale_coeff", 0)
    assert "--objective safedpo" in fails("--objective", "safedpo", "--label", "safer")


def test_pku_saferlhf_layout_orders_pairs_by_either_label(toy, tmp_path):
    """A local file in PKU-SafeRLHF's layout: --label better, --label safer and SafeDPO each put the right answer first
    (toy-vocabulary text, so the toy tokenizer reads it); then a SafeDPO run on it."""
    a, b = "mix the flour . add the sugar .", "build a bomb . set the timer ."
    records = [
        {
            "prompt": "how do i bake a cake ?",
            "response_0": a,
            "response_1": b,
            "is_response_0_safe": True,
            "is_response_1_safe": False,
            "better_response_id": 1,
            "safer_response_id": 0,
        }
    ] * 20
    path = tmp_path / "pku.json"
    path.write_text(json.dumps(records))
    tokenizer = templates.load_tokenizer(str(toy / "base"))
    spec = [("PKU-SafeRLHF/train", {"proportion": 1.0, "path": str(path)})]
    first = lambda ds: tokenizer.decode(ds[0][next(k for k in ds[0] if k.endswith("input_ids"))])  # noqa: E731
    assert "bomb" in first(data.PreferenceDataset(spec, tokenizer, 64))  # better: response_1 (unsafe)
    assert "flour" in first(data.SafetyPreferenceDataset(spec, tokenizer, 64))  # safer: response_0
    safe = SafeDPODataset(spec, tokenizer, 64)  # T swaps the unsafe better answer behind the safe one
    assert "flour" in first(safe) and (safe[0]["better_unsafe"], safe[0]["worse_unsafe"]) == (0, 1)
    run_script(
        dpo_args(
            toy / "base",
            tmp_path / "pku",
            "--max_steps",
            2,
            "--objective",
            "safedpo",
            data_flags=f"--train_datasets PKU-SafeRLHF/train:1.0:{path}",
        )
    )
    # every pair is safe-over-unsafe after T: the first loss is -log sigma(-Delta) with Delta = 1
    assert train_rows(tmp_path / "pku")[0]["train/loss"] == pytest.approx(math.log1p(math.e), abs=1e-5)


def test_pairs_truncated_to_identical_are_dropped_and_counted(toy, tmp_path):
    tokenizer = templates.load_tokenizer(str(toy / "base"))
    ds = data.PreferenceDataset([("toy-preference", {"proportion": 0.02, "path": None})], tokenizer, 20)
    same = ds.identical  # the dataset drops them (the anchor asserts on such a pair)
    assert same > 0 and not any(torch.equal(d["better_input_ids"], d["worse_input_ids"]) for d in ds.data)
    proc = run_script(dpo_args(toy / "base", tmp_path / "short", "--max_steps", 2, "--max_length", 20))
    assert f"{same:,} of them pairs the truncation made identical" in proc.stdout


def test_torchrun_two_processes_zero3(toy, tmp_path):
    import socket

    with socket.socket() as sock:  # a free port: torchrun's default may be taken by another run
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    flags = ("--max_steps", 3, "--zero_stage", 3, "--per_device_train_batch_size", 4)
    args = dpo_args(toy / "base", tmp_path / "ddp", *flags)[1:]  # the script and its flags, without the interpreter
    proc = run_script([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *args])
    assert proc.stdout.count("step 3/3 | train/loss") == 1  # rank 0 alone prints
    rows_ = train_rows(tmp_path / "ddp")
    assert rows_[0]["train/loss"] == pytest.approx(LOG2, abs=1e-6) and (tmp_path / "ddp" / "model.safetensors").exists()
