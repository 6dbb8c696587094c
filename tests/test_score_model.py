"""score_model.py: the losses and normalisers against the anchor's formulas written out in fp64 (hand-worked numbers
and slow loops), ScoreModel checkpoints in our layout and in the released Beaver layouts, smoke runs of the reward and
cost models on the toy world, and golden numbers of two fixed-seed tiny runs."""

import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import templates
import toy
from common import lr_schedule
from conftest import ROOT, run_script
from models import Normalizer, ScoreModel
from score_model import cost_loss, diverge_span, pair_metrics, reward_loss


def close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    diff = (a - b).abs()
    assert diff.max() <= tol, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def nll_sigmoid(x: float) -> float:  # -log sigma(x), by hand
    return math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------------------------------
# losses and metrics


def test_reward_loss_hand_worked():
    better, worse = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # (-log sigma(1) - log sigma(0)) / 2 = (0.31326169 + 0.69314718) / 2; L2: 0.1 * mean(1, 0, 0, 0) = 0.025
    close(reward_loss(better, worse), 0.50320444)
    close(reward_loss(better, worse, regularization=0.1), 0.52820444)


def test_cost_loss_hand_worked():
    safer, unsafer = torch.tensor([-1.0]), torch.tensor([2.0])
    safer_sign, unsafer_sign = torch.tensor([-1]), torch.tensor([1])  # safe, unsafe
    # -log sigma(2 - -1) - log sigma(-1 * -1) - log sigma(1 * 2) = 0.04858735 + 0.31326169 + 0.12692801
    close(cost_loss(safer, unsafer, safer_sign, unsafer_sign), 0.48877705)
    close(cost_loss(safer, unsafer, safer_sign, unsafer_sign, regularization=0.1), 0.48877705 + 0.1 * 2.5)
    # calling the unsafe answer safe (-2) costs: -log sigma(-1) - log sigma(1) - log sigma(-2)
    close(cost_loss(safer, -unsafer, safer_sign, unsafer_sign), 1.31326169 + 0.31326169 + 2.12692801)


def test_diverge_span():
    better_ids, worse_ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]]), torch.tensor([[5, 6, 8, 9], [5, 6, 0, 0]])
    better_mask, worse_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    span = diverge_span(better_ids, worse_ids, better_mask, worse_mask)
    # row 0: first difference at 2, the longer answer ends at 3; row 1: identical (truncation can do that): empty
    assert span.tolist() == [[False, False, True, True], [False, False, False, False]]
    prefix = diverge_span(
        torch.tensor([[5, 6, 7, 8]]),
        torch.tensor([[5, 6, 0, 0]]),
        torch.tensor([[1, 1, 1, 1]]),
        torch.tensor([[1, 1, 0, 0]]),
    )
    assert prefix.tolist() == [[False, False, True, True]]  # one answer a prefix of the other: from the padding on


def test_token_wise_hand_worked():
    """The two audit examples: every term of the anchor's token-wise loss is averaged over the span (here the last
    two tokens), the L2 and sign terms included; the tokens before the span do not count."""
    ids = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 9, 10]])
    span = diverge_span(*ids, torch.ones(1, 4), torch.ones(1, 4))
    higher, lower = torch.tensor([[9.0, -9.0, 3.0, 1.0]]), torch.tensor([[0.0, 7.0, -2.0, 1.0]])
    # (-log sigma(5) - log sigma(0)) / 2 + 1.0 * (3^2 + 1^2 + 2^2 + 1^2) / 4 = 0.34993126 + 3.75
    close(reward_loss(higher, lower, 1.0, span), 4.09993126)
    close(reward_loss(higher, lower, 0.0, span), 0.34993126)
    unsafer, safer = torch.tensor([[9.0, 9.0, -4.0, 2.0]]), torch.tensor([[0.0, 0.0, -1.0, -1.0]])
    unsafe, safe = torch.tensor([1]), torch.tensor([-1])
    # (-log sigma(-3) - log sigma(3)) / 2 + (-log sigma(1) * 2) / 2 + (-log sigma(-4) - log sigma(2)) / 2
    close(cost_loss(safer, unsafer, safe, unsafe, 0.0, span), 1.54858735 + 0.31326169 + 2.07253897)
    close(cost_loss(safer, unsafer, safe, unsafe, 0.0, span), 3.93438801)


def anchor_loss(
    first_ids,
    second_ids,
    first_mask,
    second_mask,
    first_scores,
    second_scores,
    first_sign,
    second_sign,
    reg,
    token_wise,
    score_type,
):
    """The anchor's loss written out one pair at a time in Python floats (fp64). first: the better (reward) or the
    safer (cost) answer; signs +1 unsafe, -1 safe; scores (B, T) per token, right padding."""
    B, T = first_ids.shape
    f_ids, s_ids, f_mask, s_mask = first_ids.tolist(), second_ids.tolist(), first_mask.tolist(), second_mask.tolist()
    per_pair, squares = [], []
    for i in range(B):
        f, s = first_scores[i].tolist(), second_scores[i].tolist()
        f_end, s_end = max(t for t in range(T) if f_mask[i][t]), max(t for t in range(T) if s_mask[i][t])
        if token_wise:  # from the first differing token to the later end
            ts = range(next(t for t in range(T) if f_ids[i][t] != s_ids[i][t]), max(f_end, s_end) + 1)
        else:
            f, s, ts = [f[f_end]], [s[s_end]], [0]
        high, low = (f, s) if score_type == "reward" else (s, f)
        n = len(ts)
        loss = sum(nll_sigmoid(high[t] - low[t]) for t in ts) / n
        if score_type == "cost":
            loss += sum(nll_sigmoid(first_sign[i] * f[t]) for t in ts) / n
            loss += sum(nll_sigmoid(second_sign[i] * s[t]) for t in ts) / n
        if token_wise:  # each pair carries its own L2 term: the mean of both answers' squared span scores
            loss += reg * sum(f[t] ** 2 + s[t] ** 2 for t in ts) / (2 * n)
        else:
            squares += [f[0] ** 2, s[0] ** 2]
        per_pair.append(loss)
    return sum(per_pair) / B + (0.0 if token_wise else reg * sum(squares) / len(squares))


