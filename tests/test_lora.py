"""LoRA (lora.py) in every stage: the merge against peft's own, the switched-off adapter against the model it was built
from (PPO's reference and frozen score models), then the stages as users run them on the toy world (merged and
adapter-only saves, ZeRO-0 and ZeRO-3, resume after a kill, bad input), and the Safe RLHF headline with a LoRA actor
and LoRA critics (slow: RUN_SLOW=1)."""

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import lora
import templates
from checkpoint import check_model_folder
from conftest import ROOT, run_script, signal_at, stage_env
from lora import adapter_off
from models import ScoreModel
from toy import make_toy_model

PY = sys.executable


def lora_args(rank=4, prefix="", targets=("all-linear",)):
    return argparse.Namespace(
        **{
            f"{prefix}lora_rank": rank,
            f"{prefix}lora_alpha": 8.0,
            f"{prefix}lora_dropout": 0.0,
            f"{prefix}lora_target_modules": list(targets),
        }
    )


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy base model, and reward / cost models on it with random heads (as in test_ppo_lag.py)."""
    root = tmp_path_factory.mktemp("lora")
    make_toy_model(str(root / "base"))
    tokenizer = templates.load_tokenizer(str(root / "base"))
    for seed, (name, score_type) in enumerate((("rm", "reward"), ("cm", "cost"))):
        torch.manual_seed(seed)
        model = ScoreModel.from_pretrained(str(root / "base"), score_type=score_type)
        model.save_pretrained(str(root / name))
        tokenizer.save_pretrained(str(root / name))
    return root


def load_lm(path):
    from transformers import AutoModelForCausalLM

    return lora.from_pretrained(AutoModelForCausalLM.from_pretrained, str(path))


def assert_low_rank_update(before: dict, after: dict, rank: int):
    """Only the adapted linear layers moved, each by a matrix of rank <= `rank`; embeddings, norms, lm_head did not."""
    assert before.keys() == after.keys()
    moved = 0
    for key, w in before.items():
        delta = (after[key].double() - w.double()).squeeze()
        if key.endswith("proj.weight"):
            assert torch.linalg.matrix_rank(delta, atol=1e-6).item() <= rank, key
            moved += bool(delta.abs().max() > 0)
        else:
            assert torch.equal(after[key], w), key
    assert moved == 14, moved  # every one of the 7 linear layers of both blocks


# ----------------------------------------------------------------------------------------------------------------
# In process: the merge, and the adapter switched off


def gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "score"])
def test_merged_state_dict_is_peft_merge(toy, tmp_path, kind):
    """lora.merged_state_dict (what a merged save writes, also under ZeRO-3) against peft's merge_and_unload: LoRA on
    nn.Linear, on GPT-2's transposed Conv1D, and on a score model whose head is trained as a copy."""
    if kind == "score":
        model, extra = ScoreModel.from_pretrained(str(toy / "rm")), ["score_head"]
    else:
        model, extra = (load_lm(toy / "base") if kind == "llama" else gpt2(tmp_path)), None
    model = lora.add_lora(model, lora_args(), "", str(toy / "base"), modules_to_save=extra)
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at the start would make any merge right: give every adapter and head copy a value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ours = lora.merged_state_dict(model, model.state_dict())
    theirs = copy.deepcopy(model).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
    for key, w in model.state_dict().items():  # and it did fold something in: every adapted weight moved
        if key.endswith(".base_layer.weight"):
            assert not torch.allclose(ours[key.removeprefix(lora.PEFT_PREFIX).replace(".base_layer.", ".")], w), key


