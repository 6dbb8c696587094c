"""scripts/bench.py --save_model: the folders scripts/gpu_check.sh runs a real ppo_lag.py step on, at a tiny shape."""

import json
import sys

import pytest
import torch

from conftest import ROOT, run_script

TINY = [
    "--hidden",
    "64",
    "--intermediate",
    "128",
    "--layers",
    "2",
    "--heads",
    "4",
    "--kv_heads",
    "2",
    "--vocab",
    "512",
    "--batch",
    "4",
    "--prompt",
    "32",
    "--new_tokens",
    "16",
]


def save_model(out, *flags):
    return run_script([sys.executable, "scripts/bench.py", "--save_model", str(out), *TINY, *flags])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "model"
    save_model(out)
    return out


def test_save_model_folders(saved):
    import templates
    import toy

    shape = json.loads((saved / "bench_model.json").read_text())
    assert {k: shape[k] for k in ("hidden", "layers", "vocab", "batch", "prompt", "new_tokens", "max_length")} == {
        "hidden": 64,
        "layers": 2,
        "vocab": 512,
        "batch": 4,
        "prompt": 32,
        "new_tokens": 16,
        "max_length": 48,
    }
    config = json.loads((saved / "actor" / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (512, 64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 128)
    for name in ("reward", "cost"):  # the score type each folder is read as
        assert json.loads((saved / name / "config.json").read_text())["score_type"] == name
    # 4 x --batch distinct prompts, each exactly --prompt tokens in the anchor's template, ending in a toy request
    tokenizer = templates.load_tokenizer(str(saved / "actor"))
    prompts = [json.loads(line)["prompt"] for line in (saved / "prompts.jsonl").read_text().splitlines()]
    assert len(set(prompts)) == len(prompts) == 16
    for p in prompts:
        ids = templates.tokenize(tokenizer, templates.chat_prompt(tokenizer, p))["input_ids"]
        assert len(ids) == 32 and tokenizer.unk_token_id not in ids, p
        assert toy.toy_topic(p) is not None, p


def test_tokenizer_decodes_every_id(saved, tmp_path):
    import templates
    from toy import make_toy_model

    tokenizer = templates.load_tokenizer(str(saved / "actor"))
    tokens = tokenizer.convert_ids_to_tokens(list(range(512)))
    assert len(tokenizer) == 512 and len(set(tokens)) == 512 and all(tokens), tokens
    assert all(tokenizer.decode([i]) for i in range(512))
    # the toy world's tokenizer, its words at their ids, then filler words that encode back to the same ids
    with torch.random.fork_rng():  # it seeds the global RNG; leave the other tests' as it was
        make_toy_model(str(tmp_path / "toy"))
    toy = templates.load_tokenizer(str(tmp_path / "toy")).get_vocab()
    assert {w: i for i, w in enumerate(tokens) if i < len(toy)} == toy
    fillers = list(range(len(toy), 512))
    assert tokens[len(toy) :] == [f"filler{i}" for i in fillers]
    assert tokenizer(tokenizer.decode(fillers), add_special_tokens=False)["input_ids"] == fillers
    words = "how do i bake a cake ?"
    assert tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"]) == words


def test_ppo_lag_runs_on_saved_model(saved, tmp_path):
    """One PPO-Lag step with the GPU step's flags (LoRA critics, static cache), on the CPU."""
    out = tmp_path / "ppo"
    proc = run_script(
        [
            sys.executable,
            "ppo_lag.py",
            "--actor_model_name_or_path",
            str(saved / "actor"),
            "--reward_model_name_or_path",
            str(saved / "reward"),
            "--cost_model_name_or_path",
            str(saved / "cost"),
            "--train_datasets",
            f"prompts:1.0:{saved / 'prompts.jsonl'}",
            "--max_length",
            "48",
            "--max_steps",
            "1",
            "--per_device_prompt_batch_size",
            "4",
            "--per_device_train_batch_size",
            "2",
            "--critic_lora_rank",
            "8",
            "--generation_cache",
            "static",
            "--output_dir",
            str(out),
        ]
    )
    assert "4 backbones: actor, ref, reward_model + reward_critic, cost_model + cost_critic" in proc.stdout
    assert "generation: static KV cache (64 tokens)" in proc.stdout
    assert "16 prompts | 1 rollouts of 4 sequences" in proc.stdout
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row[k] > 0 for k in ("time/generate", "time/score", "time/update")), row
    assert 1 <= row["train/response_len"] <= 16, row  # 48 - 32: every prompt is exactly 32 tokens long
    assert (out / "config.json").exists()


def test_save_model_bad_input(tmp_path, monkeypatch):
    """One `error:` line and nothing written (in this process: a subprocess per case would cost seconds each)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    from toy import toy_vocabulary

    def refused(out, *flags):
        monkeypatch.setattr(sys, "argv", ["bench.py", "--save_model", str(out), *TINY, *flags])
        with pytest.raises(SystemExit) as e, torch.random.fork_rng():  # toy.make_toy_model seeds the global RNG
            bench.main()
        return str(e.value.code)

    n_words = 4 + len(toy_vocabulary())
    assert refused(tmp_path / "a", "--vocab", str(n_words - 1)).startswith(
        f"error: --vocab {n_words - 1} is below the toy tokenizer's {n_words} words"
    )
    assert refused(tmp_path / "b", "--prompt", "12").startswith("error: --prompt 12 is shorter than a toy request")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # stopped before writing anything
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "is a non-empty folder this script did not write" in refused(tmp_path / "mine")
    assert [f.name for f in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_actor_memory_rows():
    """--actor_memory on a tiny Llama whose logits dominate a micro-batch: the fused path's peak is well below the
    logits path's, with and without gradient checkpointing (CPU: process RSS, in a re-executed process)."""
    proc = run_script(
        [
            sys.executable,
            "scripts/bench.py",
            "--actor_memory",
            "--hidden",
            "64",
            "--intermediate",
            "128",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv_heads",
            "2",
            "--vocab",
            "8000",
            "--actor_batch",
            "4",
            "--actor_len",
            "1024",
            "--threads",
            "1",
        ]
    )
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("on ", "off "))]
    assert [(r[0], r[1]) for r in rows] == [("off", "logits"), ("off", "fused"), ("on", "logits"), ("on", "fused")]
    for logits_row, fused_row in (rows[:2], rows[2:]):
        ratio = float(fused_row[-1].rstrip("x"))
        assert ratio > 2 and float(logits_row[-1]) > float(fused_row[-2]), proc.stdout
    assert proc.stdout.count("target: fused peak <= 1/4") == 2


def test_fused_logprobs_on_a_tied_model(saved, tmp_path):
    """The bench model ties its lm_head to the embedding (as Llama-3.2-1B and SmolLM2 do): --fused_logprobs under
    ZeRO-3, where the one tied weight is gathered by two modules' hooks, gives the logits path's numbers."""
    assert json.loads((saved / "actor" / "config.json").read_text())["tie_word_embeddings"]
    rows = {}
    for name, extra in (("logits", []), ("fused", ["--fused_logprobs", "--zero_stage", "3"])):
        run_script(
            [
                sys.executable,
                "ppo_lag.py",
                "--actor_model_name_or_path",
                str(saved / "actor"),
                "--reward_model_name_or_path",
                str(saved / "reward"),
                "--train_datasets",
                f"prompts:1.0:{saved / 'prompts.jsonl'}",
                "--max_length",
                "48",
                "--max_steps",
                "2",
                "--per_device_prompt_batch_size",
                "4",
                "--per_device_train_batch_size",
                "2",
                "--actor_lr",
                "1e-3",
                "--output_dir",
                str(tmp_path / name),
                *extra,
            ]
        )
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["logits"], rows["fused"], strict=True):
        for key in ("train/reward", "train/kl", "loss/actor", "loss/reward_critic"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