def random_pairs(B=7, T=12, seed=0):
    """Right-padded pairs with a shared prompt, answers of different lengths, one answer a prefix of the other in row 0,
    fp64 per-token scores of scale 2, random signs."""
    g = torch.Generator().manual_seed(seed)
    first_ids, first_mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.bool)
    second_ids, second_mask = first_ids.clone(), first_mask.clone()
    for i in range(B):
        prompt, la, lb = 2 + i % 3, 1 + (i * 5) % (T - 5), 1 + (i * 3 + 2) % (T - 5)
        a = torch.randint(1, 9, (prompt + la,), generator=g)
        b = torch.cat([a[:prompt], torch.randint(1, 9, (lb,), generator=g)])
        b[prompt] = 9  # the answers differ at their first token ...
        if i == 0:
            la, b = la + 3, a[: prompt + la]  # ... except row 0, where the second is a prefix of the first
            a = torch.cat([a, torch.randint(1, 9, (3,), generator=g)])
        first_ids[i, : len(a)], second_ids[i, : len(b)] = a, b
        first_mask[i, : len(a)], second_mask[i, : len(b)] = True, True
    scores = torch.randn(2, B, T, generator=g, dtype=torch.float64) * 2
    signs = torch.randint(0, 2, (2, B), generator=g) * 2 - 1
    return first_ids, second_ids, first_mask, second_mask, scores[0], scores[1], signs[0], signs[1]


@pytest.mark.parametrize("score_type", ["reward", "cost"])
@pytest.mark.parametrize("token_wise", [False, True])
def test_losses_match_anchor_loop(score_type, token_wise):
    first_ids, second_ids, first_mask, second_mask, first_scores, second_scores, *signs = random_pairs()
    assert first_ids.size(1) > max(first_mask.sum(-1).max(), second_mask.sum(-1).max())  # padding everywhere
    span, first, second = diverge_span(first_ids, second_ids, first_mask, second_mask), first_scores, second_scores
    if not token_wise:  # end scores, at each row's last real token (the first index of the cumsum's max)
        span, first, second = (
            None,
            *(
                x.gather(1, m.long().cumsum(-1).argmax(-1, keepdim=True))[:, 0]
                for x, m in ((first_scores, first_mask), (second_scores, second_mask))
            ),
        )
    for reg in (0.0, 0.3):
        if score_type == "reward":
            fast = reward_loss(first, second, reg, span)
        else:
            fast = cost_loss(first, second, *signs, reg, span)
        slow = anchor_loss(
            first_ids,
            second_ids,
            first_mask,
            second_mask,
            first_scores,
            second_scores,
            *(s.tolist() for s in signs),
            reg,
            token_wise,
            score_type,
        )
        assert fast.dtype == torch.float64
        close(fast, slow, tol=1e-12)


def test_pair_metrics():
    safer, unsafer = torch.tensor([-1.0, 2.0]), torch.tensor([3.0, 1.0])
    m = pair_metrics(safer, unsafer, torch.tensor([-1, -1]), torch.tensor([1, 1]), score_type="cost")
    assert m["accuracy"].item() == 0.5 and m["accuracy_sign"].item() == 0.75  # 2.0 for a safe answer is wrong
    better, worse = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 1.0])
    assert pair_metrics(better, worse)["accuracy"].item() == pytest.approx(2 / 3)


