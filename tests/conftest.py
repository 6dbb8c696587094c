"""Shared test set-up, and the helpers more than one test file needs.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process (transformers imports
triton indirectly), so it is set here, at the very top, when no CUDA device is present.
"""

import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of `make test`'s parallel workers: one thread each (set before torch starts its thread pool), as the stage
    # subprocesses use; two workers with a thread per core each oversubscribe 2 cores and OpenMP's spinning threads
    # then run several times slower
    os.environ["OMP_NUM_THREADS"] = "1"

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # a suite started in the background (`make test &`) inherits SIGINT ignored, and so would every stage it starts
    # (an ignored signal stays ignored across exec): the Ctrl-C tests need it delivered, so a handler goes back, which
    # exec resets to the default in the children
    signal.signal(signal.SIGINT, signal.default_int_handler)

try:  # cheap check that does not import triton
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def stage_env(**extra) -> dict:
    """The environment a stage script runs in: one thread (a fixed reduction order), unbuffered output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("TRITON_INTERPRET", None)  # stage scripts run the torch paths on CPU
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a process group of the test process must not leak its port into a stage's
    return env


def run_script(args, cwd=ROOT, env=None, timeout=600):
    """Run a stage script as a subprocess (the way users run it); return the CompletedProcess, fail loudly."""
    proc = subprocess.run(args, cwd=cwd, env=stage_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def signal_at(proc: subprocess.Popen, prefix: str, sig: int, timeout=120) -> tuple[str, str]:
    """Send `sig` to a run started with text pipes once it prints a line starting with `prefix` (a run that never
    prints one is left alone: its exit code says so), wait for it to end; return the rest of its stdout, its stderr."""
    for line in proc.stdout:
        if line.startswith(prefix):
            proc.send_signal(sig)
            break
    return proc.communicate(timeout=timeout)


class LoopbackServer:
    """An HTTP server on a free loopback port while a `with` block lasts (`.url` ends in /v1). Every POST goes to
    `answer(handler, body)`: the request handler (its path and headers; it writes the reply) and the request body."""

    def __init__(self, answer):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                answer(self, self.rfile.read(int(self.headers["Content-Length"])))

            def log_message(self, *args):  # no line per request in the test output
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


def send_json(handler: BaseHTTPRequestHandler, status: int, body: bytes, length: int | None = None):
    """Reply `body` with `status`; a `length` above len(body) announces bytes that never come (a cut-off answer)."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(length or len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory):
    """The toy world's models: `base`, a toy causal LM (the policy, the actor); `rm` and `cm`, a reward and a cost
    model initialised from it (random heads, seeded 0 and 1), each with its tokenizer."""
    import templates
    import toy
    from models import ScoreModel

    root = tmp_path_factory.mktemp("toy_models")
    toy.make_toy_model(str(root / "base"))
    tokenizer = templates.load_tokenizer(str(root / "base"))
    with torch.random.fork_rng():  # seeded heads (reproducible numbers), the global RNG of the tests left as it was
        for seed, (name, score_type) in enumerate((("rm", "reward"), ("cm", "cost"))):
            torch.manual_seed(seed)
            ScoreModel.from_pretrained(str(root / "base"), score_type=score_type).save_pretrained(str(root / name))
            tokenizer.save_pretrained(str(root / name))
    return root


# The longest files first: `make test` runs the suite on two pytest-xdist workers, one file per worker at a time
# (--dist loadfile --no-loadscope-reorder: in this order), and a long file started last would leave the other worker
# idle. The rest keep their order.
LONG_FIRST = (
    "test_ppo_lag.py",
    "test_faults.py",
    "test_score_model.py",
    "test_pipeline.py",
    "test_lora.py",
    "test_resume.py",
    "test_sft.py",
    "test_evaluate.py",
    "test_kernels.py",
    "test_chat.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: same order on every worker
