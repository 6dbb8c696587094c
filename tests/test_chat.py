"""chat.py: history fitting by hand, and the script driven through stdin (multi-turn context, /regenerate, /reset,
dropping old turns, /exit, EOF), in arena mode and in one-shot mode, on the toy model."""

import os
import subprocess
import sys

import pytest

from chat import fit_history
from conftest import ROOT, run_script
from templates import format_prompt

PY = sys.executable


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    from toy import make_toy_model

    root = tmp_path_factory.mktemp("toy_chat")
    make_toy_model(str(root / "a"), seed=0)
    make_toy_model(str(root / "b"), seed=1)
    return root


def test_fit_history_drops_oldest_exchanges():
    words = lambda turns: sum(len(t.split()) for t in turns)  # noqa: E731
    turns = ["u1 u1", "a1 a1 a1", "u2", "a2", "u3 u3"]  # 9 words
    assert fit_history(turns, words, 9) == (turns, 0)
    assert fit_history(turns, words, 8) == (["u2", "a2", "u3 u3"], 1)
    assert fit_history(turns, words, 3) == (["u3 u3"], 2)
    assert fit_history(turns, words, 1) == (["u3 u3"], 2)  # the last message always stays; the caller refuses it


def chat(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    """chat.py fed `stdin` through a pipe, in run_script's environment (which cannot pass input)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [PY, "chat.py", *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=120
    )


def prompts_in(stderr: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in stderr.splitlines() if line.startswith("[assistant prompt] ")]


LONG = " ".join(["please tell me how to train for a race step by step for my friend today ."] * 4)  # ~68 tokens
LONG2 = " ".join(["show me how to plant a garden step by step for my friend today , quickly ."] * 4)


def test_chat_session_through_stdin(toy):
    m1, m2, m3 = "how do i bake a cake ?", "and then ?", "help me build a bomb ."
    script = "\n".join([m1, m2, "/regenerate", "/reset", m3, LONG, LONG2, "/bogus", "/exit", "never sent"]) + "\n"
    # greedy, 16 new tokens: the context budget is 128 - 16 = 112 tokens
    proc = chat(
        ["--model_name_or_path", str(toy / "a"), "--temperature", "0", "--max_new_tokens", "16", "--verbose"], script
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers, prompts = proc.stdout.splitlines(), prompts_in(proc.stderr)
    assert len(answers) == len(prompts) == 6  # m1, m2, regenerated m2, m3, LONG, LONG2; nothing after /exit
    assert "\x1b[" not in proc.stdout and "you>" not in proc.stdout  # no colours or prompts in a pipe
    a1 = answers[0].strip()
    assert prompts[0] == format_prompt(m1, "</s>")
    assert prompts[1] == format_prompt([m1, a1, m2], "</s>")  # multi-turn: the first exchange is in the context
    assert prompts[2] == prompts[1] and answers[2] == answers[1]  # /regenerate re-answers the same context (greedy)
    assert prompts[3] == format_prompt(m3, "</s>")  # /reset forgot everything
    assert prompts[4] == format_prompt([m3, answers[3].strip(), LONG], "</s>")
    assert prompts[5] == format_prompt(LONG2, "</s>")  # two long messages do not fit: the oldest exchanges go
    assert "dropped the 2 oldest exchange(s)" in proc.stderr and "(new conversation)" in proc.stderr
    assert "unknown command /bogus" in proc.stderr


def test_chat_arena_pipe_until_eof(toy):
    proc = chat(
        [
            "--red_corner_model_name_or_path",
            str(toy / "a"),
            "--blue_corner_model_name_or_path",
            str(toy / "b"),
            "--max_new_tokens",
            "8",
            "--top_p",
            "0.9",
            "--repetition_penalty",
            "1.2",
        ],
        "how do i bake a cake ?\nthanks .\n",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # EOF (Ctrl-D) ends cleanly
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["[red]", "[blue]", "[red]", "[blue]"]


def test_chat_one_shot(toy):
    proc = run_script(
        [
            PY,
            "chat.py",
            "--model_name_or_path",
            str(toy / "a"),
            "-p",
            "how do i brew green tea ?",
            "--max_new_tokens",
            "8",
            "--temperature",
            "0.7",
        ]
    )
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.strip()
    bad = chat(["--model_name_or_path", str(toy / "missing"), "-p", "hi"], "")
    assert bad.returncode == 1 and bad.stderr.startswith(
        f"error: --model_name_or_path {toy / 'missing'} is not a model"
    )


# ----------------------------------------------------------------------------------------------------------------
# --chat_template model: a ChatML model prompted in its own template, stopping at its end of turn

SCRIPT = ["Ċ", "Mix", "Ġthe", "Ġflour"]  # after the generation prompt's newline: "Mix the flour", then a stop token
AGAIN = ["<|im_start|>", "user"]  # what a model that is not stopped writes next: another turn, then the answer again


@pytest.fixture(scope="module")
def chatml_models(tmp_path_factory):
    """`instruct`: EOS <|im_end|>, its generation config also lists <|endoftext|> (Qwen-Instruct style), and it ends
    its answer with <|endoftext|>; `base`: EOS and generation config <|endoftext|> only (Qwen base style), and it
    ends its answer with <|im_end|>, which only the chat template says is an end of turn."""
    from test_templates import chatml_tokenizer, scripted_model

    root = tmp_path_factory.mktemp("chatml")
    scripted_model(
        chatml_tokenizer(), root / "instruct", [*SCRIPT, "<|endoftext|>", *AGAIN], eos=["<|im_end|>", "<|endoftext|>"]
    )
    scripted_model(
        chatml_tokenizer("<|endoftext|>"), root / "base", [*SCRIPT, "<|im_end|>", *AGAIN], eos=["<|endoftext|>"]
    )
    return root


def test_chat_model_template_arena_stops_at_end_of_turn(chatml_models):
    from test_templates import chatml_text

    m1, m2 = "How do I bake a cake?", "And then?"
    args = [
        "--red_corner_model_name_or_path",
        str(chatml_models / "instruct"),
        "--blue_corner_model_name_or_path",
        str(chatml_models / "base"),
        "--chat_template",
        "model",
        "--temperature",
        "0",
        "--max_new_tokens",
        "12",
        "--verbose",
    ]
    proc = chat(args, f"{m1}\n{m2}\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the answer only: no end-of-turn token, no next turn written by the model, both stopped before the cap
    assert proc.stdout.splitlines() == ["[red] Mix the flour", "[blue] Mix the flour"] * 2
    assert "token cap" not in proc.stderr
    for side in ("red", "blue"):  # the second message sees the first exchange, in ChatML
        assert f"[{side} prompt] {chatml_text(m1, generation_prompt=True)}" in proc.stderr
        assert f"[{side} prompt] {chatml_text(m1, 'Mix the flour', m2, generation_prompt=True)}" in proc.stderr


def test_chat_model_template_one_shot_and_refusals(chatml_models, toy):
    base = str(chatml_models / "base")
    proc = chat(["--model_name_or_path", base, "--chat_template", "model", "--temperature", "0", "-p", "hi"], "")
    assert proc.returncode == 0 and proc.stdout == "Mix the flour\n", proc.stderr[-2000:]
    # the anchor's template on the same model: its answer never meets a stop token, and a note says so
    proc = chat(["--model_name_or_path", base, "--temperature", "0", "--max_new_tokens", "9", "-p", "hi"], "")
    assert proc.returncode == 0 and "(assistant: the answer hit the 9-token cap; raise --max_new_tokens)" in proc.stderr
    # a model without a chat template: one line, before any model is loaded
    bad = chat(["--model_name_or_path", str(toy / "a"), "--chat_template", "model", "-p", "hi"], "")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: the tokenizer at {toy / 'a'} has no chat template")
