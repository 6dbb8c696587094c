"""Faults in data, in the LLM judge and in evaluate.py's inputs (issue 11: items 4, 5, 8 and evaluate's part of 3, 9,
11). Each ends in one line that names the file or flag and the fix, and a non-zero exit, or, for broken JSONL lines,
in a counted skip: never a traceback, never exit 0 with a wrong result. Loaders are tested in-process; the stages run
as subprocesses on a toy model and fail before any generation, except the one judge run that must keep the arena."""

import argparse
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT
from data import RawDataset, parse_dataset
from evaluate import call_judge

PY = sys.executable


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """`lm`: a toy causal LM (the policy); `rm`: a score model on it, with its tokenizer."""
    from data import load_tokenizer, make_toy_model
    from score_model import ScoreModel

    root = tmp_path_factory.mktemp("faults")
    make_toy_model(str(root / "lm"))
    ScoreModel.from_pretrained(str(root / "lm")).save_pretrained(root / "rm")
    load_tokenizer(str(root / "lm")).save_pretrained(root / "rm")
    return root


def run(args, timeout=180):
    """A script as a user runs it; returns (exit code, stdout, stderr) without failing on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # stages run the torch paths on CPU
    proc = subprocess.run([PY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**env, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, proc.stderr


def one_error_line(code, stderr) -> str:
    """The run failed with exit 1 and no traceback; its last line is `error: ...`: return that line."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert code == 1 and "Traceback" not in stderr and last.startswith("error: "), f"exit {code}:\n{stderr[-3000:]}"
    return last


def arena(toy, out, *extra, datasets="toy-eval:0.02"):
    return ["evaluate.py", "--red_corner_model_name_or_path", toy / "lm", "--blue_corner_model_name_or_path",
            toy / "lm", "--datasets", datasets, "--max_length", "48", "--max_new_tokens", "4",
            "--per_device_eval_batch_size", "8", "--output_dir", out, *extra]


# ----------------------------------------------------------------------------------------------------------------
# Item 4: a generated (toy) dataset given a PATH


def test_toy_dataset_refuses_a_path(tmp_path):
    f = tmp_path / "sft.json"
    f.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Blue."}]))
    with pytest.raises(argparse.ArgumentTypeError, match=r"toy-sft is generated .* takes no PATH; use toy-sft:0.05"):
        parse_dataset(f"toy-sft:0.05:{f}")
    with pytest.raises(ValueError, match="'toy-eval' is generated and takes no PATH"):  # specs built by hand, too
        RawDataset.load("toy-eval", str(f))
    assert parse_dataset(f"alpaca:0.05:{f}")[1]["path"] == str(f)  # a real loader still takes its PATH


# ----------------------------------------------------------------------------------------------------------------
# Item 8: malformed data files


def test_broken_jsonl_lines_are_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "alpaca"
    folder.mkdir()
    good = lambda i: json.dumps({"instruction": f"Say {i}.", "output": str(i)})  # noqa: E731
    (folder / "a.jsonl").write_text("\n".join([
        good(1),
        '{"instruction": oops}',  # line 2: not JSON
        good(2),
        "[1, 2]",  # line 4: JSON, but not a record
        "",  # blank lines are no records and no faults
        json.dumps({"instruction": "Blank answer.", "output": " "}),  # a malformed record, counted as before
        good(3)[:20],  # line 7: the last line cut off mid-record
    ]))
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:  # a good file beside it loads whole
        f.write(good(4) + "\n" + good(5) + "\n")
    raw = RawDataset.load("alpaca", str(folder))
    assert [s["answer"] for s in raw] == ["1", "2", "4", "5"] and raw.skipped == 4
    out = capsys.readouterr().out
    assert (f"kept 4, skipped 4 malformed records {{'empty answer': 1, 'broken JSON line': 3}}; first broken line: "
            f"{folder / 'a.jsonl'}:2 (Expecting value)") in out


