"""The output-folder protocol shared by sft.py, score_model.py, ppo_lag.py and evaluate.py: a run never leaves a
half-written or non-finite model at --output_dir, never destroys the previous good one, two runs never write into the
same folder, and a killed run continues from its last checkpoint when the same command is run again.

A run writing OUT uses three siblings of it:
    OUT.lock      {pid, host, started, argv}: held from prepare_output to the end of the process
    OUT.partial   everything the run writes; COMPLETE once `arguments.json` is at its top level, which the final
                  save writes last (intermediate saves write theirs one level down, in checkpoint-<step>/)
    OUT.old       the previous OUT, only during the swap
The protocol:
 1. prepare_output (master, at start-up, before any slow work): make the parent folder, take the lock (writing it
    is also the check that OUT can be written), recover what a killed run left (below), return OUT.partial.
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
    OUT.partial not complete    a killed run's leftovers: its resumable checkpoints and logs are kept when the run
                                resumes (--resume_from_checkpoint auto or PATH), the rest is deleted
A complete model is deleted only by the swap that puts a newer complete one in its place.

Resume. `--save_interval N` writes, on every rank, OUT.partial/checkpoint-<step>.tmp/ and renames it to
checkpoint-<step>/ once whole:
    deepspeed/<name>/        each trained engine's DeepSpeed checkpoint: weights, optimizer, LR scheduler, ZeRO shards
    rng_state_<rank>.pth     the python, numpy, torch and CUDA generators of each rank
    loop_state.json          the loop's position and state (step, epoch, position in the epoch, lambda, windows...)
    the HF model files       so an intermediate policy can be evaluated or chatted with
    manifest.json            every file's size and the run's data files' sha256
    arguments.json           last: the completeness marker
A re-run finds the newest whole one (find_resume; a damaged one, by its manifest, is named and skipped), refuses when
a flag that changes the result, a data file or the world size differs, restores engines, RNG and loop state
(load_checkpoint) and continues where the checkpoint was taken.

Every entry point imports this module first: its command-line section checks flag ranges (check_ranges, with the
tables the stages share) and installs the handler that ends a run on an error the user can fix (Ctrl-C, a full disk,
a read-only file system) with one line (error_line) instead of a traceback.
"""

import atexit
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
import zipfile
from pathlib import Path
from typing import NoReturn

RERUN_HINT = "re-run the same command to resume"


def _master() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _stop(message: str) -> NoReturn:
    """Exit 1 on every rank (the values that trigger it are all-reduced), with the one line from rank 0 only."""
    raise SystemExit(message if _master() else 1)


def _paths(output_dir) -> tuple[Path, Path, Path, Path]:
    out = Path(os.path.normpath(output_dir))  # "out/" and "out" name the same siblings
    if out.is_symlink():  # a link to a folder elsewhere: the run writes beside its target, and the link stays
        out = Path(os.path.realpath(out))
    return out, Path(f"{out}.partial"), Path(f"{out}.old"), Path(f"{out}.lock")


def is_complete(folder) -> bool:
    return (Path(folder) / "arguments.json").is_file()


def _ours(folder: Path) -> bool:
    """A folder the swap may replace: empty, or written by one of our stages (a model: arguments.json; an arena:
    summary.json)."""
    return not any(folder.iterdir()) or is_complete(folder) or (folder / "summary.json").is_file()


def _input_paths(args_dict: dict) -> dict[str, Path]:
    """flag -> resolved path of every existing file or folder a run reads (models, data files, configs), LoRA
    adapters' base models included; not the checkpoint it resumes from (read at start, replaced with the rest)."""

    def strings(value):  # a flag's value: a string, or a list of dataset specs (name, {"path": ..., ...})
        if isinstance(value, str):
            yield value
        elif isinstance(value, list | tuple | dict):
            for item in value.values() if isinstance(value, dict) else value:
                yield from strings(item)

    found = {}
    for name, value in (args_dict or {}).items():
        for text in strings(value):
            if name in ("output_dir", "resume_from_checkpoint") or not text or not os.path.exists(text):
                continue
            found[f"--{name} {text}"] = Path(os.path.realpath(text))
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                base = json.loads((Path(text) / "adapter_config.json").read_text())["base_model_name_or_path"]
                if base and os.path.exists(base):
                    found[f"--{name} {text} (its base model {base})"] = Path(os.path.realpath(base))
    return found


