"""Progress bars (rollout.progress / token_progress): drawn on rank 0 of a terminal only, and never a change of tokens.

1. The rule: a bar draws on rank 0 when stderr is a terminal, or when NANO_PROGRESS=1 forces it; never on another
   rank, never with NANO_PROGRESS=0; a disabled bar still iterates and writes nothing.
2. The generation bar ticks once per decoding step (the generated columns: max_new_tokens, or fewer when every row
   stopped at EOS) on the dynamic and the static cache, and the tokens are the ones decoded without it (greedy and
   seeded sampling).
3. A stage whose output goes to a pipe writes no carriage return (tqdm redraws; transformers' loading bars included).
"""

import io
import subprocess
import sys

import pytest
import torch

import rollout
from conftest import ROOT, stage_env


class Stderr(io.StringIO):
    """A stand-in for sys.stderr that says whether it is a terminal."""

    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize(
    "tty, rank, setting, drawn",
    [
        (True, "0", None, True),  # an interactive run
        (False, "0", None, False),  # a log file, CI, a pipe
        (True, "1", None, False),  # another rank
        (True, "0", "0", False),  # turned off
        (False, "0", "1", True),  # forced on
        (False, "1", "1", False),  # forced, but still rank 0 only
    ],
)
def test_bars_on_rank0_terminal_only(monkeypatch, tty, rank, setting, drawn):
    stderr = Stderr(tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv("RANK", rank)
    if setting is None:
        monkeypatch.delenv("NANO_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("NANO_PROGRESS", setting)
    assert rollout.show_progress() is drawn
    with rollout.progress(range(3), desc="work", delay=0) as bar:  # delay 0: drawn at once when it draws at all
        assert list(bar) == [0, 1, 2]  # a disabled bar still iterates
    with rollout.token_progress(5, "generate") as ticks:
        assert (ticks is not None) is drawn  # off: generate gets no logits processor at all
    with rollout.token_progress(5, "generate", ["the caller's"]) as ticks:
        assert list(ticks[:1]) == ["the caller's"] and len(ticks) == 1 + drawn  # kept, the tick after it
    written = stderr.getvalue()
    assert ("\r" in written and "work" in written) if drawn else written == ""


def test_bad_setting_is_one_error_line(monkeypatch):
    monkeypatch.setenv("NANO_PROGRESS", "yes")
    with pytest.raises(SystemExit, match=r"^error: NANO_PROGRESS='yes': use 0 .* or 1"):
        rollout.show_progress()


@pytest.fixture(scope="module")
def policy(toy_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(toy_models / "base"), dtype=torch.float32).eval()


def left_padded(lengths, vocab, seed=0):
    """(input_ids, attention_mask) of random prompts with the given true lengths, left-padded."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(4, vocab, (len(lengths), P), generator=g)  # 0-3: the special tokens
    mask = torch.arange(P)[None, :] >= P - torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask.long()


@pytest.mark.parametrize("cache, compile", [("dynamic", None), ("static", False), ("static", "eager")])
def test_generation_bar_ticks_per_step_same_tokens(policy, cache, compile, monkeypatch):
    """Each run twice, without and with the bar: the same tokens, and the bar counted every generated column.
    compile "eager": the static cache's compiled decoding as on CUDA (dynamo's capture and guards, no code generation;
    one run, one compile); the ticking processor lives in generate's Python loop, outside the compiled step."""
    real, bars = rollout.progress, []  # every bar made, to read its count

    def recording(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(rollout, "progress", recording)
    monkeypatch.setenv("RANK", "0")
    new = 20
    ids, mask = left_padded([6, 3, 1, 6], policy.config.vocab_size)
    P = ids.shape[1]
    # the token row 0 decodes greedily at step 5, declared the EOS: row 0 alone stops at its first occurrence (step 5
    # or earlier); in the batch other rows go on to the cap
    first = policy.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=new, do_sample=False)
    eos = int(first[0, P + 4])
    row0_steps = int((first[0, P:] == eos).nonzero()[0]) + 1
    runs = [  # (rows, sampling, steps the bar must count; None: whatever the sampled answers took)
        (slice(0, 1), dict(do_sample=False), row0_steps),
        (slice(None), dict(do_sample=False), new),
        (slice(None), dict(do_sample=True, temperature=0.9, top_p=0.95, num_return_sequences=2), None),
    ]
    if compile == "eager":
        runs = runs[1:2]
    for rows, sampling, steps in runs:
        out = {}
        for setting in ("0", "1"):  # without, then with the bar
            monkeypatch.setenv("NANO_PROGRESS", setting)
            torch.manual_seed(7)
            out[setting] = rollout.generate(
                policy,
                ids[rows],
                mask[rows],
                max_new_tokens=new,
                cache=cache,
                compile=compile,
                pad_token_id=0,
                eos_token_id=eos,
                **sampling,
            )
        assert torch.equal(out["1"], out["0"]), f"the bar changed the tokens ({cache}, {compile}, {sampling})"
        off, on = bars[-2:]
        assert off.n == 0 and on.total == new and on.n == out["1"].shape[1] - P == (steps or on.n), (on.n, steps)
    assert row0_steps <= 5 and len(bars) == 2 * len(runs)


@pytest.mark.parametrize("setting, carriage_returns", [("", False), ("1", True)])
def test_stage_to_a_pipe_writes_no_carriage_return(toy_models, tmp_path, setting, carriage_returns):
    """A PPO-Lag run whose stdout and stderr are pipes (a log file, CI): no '\\r' anywhere, transformers' "Loading
    weights" bars included; forced on (NANO_PROGRESS=1), the same capture does see them (the check is not blind).
    Bytes, not text: text mode's universal newlines would turn every '\\r' into '\\n'."""
    args = [
        sys.executable,
        "ppo_lag.py",
        "--actor_model_name_or_path",
        toy_models / "base",
        "--reward_model_name_or_path",
        toy_models / "rm",
        "--cost_model_name_or_path",
        toy_models / "cm",
        "--train_datasets",
        "toy-prompts:0.01",
        "--eval_datasets",
        "toy-eval:0.02",
        "--max_length",
        "40",
        "--max_steps",
        "1",
        "--per_device_prompt_batch_size",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--output_dir",
        tmp_path / "ppo",
    ]
    proc = subprocess.run(args, cwd=ROOT, env=stage_env(NANO_PROGRESS=setting), capture_output=True, timeout=300)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0 and "step 1/1" in out and "eval step 1" in out, out[-2000:] + err[-3000:]
    assert ("\r" in out + err) is carriage_returns, err[-2000:]