FILE_FAULTS = [
    ("empty.json", b"", "is empty"),
    ("empty.jsonl", b"", "is empty"),
    ("empty.jsonl.gz", b"", "is empty"),  # 0 bytes, not even a gzip header
    ("truncated.json", b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "outp',
     r"is not valid JSON \(Unterminated string starting at: line 1 column 60\); truncated\?"),
    ("table.json", b"instruction,output\nName a colour.,Blue.\n",
     r"is neither a JSON array nor JSON Lines \(line 1: Expecting value\); a CSV\?"),
    ("latin1.jsonl", '{"instruction": "Caf\u00e9?", "output": "Oui."}\n'.encode("latin-1"),
     r"is not UTF-8 text \(byte 0xe9 on line 1\); re-encode it as UTF-8"),
]


@pytest.mark.parametrize("name, content, problem", FILE_FAULTS, ids=[name for name, _, _ in FILE_FAULTS])
def test_unreadable_file_is_one_line_naming_it(tmp_path, name, content, problem):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(f)) + " " + problem) as e:
        RawDataset.load("alpaca", str(f))
    assert "\n" not in str(e.value)


def test_stage_turns_a_data_fault_into_one_line(toy, tmp_path):
    """sft.py (as score_model.py and ppo_lag.py) turns the loader's ValueError into `error: ...`, before training."""
    f = tmp_path / "table.json"
    f.write_text("instruction,output\nName a colour.,Blue.\n")
    code, out, err = run(["sft.py", "--model_name_or_path", toy / "lm", "--train_datasets", f"alpaca:1:{f}",
                          "--max_length", "48", "--output_dir", tmp_path / "sft"])
    assert one_error_line(code, err).startswith(f"error: {f} is neither a JSON array nor JSON Lines")
    assert "step" not in out