def check_output_dir(output_dir: str, args_dict: dict | None = None) -> None:
    """Before any slow work: one line and exit 1 unless the final swap may replace output_dir, i.e. it is new, empty
    or a stage's output, and neither the current folder, nor an input of the run, nor a folder holding one."""
    out = _paths(output_dir)[0]
    real, here = Path(os.path.realpath(out)), Path(os.getcwd()).resolve()
    if real == here or real in here.parents:
        raise SystemExit(
            f"error: --output_dir {output_dir!r} is the current folder or one above it, which the final swap cannot "
            "replace; pass a folder of its own, such as output/run"
        )
    for flag, path in _input_paths(args_dict).items():
        if real == path or real in path.parents:
            raise SystemExit(
                f"error: --output_dir {output_dir} holds the run's input {flag}, which the final swap would delete; "
                "pass another --output_dir"
            )
    if out.is_dir() and not _ours(out):
        raise SystemExit(
            f"error: --output_dir {output_dir} is a folder that no stage of ours wrote (it has no arguments.json or "
            "summary.json), and the final swap would delete its files; pass a new or empty folder"
        )


def _remove(path: Path) -> None:
    """Delete a folder, or a link (to a folder) without touching its target."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


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
    for junk in partial.glob("best-*"):  # score_model.py --save_best: a best copy whose deletion a kill cut short
        shutil.rmtree(junk)
    if out.exists():
        if old.exists() or old.is_symlink():
            _remove(old)  # a stale copy: out is there, so a model always remains
        os.rename(out, old)
    if pause:  # test hook: a test kills the process here, inside the window
        print("swap: pausing", flush=True)
        time.sleep(pause)
    os.rename(partial, out)
    with contextlib.suppress(OSError):
        _remove(old)


def _recover(out: Path, partial: Path, old: Path) -> None:
    if is_complete(partial):
        print(f"{partial} holds the complete model of a run whose final swap was interrupted: publishing it")
        _swap(partial, out, old)
    elif old.exists() or old.is_symlink():
        if is_complete(out):
            _remove(old)
        elif out.exists():
            raise SystemExit(f"error: {out} is incomplete and {old} holds the previous model; move one of them away")
        else:
            os.rename(old, out)
            print(f"restored {out} from {old}: an interrupted swap had moved it aside")


def _clean(partial: Path, keep: bool | str) -> None:
    """Delete what a killed run left in `partial`. With `keep` (resuming: "auto" or a checkpoint's path; "auto" first
    deletes damaged checkpoints, newest first, with a line each) and a resumable checkpoint there, only the
    unfinished parts go (*.tmp, folders without arguments.json, a half-written final model's files); the complete
    folders (checkpoints, score_model.py's --save_best copy best-<step>/), metrics.jsonl, samples.jsonl and
    tensorboard/ stay."""
    if not partial.exists():
        return
    if keep == "auto":  # a damaged newest checkpoint: the one before it, else a fresh start
        marked = [p for p in partial.glob("checkpoint-*") if p.name[11:].isdigit() and is_complete(p)]
        for path in sorted(marked, key=lambda p: int(p.name[11:]), reverse=True):
            if problem := checkpoint_problem(path):
                rest = [step for step in checkpoints(partial) if step < int(path.name[11:])]
                then = f"resuming from checkpoint-{max(rest)}" if rest else "no earlier checkpoint: starting over"
                print(f"{path} is damaged ({problem}): deleting it, {then}")
                _delete(path)
    saved = checkpoints(partial)
    if saved and not keep:
        print(f"discarding {len(saved)} checkpoint(s) in {partial} (--resume_from_checkpoint none): starting over")
    if not (keep and saved):
        shutil.rmtree(partial)
        return
    for path in partial.iterdir():
        whole = path.is_dir() and is_complete(path) and not path.name.endswith(".tmp")
        if not whole and path.name not in ("metrics.jsonl", "samples.jsonl", "tensorboard"):
            _delete(path)


def prepare_output(output_dir: str, args_dict: dict | None = None, resume: str = "none") -> Path:
    """Master only, at start-up: check that output_dir can be written, lock it, recover an interrupted swap, and
    return the `<output_dir>.partial` the run writes into: empty, or, when `resume` is "auto" or a path (a stage's
    --resume_from_checkpoint), holding only the killed run's resumable checkpoints and its logs."""
    out, partial, old, lock = _paths(output_dir)
    try:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(20, "a file, not a folder", str(out))
        check_output_dir(output_dir, args_dict)
        out.parent.mkdir(parents=True, exist_ok=True)
        _take_lock(out, lock, args_dict)
        _recover(out, partial, old)
        _clean(partial, keep=resume if resume != "none" else False)
        partial.mkdir(exist_ok=True)
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
# Resume: full-state checkpoints (engines, RNG, loop state) and the way back into the loop

# the flags that cannot change the trained model or its training metrics: they may differ on resume
RESUME_IGNORED = (
    "output_dir",
    "logging_steps",
    "save_interval",
    "save_total_limit",
    "resume_from_checkpoint",
    "log_type",
    "log_project",
    "local_rank",
)


MANIFEST = "manifest.json"  # in each checkpoint: every file's size, written just before arguments.json


_digests: dict[tuple, str] = {}


def data_files(args_dict: dict) -> dict[str, str]:
    """path -> sha256 of every file among a run's inputs (not folders: models are checked as models): the data files
    of its dataset specs, a prompt file, a chat template file. In each checkpoint's manifest, checked on resume."""
    import hashlib

    found = {}
    for path in sorted({str(p) for p in _input_paths(args_dict).values() if p.is_file()}):
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in _digests:  # hashed once per process, again only when the file changes
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            _digests[key] = digest.hexdigest()
        found[path] = _digests[key]
    return found


def checkpoint_problem(folder) -> str | None:
    """What keeps a checkpoint folder from being resumed, from the files resume reads (None: it is whole): its
    arguments.json and loop_state.json must parse, and every file its manifest lists must be there at its size."""
    folder = Path(folder)
    for name in ("arguments.json", "loop_state.json"):
        try:
            json.loads((folder / name).read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as e:
            return f"{name} is unreadable ({type(e).__name__})"
    if not (folder / MANIFEST).is_file():  # written by an earlier version: the marker files are all there is
        return None
    try:
        sizes = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for name, size in sizes.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size:,} bytes, {size:,} were written"
    return None


def is_resumable(folder) -> bool:
    return is_complete(folder) and checkpoint_problem(folder) is None


def checkpoints(partial) -> dict[int, Path]:
    """The resumable checkpoint-<step> folders in `partial`, by step."""
    found = {int(p.name[11:]): p for p in Path(partial).glob("checkpoint-*") if p.name[11:].isdigit()}
    return {step: path for step, path in sorted(found.items()) if is_resumable(path)}


def link_copy(src, dst) -> None:
    """Put src's files into dst (made if missing; files already there are replaced) as hard links, copies where a link
    cannot be made, arguments.json last: dst looks complete only once it is. src is left as it was."""
    src, dst = Path(src), Path(dst)
    for file in sorted((f for f in src.rglob("*") if f.is_file()), key=lambda f: f.name == "arguments.json"):
        target = dst / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(file, target)
        except OSError:  # another file system, or links not supported
            shutil.copy2(file, target)


def _delete(path: Path) -> None:
    """Unmark a checkpoint first, so that a kill in the middle of deleting it never leaves a complete-looking one."""
    if path.is_dir():
        (path / "arguments.json").unlink(missing_ok=True)
        shutil.rmtree(path)
    else:
        path.unlink()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _choose(partial: Path, resume: str, args_dict: dict, ignored: set, world_size: int) -> Path | None:
    """Rank 0: the checkpoint to resume from (None: start over), after checking it fits this run."""
    saved = checkpoints(partial)
    if resume == "none" or resume == "auto" and not saved:
        return None
    folder = saved[max(saved)] if resume == "auto" else Path(resume)
    if not is_complete(folder) or not (folder / "loop_state.json").is_file():
        raise SystemExit(
            f"error: --resume_from_checkpoint {resume} is not a complete checkpoint (a checkpoint-<step> folder "
            "with loop_state.json and arguments.json, written with --save_interval); pass one, auto or none"
        )
    if problem := checkpoint_problem(folder):
        raise SystemExit(
            f"error: --resume_from_checkpoint {resume} is damaged: {problem}; pass an earlier checkpoint, auto "
            "(the newest whole one) or none"
        )
    state = json.loads((folder / "loop_state.json").read_text())
    if state["world_size"] != world_size:
        raise SystemExit(
            f"error: cannot resume from {folder}: it was saved by {state['world_size']} processes and this run has "
            f"{world_size} (its ZeRO shards and RNG states are per process); resume with {state['world_size']} "
            "processes, or pass --resume_from_checkpoint none to start over"
        )
    old = json.loads((folder / "arguments.json").read_text())
    new = json.loads(json.dumps(args_dict, default=str))  # the saved values went through the same round trip
    _unset = object()
    show = lambda v: v if isinstance(v, str) else "(unset)" if v is _unset else json.dumps(v)  # noqa: E731
    differ = [
        f"--{k} {show(old.get(k, _unset))} -> {show(new.get(k, _unset))}"
        for k in [*new, *(k for k in old if k not in new)]
        if k not in ignored and old.get(k, _unset) != new.get(k, _unset)
    ]
    if differ:
        raise SystemExit(
            f"error: cannot resume from {folder}: flags differ from the run that saved it: {', '.join(differ)}; "
            "re-run with the saved flags, or pass --resume_from_checkpoint none to start over"
        )
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # no manifest: an earlier version's checkpoint
        saved_files = json.loads((folder / MANIFEST).read_text())["data_files"]
        changed = [f for f, digest in data_files(args_dict).items() if saved_files.get(f, digest) != digest]
        if changed:
            raise SystemExit(
                f"error: cannot resume from {folder}: {', '.join(changed)} changed since it was saved (the resumed "
                "run would continue in another data order); put the file back, or pass --resume_from_checkpoint none "
                "to start over"
            )
    for later, path in saved.items():  # an older checkpoint was chosen: the steps after it will be trained again
        if later > state["step"]:
            print(f"deleting {path}: the run continues from step {state['step']}")
            _delete(path)
    for log in (partial / "metrics.jsonl", partial / "samples.jsonl"):  # keep the lines of steps <= N (the kill
        if log.is_file():  # may have cut the last one)
            rows = []
            for line in log.read_text().splitlines():
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    if json.loads(line)["step"] <= state["step"]:
                        rows.append(line + "\n")
            log.with_name(f"{log.name}.tmp").write_text("".join(rows))
            os.replace(log.with_name(f"{log.name}.tmp"), log)
    return folder


def find_resume(partial, resume: str, args_dict: dict, ignored=()) -> Path | None:
    """Every rank, after prepare_output and a barrier, before data and models: the checkpoint to resume from, or
    None to start fresh. Rank 0 decides (auto: the newest resumable checkpoint in `partial`; a path; none) and
    checks the world size and every flag outside RESUME_IGNORED + `ignored` against the saved arguments.json; a
    mismatch is one line and exit 1 on every rank, nothing deleted. Then rank 0 deletes newer checkpoints and
    truncates metrics.jsonl to the checkpoint's step."""
    import torch.distributed as dist

    rank, world_size = _rank_world()
    answer = [None]
    if rank == 0:
        try:
            answer = [_choose(Path(partial), resume, args_dict, {*RESUME_IGNORED, *ignored}, world_size)]
        except SystemExit as e:
            answer = [str(e.code)]
    if world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        _stop(answer[0])
    return answer[0]


def start_run(args, ignored=()) -> tuple[Path, Path | None]:
    """Every rank, once the process group is up: rank 0 locks <output_dir> and prepares <output_dir>.partial
    (prepare_output), then every rank learns the checkpoint to continue from, if any (find_resume; `ignored`: the
    stage's flags that may differ from the checkpoint's). Returns (the .partial folder, the checkpoint or None)."""
    import torch.distributed as dist

    partial = Path(f"{os.path.normpath(args.output_dir)}.partial")
    if _master():  # before slow work: check it can be written, recover an interrupted swap
        partial = prepare_output(args.output_dir, vars(args), args.resume_from_checkpoint)
    dist.barrier()
    return partial, find_resume(partial, args.resume_from_checkpoint, vars(args), ignored)


def _rng_states() -> dict:
    import numpy as np
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return states


def _set_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(
    partial,
    step: int,
    engines: dict,
    state: dict,
    write_model,
    args_dict: dict,
    save_total_limit=None,
    rank_state=None,
    folders=None,
) -> Path:
    """Every rank, at an optimizer-step boundary, after the weights check (and the ZeRO-3 gather write_model needs):
    write `partial/checkpoint-<step>.tmp` (each engine's DeepSpeed checkpoint, each rank's RNG states, the HF model
    via write_model(folder) on rank 0, `folders` {name: folder} linked in as <name>/ (score_model.py's best model as of
    this step), loop_state.json = `state` + every rank's `rank_state`, manifest.json, arguments.json last),
    rename it to checkpoint-<step>, keep the newest `save_total_limit` checkpoints. Both states must be JSON-able."""
    import torch
    import torch.distributed as dist

    t0 = time.time()
    rank, world_size = _rank_world()
    final, tmp = Path(partial) / f"checkpoint-{step}", Path(partial) / f"checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    for name, engine in engines.items():  # weights, optimizer, LR scheduler; each rank writes its own ZeRO shards
        engine.save_checkpoint(str(tmp / "deepspeed"), tag=name, save_latest=False)
    torch.save(_rng_states(), tmp / f"rng_state_{rank}.pth")
    rank_states = [None] * world_size
    dist.all_gather_object(rank_states, rank_state or {})
    if rank == 0:
        write_model(tmp)
        for name, folder in (folders or {}).items():
            link_copy(folder, tmp / name)
        loop = {"step": step, "world_size": world_size, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), **state}
        (tmp / "loop_state.json").write_text(json.dumps({**loop, "rank_state": rank_states}, indent=1))
    dist.barrier()  # every rank's files are down before the manifest and the completeness marker
    if rank == 0:
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": sizes, "data_files": data_files(args_dict)}, indent=1))
        (tmp / "arguments.json").write_text(json.dumps(args_dict, indent=2, default=str))
        if final.exists():  # left by an older run of this step: replaced
            _delete(final)
        os.rename(tmp, final)
        saved = checkpoints(partial)
        for old in list(saved)[: -save_total_limit if save_total_limit else 0]:
            _delete(saved[old])
        size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        print(f"checkpoint {final} saved in {time.time() - t0:.2f} s ({size / 1e6:,.1f} MB)", flush=True)
        if os.environ.get("NANO_CHECKPOINT_PAUSE") == str(step):  # test hook: a test kills the run in this pause
            print("checkpoint: pausing", flush=True)
            time.sleep(600)
    dist.barrier()
    return final


def save_model(engine, folder, step: int, write_model, args_dict: dict, checkpoint=None, what="weights"):
    """Every rank: the trained model as an ordinary HF folder in `folder`, arguments.json last (it marks the folder
    complete). Never a non-finite model: the weights are checked first (one host sync; under ZeRO-3 each rank checks
    its own partition, then every rank joins the gather of the weights into rank 0's copy). write_model(folder,
    state_dict) writes the model files on rank 0 (state_dict: the gathered one under ZeRO-3, else None).
    checkpoint: save_checkpoint's other arguments (engines, state, save_total_limit, rank_state, folders): a full
    checkpoint-<step>/ inside `folder` instead."""
    import torch
    import torch.distributed as dist

    finite = torch.tensor(float(weights_finite(engine.module)), device=engine.device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # a NaN in one rank's ZeRO partition stops every rank
    check_finite({what: 1.0 if finite.item() else math.nan}, step)
    state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else None

    def write(path):
        os.makedirs(path, exist_ok=True)
        write_model(path, state_dict)

    if checkpoint is not None:
        return save_checkpoint(folder, step, write_model=write, args_dict=args_dict, **checkpoint)
    if _master():
        write(folder)
        (Path(folder) / "arguments.json").write_text(json.dumps(args_dict, indent=2, default=str))
    dist.barrier()


def load_checkpoint(folder, engines: dict) -> dict:
    """Every rank, once the engines exist, immediately before the loop: load each engine's DeepSpeed checkpoint
    (weights, optimizer, LR scheduler), then this rank's RNG states (last: nothing may draw random numbers between
    this call and the loop); return the loop state, this rank's part merged in."""
    import torch

    folder = Path(folder)
    rank, _ = _rank_world()
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(folder / "deepspeed"), tag=name)
        if path is None:
            _stop(f"error: {folder} holds no DeepSpeed checkpoint for {name}; pass --resume_from_checkpoint none")
    state = json.loads((folder / "loop_state.json").read_text())
    _set_rng_states(torch.load(folder / f"rng_state_{rank}.pth", weights_only=False))
    if rank == 0:
        print(f"resumed from step {state['step']} ({folder})", flush=True)
    rank_state = state.pop("rank_state")[rank]
    return {**state, **rank_state}


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
# The command line: each flag's range checked in one place, and one line for the errors a user can fix

# the ranges of the flags the training stages share (each stage adds its own)
LOOP_RANGES = {
    **dict.fromkeys(
        [
            "max_length",
            "epochs",
            "max_steps",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_total_limit",
        ],
        ">= 1",
    ),
    "eval_interval": ">= 0",
    "save_interval": ">= 0",
}
# and of the optimiser flags of the stages that train one model (sft.py, score_model.py, dpo.py)
TRAIN_RANGES = {**LOOP_RANGES, "lr": "finite and > 0", "lr_warmup_ratio": "[0, 1]", "weight_decay": "finite and >= 0"}
# the sampling flags of ppo_lag.py, evaluate.py and chat.py (a temperature of 0 is greedy where a stage allows it)
SAMPLING_RANGES = {"temperature": "> 0", "top_p": "(0, 1]", "repetition_penalty": "> 0"}


def check_ranges(parser, args, ranges: dict[str, str]) -> None:
    """argparse's one line (exit 2) for the first flag out of its range. `ranges`: flag -> "> 0", ">= 1", or an
    interval "[0, 1]", "(0, 1]" (a square bracket includes its end), as the line will say it; "finite and > 0" says
    so too, though NaN and inf are refused whatever the rule. An unset flag (None) passes, and so does one the stage
    does not have (a stage may use part of a shared table)."""
    for name, rule in ranges.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        bounds = rule.removeprefix("finite and ")
        if bounds[0] in "[(":
            low, high = (float(x) for x in bounds[1:-1].split(","))
            above = low <= value if bounds[0] == "[" else low < value
            ok = above and (value <= high if bounds[-1] == "]" else value < high)
            rule = rule.replace(bounds, f"in {bounds}")
        else:
            op, bound = bounds.split()
            ok = value >= float(bound) if op == ">=" else value > float(bound)
        if not (ok and math.isfinite(value)):
            rule = rule if math.isfinite(value) or rule.startswith("finite") else f"finite and {rule}"
            parser.error(f"--{name} must be {rule}, got {value}")


FIXES = {  # errno -> what to do about it
    errno.ENOSPC: "the disk is full: free space, then re-run the same command (it resumes from a checkpoint, if any)",
    errno.EDQUOT: "the disk quota is used up: free space, then re-run the same command (it resumes if it can)",
    errno.EFBIG: "a file outgrew the size limit of the file system or of `ulimit -f`: raise it or write elsewhere, "
    "then re-run the same command (it resumes if it can)",
    errno.EROFS: "the file system is read-only: make it writable or pass another --output_dir, then re-run",
    errno.EACCES: "fix its permissions or pass another folder",
    errno.EPERM: "fix its permissions or pass another folder",
}
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _failed_write(e: BaseException) -> OSError | None:
    """torch.save and safetensors report a failed write without an OSError (torch says "unexpected pos 576 vs 534"):
    when this process holds an output folder and 1 MiB can no longer be written into its .partial, that is the
    cause. The old model at the output folder is untouched: only the swap replaces it."""
    if not isinstance(e, Exception):
        return None
    for lock in list(_held):
        partial = Path(f"{str(lock).removesuffix('.lock')}.partial")
        probe = partial / ".write_probe"
        try:
            if partial.is_dir():
                with open(probe, "wb") as f:
                    f.write(bytes(1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as err:
            if err.errno in _WRITE_ERRORS:
                return OSError(err.errno, f"{err.strerror}, so a write failed ({type(e).__name__})", str(partial))
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
    return None


def error_line(e: BaseException) -> str | None:
    """The one line an entry point ends with for an error the user can fix: an interrupt, an OSError (its cause and
    file: disk full, a read-only file system, permissions), a write that failed for one of those; None for the rest,
    which are bugs and keep their traceback."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C); nothing half-written was published: re-run the same command to continue"
    e = e if isinstance(e, OSError) and e.errno else _failed_write(e)
    if e is None:
        return None
    where = f"{e.filename}: " if e.filename else ""
    fix = FIXES.get(e.errno, "check the path, its permissions and its file system")
    return f"error: {where}{e.strerror} [{errno.errorcode.get(e.errno, e.errno)}]; {fix}"


def _excepthook(kind, value, tb) -> None:
    line = error_line(value)
    if line is None:
        _previous_excepthook(kind, value, tb)
    elif _master() or not isinstance(value, KeyboardInterrupt):  # Ctrl-C reaches every rank: one line is enough
        print(line, file=sys.__stderr__, flush=True)  # past torch.distributed's hook, which prefixes "[rank0]: "


# Installed when an entry point imports this module, which each does first, before its slow imports (torch,
# transformers, deepspeed): from then on an exception that ends the process goes through error_line. The interpreter
# then exits with 1, or, after Ctrl-C, by SIGINT (130 in a shell), running the atexit hooks either way (the lock).
_previous_excepthook = sys.excepthook
if sys.excepthook is sys.__excepthook__:
    sys.excepthook = _excepthook


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
    if is_score:
        try:
            config = json.loads((root / "config.json").read_text())
        except ValueError as e:
            fail(f"has an unreadable config.json ({type(e).__name__}: {e})", "save the adapter again")
        flag = name.split()[0] if name.startswith("--") else ""
        role = "cost" if "cost" in flag else "reward" if "reward" in flag else "score"
        _check_score_type(config, kind, role, fail)
    if not base:
        fail("is a LoRA adapter folder that names no base model", "set base_model_name_or_path in adapter_config.json")
    if os.path.realpath(base) == os.path.realpath(root):  # an adapter once saved over its own base model
        fail("is a LoRA adapter that names itself as its base model", "its base weights are gone: train it again")
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
    role = "cost" if "cost" in (flag or "") else "reward" if "reward" in (flag or "") else "score"
    if kind == "score_model" and not is_score:
        what = f"a causal LM ({arch})" if arch.endswith("ForCausalLM") else f"a model ({arch})"
        fail(f"is {what} with no score head", f"it needs a {role} model trained by score_model.py")
    _check_score_type(config, kind, role, fail)


def _check_score_type(config: dict, kind: str, role: str, fail) -> None:
    """A reward model passed as the cost model (or the other way round): refused from the score_type it was saved
    with (score_model.py --score_type)."""
    trained = config.get("score_type")
    if kind == "score_model" and role in ("reward", "cost") and trained in ("reward", "cost") and trained != role:
        fail(
            f"is a {trained} model (score_type {trained} in its config.json), not a {role} model",
            f"pass a model trained with score_model.py --score_type {role} (are the reward and cost models swapped?)",
        )