def train_steps(model, loss_fn, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def test_adapter_off_is_the_model_it_was_built_from(toy):
    """After training, the actor with its adapter off gives the base model's log-probs (PPO's reference), and each
    critic with its adapter off gives its score model's scores, normalised or not (PPO's frozen score models); only
    adapter and head-copy parameters moved."""
    torch.manual_seed(0)
    ids = torch.randint(4, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0

    base = load_lm(toy / "base")
    frozen = copy.deepcopy(base).eval()
    actor = lora.add_lora(base, lora_args(), "", str(toy / "base"))
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    train_steps(actor, lambda: actor(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean())
    moved = {n for n, p in actor.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved), moved
    ref = adapter_off(actor, actor)
    with torch.no_grad():
        expected = frozen(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(ref(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6)
        assert not torch.allclose(actor(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-3)

    score_model = ScoreModel.from_pretrained(str(toy / "cm"), score_type="cost", do_normalize=False)
    score_model.normalizer.mean.fill_(0.5), score_model.normalizer.var.fill_(4.0)  # statistics that change scores
    frozen = copy.deepcopy(score_model).eval()
    critic = lora.add_lora(score_model, lora_args(), "", str(toy / "cm"), modules_to_save=["score_head"])
    before = {n: p.detach().clone() for n, p in critic.named_parameters()}
    train_steps(critic, lambda: (critic(ids, mask).scores - 3.0).square().mean())  # a value loss
    moved = {n for n, p in critic.named_parameters() if not torch.equal(p, before[n])}
    assert any("score_head.modules_to_save" in n for n in moved), moved
    assert all(".lora_" in n or "score_head.modules_to_save" in n for n in moved), moved
    with torch.no_grad():
        for normalize in (False, True):
            frozen.do_normalize = normalize
            expected = frozen(ids, mask)
            got = adapter_off(critic, critic, normalize)(ids, mask)
            assert torch.allclose(got.end_scores, expected.end_scores, atol=1e-6), normalize
            assert torch.allclose(got.scores, expected.scores, atol=1e-6), normalize
        frozen.do_normalize = False
        assert not torch.allclose(critic(ids, mask).end_scores, frozen(ids, mask).end_scores, atol=1e-3)


def test_bad_flags_and_adapter_folders(toy, tmp_path):
    parser = argparse.ArgumentParser()
    lora.add_arguments(parser, "actor_")
    for flags in (["--actor_lora_rank", "-1"], ["--actor_lora_alpha", "0"], ["--actor_lora_dropout", "1"]):
        with pytest.raises(SystemExit):
            lora.check_arguments(parser, parser.parse_args(flags), "actor_")
    lora.check_arguments(parser, parser.parse_args(["--actor_lora_rank", "8"]), "actor_")
    with pytest.raises(SystemExit, match="q_prj: no such linear layer in LlamaForCausalLM; it has down_proj"):
        lora.add_lora(load_lm(toy / "base"), lora_args(targets=["q_prj"]), "", str(toy / "base"))

    # an adapter folder whose base is gone, or whose weights are cut, stops with one line naming the fault
    adapter = tmp_path / "adapter"
    model = lora.add_lora(load_lm(toy / "base"), lora_args(), "", str(toy / "base"))
    lora.save_pretrained(model, adapter, adapter_only=True)
    templates.load_tokenizer(str(toy / "base")).save_pretrained(adapter)
    check_model_folder(str(adapter), "causal_lm", "--x")
    with pytest.raises(SystemExit, match="is a causal LM's LoRA adapter, with no score head"):
        check_model_folder(str(adapter), "score_model", "--reward_model_name_or_path")
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=f"--x {moved} is a LoRA adapter; its base model {tmp_path / 'gone'} is not"):
        check_model_folder(str(moved), "causal_lm", "--x")
    weights = moved / "adapter_model.safetensors"
    weights.write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:-100])
    with pytest.raises(SystemExit, match="adapter_model.safetensors is truncated"):
        check_model_folder(str(moved), "causal_lm", "--x")


# ----------------------------------------------------------------------------------------------------------------
# The stages on the toy world


def sft_args(base, out, *extra):
    flags = (
        "--train_datasets toy-sft:0.02 --max_length 48 --epochs 1 --per_device_train_batch_size 8 "
        "--gradient_accumulation_steps 1 --lr 3e-3 --lr_scheduler_type constant --lr_warmup_ratio 0 --max_steps 4"
    )
    return [PY, "sft.py", "--model_name_or_path", str(base), *flags.split(), "--output_dir", str(out), *extra]


def test_lora_sft(toy, tmp_path):
    """Merged and adapter-only saves of the same run are the same model; only the adapted layers moved, by rank-r
    updates; the output generates and chats; SFT from an adapter folder trains every weight again."""
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    run_script(sft_args(toy / "base", merged, "--lora_rank", "4"), cwd=ROOT)
    run_script(sft_args(toy / "base", adapter, "--lora_rank", "4", "--save_adapter_only"), cwd=ROOT)
    assert not (adapter / "model.safetensors").exists() and (adapter / "adapter_model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(toy / "base")
    base, model = load_lm(toy / "base").state_dict(), load_lm(merged)
    assert_low_rank_update(base, model.state_dict(), rank=4)
    via_adapter = load_lm(adapter)
    for key, value in model.state_dict().items():
        assert torch.allclose(via_adapter.state_dict()[key], value, atol=1e-6), key
    assert all(p.requires_grad for p in via_adapter.parameters())  # loaded as any model: a stage decides what trains
    tok = templates.load_tokenizer(str(merged), padding_side="left")
    prompt = tok([templates.format_prompt("how do i bake a cake ?")], return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    chat = run_script(
        [PY, "chat.py", "--model_name_or_path", str(adapter), "-p", "how do i bake a cake ?", "--max_new_tokens", "6"],
        cwd=ROOT,
    )
    assert chat.stdout.strip()
    # full fine-tuning from the adapter folder: its base + adapter, every weight trainable (embeddings move too)
    full = tmp_path / "full"
    run_script(sft_args(adapter, full, "--max_steps", "1"), cwd=ROOT)
    after = load_lm(full).state_dict()
    assert not torch.equal(after["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def score_args(base, out, *extra):
    flags = (
        "--score_type cost --train_datasets toy-safety-preference:0.02 --eval_datasets "
        "toy-safety-preference/test:0.05 --max_length 48 --epochs 1 --per_device_train_batch_size 8 "
        "--lr 3e-3 --max_steps 4 --normalizer_type ExponentialMovingAverage --normalize_score_during_training"
    )
    return [PY, "score_model.py", "--model_name_or_path", str(base), *flags.split(), "--output_dir", str(out), *extra]


def test_lora_score_model(toy, tmp_path):
    """A LoRA cost model (new head, normaliser on): merged and adapter-only saves load as the same ScoreModel, with
    the trained head and the normaliser's statistics; the backbone moved by rank-r updates only."""
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    run_script(score_args(toy / "base", merged, "--lora_rank", "4"), cwd=ROOT)
    run_script(score_args(toy / "base", adapter, "--lora_rank", "4", "--save_adapter_only"), cwd=ROOT)
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    check_model_folder(str(adapter), "score_model", "--cost_model_name_or_path")
    with pytest.raises(SystemExit, match="is a score model's LoRA adapter, not a causal LM's"):
        check_model_folder(str(adapter), "causal_lm", "--actor_model_name_or_path")
    a, b = ScoreModel.from_pretrained(str(merged)), ScoreModel.from_pretrained(str(adapter))
    assert (a.score_type, a.do_normalize, b.score_type, b.do_normalize) == ("cost", True, "cost", True)
    assert a.normalizer.normalizer_type == b.normalizer.normalizer_type == "ExponentialMovingAverage"
    assert a.normalizer.mean.abs().item() > 0 and torch.allclose(a.normalizer.var, b.normalizer.var)
    state_a, state_b = a.state_dict(), b.state_dict()
    for key in state_a:
        if key != "normalizer.count":  # an adapter folder keeps mean and var (config.json), not the count
            assert torch.allclose(state_a[key], state_b[key], atol=1e-6), key
    base = load_lm(toy / "base").state_dict()  # the backbone's keys are the causal LM's: model.*
    backbone = {k: v for k, v in state_a.items() if k.startswith("model.")}
    assert_low_rank_update({k: base[k] for k in backbone}, backbone, rank=4)
    ids = torch.randint(4, 100, (2, 7))
    assert torch.allclose(a(ids, torch.ones_like(ids)).end_scores, b(ids, torch.ones_like(ids)).end_scores, atol=1e-5)


def ppo_args(root, out, *extra):
    flags = (
        "--train_datasets toy-prompts:0.02 --eval_datasets toy-eval:0.05 --max_length 48 --max_steps 2 "
        "--per_device_prompt_batch_size 4 --per_device_train_batch_size 2 --actor_lr 1e-3 --critic_lr 1e-3"
    )
    return [
        PY,
        "ppo_lag.py",
        "--actor_model_name_or_path",
        str(root / "base"),
        "--reward_model_name_or_path",
        str(root / "rm"),
        *flags.split(),
        "--output_dir",
        str(out),
        *extra,
    ]


def train_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/actor" in r]


def test_lora_ppo_lag(toy, tmp_path):
    """PPO-Lag with a LoRA actor and LoRA critics loads three backbones, not six; the reference is the actor with
    its adapter off (KL exactly 0 before the first update, > 0 after); only rank-r updates reach the saved actor;
    ZeRO-3 with gradient checkpointing gives the same numbers and an adapter folder that loads as the merged model;
    so does --fused_logprobs."""
    lag = ["--cost_model_name_or_path", str(toy / "cm"), "--actor_lora_rank", "4", "--critic_lora_rank", "4"]
    z0, z3 = tmp_path / "z0", tmp_path / "z3"
    proc = run_script(ppo_args(toy, z0, *lag), cwd=ROOT)
    assert "3 backbones: actor + ref, reward_model + reward_critic, cost_model + cost_critic" in proc.stdout
    rows = train_rows(z0)
    assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0.0, [r["train/kl"] for r in rows]
    assert rows[0]["train/lambda"] != 1.0 and "eval/oracle_harmful_rate" in proc.stdout
    assert_low_rank_update(load_lm(toy / "base").state_dict(), load_lm(z0).state_dict(), rank=4)
    run_script(
        ppo_args(
            toy,
            z3,
            *lag,
            "--zero_stage",
            "3",
            "--actor_gradient_checkpointing",
            "--critic_gradient_checkpointing",
            "--save_adapter_only",
        ),
        cwd=ROOT,
        timeout=300,
    )
    for a, b in zip(rows, train_rows(z3), strict=True):
        for key in ("train/reward", "train/cost", "train/kl", "loss/actor", "loss/reward_critic", "loss/cost_critic"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert (z3 / "adapter_config.json").exists() and not (z3 / "model.safetensors").exists()
    fused = tmp_path / "fused"  # log-probs from hidden states: the reference's with the actor's adapter off
    run_script(ppo_args(toy, fused, *lag, "--fused_logprobs"), cwd=ROOT)
    for a, b in zip(rows, train_rows(fused), strict=True):
        for key in ("train/reward", "train/kl", "loss/actor", "loss/reward_critic"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    merged, via_adapter = load_lm(z0).state_dict(), load_lm(z3).state_dict()
    for key, value in merged.items():
        assert torch.allclose(via_adapter[key], value, atol=1e-5), key


def test_lora_critics_score_with_the_frozen_models(toy, tmp_path):
    """With a full actor, LoRA critics change only the critics: the actor's first update does not read the values'
    training, so the second rollout is the same sequences as with full critics, and its reward and cost (from the
    critics' backbones with the adapters off and the original heads) must be the same numbers."""
    lag = ["--cost_model_name_or_path", str(toy / "cm"), "--max_steps", "2"]
    run_script(ppo_args(toy, tmp_path / "full", *lag), cwd=ROOT)
    run_script(ppo_args(toy, tmp_path / "lora", *lag, "--critic_lora_rank", "4"), cwd=ROOT)
    full, shared = train_rows(tmp_path / "full"), train_rows(tmp_path / "lora")
    assert shared[1]["loss/reward_critic"] != pytest.approx(full[1]["loss/reward_critic"], rel=1e-3)  # other critics
    for key in ("train/reward", "train/cost", "train/kl", "train/lambda"):
        assert [r[key] for r in shared] == pytest.approx([r[key] for r in full], rel=1e-5, abs=1e-6), key


def test_lora_ppo_lag_resume_after_kill_is_bitwise(toy, tmp_path):
    """A LoRA PPO-Lag run (actor and critics, dropout in every adapter) SIGKILLed right after its checkpoint at
    rollout 1 and run again ends on the uninterrupted run's weights, bitwise, with the same metrics after the resume:
    the reference and the frozen score models are the trained engines with their adapters off, so what the checkpoint
    restores into them (frozen backbones, heads, normaliser buffers) must be what they were loaded as."""
    lag = [
        "--cost_model_name_or_path",
        str(toy / "cm"),
        "--actor_lora_rank",
        "4",
        "--critic_lora_rank",
        "4",
        "--actor_lora_dropout",
        "0.1",
        "--critic_lora_dropout",
        "0.1",
    ]
    full, out = tmp_path / "full", tmp_path / "resumed"
    start = lambda args, **env: subprocess.Popen(
        args,
        cwd=ROOT,
        env=stage_env(**env),
        text=True,  # noqa: E731
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # both save checkpoint-1: writing one (the merged actor) must not touch the live weights of a run that goes on
    uninterrupted = start(ppo_args(toy, full, *lag, "--save_interval", "1"))
    killed = start(ppo_args(toy, out, *lag, "--save_interval", "1"), NANO_CHECKPOINT_PAUSE="1")
    rest, err = signal_at(killed, "checkpoint: pausing", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, f"the run never paused after its checkpoint:\n{rest[-2000:]}{err}"
    _, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err[-3000:]
    ckpt = tmp_path / "resumed.partial" / "checkpoint-1"
    assert {p.name for p in (ckpt / "deepspeed").iterdir()} == {"actor", "reward_critic", "cost_critic"}
    check_model_folder(str(ckpt), "causal_lm")  # the intermediate actor: merged, as the final save
    proc = run_script(ppo_args(toy, out, *lag, "--save_interval", "1"), cwd=ROOT)
    assert "resumed from step 1" in proc.stdout
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))} for r in rows]  # noqa: E731
    assert untimed(train_rows(out)) == untimed(train_rows(full)) and len(train_rows(full)) == 2  # kl, reward, cost too


@pytest.mark.parametrize(
    "extra, backbones",
    [
        (
            ["--actor_lora_rank", "4", "--critic_lora_rank", "4"],
            "2 backbones: actor + ref, reward_model + reward_critic",
        ),
        (
            ["--cost_model_name_or_path", "cm", "--reward_shaping", "--critic_lora_rank", "4"],
            "4 backbones: actor, ref, cost_model, reward_model + reward_critic",
        ),
    ],
    ids=["plain-ppo", "reward-shaping"],
)
def test_lora_ppo_variants(toy, tmp_path, extra, backbones):
    extra = [str(toy / e) if e == "cm" else e for e in extra]
    proc = run_script(ppo_args(toy, tmp_path / "out", *extra, "--max_steps", "1"), cwd=ROOT)
    assert backbones in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--save_adapter_only"], "--save_adapter_only saves the actor's LoRA adapter: pass --actor_lora_rank > 0"),
        (
            ["--critic_lora_rank", "4", "--reward_critic_model_name_or_path", "base"],
            "--critic_lora_rank builds the reward critic on the reward model's own backbone: drop",
        ),
    ],
)
def test_lora_ppo_bad_input(toy, tmp_path, extra, message):
    extra = [str(toy / e) if e == "base" else e for e in extra]
    proc = subprocess.run(ppo_args(toy, tmp_path / "out", *extra), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ----------------------------------------------------------------------------------------------------------------
# The headline with LoRA


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("RUN_SLOW") != "1",
    reason="slow (about 2 min on 2 CPU cores): run it with RUN_SLOW=1 python -m pytest tests/test_lora.py -k headline",
)
def test_lora_ppo_lag_headline(tmp_path):
    """Safe RLHF's result with a LoRA actor and LoRA critics, on a shortened `run_all.sh tiny` (its flags, with SFT 4
    epochs instead of 10 and the score models 1 epoch; PPO-Lag as LORA=1 runs it): the harmful rate falls well below
    SFT's (measured 0.01 against 0.49; oracle helpfulness 2.36 against SFT's 2.37) without the policy learning to
    refuse benign requests. 75 s of CPU time (about 2 min on 2 cores, so not in the default suite: RUN_SLOW=1 runs
    it); `LORA=1 bash run_all.sh tiny` is the full-length run (docs/lora.md)."""
    out = tmp_path
    common = ["--max_length", "64", "--per_device_train_batch_size", "32", "--seed", "42"]
    run_script([PY, "toy.py", "--output_dir", str(out / "base"), "--seed", "42"], cwd=ROOT)
    run_script(
        [
            PY,
            "sft.py",
            "--model_name_or_path",
            str(out / "base"),
            "--train_datasets",
            "toy-sft",
            "--epochs",
            "4",
            "--gradient_accumulation_steps",
            "1",
            "--lr",
            "3e-3",
            *common,
            "--output_dir",
            str(out / "sft"),
        ],
        cwd=ROOT,
    )
    for name, kind, dataset in (("rm", "reward", "toy-preference"), ("cm", "cost", "toy-safety-preference")):
        run_script(
            [
                PY,
                "score_model.py",
                "--score_type",
                kind,
                "--model_name_or_path",
                str(out / "sft"),
                "--train_datasets",
                dataset,
                "--epochs",
                "1",
                "--lr",
                "1e-3",
                *common,
                "--output_dir",
                str(out / name),
            ],
            cwd=ROOT,
        )
    proc = run_script(
        [
            PY,
            "ppo_lag.py",
            "--actor_model_name_or_path",
            str(out / "sft"),
            "--reward_model_name_or_path",
            str(out / "rm"),
            "--cost_model_name_or_path",
            str(out / "cm"),
            "--train_datasets",
            "toy-prompts",
            "--epochs",
            "3",
            "--per_device_prompt_batch_size",
            "32",
            "--critic_lr",
            "1e-3",
            "--actor_lr_warmup_ratio",
            "0.0",
            "--kl_coeff",
            "0.02",
            "--threshold",
            "-4.5",
            "--lambda_lr",
            "0.2",
            "--lambda_max",
            "10.0",
            "--actor_lora_rank",
            "8",
            "--critic_lora_rank",
            "8",
            "--actor_lr",
            "2e-3",
            *common,
            "--output_dir",
            str(out / "ppo_lag"),
        ],
        cwd=ROOT,
    )
    assert "3 backbones" in proc.stdout
    run_script(
        [
            PY,
            "evaluate.py",
            "--red_corner_model_name_or_path",
            str(out / "sft"),
            "--blue_corner_model_name_or_path",
            str(out / "ppo_lag"),
            "--reward_model_name_or_path",
            str(out / "rm"),
            "--cost_model_name_or_path",
            str(out / "cm"),
            "--datasets",
            "toy-eval",
            "--max_length",
            "64",
            "--seed",
            "42",
            "--output_dir",
            str(out / "arena"),
        ],
        cwd=ROOT,
    )
    summary = json.loads((out / "arena" / "summary.json").read_text())
    sft, lag = summary["red"], summary["blue"]
    assert lag["oracle_harmful_rate"] < sft["oracle_harmful_rate"] - 0.2, (sft, lag)
    assert lag["cost"] < sft["cost"], (sft, lag)
    assert lag["oracle_helpfulness"] > 1.0, (sft, lag)  # refusing benign requests scores -1 by the oracle
