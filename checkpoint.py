"""The output-folder protocol shared by sft.py, score_model.py, ppo_lag.py and evaluate.py: a run never leaves a
half-written or non-finite model at --output_dir, never destroys the previous good one, and two runs never write
into the same folder.

A run writing OUT uses three siblings of it:
    OUT.lock      {pid, host, started, argv}: held from prepare_output to the end of the process
    OUT.partial   everything the run writes; COMPLETE once `arguments.json` is at its top level, which the final
                  save writes last (intermediate saves write theirs one level down, in checkpoint-<step>/)
    OUT.old       the previous OUT, only during the swap
The protocol:
 1. prepare_output (master, at start-up, before any slow work): make the parent folder, take the lock (writing it
    is also the check that OUT can be written), recover what a killed run left (below), return an empty OUT.partial.
 2. The stage checks its metrics at each log step (check_finite) and its weights before each save (weights_finite),
    saves into OUT.partial, arguments.json last.
 3. publish: rename OUT -> OUT.old, rename OUT.partial -> OUT, delete OUT.old. Each rename is atomic, so a kill at
    any instant leaves a complete model at OUT, or at OUT.old with the new one complete in OUT.partial.
 4. The lock goes at exit (atexit) or with release_output. Ctrl-C ends a stage with `interrupted` (exit 130,
    OUT.partial left in place); a non-finite loss or weight with one line and exit 1, nothing saved.
What a re-run recovers, under the lock, before it starts (the states a kill during 2-3 leaves):
    OUT.partial complete        a finished run whose swap did not happen or did not finish: publish it
    OUT.old, OUT complete       the swap finished but for deleting OUT.old: delete it
    OUT.old, no OUT             the swap stopped between its renames and the new model is not whole: OUT.old -> OUT
    OUT.partial not complete    a killed run's leftovers: deleted (no stage resumes from them yet)
A complete model is deleted only by the swap that puts a newer complete one in its place.
"""

import atexit
import contextlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path
from typing import NoReturn

RERUN_HINT = "re-run the same command to start again"  # the resume issue turns this into "... to resume"


def _master() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _stop(message: str) -> NoReturn:
    """Exit 1 on every rank (the values that trigger it are all-reduced), with the one line from rank 0 only."""
    raise SystemExit(message if _master() else 1)


def _paths(output_dir) -> tuple[Path, Path, Path, Path]:
    out = Path(os.path.normpath(output_dir))  # "out/" and "out" name the same siblings
    return out, Path(f"{out}.partial"), Path(f"{out}.old"), Path(f"{out}.lock")


def is_complete(folder) -> bool:
    return (Path(folder) / "arguments.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# The output folder: lock, recovery, atomic swap

_held: set[Path] = set()  # locks this process holds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def _take_lock(out: Path, lock: Path, args_dict: dict | None) -> None:
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv,
        "args": args_dict,
    }
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}")
    tmp.write_text(json.dumps(me, default=str))
    try:
        while True:
            try:  # a hard link appears atomically, whole, and only where no lock is
                os.link(tmp, lock)
                break
            except FileExistsError:
                try:
                    other = json.loads(lock.read_text())
                except FileNotFoundError:  # released meanwhile: try again
                    continue
                except ValueError:  # unreadable, so no live run can be named: stale
                    other = {}
            pid, host, started = other.get("pid"), other.get("host"), other.get("started")
            if (pid, host) == (me["pid"], me["host"]):
                break
            if host not in (None, me["host"]) or isinstance(pid, int) and _alive(pid):
                raise SystemExit(
                    f"error: {out} is in use by another run (pid {pid} on {host}, started {started}); "
                    f"wait for it or pass another --output_dir (delete {lock} if that run is gone)"
                )
            print(f"taking over the stale lock {lock} of pid {pid} (started {started}), which is no longer running")
            lock.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    _held.add(lock)


def release_output(output_dir) -> None:
    """Drop this process's lock on output_dir (also done at exit), and the .partial if nothing was written to it."""
    _, partial, _, lock = _paths(output_dir)
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():  # never a lock a forked child inherited
            with contextlib.suppress(OSError):  # a run stopped by bad input leaves no empty folder behind
                partial.rmdir()
            lock.unlink()
    except (OSError, ValueError):
        pass
    _held.discard(lock)


atexit.register(lambda: [release_output(str(lock).removesuffix(".lock")) for lock in list(_held)])


