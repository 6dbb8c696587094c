"""sft.py: the masked loss and LR schedule against hand-worked numbers and a slow loop, then smoke runs of the
script as users run it (one process, ZeRO-3, 2-process torchrun) on the toy world, and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import templates
import toy
from common import lr_schedule
from conftest import ROOT, run_script
from sft import sft_loss


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "base"
    toy.make_toy_model(str(path))
    return path


def sft_args(base, out, *extra):
    # constant LR, no warmup: the first losses do not depend on the run length, so runs can be compared step by step
    flags = (
        "--train_datasets toy-sft:0.05 --eval_split_ratio 0.1 --max_length 64 --epochs 1 --per_device_train_batch_size "
        "8 --gradient_accumulation_steps 1 --lr 3e-3 --lr_scheduler_type constant --lr_warmup_ratio 0 --logging_steps 1"
    )
    return ["sft.py", "--model_name_or_path", str(base), *flags.split(), "--output_dir", str(out), *extra]


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r], [r for r in rows if "eval/loss" in r]


# ----------------------------------------------------------------------------------------------------------------
# The math


def test_sft_loss_hand_worked():
    logits = torch.zeros(2, 3, 2)
    logits[0, 0, 1] = math.log(3.0)  # position 0 predicts token 1 with p = 3/4
    labels = torch.tensor([[-100, 1, -100], [-100, -100, 0]])  # row 1: position 1 predicts token 0 with p = 1/2
    expected = (-math.log(0.75) + math.log(2.0)) / 2  # = 0.490415
    assert sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_sft_loss_matches_slow_loop():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.4] = -100
    labels[:, 0] = -100
    loss = sft_loss(logits, labels)
    total, n = 0.0, 0
    for b in range(B):
        for t in range(T - 1):  # logits at t predict the label at t + 1
            if labels[b, t + 1] != -100:
                total -= torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]].item()
                n += 1
    assert loss.item() == pytest.approx(total / n, abs=1e-5)
    loss.backward()
    assert logits.grad[:, -1].abs().max() == 0  # the last position predicts nothing
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_lr_schedule():
    # lr_schedule(kind, total_steps, warmup_ratio)(step): 10 steps, ratio 0.2 = 2 warm-up steps
    assert [lr_schedule("cosine", 10, 0.2)(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    assert [lr_schedule("linear", 10, 0.2)(s) for s in (2, 6, 10)] == pytest.approx([1, 0.5, 0])
    # "constant" has no warm-up whatever the ratio (sft.py always gave it 0 warm-up steps)
    assert [lr_schedule("constant", 10, 0.2)(s) for s in (1, 6, 10)] == pytest.approx([1, 1, 1])
    assert lr_schedule("cosine", 10, 0.0)(0) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Smoke runs


def test_single_process_run_learns_saves_and_reloads(toy_base, tmp_path):
    out = tmp_path / "sft"
    proc = run_script(
        [
            sys.executable,
            *sft_args(toy_base, out, "--max_steps", "20", "--eval_interval", "10", "--save_interval", "10"),
        ]
    )
    assert "perf/tok_per_sec" in proc.stdout and "step 20/20 | train/loss" in proc.stdout
    losses, evals = metrics(out)
    assert len(losses) == 20 and [e["step"] for e in evals] == [0, 10, 20]  # the untrained model, every 10 steps
    assert losses[0] == pytest.approx(math.log(183), abs=0.1)  # a random init is uniform over the toy vocabulary
    # golden: fixed seed, fixed init; regenerate deliberately when the data or the loop changes on purpose
    assert losses[:3] == pytest.approx([5.1899, 4.8435, 4.6735], abs=2e-3)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[-1]["eval/perplexity"] == pytest.approx(math.exp(evals[-1]["eval/loss"]), rel=1e-4)
    assert not (tmp_path / "sft.partial").exists() and (out / "checkpoint-10" / "model.safetensors").exists()
    assert json.loads((out / "arguments.json").read_text())["max_steps"] == 20

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = templates.load_tokenizer(str(out), padding_side="left")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    prompts = data.PromptOnlyDataset([("toy-eval", {"proportion": 0.02, "path": None})], tokenizer, 64)
    batch = prompts.collate([prompts[i] for i in range(3)])
    with torch.no_grad():
        seqs = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8, do_sample=True
        )
    assert seqs.shape[0] == 3 and 1 <= seqs.shape[1] - batch["input_ids"].shape[1] <= 8
    # the reloaded weights give the logged eval loss back (same held-out slice, same loss)
    sup = data.SupervisedDataset([("toy-sft", {"proportion": 0.05, "path": None})], tokenizer, 64, 42)
    held_out = torch.utils.data.random_split(sup, [180, 20], generator=torch.Generator().manual_seed(42))[1]
    b = sup.collate(list(held_out))
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert sft_loss(logits, b["labels"]).item() == pytest.approx(evals[-1]["eval/loss"], abs=1e-4)


def test_zero3_run_matches_zero0(toy_base, tmp_path):
    """ZeRO-3 gives ZeRO-0's losses and weights; so does ZeRO-3 with --fused_logprobs (the loss from log-probs the
    lm_head gives, whose weight ZeRO-3 gathers through its hooks), eval loss included."""
    run_script([sys.executable, *sft_args(toy_base, tmp_path / "z0", "--max_steps", "4")])
    run_script([sys.executable, *sft_args(toy_base, tmp_path / "z3", "--max_steps", "4", "--zero_stage", "3")])
    assert metrics(tmp_path / "z3")[0] == pytest.approx(metrics(tmp_path / "z0")[0], abs=1e-4)
    run_script(
        [
            sys.executable,
            *sft_args(toy_base, tmp_path / "fused", "--max_steps", "4", "--zero_stage", "3", "--fused_logprobs"),
        ]
    )
    (losses, evals), (want_losses, want_evals) = metrics(tmp_path / "fused"), metrics(tmp_path / "z0")
    assert losses == pytest.approx(want_losses, abs=1e-4)
    assert len(evals) >= 1 and [e["eval/loss"] for e in evals] == pytest.approx(
        [e["eval/loss"] for e in want_evals], abs=1e-4
    )
    from safetensors.torch import load_file

    z0, z3 = load_file(tmp_path / "z0" / "model.safetensors"), load_file(tmp_path / "z3" / "model.safetensors")
    assert z0.keys() == z3.keys() and all(torch.allclose(z0[k], z3[k], atol=1e-4) for k in z0)  # gathered, whole


def test_torchrun_two_processes(toy_base, tmp_path):
    import socket

    out = tmp_path / "ddp"
    with socket.socket() as sock:  # a free port: torchrun's default 29500 may be taken by another run
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = run_script(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            *sft_args(
                toy_base,
                out,
                "--max_steps",
                "6",
                "--per_device_train_batch_size",
                "4",
                "--gradient_accumulation_steps",
                "2",
                "--zero_stage",
                "2",
            ),
        ]
    )
    assert "= 4 x 2 accum x 2 ranks" in proc.stdout and proc.stdout.count("step 6/6 | train/loss") == 1  # rank 0 logs
    losses, evals = metrics(out)
    assert len(losses) == 6 and losses[-1] < losses[0] and [e["step"] for e in evals] == [0, 6]
    assert not (tmp_path / "ddp.partial").exists() and (out / "model.safetensors").exists()


def test_bad_input_stops_with_one_line(toy_base, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cases = [
        (["--model_name_or_path", str(tmp_path / "missing")], "--model_name_or_path"),
        (["--per_device_train_batch_size", "64", "--gradient_accumulation_steps", "4"], "global batch"),
    ]
    for extra, needle in cases:
        out = tmp_path / "never"
        args = sft_args(toy_base, out) + extra  # later flags win
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "real_accelerator" not in line]
        assert proc.returncode != 0 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ") and needle in lines[0]
        assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_model_chat_template(tmp_path):
    """--chat_template model on a ChatML model whose EOS is not its end of turn (Qwen base style): trained on ChatML
    samples (the eval at step 0 is the untrained model's loss on exactly those), saved with ChatML as its template and
    a generation config that stops at <|im_end|> as well as at the EOS."""
    from test_templates import A1, A2, CHATML, U1, U2, chatml_base
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base, out = chatml_base(tmp_path / "base", "<|endoftext|>"), tmp_path / "sft"
    records = [{"instruction": u, "input": "", "output": a} for u, a in [(U1, A1), (U2, A2)] * 8]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    spec = f"alpaca:1.0:{tmp_path / 'alpaca.json'}"
    run_script(
        [
            sys.executable,
            "sft.py",
            "--model_name_or_path",
            str(base),
            "--train_datasets",
            spec,
            "--eval_datasets",
            spec,
            "--chat_template",
            "model",
            "--max_length",
            "128",
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "1",
            "--max_steps",
            "2",
            "--lr",
            "1e-3",
            "--logging_steps",
            "1",
            "--output_dir",
            str(out),
        ]
    )
    losses, evals = metrics(out)
    assert [e["step"] for e in evals] == [0, 2] and len(losses) == 2
    tokenizer = templates.load_tokenizer(str(base), chat_template="model")
    samples = data.SupervisedDataset([data.parse_dataset(spec)], tokenizer, 128, chat_template="model")
    batch = samples.collate([samples[i] for i in range(len(samples))])
    assert tokenizer.decode(batch["input_ids"][0, :2]) == "<|im_start|>system"  # ChatML samples
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(base)(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert sft_loss(logits.logits, batch["labels"]).item() == pytest.approx(evals[0]["eval/loss"], abs=1e-4)
    assert (out / "chat_template.jinja").read_text() == CHATML == AutoTokenizer.from_pretrained(out).chat_template
    stops = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert GenerationConfig.from_pretrained(out).eos_token_id == stops  # the EOS first, then the end of turn