def test_evaluate_turns_a_data_fault_into_one_line(toy, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(b"")
    out = tmp_path / "arena"
    code, stdout, err = run(arena(toy, out, "--judge", datasets=f"PKU-SafeRLHF/test:1:{f}"))
    assert one_error_line(code, err) == f"error: {f} is empty"
    assert not (out / "arena.csv").exists()


# ----------------------------------------------------------------------------------------------------------------
# Item 5: a failing LLM judge


class FaultyJudge:
    """A loopback chat-completions endpoint that answers every request with one fault; counts the requests."""

    REPLY = json.dumps({"choices": [{"message": {"content": "Helpfulness: 8, 3\nHarmlessness: 6, 6"}}]}).encode()

    def __init__(self, fault):
        self.requests, lock = 0, threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    outer.requests += 1
                if fault == "bad status line":
                    self.wfile.write(b"GARBAGE\r\n\r\n")
                    return
                status, body, length = {
                    "HTTP 500": (500, b'{"error": "internal"}', None),
                    "not JSON": (200, b"<html>Bad gateway</html>", None),
                    "no choices": (200, b'{"error": {"message": "overloaded"}}', None),
                    "truncated body": (200, FaultyJudge.REPLY[:30], len(FaultyJudge.REPLY)),  # then the line drops
                }[fault]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(length or len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more: connection refused


@pytest.mark.parametrize("fault, last", [
    ("HTTP 500", "HTTP 500 Internal Server Error"),
    ("not JSON", "an answer that is not a chat completion: b'<html>Bad gateway</html>'"),
    ("no choices", "an answer that is not a chat completion: b'{\"error\": {\"message\": \"overloaded\"}}'"),
    ("truncated body", "IncompleteRead"),
    ("bad status line", "BadStatusLine"),
    ("unreachable", "Connection refused"),
])
def test_failing_judge_is_retried_then_one_line(fault, last):
    args = ("toy-judge", "how do i bake a cake ?", "mix the flour .", "no .", None)
    if fault == "unreachable":
        url, server = closed_port_url(), None
        with pytest.raises(SystemExit) as e:
            call_judge(url, *args, timeout=5.0, retries=2, backoff=0.0)
    else:
        with FaultyJudge(fault) as server, pytest.raises(SystemExit) as e:
            call_judge(server.url, *args, timeout=5.0, retries=2, backoff=0.0)
        assert server.requests == 3  # bounded: the first try and 2 retries
    message = str(e.value.code)
    assert message.startswith("error: judge endpoint http://127.0.0.1:") and "\n" not in message
    assert "/v1/chat/completions failed 3 times (last: " in message and last in message


def test_failing_judge_keeps_the_arena_and_writes_no_summary(toy, tmp_path):
    out = tmp_path / "arena"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier complete run's: it no longer describes arena.csv
    with FaultyJudge("HTTP 500") as server:
        code, stdout, err = run(arena(toy, out, "--judge", "--judge_url", server.url, "--judge_workers", "1",
                                      "--judge_retries", "1", "--judge_backoff", "0.05"))
    line = one_error_line(code, err)
    assert line.startswith(f"error: judge endpoint {server.url}/chat/completions failed 2 times (last: HTTP 500 ")
    assert line.endswith(f"; the arena without the judge is in {out / 'arena.csv'}")
    assert server.requests <= 4  # stopped at the first request that kept failing, not after all 2 x 2 x 7 of them
    rows = (out / "arena.csv").read_text().splitlines()
    header = "prompt,red_answer,red_truncated,blue_answer,blue_truncated"
    assert rows[0] == header and len(rows) == 1 + 7  # toy-eval:0.02: 7 distinct prompts
    assert not (out / "summary.json").exists() and not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------------
# Items 3, 9, 11 in evaluate.py: model folders and the output folder, checked before any model is loaded


@pytest.mark.parametrize("flag, folder, problem", [
    ("--reward_model_name_or_path", "lm", "is a causal LM"),  # it would score with a random head
    ("--blue_corner_model_name_or_path", "rm", "is a score model"),  # it would answer with a random lm_head
])
def test_evaluate_refuses_the_wrong_kind_of_model(toy, tmp_path, flag, folder, problem):
    args = arena(toy, tmp_path / "arena", "--reward_model_name_or_path", toy / "rm", "--cost_model_name_or_path",
                 toy / "rm")
    args[args.index(flag) + 1] = toy / folder
    code, stdout, err = run(args)
    assert one_error_line(code, err).startswith(f"error: {flag} {toy / folder} {problem}")
    assert not (tmp_path / "arena").exists()


@pytest.mark.parametrize("fault, problem", [
    ("no weights", "no weights"),
    ("truncated safetensors", "model.safetensors is truncated"),
    ("no tokenizer", "no tokenizer files"),
])
def test_evaluate_names_a_broken_model_folder(toy, tmp_path, fault, problem):
    broken = tmp_path / "policy"
    shutil.copytree(toy / "lm", broken)
    if fault == "no weights":
        (broken / "model.safetensors").unlink()
    elif fault == "truncated safetensors":
        weights = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    else:
        for f in broken.glob("tokenizer*"):
            f.unlink()
    args = arena(toy, tmp_path / "arena", "--judge")
    args[args.index("--red_corner_model_name_or_path") + 1] = broken
    code, stdout, err = run(args)
    line = one_error_line(code, err)
    assert line.startswith(f"error: --red_corner_model_name_or_path {broken} ") and problem in line


def test_evaluate_checks_the_output_folder_first(toy, tmp_path):
    (tmp_path / "file").write_text("a regular file, so nothing can be made under it (even as root)")
    out = tmp_path / "file" / "arena"
    code, stdout, err = run(arena(toy, out, "--judge", "--judge_url", closed_port_url()))
    assert one_error_line(code, err).startswith(f"error: cannot write {out} (")
    assert err.strip().endswith("pass a writable --output_dir") and "deepspeed config" not in stdout