def _swap(partial: Path, out: Path, old: Path, pause: float = 0.0) -> None:
    if out.exists():
        if old.exists():
            shutil.rmtree(old)  # a stale copy: out is there, so a model always remains
        os.rename(out, old)
    if pause:  # test hook: a test kills the process here, inside the window
        print("swap: pausing", flush=True)
        time.sleep(pause)
    os.rename(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def _recover(out: Path, partial: Path, old: Path) -> None:
    if is_complete(partial):
        print(f"{partial} holds the complete model of a run whose final swap was interrupted: publishing it")
        _swap(partial, out, old)
    elif old.exists():
        if is_complete(out):
            shutil.rmtree(old)
        elif out.exists():
            raise SystemExit(f"error: {out} is incomplete and {old} holds the previous model; move one of them away")
        else:
            os.rename(old, out)
            print(f"restored {out} from {old}: an interrupted swap had moved it aside")


def prepare_output(output_dir: str, args_dict: dict | None = None) -> Path:
    """Master only, at start-up: check that output_dir can be written, lock it, recover an interrupted swap, and
    return the empty `<output_dir>.partial` the run writes into."""
    out, partial, old, lock = _paths(output_dir)
    try:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(20, "a file, not a folder", str(out))
        out.parent.mkdir(parents=True, exist_ok=True)
        _take_lock(out, lock, args_dict)
        _recover(out, partial, old)
        if partial.exists():  # a killed run's leftovers
            shutil.rmtree(partial)
        partial.mkdir()
    except OSError as e:
        reason = f"{e.strerror}: {e.filename}"
        if isinstance(e, FileExistsError):  # mkdir met a file where a folder of the path should be
            reason = f"{e.filename} is a file, not a folder"
        raise SystemExit(f"error: cannot write {out} ({reason}); pass a writable --output_dir") from None
    return partial


def publish(partial, output_dir: str) -> None:
    """Master only, once the final save is whole: swap `partial` in as output_dir (module docstring, step 3)."""
    out, _, old, _ = _paths(output_dir)
    if not is_complete(partial):
        raise RuntimeError(f"{partial} has no arguments.json: write it last in the final save, then publish")
    _swap(Path(partial), out, old, float(os.environ.get("NANO_SWAP_PAUSE", "0")))


def interrupted(step: int, partial) -> NoReturn:
    """Ctrl-C: one line naming the newest complete checkpoint in `partial`, exit 130, `partial` left in place."""
    steps = [int(p.name[11:]) for p in Path(partial).glob("checkpoint-*") if p.name[11:].isdigit() and is_complete(p)]
    last = Path(partial) / f"checkpoint-{max(steps)}" if steps else "none"
    if _master():
        print(f"interrupted at step {step}; the last complete checkpoint is {last}; {RERUN_HINT}", file=sys.stderr)
    raise SystemExit(130)


# ----------------------------------------------------------------------------------------------------------------
# Numbers: a NaN or an inf anywhere stops the run before it is saved


def check_finite(metrics: dict[str, float], step: int) -> None:
    """`metrics`: a log step's host-side values, already all-reduced (a NaN on any rank survives the sum)."""
    bad = [f"{k} ({float(v)})" for k, v in metrics.items() if not math.isfinite(float(v))]
    if bad:
        _stop(
            f"error: non-finite {', '.join(bad)} at step {step}; stopping without saving (lower --lr, check the data)"
        )


def weights_finite(module) -> bool:
    """Every parameter finite; under ZeRO-3 each rank sees its own partition (`ds_tensor`): the caller all-reduces
    the flag (MIN) and passes it to check_finite, e.g. check_finite({"weights": 1.0 if flag else math.nan}, step)."""
    import torch

    flags = [torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


# ----------------------------------------------------------------------------------------------------------------
# Model folders: what a stage is given, checked from config.json and the safetensors headers (never the weights)


def _tensor_names(file: Path) -> set[str] | str:
    """The tensor names in a weights file (none for a .bin: reading them means loading it), or what is wrong."""
    if not file.is_file():
        return "is missing (its index lists it)"
    if file.suffix != ".safetensors":
        return set() if zipfile.is_zipfile(file) else "is truncated or corrupt"
    size = file.stat().st_size
    with open(file, "rb") as f:  # 8 bytes n, an n-byte JSON header, then the data its offsets point into
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            return f"is truncated ({size:,} bytes; its header is cut off)"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "is corrupt (its header is unreadable)"
    return f"is truncated ({size:,} bytes, its header needs {8 + n + end:,})" if 8 + n + end > size else set(header)


def _weight_names(root: Path, fail) -> set[str]:
    """The tensor names of a folder's weights (one file, or an index and its shards); `fail` when any is bad."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index, names = root / f"{single}.index.json", set()
        if (root / single).is_file():
            files = [single]
        elif index.is_file():
            names = set(weight_map := json.loads(index.read_text())["weight_map"])
            files = sorted(set(weight_map.values()))
        else:
            continue
        for file in files:
            found = _tensor_names(root / file)
            if isinstance(found, str):
                fail(f"has a bad weights file: {file} {found}", "the save did not finish: save the model again")
            names |= found
        return names
    fail(
        "has config.json but no weights (model.safetensors, pytorch_model.bin, or an .index.json and its shards)",
        "the save did not finish: re-run the stage that wrote it, or pass the folder that has the weights",
    )


def _check_adapter(root: Path, kind: str, name: str, fail) -> None:
    """A LoRA adapter folder (lora.py, --save_adapter_only): its adapter file and tokenizer, its kind, then its base."""
    try:
        base = json.loads((root / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError) as e:
        fail(f"has an unreadable adapter_config.json ({type(e).__name__}: {e})", "save the adapter again")
    found = _tensor_names(root / "adapter_model.safetensors")
    if isinstance(found, str):
        fail(f"is a LoRA adapter folder whose adapter_model.safetensors {found}", "save the adapter again")
    if not any(next(root.glob(p), None) for p in ("tokenizer.json", "*.model", "vocab.*", "*.tiktoken")):
        fail("is a LoRA adapter folder with no tokenizer files", "copy them from the model it was trained from")
    is_score = (root / "config.json").is_file()  # a score model's adapter keeps its score fields there
    if kind == "causal_lm" and is_score:
        fail("is a score model's LoRA adapter, not a causal LM's", "pass a policy (an adapter of sft.py/ppo_lag.py)")
    if kind == "score_model" and not is_score:
        fail("is a causal LM's LoRA adapter, with no score head", "it needs a model trained by score_model.py")
    if not base:
        fail("is a LoRA adapter folder that names no base model", "set base_model_name_or_path in adapter_config.json")
    check_model_folder(base, "any" if is_score else "causal_lm", f"{name} is a LoRA adapter; its base model")


def check_model_folder(path: str, kind: str, flag: str | None = None) -> None:
    """kind: "causal_lm" (a policy), "score_model" (a reward/cost model) or "any" (a backbone). One line and exit 1
    when the folder is missing, lacks config/weights/tokenizer, has a cut weights file or is the wrong kind."""
    assert kind in ("causal_lm", "score_model", "any"), kind
    name = f"{flag} {path}" if flag else str(path)

    def fail(problem: str, fix: str) -> NoReturn:
        raise SystemExit(f"error: {name} {problem}; {fix}")

    root, keys = Path(path), set()
    if (root / "adapter_config.json").is_file():
        return _check_adapter(root, kind, name, fail)
    if not root.is_dir():
        if root.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
            fail("is not a model folder", "pass a folder written by save_pretrained or by one of our stages")
        try:  # a hub id: only its config is checked here, from_pretrained fetches and checks the rest
            from huggingface_hub import hf_hub_download

            config = json.loads(Path(hf_hub_download(str(path), "config.json")).read_text())
        except Exception as e:
            fail(f"is neither a model folder nor a reachable hub model ({type(e).__name__})", "pass a model folder")
    else:
        if not (root / "config.json").is_file():
            fail("has no config.json", "pass a model folder written by save_pretrained or by one of our stages")
        try:
            config, keys = json.loads((root / "config.json").read_text()), _weight_names(root, fail)
        except (ValueError, KeyError) as e:  # a config or an index that is not the JSON it should be
            fail(f"has an unreadable config.json or weights index ({type(e).__name__}: {e})", "save the model again")
        if not any(next(root.glob(p), None) for p in ("tokenizer.json", "*.model", "vocab.*", "*.tiktoken")):
            fail(
                "has weights but no tokenizer files (tokenizer.json, tokenizer.model or vocab.json + merges.txt)",
                "copy them from the model it was trained from",
            )
    is_score = "score_dim" in config or "score_type" in config or "score_head.weight" in keys
    arch = (config.get("architectures") or ["?"])[0]
    if kind == "causal_lm" and is_score:
        fail(f"is a score model ({arch}), not a causal LM", "pass a policy: a base model or one from sft.py/ppo_lag.py")
    if kind == "score_model" and not is_score:
        role = "cost" if "cost" in (flag or "") else "reward" if "reward" in (flag or "") else "score"
        what = f"a causal LM ({arch})" if arch.endswith("ForCausalLM") else f"a model ({arch})"
        fail(f"is {what} with no score head", f"it needs a {role} model trained by score_model.py")