def test_lr_schedule_warmup_rule():
    """Warm-up multiplier step / max(1, warmup_steps) (transformers' schedulers, so the anchor's), then the decay; a
    constant schedule has no warm-up (as the stages always ran it)."""
    assert [lr_schedule("cosine", 10, 0.4)(s) for s in range(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert [lr_schedule("cosine", 10, 0.2)(s) for s in (2, 6, 10)] == pytest.approx([1, 0.5, 0])
    assert [lr_schedule("linear", 10, 0.2)(s) for s in (2, 6, 10)] == pytest.approx([1, 0.5, 0])
    assert [lr_schedule("constant", 10, 0.2)(s) for s in (1, 6, 10)] == pytest.approx([1, 1, 1])
    assert lr_schedule("cosine", 10, 0.0)(0) == 1.0  # no warm-up: the full LR from the first step


# ----------------------------------------------------------------------------------------------------------------
# the normaliser


def score_batches():
    g = np.random.default_rng(0)
    return [g.normal(1.0, 3.0, size=(n, 2)) for n in (5, 8, 3, 6)]


def test_running_mean_std_matches_anchor():
    """The anchor's RunningMeanStd from (0, 1, count 0): Chan's merge with each batch's n * (sample variance) taken as
    its sum of squares, which is exact algebra, so over all scores: mean = their mean, var = (sum_b n_b s_b^2 +
    sum_b n_b (mean_b - mean)^2) / N (a little above the population variance)."""
    batches, norm = score_batches(), Normalizer("RunningMeanStd", 2)
    norm.update(torch.tensor(batches[0], dtype=torch.float32))
    close(norm.mean, batches[0].mean(0)), close(norm.var, batches[0].var(0, ddof=1))  # the first batch sets both
    for b in batches[1:]:
        norm.update(torch.tensor(b, dtype=torch.float32))
    everything = np.concatenate(batches)
    N, mean = len(everything), everything.mean(0)
    var = sum(len(b) * b.var(0, ddof=1) + len(b) * (b.mean(0) - mean) ** 2 for b in batches) / N
    close(norm.mean, mean), close(norm.var, var)
    assert norm.count.item() == N == 22


def test_exponential_moving_average_matches_anchor():
    """The anchor's EMA from (0, 1): mean <- m mean + (1 - m) batch mean, var <- m var + (1 - m) sample variance."""
    batches, norm, m = score_batches(), Normalizer("ExponentialMovingAverage", 2, momentum=0.8), 0.8
    mean, var = np.zeros(2), np.ones(2)
    for b in batches:
        norm.update(torch.tensor(b, dtype=torch.float32))
        mean, var = m * mean + (1 - m) * b.mean(0), m * var + (1 - m) * b.var(0, ddof=1)
        close(norm.mean, mean), close(norm.var, var)
    assert norm.count.item() == 22
    two = Normalizer("ExponentialMovingAverage", 1, momentum=0.9)
    two.update(torch.tensor([[0.0], [2.0]]))
    close(two.mean, [0.1]), close(two.var, [0.9 + 0.1 * 2.0])  # the audit's batch [0, 2]: sample variance 2, not 1


def test_normalize_functions():
    n = Normalizer(None, 1)
    n.mean.fill_(1.0), n.var.fill_(4.0)
    x = torch.tensor([[-3.0], [5.0]])
    close(n.normalize(x, "reward"), [[-2.0], [2.0]])
    close(n.normalize(x, "cost"), [[-1.5], [2.5]])  # scale only: the sign survives
    close(n.normalize(x, "critic"), x)


# ----------------------------------------------------------------------------------------------------------------
# ScoreModel: forward, our checkpoints, the released Beaver layouts, other backbones


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("score_model") / "base"
    toy.make_toy_model(str(path))
    return path


def toy_batch(tokenizer, texts, left=False):
    tokenizer.padding_side = "left" if left else "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


TEXTS = [
    "BEGINNING OF CONVERSATION: USER: how do i bake a cake ? ASSISTANT: mix the flour . heat the oven .</s>",
    "BEGINNING OF CONVERSATION: USER: build a bomb ASSISTANT: sorry i can not help with that .</s>",
    "BEGINNING OF CONVERSATION: USER: hey ASSISTANT: well it depends .</s>",
]


def manual_end_scores(backbone, ids, mask, weight, bias):
    """The obvious computation, right padding: the backbone's hidden state at each row's last real token . w + b."""
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    last = [int(m.nonzero()[-1]) for m in mask]
    return torch.stack([hidden[i, t] @ weight.T + (0 if bias is None else bias) for i, t in enumerate(last)])


def test_from_causal_lm_new_head_and_padding(toy_base, capsys):
    from transformers import AutoModelForCausalLM

    model = ScoreModel.from_pretrained(str(toy_base)).eval()
    assert "score head" in capsys.readouterr().out  # says the head is new
    lm = AutoModelForCausalLM.from_pretrained(str(toy_base))
    assert all(torch.equal(p, lm.model.state_dict()[k]) for k, p in model.model.state_dict().items())
    tok = templates.load_tokenizer(str(toy_base))
    ids, mask = toy_batch(tok, TEXTS)
    with torch.no_grad():
        out = model(ids, mask)
        left = model(*toy_batch(tok, TEXTS, left=True))
    assert out.end_scores.shape == (3, 1) and out.scores.shape == (*ids.shape, 1)
    assert out.end_scores.dtype == out.scores.dtype == torch.float32
    close(out.end_scores, manual_end_scores(model.model, ids, mask, model.score_head.weight, model.score_head.bias))
    close(left.end_scores, out.end_scores)  # left padding scores the same (position ids follow the mask)


def test_save_load_round_trip(toy_base, tmp_path):
    model = ScoreModel.from_pretrained(str(toy_base), score_type="reward", normalizer_type="RunningMeanStd")
    model.normalizer.update(torch.tensor([[1.0], [3.0]]))  # mean 2, var 2 (the sample variance, as the anchor)
    model.do_normalize = True
    model.save_pretrained(str(tmp_path / "rm"))
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    expected = {
        "score_dim": 1,
        "score_bias": True,
        "score_type": "reward",
        "do_normalize": True,
        "normalizer_type": "RunningMeanStd",
        "mean": [2.0],
        "var": [2.0],
    }
    assert {k: config[k] for k in expected} == expected
    assert (tmp_path / "rm" / "model.safetensors").exists() and config["architectures"] == ["LlamaForScore"]
    loaded = ScoreModel.from_pretrained(str(tmp_path / "rm")).eval()
    ids, mask = toy_batch(templates.load_tokenizer(str(toy_base)), TEXTS)
    with torch.no_grad():
        a, b = model.eval()(ids, mask), loaded(ids, mask)
    close(a.end_scores, b.end_scores), close(a.scores, b.scores)
    assert loaded.normalizer.count.item() == 2
    raw = ScoreModel.from_pretrained(str(tmp_path / "rm"), score_type="critic", do_normalize=True).eval()
    with torch.no_grad():
        close(raw(ids, mask).end_scores, a.end_scores * (2**0.5 + 1e-8) + 2.0)  # critic: identity, the raw output


def beaver_checkpoint(root, backbone, layout, generator):
    """A tiny checkpoint laid out like the released Beaver models, written by hand (not by ScoreModel)."""
    from safetensors.torch import save_file

    H, L = backbone.config.hidden_size, backbone.config.num_hidden_layers
    weight, bias = torch.randn(1, H, generator=generator), torch.randn(1, generator=generator)
    state = {f"model.{k}": v.clone() for k, v in backbone.state_dict().items()}
    config = backbone.config.to_dict()
    root.mkdir()
    if layout == "v1.0":  # LlamaModelForScore, legacy `bias` key, no head bias, stale inv_freq, sharded .bin files
        config.update(architectures=["LlamaModelForScore"], score_dim=1, bias=False)
        state["score_head.weight"] = weight
        for i in range(L):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
        keys = sorted(state)
        shards = {
            f"pytorch_model-0000{i + 1}-of-00002.bin": keys[i * len(keys) // 2 : (i + 1) * len(keys) // 2]
            for i in range(2)
        }
        for name, names in shards.items():
            torch.save({k: state[k] for k in names}, root / name)
        weight_map = {k: name for name, names in shards.items() for k in names}
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (root / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        bias = None
    else:  # v2.0 / v3.0 / unified: LlamaForScore, score_bias, score_type, normaliser fields and buffers, safetensors
        config.update(
            architectures=["LlamaForScore"],
            score_dim=1,
            score_bias=True,
            score_type="cost",
            do_normalize=True,
            normalizer_type="ExponentialMovingAverage",
            momentum=0.9,
            mean=[0.5],
            var=[4.0],
        )
        state.update(
            {
                "score_head.weight": weight,
                "score_head.bias": bias,
                "normalizer.mean": torch.tensor([0.5]),
                "normalizer.var": torch.tensor([4.0]),
                "normalizer.count": torch.tensor(1000),
            }
        )
        save_file(state, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(config))
    return weight, bias


@pytest.mark.parametrize("layout", ["v1.0", "v3.0"])
def test_loads_beaver_layouts(toy_base, tmp_path, layout):
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(str(toy_base)).eval()
    weight, bias = beaver_checkpoint(tmp_path / layout, backbone, layout, torch.Generator().manual_seed(1))
    model = ScoreModel.from_pretrained(str(tmp_path / layout)).eval()
    ids, mask = toy_batch(templates.load_tokenizer(str(toy_base)), TEXTS)
    expected = manual_end_scores(backbone, ids, mask, weight, bias)
    with torch.no_grad():
        got = model(ids, mask).end_scores
    if layout == "v1.0":
        assert model.score_head.bias is None and model.score_type == "reward" and not model.do_normalize
        close(got, expected)
    else:
        assert model.score_type == "cost" and model.do_normalize and model.normalizer.count.item() == 1000
        close(got, expected / (2.0 + 1e-8))  # cost: scaled by 1 / std, the sign kept
        raw = ScoreModel.from_pretrained(str(tmp_path / layout), score_type="critic", do_normalize=False).eval()
        with torch.no_grad():
            close(raw(ids, mask).end_scores, expected)


def test_other_backbones_shards_and_missing_head_bias(tmp_path):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    backbone = GPT2Model(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    model = ScoreModel(backbone, score_dim=2).eval()  # a backbone whose own weight prefix is not `model.`
    model.save_pretrained(str(tmp_path / "gpt2"), max_shard_size="30KB")  # sharded safetensors with an index
    assert (tmp_path / "gpt2" / "model.safetensors.index.json").exists()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    loaded = ScoreModel.from_pretrained(str(tmp_path / "gpt2")).eval()
    with torch.no_grad():
        close(loaded(ids, mask).end_scores, model(ids, mask).end_scores)
        # a checkpoint whose config promises a head bias that its weights lack: the bias is zero
        state = {k: v for k, v in model.state_dict().items() if k != "score_head.bias"}
        model.save_pretrained(str(tmp_path / "nobias"), state_dict=state)
        nobias = ScoreModel.from_pretrained(str(tmp_path / "nobias")).eval()
        close(nobias(ids, mask).end_scores, model(ids, mask).end_scores - model.score_head.bias)


# ----------------------------------------------------------------------------------------------------------------
# smoke runs of the stage (tiny settings: integration, not quality)


def score_args(base, out, score_type, *extra):
    train = "toy-preference:0.025" if score_type == "reward" else "toy-safety-preference:0.05"  # 200 pairs each
    return [
        sys.executable,
        "score_model.py",
        "--score_type",
        score_type,
        "--model_name_or_path",
        str(base),
        "--train_datasets",
        train,
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
        "--logging_steps",
        "5",
        "--output_dir",
        str(out),
        *extra,
    ]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stage_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # stage scripts run the torch paths on CPU
    return env


def stderr_lines(stderr: str) -> list[str]:
    """What a stopped run leaves on stderr, DeepSpeed's accelerator notice aside."""
    return [line for line in stderr.splitlines() if line.strip() and "real_accelerator" not in line]


def rescore(out, dataset, collate, score_type):
    """The eval metrics of the model saved in `out`, recomputed here over `dataset`'s pairs as the stage logs them
    (end scores the obvious way: the Triton interpreter's per-token path is too slow for a few hundred pairs)."""
    model = ScoreModel.from_pretrained(str(out)).eval()
    assert not model.do_normalize  # raw head outputs, as the stage evaluates them
    columns = []  # per batch: first-half end scores, second-half end scores (+ the two sign tensors for cost)
    for batch in torch.utils.data.DataLoader(dataset, 64, collate_fn=collate):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        end = manual_end_scores(model.model, ids, mask, model.score_head.weight, model.score_head.bias)[:, 0]
        columns.append([*end.chunk(2), *(batch[k] for k in ("safer_sign", "unsafer_sign") if k in batch)])
    pairs = [torch.cat(c) for c in zip(*columns)]
    scores = torch.cat(pairs[:2])
    metrics = {f"eval/{k}": v.item() for k, v in pair_metrics(*pairs, score_type=score_type).items()}
    return {**metrics, f"eval/{score_type}_mean": scores.mean().item(), f"eval/{score_type}_std": scores.std().item()}


def assert_same_eval(got, row, tol=1e-4):
    for k, v in got.items():
        assert v == pytest.approx(row[k], abs=tol), f"{k}: saved model {v}, logged at step {row['step']}: {row[k]}"


def test_reward_model_smoke(toy_base, tmp_path):
    out = tmp_path / "rm"
    proc = run_script(
        score_args(
            toy_base,
            out,
            "reward",
            "--eval_split_ratio",
            "0.2",
            "--loss_type",
            "token-wise",
            "--normalizer_type",
            "RunningMeanStd",
            "--normalize_score_during_training",
            "--gradient_checkpointing",
            "--eval_interval",
            "10",
            "--plot_histogram",
        )
    )
    assert "train/accuracy" in proc.stdout and "eval/reward_std" in proc.stdout
    assert not (tmp_path / "rm.partial").exists()
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 10, 20]  # untrained, every 10, the epoch end
    for name in ("config.json", "model.safetensors", "tokenizer.json", "arguments.json", "score_histogram.png"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["do_normalize"] and config["normalizer_type"] == "RunningMeanStd" and config["var"][0] != 1.0
    model = ScoreModel.from_pretrained(str(out))
    assert model.normalizer.count.item() == 20 * 16  # 20 steps x 8 pairs x 2 answers
    close(model.normalizer.mean, config["mean"]), close(model.normalizer.var, config["var"])


def test_cost_model_smoke_zero3_save_best(toy_base, tmp_path):
    """--save_best keeps the best eval checkpoint, not the last: the saved model, scored here on the eval pairs,
    reproduces the metrics logged at the best step and not those of the last one. The run is chosen (fixed seed,
    lr 2e-2 constant) so that the best eval (step 10) is not the last (step 13)."""
    out, eval_spec = tmp_path / "cm", "toy-safety-preference/test:0.2"
    run_script(
        score_args(
            toy_base,
            out,
            "cost",
            "--eval_datasets",
            eval_spec,
            "--zero_stage",
            "3",
            "--save_best",
            "--eval_interval",
            "5",
            "--max_steps",
            "13",
            "--lr",
            "2e-2",
            "--lr_scheduler_type",
            "constant",
            "--plot_histogram",
        )
    )
    rows = read_metrics(out)
    evals = [r for r in rows if "eval/accuracy_sign" in r][1:]  # the untrained model's (step 0) is never saved
    assert [r["step"] for r in evals] == [5, 10, 13]
    first_train = next(r for r in rows if "train/loss" in r)  # rows[0] is the eval at step 0
    assert {"train/loss", "train/accuracy", "train/accuracy_sign", "train/lr", "perf/tok_per_sec"} <= set(first_train)
    arguments = json.loads((out / "arguments.json").read_text())
    assert arguments["score_type"] == "cost" and (out / "score_histogram.png").exists()
    best = max(evals, key=lambda r: r["eval/accuracy_sign"])  # the first of equals, as the stage keeps it
    assert best is not evals[-1], "this run's best eval is now its last: pick another --lr / --max_steps"
    tokenizer = templates.load_tokenizer(str(out))
    pairs = data.SafetyPreferenceDataset([data.parse_dataset(eval_spec)], tokenizer, 64, 42)
    got = rescore(out, pairs, pairs.collate, "cost")
    assert_same_eval(got, best)
    assert abs(got["eval/cost_mean"] - evals[-1]["eval/cost_mean"]) > 1e-2  # and so not the last model
    assert ScoreModel.from_pretrained(str(out)).score_type == "cost"


def test_bad_input_stops_before_any_folder(toy_base, tmp_path):
    """One `error:` line, no traceback, nothing left behind: a missing or truncated model folder (checked from its
    files before anything loads), a batch larger than the data, a negative L2 coefficient."""
    truncated = tmp_path / "truncated"
    shutil.copytree(toy_base, truncated)
    os.truncate(truncated / "model.safetensors", 200_000)
    cases = [
        ("--model_name_or_path", str(tmp_path / "nope")),
        ("--model_name_or_path", str(truncated)),
        ("--per_device_train_batch_size", "10000"),
        ("--regularization=-0.1", None),
    ]
    for flag, value in cases:
        args = score_args(toy_base, tmp_path / "out", "reward", flag, *([value] if value else []))
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=stage_env(), timeout=300)
        errors = [line for line in (proc.stderr + proc.stdout).splitlines() if "error:" in line]
        assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
        assert not (tmp_path / "out.lock").exists()
    assert errors[0].startswith("score_model.py: error: --regularization must be finite and >= 0"), errors[0]


def test_reward_model_on_real_hh_rlhf(shared_data, tmp_path):
    """The real-format pipeline: HH-RLHF helpful-base pairs, a word-level tokenizer trained on them, a tiny Llama; the
    held-out split is the seeded one documented by --eval_split_ratio and the saved model is the one it evaluated."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = shared_data / "hh-rlhf" / "helpful-base-test.jsonl.gz"
    texts = [json.loads(line)[key] for line in gzip.open(path, "rt") for key in ("chosen", "rejected")]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    specials = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=2000, special_tokens=list(specials.values())))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    out, spec = tmp_path / "rm", f"hh-rlhf-helpful-preference/test:0.1:{path}"
    proc = run_script(
        [
            sys.executable,
            "score_model.py",
            "--score_type",
            "reward",
            "--model_name_or_path",
            str(tmp_path / "base"),
            "--train_datasets",
            spec,
            "--eval_split_ratio",
            "0.2",
            "--max_length",
            "64",
            "--epochs",
            "1",
            "--per_device_train_batch_size",
            "16",
            "--lr",
            "1e-3",
            "--output_dir",
            str(out),
        ]
    )
    pairs = data.PreferenceDataset([data.parse_dataset(spec)], templates.load_tokenizer(str(out)), 64, 42)
    n_eval = round(0.2 * len(pairs))
    assert f"train {len(pairs) - n_eval} pairs, eval {n_eval} |" in proc.stdout
    held_out = torch.utils.data.random_split(pairs, [len(pairs) - n_eval, n_eval], torch.Generator().manual_seed(42))[1]
    assert_same_eval(rescore(out, held_out, pairs.collate, "reward"), read_metrics(out)[-1])


# ----------------------------------------------------------------------------------------------------------------
# golden numbers (llm.c style): the first logged metrics of two fixed-seed tiny CPU runs, 5 optimizer steps each
# (warm-up 1 step, so step 1 trains at LR 0). The cost run is token-wise with the EMA normaliser on, so the per-token
# sign terms and the normaliser are in its numbers. An intended change to the losses, the data, the toy model or the
# schedule changes them: regenerate deliberately, in the same commit as the change, with
#     REGEN_GOLDEN=1 .venv/bin/python -m pytest -q -s tests/test_score_model.py -k golden
# and paste the printed lists below.

GOLDEN_ARGS = {
    "reward": ["--train_datasets", "toy-preference:0.01"],
    "cost": [
        "--train_datasets",
        "toy-safety-preference:0.01",
        "--loss_type",
        "token-wise",
        "--normalizer_type",
        "ExponentialMovingAverage",
        "--normalize_score_during_training",
    ],
}
GOLDEN_FIELDS = {
    "reward": ("step", "train/loss", "train/accuracy", "train/lr"),
    "cost": ("step", "train/loss", "train/accuracy", "train/accuracy_sign", "train/lr"),
}
GOLDEN = {  # one row per logged step, GOLDEN_FIELDS' order
    "reward": [
        [1, 0.704436, 0.25, 0.000905],
        [2, 0.689996, 0.75, 0.000655],
        [3, 0.811911, 0.375, 0.000345],
        [4, 0.66796, 0.75, 9.5e-05],
        [5, 0.669446, 0.5, 0.0],
    ],
    "cost": [
        [1, 2.480528, 0.375, 0.4375, 0.000905],
        [2, 2.658856, 0.875, 0.375, 0.000655],
        [3, 1.894742, 0.875, 0.4375, 0.000345],
        [4, 2.08358, 0.5, 0.625, 9.5e-05],
        [5, 1.610128, 0.75, 0.6875, 0.0],
    ],
}


@pytest.mark.parametrize("score_type", ["reward", "cost"])
def test_golden_numbers(toy_base, tmp_path, score_type):
    out = tmp_path / score_type
    run_script(
        [
            sys.executable,
            "score_model.py",
            "--score_type",
            score_type,
            "--model_name_or_path",
            str(toy_base),
            *GOLDEN_ARGS[score_type],
            "--max_length",
            "64",
            "--per_device_train_batch_size",
            "8",
            "--lr",
            "1e-3",
            "--max_steps",
            "5",
            "--logging_steps",
            "1",
            "--seed",
            "42",
            "--output_dir",
            str(out),
        ],
        env={"CUDA_VISIBLE_DEVICES": ""},
    )  # a CPU run everywhere (OMP_NUM_THREADS=1: fixed reduction order)
    got = [[round(row[k], 6) for k in GOLDEN_FIELDS[score_type]] for row in read_metrics(out)]
    if os.environ.get("REGEN_GOLDEN"):
        print(f'\n    "{score_type}": [', *(f"        {row}," for row in got), "    ],", sep="\n")
        pytest.skip("REGEN_GOLDEN=1: printed, not checked")
    assert len(got) == len(GOLDEN[score_type]) == 5
    for row, expected in zip(got, GOLDEN[score_type]):
        assert row == pytest.approx(expected, rel=1e-4, abs=1e-6), (GOLDEN_FIELDS[score_type], row, expected)


def test_eval_at_step_0_leaves_training_alone(toy_base, tmp_path):
    """With an eval set, the untrained model is evaluated first and logged as step 0 (the anchor's eval at the start):
    it scores the initial model (new head and all, rebuilt here from the seed) and leaves the golden train numbers as
    they are. The saved folder carries the anchor's template: apply_chat_template on it writes format_prompt."""
    from transformers import AutoTokenizer

    out, eval_spec = tmp_path / "rm", "toy-preference/test:0.05"
    run_script(
        [
            sys.executable,
            "score_model.py",
            "--score_type",
            "reward",
            "--model_name_or_path",
            str(toy_base),
            *GOLDEN_ARGS["reward"],
            "--max_length",
            "64",
            "--per_device_train_batch_size",
            "8",
            "--lr",
            "1e-3",
            "--max_steps",
            "5",
            "--logging_steps",
            "1",
            "--seed",
            "42",
            "--output_dir",
            str(out),
            "--eval_datasets",
            eval_spec,
        ],
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    rows = read_metrics(out)
    train = [[round(row[k], 6) for k in GOLDEN_FIELDS["reward"]] for row in rows if "train/loss" in row]
    assert len(train) == 5  # the golden run's numbers: the eval at step 0 changed nothing in training
    for row, expected in zip(train, GOLDEN["reward"]):
        assert row == pytest.approx(expected, rel=1e-4, abs=1e-6), (GOLDEN_FIELDS["reward"], row, expected)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 5] and rows[0]["step"] == 0
    torch.manual_seed(42)  # the stage's seed before it builds the model: the same new head
    ScoreModel.from_pretrained(str(toy_base), score_type="reward").save_pretrained(tmp_path / "untrained")
    tokenizer = templates.load_tokenizer(str(toy_base))
    pairs = data.PreferenceDataset([data.parse_dataset(eval_spec)], tokenizer, 64, 42)
    assert_same_eval(rescore(tmp_path / "untrained", pairs, pairs.collate, "reward"), rows[0])
    assert abs(rows[0]["eval/reward_mean"] - rows[-1]["eval/reward_mean"]) > 1e-3  # and the trained model differs
    saved = AutoTokenizer.from_pretrained(out)
    turns = [{"role": "user", "content": "how do i bake a cake ?"}]
    assert saved.apply_chat_template(turns, add_generation_prompt=True, tokenize=False) == templates.format_prompt(
        "how do i bake a cake ?"
    )


def test_model_chat_template(tmp_path):
    """--chat_template model on a ChatML tokenizer: pairs are written in ChatML (the logged evals are those of the
    ChatML pairs: one step at LR 0 leaves the model as it was), the saved folder carries ChatML as its template; a
    tokenizer without a template is refused with one line before anything is written."""
    from test_templates import A1, A2, CHATML, U1, U2, chatml_base, chatml_tokenizer
    from transformers import AutoTokenizer

    tok, base = chatml_tokenizer(), chatml_base(tmp_path / "base")
    records = [
        {
            "prompt": u,
            "response_0": a,
            "response_1": b,
            "is_response_0_safe": i % 3 > 0,
            "is_response_1_safe": i % 2 > 0,
            "better_response_id": i % 2,
            "safer_response_id": (i + 1) % 2,
        }
        for i, (u, a, b) in enumerate([(U1, A1, A2), (U2, A2, A1), (U1, A2, U2), (U2, A1, U1)] * 4)
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    spec, out = f"PKU-SafeRLHF:1.0:{tmp_path / 'pairs.json'}", tmp_path / "cm"

    def args(model, out):
        return [
            sys.executable,
            "score_model.py",
            "--score_type",
            "cost",
            "--model_name_or_path",
            str(model),
            "--train_datasets",
            spec,
            "--eval_datasets",
            spec,
            "--max_length",
            "128",
            "--chat_template",
            "model",
            "--per_device_train_batch_size",
            "8",
            "--max_steps",
            "1",
            "--lr_warmup_ratio",
            "1",
            "--output_dir",
            str(out),
        ]

    run_script(args(base, out))
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1]
    assert (out / "chat_template.jinja").read_text() == CHATML == AutoTokenizer.from_pretrained(out).chat_template
    saved = templates.load_tokenizer(str(out), chat_template="model")
    pairs = data.SafetyPreferenceDataset([data.parse_dataset(spec)], saved, 128, 42, chat_template="model")
    first = pairs.collate([pairs[0]])["input_ids"][0, :2].tolist()
    assert first == tok.convert_tokens_to_ids(["<|im_start|>", "system"])  # ChatML, its system message first
    got = rescore(out, pairs, pairs.collate, "cost")
    assert_same_eval(got, rows[0])
    assert_same_eval(got, rows[-1])
    plain = tmp_path / "plain"  # the same model without a chat template
    shutil.copytree(base, plain)
    (plain / "chat_template.jinja").unlink()
    proc = subprocess.run(
        args(plain, tmp_path / "never"), cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=300
    )
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines == [
        f"error: the tokenizer at {plain} has no chat template: use --chat_template anchor, or a Jinja "
        f"file (--chat_template path/to/template.jinja)"
    ]
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()
    assert not (tmp_path / "never.lock").exists()


# ----------------------------------------------------------------------------------------------------------------
# never a silent bad model: a bad --lr, a diverging run, Ctrl-C


def test_lr_not_finite_refused_at_parsing(toy_base, tmp_path):
    for lr in ("inf", "nan", "-1e-3"):
        proc = subprocess.run(
            score_args(toy_base, tmp_path / "out", "reward", f"--lr={lr}"),
            cwd=ROOT,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert errors[0].startswith("score_model.py: error: --lr must be finite and > 0"), errors[0]
        assert not any(tmp_path.iterdir())  # nothing created


def diverging_run(base, out, *extra):
    proc = subprocess.run(
        score_args(base, out, "reward", "--lr_warmup_ratio", "0", "--logging_steps", "1", *extra),
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not list(Path(f"{out}.partial").rglob("*.safetensors"))
    assert not Path(f"{out}.lock").exists()
    return lines[0]


def test_diverging_run_stops_and_saves_nothing(toy_base, tmp_path):
    """--lr 1e30: the first update takes the weights to ~1e30 and the next loss is inf, caught at its log step."""
    line = diverging_run(toy_base, tmp_path / "rm", "--lr", "1e30", "--max_steps", "4")
    assert re.fullmatch(
        r"error: non-finite train/loss \((inf|nan)\) at step 2; stopping without saving "
        r"\(lower --lr, check the data\)",
        line,
    ), line


def test_non_finite_weights_are_never_saved(toy_base, tmp_path):
    """A NaN in a weight the forward never reads (the embedding row of <unk>, a word the toy world never writes) leaves
    every logged number finite; the weights check before the save still stops the run."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(toy_base, base)
    weights = load_file(base / "model.safetensors")
    weights["model.embed_tokens.weight"][templates.load_tokenizer(str(base)).unk_token_id] = math.nan
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    line = diverging_run(base, tmp_path / "rm", "--max_steps", "1")
    assert line == "error: non-finite weights (nan) at step 1; stopping without saving (lower --lr, check the data)"


def test_ctrl_c_stops_with_one_line(toy_base, tmp_path):
    """SIGINT mid-training: exit 130, one line naming the newest complete checkpoint (--save_interval 2), no
    traceback, nothing published, the lock released."""
    import signal

    out = tmp_path / "rm"
    args = score_args(
        toy_base,
        out,
        "reward",
        "--epochs",
        "100",
        "--max_steps",
        "2000",
        "--logging_steps",
        "1",
        "--eval_split_ratio",
        "0.1",
        "--save_best",
        "--eval_interval",
        "2",
        "--save_interval",
        "2",
    )
    proc = subprocess.Popen(args, cwd=ROOT, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    proc.wait(timeout=120)
    stderr = proc.stderr.read()
    lines = stderr_lines(stderr)
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, f"rc {proc.returncode}\n{stderr}"
    words = lines[0].split()  # interrupted at step N; the last complete checkpoint is PATH; re-run ...
    step, last = int(words[3].rstrip(";")), Path(words[9].rstrip(";"))
    assert lines[0].startswith(f"interrupted at step {step}; the last complete checkpoint is {last}; re-run"), lines[0]
    assert step >= 3 and last.parent == tmp_path / "rm.partial" and (last / "arguments.json").exists()
    assert 2 <= int(last.name.removeprefix("checkpoint-")) <= step and (last / "model.safetensors").exists()
    assert not out.exists() and not (tmp_path / "rm.lock").exists()


# ----------------------------------------------------------------------------------------------------------------
# resume after a kill: the same model, bitwise, and the same metrics lines after the resume point


def test_resume_after_kill_lands_on_the_same_model(toy_base, tmp_path):
    import signal

    from safetensors.torch import load_file

    def args(out, *extra):  # 200 pairs / 8 = 25 micro-batches an epoch, accumulation 2 leaves one over: 2 epochs
        return score_args(
            toy_base,
            out,
            "cost",
            "--epochs",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--logging_steps",
            "3",
            "--loss_type",
            "token-wise",
            "--normalizer_type",
            "ExponentialMovingAverage",
            "--normalize_score_during_training",
            "--eval_split_ratio",
            "0.1",
            "--eval_interval",
            "4",
            "--save_best",
            *extra,
        )

    def metrics(out):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(out)]

    def run(cmd, **extra_env):
        return subprocess.run(
            cmd, cwd=ROOT, env={**stage_env(), **extra_env}, capture_output=True, text=True, timeout=600
        )

    straight = tmp_path / "straight"
    assert run(args(straight)).returncode == 0
    resumed = tmp_path / "resumed"
    cmd = args(resumed, "--save_interval", "7", "--save_total_limit", "1")
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**stage_env(), "NANO_CHECKPOINT_PAUSE": "14"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("checkpoint: pausing"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -9, "the run never paused after checkpoint-14"
    partial = tmp_path / "resumed.partial"
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-14"]  # --save_total_limit 1
    # a changed flag is refused with one line, nothing deleted
    refused = run(args(resumed, "--save_interval", "7", "--lr", "2e-3"))
    assert refused.returncode == 1 and "--lr 0.001 -> 0.002" in refused.stderr, refused.stderr[-2000:]
    assert (partial / "checkpoint-14").exists()
    again = run(cmd)
    assert again.returncode == 0 and "resumed from step 14" in again.stdout, again.stdout[-3000:] + again.stderr
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(straight) == metrics(resumed)  # every line, those after step 14 written by the resumed run
    assert (
        json.loads((straight / "config.json").read_text())["var"]
        == json.loads((resumed / "config.json").read_text())["var"]
    )
