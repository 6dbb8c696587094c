"""Datasets for every stage: raw samples, the dataset registry, NAME[@REVISION][:PROPORTION[:PATH[#FIELD]]] specs, the
built-in datasets, and tokenized datasets with their collators. A conversation becomes text and token ids in
templates.py (the prompt and chat templates, the tokenizer); the toy world's datasets (toy-*) are in toy.py.

A raw dataset is a class with a NAME that yields RawSample dicts; registering one is subclassing RawDataset (or
`variant(...)` for another split of a loader), which works from a user's own script too (before argument parsing).
@REVISION picks a version of a hub dataset (PKU-SafeRLHF/train@v0, the paper's); `prompts:1.0:PATH[#FIELD]` reads any
local JSON/JSONL/CSV/Parquet file of prompts; `safe-unsafe-pairs[/train|/test]:1.0:PATH` reads [safe, unsafe] answer
pairs (the PKU-SafeRLHF-derived file), split by prompt. Tokenized datasets turn raw samples into tensors for one stage:
supervised (SFT), preference (reward model), safety preference (cost model) and prompt-only (PPO rollouts,
evaluation), in the anchor's template (the default) or the tokenizer's own chat template (`model`, or a Jinja file).
Broken JSONL lines are skipped and counted like malformed records; a file that cannot be read at all, or gives no
usable record, is a ValueError naming it (and, for unparseable records, the fields expected and found), which every
stage prints as one line.
"""

import argparse
import gzip
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import NamedTuple, TypedDict

import torch

from templates import as_turns, chat_prompt, chat_spans, check_fits_model, root_cause, set_chat_template, tokenize

# ----------------------------------------------------------------------------------------------------------------
# Raw samples, the registry and NAME[@REVISION][:PROPORTION[:PATH[#FIELD]]] specs


class RawSample(TypedDict, total=False):
    input: str | list[str]  # the user's request; a list holds earlier turns (user, assistant, ..., user)
    dialogue: list[str]  # alternating user/assistant turns (SFT)
    answer: str
    other_answer: str
    better: bool  # answer is more helpful than other_answer
    safer: bool  # answer is safer than other_answer
    is_safe: bool  # answer is safe
    is_other_safe: bool  # other_answer is safe
    severity: int  # harm severity of answer, 0 (safe) to 3 (severe), where the data has it (PKU-SafeRLHF v1)
    other_severity: int
    harm_categories: list[str]  # the harm categories answer falls in, where the data has them
    other_harm_categories: list[str]
    category: str  # a prompt's category (red-team prompt files)


class RawDataset:
    """Subclass with NAME (and ALIASES) to register. `records(path)` reads PATH, or HUB_ID's SPLIT (in DATA_DIR, at
    `revision`) when no PATH is given; `to_sample(record)` turns a record into a RawSample, or None when it cannot be
    parsed (EXPECTED names the fields it reads, for that error). `field`: a FIELD_CHOICE loader's field."""

    NAME, ALIASES = "", ()
    HUB_ID, SPLIT, DATA_DIR = None, "train", None
    GENERATED = False  # True: the samples are generated (the toy world), a PATH would be silently ignored
    EXPECTED, FIELD_CHOICE = "", False  # FIELD_CHOICE: the spec may name the field to read (PATH#FIELD)
    registry: dict[str, type["RawDataset"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in (cls.NAME, *cls.ALIASES):
            if name:
                RawDataset.registry[name] = cls

    def __init__(self, path: str | None = None, revision: str | None = None, field: str | None = None):
        self.revision, self.field = revision, field
        self.samples, skipped, broken, unparsed = [], {}, None, None
        for record in self.records(path):
            if isinstance(record, BrokenLine):
                reason, broken = "broken JSON line", broken or record
            else:
                try:
                    sample = self.to_sample(record)
                except ValueError as e:  # a label that is no label: every sample would be wrong, not one skipped
                    raise ValueError(
                        f"{path or self.HUB_ID}: record {len(self.samples) + sum(skipped.values()) + 1}"
                        f": {e}; fix the file"
                    ) from None
                reason = "unparseable" if sample is None else malformed(sample)
                if sample is None and unparsed is None:
                    unparsed = record
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                self.samples.append(sample)
        self.skipped = sum(skipped.values())
        first = f"; first broken line: {broken.file}:{broken.line} ({broken.why})" if broken else ""
        if unparsed is not None:  # name what the loader wanted and what the file has
            found = ", ".join(list(unparsed)[:12]) + (", ..." if len(unparsed) > 12 else "")
            first += f"; unparseable records: expected {self.expected()}, found fields {found}"
        if not self.samples:
            raise ValueError(
                f"dataset {self.NAME} gave no usable samples from {path or self.HUB_ID} "
                f"(skipped {skipped or 'nothing: no records'}){first}"
            )
        if self.skipped:
            print(
                f"dataset {self.NAME}: kept {len(self.samples):,}, skipped {self.skipped:,} malformed records "
                f"{skipped}{first}"
            )

    def records(self, path):
        return read_records(path, self.HUB_ID, self.SPLIT, self.DATA_DIR, self.NAME, self.revision)

    def expected(self) -> str:
        return f"the fields {self.EXPECTED}" if self.EXPECTED else "other fields"

    def to_sample(self, record: dict) -> RawSample | None:
        return record  # records that already are RawSamples (the toy world)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i) -> RawSample:
        return self.samples[i]

    @staticmethod
    def load(name: str, path: str | None = None, revision: str | None = None, field: str | None = None):
        if name not in registry():
            raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(sorted(registry()))}")
        if path is not None and registry()[name].GENERATED:
            raise ValueError(f"dataset {name!r} is generated and takes no PATH (got {path!r}); drop the PATH")
        if problem := option_problem(name, path, revision, field):
            raise ValueError(f"dataset {name}: {problem}")
        return registry()[name](path, revision, field)


def registry() -> dict[str, type[RawDataset]]:
    """Every dataset by name: the ones below, a user's, and the toy world's, which toy.py registers when it is imported
    (it imports this file, so it is imported here, at the first lookup, not at the top)."""
    import toy  # noqa: F401

    return RawDataset.registry


def option_problem(name: str, path: str | None, revision: str | None, field: str | None) -> str | None:
    """Why a dataset cannot take this @REVISION or #FIELD, or None."""
    cls = registry()[name]
    if revision is not None and not revision:
        return "empty @REVISION: drop the @ or name a version, e.g. @v0"
    if revision is not None and cls.HUB_ID is None:
        return f"@{revision}: {name} has no hub copy to pick a version of; drop @{revision}"
    if revision is not None and path is not None:
        return f"@{revision} picks a version on the hub ({cls.HUB_ID}), a local PATH is read as it is: drop one of them"
    if field is not None and (not field or not cls.FIELD_CHOICE):
        return f"#{field}: only the prompts dataset takes a #FIELD (the field that holds the prompt)"
    return None


def label(value, field: str, ids: bool = False) -> bool | int:
    """A boolean label (ids: a response id, 0 or 1) as a JSON, CSV or Parquet file may hold it: true/false, 1/0, or
    either as text. bool("false") is True: text labels are read, not cast; anything else is a ValueError."""
    text = str(value).strip().lower()
    if not ids and text in ("true", "false"):
        return text == "true"
    if text in ("0", "1", "0.0", "1.0") and not isinstance(value, list | dict):
        return int(float(text)) if ids else text.startswith("1")
    raise ValueError(f"field {field} is {value!r}, not {'a response id (0 or 1)' if ids else 'true/false or 1/0'}")


def variant(base: type[RawDataset], name: str, *aliases: str, **attrs) -> type[RawDataset]:
    """Register another split or subset of a loader in one line: a subclass that only changes class attributes."""
    return type(name, (base,), {"NAME": name, "ALIASES": aliases, **attrs})


def malformed(s: RawSample) -> str | None:
    """Why a sample cannot be trained on, or None."""
    texts = [s["input"]] if isinstance(s.get("input"), str) else s.get("input") or s.get("dialogue") or []
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        return "empty input"
    for key in ("answer", "other_answer"):
        if key in s and (not isinstance(s[key], str) or not s[key].strip()):
            return f"empty {key}"
    if "other_answer" in s and s["answer"].strip() == s["other_answer"].strip():
        return "identical answers"
    if {"safer", "is_safe", "is_other_safe"} <= s.keys():  # exactly one answer is safe and `safer` names the other
        if bool(s["is_safe"]) != bool(s["is_other_safe"]) and bool(s["safer"]) != bool(s["is_safe"]):
            return "contradictory safety labels"
    return None


class BrokenLine(NamedTuple):
    """A line of a JSON Lines file that is not a JSON object: read_records returns one per such line after the
    records, and RawDataset counts it as a skipped record."""

    file: str
    line: int
    why: str


def read_records(
    path: str | None, hub_id: str | None, split: str, data_dir: str | None, name: str, revision: str | None = None
) -> list:
    """Records from a local JSON/JSONL/JSONL.GZ/CSV/Parquet file, a folder of them, a save_to_disk folder, or the hub
    (at a revision); JSONL lines that do not parse are skipped (a BrokenLine each); an unreadable file: ValueError."""
    import datasets

    if path is None:
        if hub_id is None:
            raise ValueError(f"dataset {name!r} has no hub id: give a local file, e.g. {name}:1.0:/path/to/file.json")
        try:
            return list(datasets.load_dataset(hub_id, data_dir=data_dir, split=split, revision=revision))
        except Exception as e:
            at = f" at revision {revision!r}" if revision else ""
            raise ValueError(
                f"could not load {hub_id!r}{at} from the hub ({type(e).__name__}); offline? "
                f"pass a local copy as {name}:1.0:/path/to/{split}.jsonl"
            ) from None
    p = Path(path)
    if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise ValueError(f"could not read the save_to_disk folder {path}: {root_cause(e)}") from None
        if isinstance(ds, datasets.DatasetDict) and split not in ds:
            raise ValueError(f"{path} has no split {split!r} (it has {', '.join(ds)}); pick a dataset of another split")
        return list(ds[split] if isinstance(ds, datasets.DatasetDict) else ds)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    kinds = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".gz": "json"}
    files = [str(f) for f in files if f.name.endswith((".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".csv"))]
    if not files:
        raise ValueError(f"no JSON/JSONL/CSV/Parquet files for dataset {name!r} under {path}")
    if len(found := {kinds[Path(f).suffix] for f in files}) > 1:
        raise ValueError(f"{path} mixes {' and '.join(sorted(found))} files; give them as separate datasets")
    kind = found.pop()
    for module in ("json.json", "parquet.parquet", "csv.csv"):  # their error logs would precede our line saying so
        logging.getLogger(f"datasets.packaged_modules.{module}").setLevel(logging.CRITICAL)
    try:
        return list(datasets.load_dataset(kind, data_files=files, split="train"))
    except Exception as e:  # StopIteration, DatasetGenerationError, UnicodeDecodeError: none names the file or line
        failure = e
    # find the file and the problem; if it is only broken lines, load the other lines (still with datasets)
    broken, clean = [], list(files)
    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(files if kind == "json" else []):
            good, bad = scan_json_file(f)
            if bad:
                broken += bad
                clean[i] = os.path.join(tmp, f"{i}.jsonl")
                Path(clean[i]).write_text("\n".join(good) + "\n", encoding="utf-8")
        if broken:
            try:
                return list(datasets.load_dataset("json", data_files=clean, split="train", cache_dir=tmp)) + broken
            except Exception as e:
                failure = e
    where = files[0] if len(files) == 1 else f"the files under {path}"
    raise ValueError(f"could not read {where}: {root_cause(failure)}")


def scan_json_file(f: str) -> tuple[list[str], list[BrokenLine]]:
    """(the lines that are JSON objects, the BrokenLines) of a JSON Lines file; ([], []) for a good JSON array.
    A fault of the whole file (empty, not UTF-8, a truncated array, no line parses) is a ValueError naming it."""
    try:
        with (gzip.open if f.endswith(".gz") else open)(f, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:  # a corrupt or truncated .gz
        raise ValueError(f"cannot read {f}: {e}") from None
    if not raw.strip():
        raise ValueError(f"{f} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{f} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); re-encode it as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8"
        ) from None
    if text.lstrip().startswith("["):  # one JSON document: all of it or nothing
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); truncated?") from None
        if not records or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{f}: expected a non-empty JSON array of objects (records)")
        return [], []
    good, bad = [], []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if line.strip():
            try:
                why = None if isinstance(json.loads(line), dict) else "not a JSON object"
            except json.JSONDecodeError as e:
                why = e.msg
            if why:
                bad.append(BrokenLine(f, n, why))
            else:
                good.append(line)
    if not good:
        raise ValueError(
            f"{f} is neither a JSON array nor JSON Lines (line {bad[0].line}: {bad[0].why}); a CSV? "
            f"convert it to one JSON object per line"
        )
    return good, bad


def parse_dataset(spec: str) -> tuple[str, dict]:
    """`NAME[@REVISION][%K/N][:PROPORTION[:PATH[#FIELD]]]` -> (name, {"proportion": p, "path": path or None}, plus
    "revision" (a hub dataset's version, e.g. PKU-SafeRLHF/train@v0), "part" ((K, N): the K-th of N disjoint parts
    by a hash of each sample's prompt, e.g. two judges trained on other prompts: NAME%1/2 and NAME%2/2) and "field"
    (the prompts dataset's field) when given); usable as argparse `type=`."""

    def bad(why: str):
        return argparse.ArgumentTypeError(f"dataset spec {spec!r}: {why}")

    parts = spec.split(":")
    if len(parts) > 3:
        raise bad("has more than two colons; use NAME[@REVISION][:PROPORTION[:PATH[#FIELD]]]")
    name, proportion, path = parts[0], parts[1] if len(parts) > 1 else "1.0", parts[2] if len(parts) > 2 else None
    name, percent, part_text = name.partition("%")
    name, at, revision = name.partition("@")
    part = None
    if percent:
        k, slash, n = part_text.partition("/")
        if not (slash and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            raise bad(f"part %{part_text} is not K/N with 1 <= K <= N, e.g. %1/2")
        part = (int(k), int(n))
    field = None
    if path is not None and "#" in path and not os.path.exists(path):  # a file name may hold a '#' itself
        path, field = path.rsplit("#", 1)
    if name not in registry():
        raise bad(f"unknown dataset {name!r}; registered: {', '.join(sorted(registry()))}")
    if path is not None and registry()[name].GENERATED:
        raise bad(f"{name} is generated (the toy world) and takes no PATH; use {name}:{proportion}")
    try:
        p = float(proportion)
    except ValueError:
        raise bad(f"proportion {proportion!r} is not a number") from None
    if not 0 < p < float("inf"):  # also rejects nan
        raise bad(f"proportion must be a finite number > 0, got {proportion}")
    if path is not None and not path.strip():
        raise bad("empty PATH; drop the last colon or give a file")
    if path is not None and not os.path.exists(path):
        raise bad(f"path {path!r} does not exist")
    if problem := option_problem(name, path, revision if at else None, field):
        raise bad(problem)
    return name, {
        "proportion": p,
        "path": path,
        **({"revision": revision} if at else {}),
        **({"part": part} if part else {}),
        **({"field": field} if field is not None else {}),
    }


def load_samples(specs: list[tuple[str, dict]], seed: int = 42) -> list[RawSample]:
    """Concatenate specs; a proportion p <= 1 takes a seeded random subset, p > 1 repeats whole then samples."""
    rng, out = random.Random(seed), []
    for name, opts in specs:
        raw = RawDataset.load(name, opts.get("path"), opts.get("revision"), opts.get("field"))
        if "part" in opts:  # the K-th of N parts by prompt: a list of the samples in it, in their order
            raw = [s for s in raw if in_part(sample_prompt(s), *opts["part"])]
        n, p = len(raw), opts.get("proportion", 1.0)
        if n and round(p * n) == 0:  # the data is fine: the proportion is too small for it
            raise ValueError(
                f"dataset spec {name}:{p:g} selects no record: {p:g} x {n:,} records rounds to 0; pass a "
                f"proportion of at least {1 / n:.2g}"
            )
        whole, rest = divmod(round(p * n), n) if n else (0, 0)
        indices = list(range(n)) * whole + sorted(rng.sample(range(n), rest))
        out.extend(raw[i] for i in indices)
    if not out:
        raise ValueError(f"datasets {[name for name, _ in specs]} gave no usable samples")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Built-in raw datasets (hub id by default, a local PATH when given)


class Alpaca(RawDataset):
    NAME, HUB_ID, EXPECTED = "alpaca", "tatsu-lab/alpaca", "instruction, output (and input)"

    def to_sample(self, r):
        instruction, extra = r.get("instruction"), r.get("input") or ""
        if not isinstance(instruction, str) or "output" not in r:
            return None
        return RawSample(input=f"{instruction}\n\n{extra}" if extra.strip() else instruction, answer=r["output"])


class PKUSafeRLHF(RawDataset):
    """The hub's default is v1.0 (83.4K pairs, with 19 harm categories and 3 severity levels per response, carried
    into the samples); the paper used v0: PKU-SafeRLHF/train@v0."""

    NAME, ALIASES, HUB_ID = "PKU-SafeRLHF/train", ("PKU-SafeRLHF",), "PKU-Alignment/PKU-SafeRLHF"
    KEYS = (
        "prompt",
        "response_0",
        "response_1",
        "is_response_0_safe",
        "is_response_1_safe",
        "better_response_id",
        "safer_response_id",
    )
    EXPECTED = ", ".join(KEYS)

    def to_sample(self, r):
        if any(r.get(k) is None for k in self.KEYS):
            return None
        sample = RawSample(
            input=r["prompt"],
            answer=r["response_0"],
            other_answer=r["response_1"],
            better=label(r["better_response_id"], "better_response_id", ids=True) == 0,
            safer=label(r["safer_response_id"], "safer_response_id", ids=True) == 0,
            is_safe=label(r["is_response_0_safe"], "is_response_0_safe"),
            is_other_safe=label(r["is_response_1_safe"], "is_response_1_safe"),
        )
        for i, side in ((0, ""), (1, "other_")):  # v1: a severity level and {category: bool} per response
            if r.get(f"response_{i}_severity_level") is not None:
                sample[f"{side}severity"] = int(r[f"response_{i}_severity_level"])
            if isinstance(categories := r.get(f"response_{i}_harm_category"), dict):
                sample[f"{side}harm_categories"] = sorted(c for c, flag in categories.items() if flag)
        return sample


variant(PKUSafeRLHF, "PKU-SafeRLHF/test", SPLIT="test")
variant(PKUSafeRLHF, "PKU-SafeRLHF-30K/train", "PKU-SafeRLHF-30K", HUB_ID="PKU-Alignment/PKU-SafeRLHF-30K")
variant(PKUSafeRLHF, "PKU-SafeRLHF-30K/test", HUB_ID="PKU-Alignment/PKU-SafeRLHF-30K", SPLIT="test")
variant(PKUSafeRLHF, "PKU-SafeRLHF-10K/train", "PKU-SafeRLHF-10K", HUB_ID="PKU-Alignment/PKU-SafeRLHF-10K")


def split_transcript(text: str) -> list[str] | None:
    """Anthropic's `\\n\\nHuman: ...\\n\\nAssistant: ...` transcript -> alternating turns, or None if malformed."""
    turns, role = [], None
    for chunk in text.split("\n\n"):
        for prefix, who in (("Human:", "user"), ("Assistant:", "assistant")):
            if chunk.startswith(prefix):
                if who == role:
                    return None
                turns.append(chunk[len(prefix) :].strip())
                role = who
                break
        else:
            if not turns:
                continue
            turns[-1] += "\n\n" + chunk  # a paragraph inside the current turn
    return turns if turns and len(turns) % 2 == 0 else None


class HHRLHFPreference(RawDataset):
    """Both Anthropic's raw layout (`chosen`/`rejected` transcripts) and a processed one (`context` + answers)."""

    NAME, ALIASES = "hh-rlhf-helpful-preference/train", ("hh-rlhf-helpful-preference",)
    HUB_ID, DATA_DIR = "Anthropic/hh-rlhf", "helpful-base"
    EXPECTED = "chosen, rejected (Human/Assistant transcripts) or context, chosen, rejected"

    def to_sample(self, r):
        text = lambda t: t.get("text") if isinstance(t, dict) else t  # noqa: E731 (processed turns are {role, text})
        chosen, rejected = text(r.get("chosen")), text(r.get("rejected"))
        if isinstance(r.get("context"), list):  # processed layout (PKU-Alignment/processed-hh-rlhf)
            context = [text(t) for t in r["context"]]
            return RawSample(input=context, answer=chosen, other_answer=rejected, better=True) if context else None
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            return None
        a, b = split_transcript(chosen), split_transcript(rejected)
        if a is None or b is None or a[:-1] != b[:-1]:
            return None
        return RawSample(input=a[:-1], answer=a[-1], other_answer=b[-1], better=True)


class HHRLHFDialogue(HHRLHFPreference):
    """SFT on the chosen side of each conversation (helpful and harmless halves together)."""

    NAME, ALIASES, DATA_DIR = "hh-rlhf-dialogue", ("hh-rlhf-dialogue/train",), None

    def to_sample(self, r):
        pair = super().to_sample(r)
        return None if pair is None else RawSample(dialogue=[*pair["input"], pair["answer"]])


variant(HHRLHFPreference, "hh-rlhf-helpful-preference/test", SPLIT="test")
variant(HHRLHFPreference, "hh-rlhf-harmless-preference/train", "hh-rlhf-harmless-preference", DATA_DIR="harmless-base")
variant(HHRLHFPreference, "hh-rlhf-harmless-preference/test", DATA_DIR="harmless-base", SPLIT="test")
variant(HHRLHFDialogue, "hh-rlhf-helpful-dialogue", DATA_DIR="helpful-base")
variant(HHRLHFDialogue, "hh-rlhf-harmless-dialogue", DATA_DIR="harmless-base")


class Firefly(RawDataset):
    NAME, HUB_ID, EXPECTED = "firefly", "YeungNLP/firefly-train-1.1M", "input, target"

    def to_sample(self, r):
        return RawSample(input=r.get("input"), answer=r.get("target")) if "input" in r and "target" in r else None


class Moss002SFT(RawDataset):
    """fnlp/moss-002-sft-data, local only: `plain_text` with `[Human]: ... <eoh> [MOSS]: ... <eoa>` turns."""

    NAME, EXPECTED = "moss-002-sft", "plain_text"

    def to_sample(self, r):
        text, dialogue = r.get("plain_text"), []
        if not isinstance(text, str):
            return None
        for turn in text.split("<eoa>"):
            if "[Human]:" in turn and "[MOSS]:" in turn:
                user, answer = turn.split("[MOSS]:", 1)
                dialogue += [user.split("[Human]:", 1)[1].replace("<eoh>", "").strip(), answer.strip()]
        return RawSample(dialogue=dialogue) if dialogue else None


class Moss003SFT(RawDataset):
    """fnlp/moss-003-sft-data, local only: `chat` = {"turn_1": {"Human": ..., "MOSS": ...}, ...}."""

    NAME, EXPECTED = "moss-003-sft", "chat"

    def to_sample(self, r):
        chat, dialogue = r.get("chat"), []
        if not isinstance(chat, dict):
            return None
        clean = lambda s, who, end: (s or "").strip().removeprefix(f"<|{who}|>:").replace(end, "").strip()  # noqa: E731
        for key in sorted(chat, key=lambda k: int(k.split("_")[-1])):
            if chat[key]:  # an Arrow struct column (Parquet) pads shorter chats with None turns
                turn = chat[key]
                dialogue += [clean(turn.get("Human"), "Human", "<eoh>"), clean(turn.get("MOSS"), "MOSS", "<eom>")]
        return RawSample(dialogue=dialogue) if dialogue else None


class SafeUnsafePairs(RawDataset):
    """Local files of {prompt, response: [safe_response, unsafe_response]} (the list, or it JSON-encoded as a string),
    such as the PKU-SafeRLHF-derived pku_seferlhf_realign_dpo_5k.json: cost model pairs where the first answer is the
    safe one (there is no helpfulness label). /train and /test split one file by prompt: a prompt's pairs all go to
    /test when a hash of its text falls in the held-out tenth, so no test prompt is trained on."""

    NAME, ALIASES, EXPECTED = "safe-unsafe-pairs", (), "prompt, response (a 2-list [safe, unsafe] or it as JSON text)"
    HELD_OUT = None  # None: every pair; True: /test's prompts only; False: /train's

    def records(self, path):  # the other split's records are not malformed ones: they never reach to_sample
        for r in super().records(path):
            if self.HELD_OUT is None or not isinstance(r, dict) or held_out(str(r.get("prompt"))) == self.HELD_OUT:
                yield r

    def to_sample(self, r):
        prompt, response = r.get("prompt"), r.get("response")
        if isinstance(response, str):
            try:
                response = json.loads(response)
            except json.JSONDecodeError:
                return None
        if not isinstance(prompt, str) or not isinstance(response, list) or len(response) != 2:
            return None
        return RawSample(
            input=prompt, answer=response[0], other_answer=response[1], safer=True, is_safe=True, is_other_safe=False
        )


def sample_prompt(s: RawSample) -> str:
    """What a sample answers, as one string: its input (the turns joined), or a dialogue's first turn."""
    prompt = s["input"] if "input" in s else s["dialogue"][:1]
    return prompt if isinstance(prompt, str) else "\n\n".join(prompt)


def text_hash(text: str) -> int:
    """sha256 of a text as an int: stable across runs and machines (Python's hash() is salted per process)."""
    import hashlib

    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def in_part(text: str, k: int, n: int) -> bool:
    """Whether a prompt falls in part k (1-based) of n by a hash salted apart from held_out's, so the parts of the
    train split of safe-unsafe-pairs stay even. Every sample of a prompt lands in the same part."""
    return text_hash(f"part|{text}") % n == k - 1


def held_out(text: str, share: int = 10) -> bool:
    """Whether a text falls in the held-out 1/share of a split by hash (stable across runs and machines)."""
    return text_hash(text) % share == 0


variant(SafeUnsafePairs, "safe-unsafe-pairs/train", HELD_OUT=False)
variant(SafeUnsafePairs, "safe-unsafe-pairs/test", HELD_OUT=True)


class Prompts(RawDataset):
    """Prompts from any local JSON/JSONL/CSV/Parquet file (red-team sets: safe-rlhf's problem.json, AdvBench,
    HarmBench, StrongREJECT, ...), for PPO, evaluation and chat: the first of FIELDS that the file has, or the field
    named by prompts:1.0:PATH#FIELD. Alpaca-style `input` joins its instruction; a `category` is kept."""

    NAME, FIELD_CHOICE = "prompts", True
    FIELDS = ("prompt", "instruction", "goal", "Goal", "Behavior", "forbidden_prompt")  # Goal: JailbreakBench's

    def expected(self):
        return (
            f"the field {self.field} (from #{self.field})"
            if self.field
            else (f"a field {', '.join(self.FIELDS)} (or name one: {self.NAME}:1.0:PATH#FIELD)")
        )

    def to_sample(self, r):
        field = self.field or next((f for f in self.FIELDS if f in r), None)
        if not isinstance(r.get(field), str):
            return None
        extra = r.get("input") if field == "instruction" and isinstance(r.get("input"), str) else ""
        sample = RawSample(input=f"{r[field]}\n\n{extra}" if extra.strip() else r[field])
        if isinstance(r.get("category"), str):
            sample["category"] = r["category"]
        return sample


# ----------------------------------------------------------------------------------------------------------------
# Tokenized datasets and collators

IGNORE_INDEX = -100  # the label of a token that is not trained on (cross_entropy's ignore_index)


def pad(seqs: list[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    """1-D tensors -> (B, T) filled with value after each sequence (before it when left)."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, slice(T - len(s), T) if left else slice(0, len(s))] = s
    return out


def conversation_ids(tokenizer, input: str | list[str], answer: str, chat_template: str = "anchor") -> list[int]:
    """prompt + answer + end of turn as token ids: the sequence a score model reads (and was trained on)."""
    ids, spans = chat_spans(tokenizer, [*as_turns(input), answer], chat_template)
    return ids[: spans[-1][1]]


class TokenizedDataset(torch.utils.data.Dataset):
    """Load specs, tokenize every sample in the chat template (`preprocess` returns a dict or None to drop), print
    what was dropped."""

    DROP_REASON = "prompt leaves no room for an answer"

    def __init__(self, specs, tokenizer, max_length: int = 512, seed: int = 42, chat_template: str = "anchor"):
        self.tokenizer, self.max_length, self.truncated, self.identical = tokenizer, max_length, 0, 0
        self.chat_template = set_chat_template(tokenizer, chat_template)  # "anchor" or "model"
        samples = load_samples(specs, seed)
        self.data = [d for d in map(self.preprocess, samples) if d is not None]
        dropped = len(samples) - len(self.data)
        if self.truncated or dropped:
            same = f"; {self.identical:,} of them pairs the truncation made identical" if self.identical else ""
            print(
                f"{type(self).__name__}: {len(self.data):,} samples, {self.truncated:,} truncated to "
                f"max_length {max_length}, {dropped:,} dropped ({self.DROP_REASON}{same})"
            )
        if not self.data:
            raise ValueError(f"no sample fits max_length {max_length}; raise --max_length")
        seqs = [v for d in self.data for k, v in d.items() if k.endswith("input_ids")]
        check_fits_model(tokenizer, seqs, max_length)  # every id has an embedding row, every sequence positions

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]

    def conversation(self, turns: list[str], train_all: bool = False):
        """(input_ids, labels) of turns ending with an assistant turn, cut to max_length on the answer side; labels
        hold every assistant turn (train_all) or the last one, with its end of turn, and IGNORE_INDEX elsewhere.
        None when no trained token fits."""
        ids, spans = chat_spans(self.tokenizer, turns, self.chat_template)
        trained = spans if train_all else spans[-1:]
        if trained[0][0] >= self.max_length:
            return None
        ids = torch.tensor(ids[: spans[-1][1]], dtype=torch.long)  # the conversation ends at its last end of turn
        labels = torch.full_like(ids, IGNORE_INDEX)
        for a, b in trained:
            labels[a:b] = ids[a:b]
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    def answer_ids(self, input, answer: str) -> torch.Tensor | None:
        """prompt + answer + end of turn (a score model's input), or None when no answer token fits."""
        pair = self.conversation([*as_turns(input), answer])
        return None if pair is None else pair[0]

    def pair_ids(self, input, first: str, second: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The two answers' answer_ids, or None when either has no room or the truncation to max_length made them
        the same tokens (a pair with nothing to compare: dropped and counted, as identical answers are)."""
        a, b = self.answer_ids(input, first), self.answer_ids(input, second)
        if a is None or b is None:
            return None
        if torch.equal(a, b):
            self.identical += 1
            return None
        return a, b

    def padded(self, seqs: list[torch.Tensor], left: bool = False) -> dict:
        """input_ids (B,T) padded with the pad token, attention_mask (B,T) True on real tokens."""
        return {
            "input_ids": pad(seqs, self.tokenizer.pad_token_id, left),
            "attention_mask": pad([torch.ones_like(s) for s in seqs], 0, left).bool(),
        }


class SupervisedDataset(TokenizedDataset):
    """input_ids (B,T), labels (B,T) with IGNORE_INDEX on prompt/user/system tokens and padding, attention_mask (B,T);
    right padded. A dialogue trains every assistant turn, an input + answer only the answer."""

    def preprocess(self, s: RawSample):
        if "dialogue" in s:
            pair = self.conversation(s["dialogue"], train_all=True)
        else:
            pair = self.conversation([*as_turns(s["input"]), s["answer"]])
        return None if pair is None else {"input_ids": pair[0], "labels": pair[1]}

    def collate(self, batch):
        labels = pad([b["labels"] for b in batch], IGNORE_INDEX)
        return {**self.padded([b["input_ids"] for b in batch]), "labels": labels}


class PreferenceDataset(TokenizedDataset):
    """input_ids (2B,T): rows [:B] the better answers, rows [B:] the worse ones, so one forward scores both."""

    def preprocess(self, s: RawSample):
        better, worse = (s["answer"], s["other_answer"]) if s["better"] else (s["other_answer"], s["answer"])
        pair = self.pair_ids(s["input"], better, worse)
        return None if pair is None else {"better_input_ids": pair[0], "worse_input_ids": pair[1]}

    def collate(self, batch):
        return self.padded([b["better_input_ids"] for b in batch] + [b["worse_input_ids"] for b in batch])


class SafetyPreferenceDataset(TokenizedDataset):
    """input_ids (2B,T): rows [:B] the safer answers, rows [B:] the unsafer ones; safer_sign, unsafer_sign (B,):
    +1 for an unsafe answer, -1 for a safe one (cost > 0 means unsafe)."""

    def preprocess(self, s: RawSample):
        first, second = (s["answer"], s["is_safe"]), (s["other_answer"], s["is_other_safe"])
        (safer, safer_safe), (unsafer, unsafer_safe) = (first, second) if s["safer"] else (second, first)
        if (pair := self.pair_ids(s["input"], safer, unsafer)) is None:
            return None
        return {
            "safer_input_ids": pair[0],
            "unsafer_input_ids": pair[1],
            "safer_sign": -1 if safer_safe else 1,
            "unsafer_sign": -1 if unsafer_safe else 1,
        }

    def collate(self, batch):
        signs = {k: torch.tensor([b[k] for b in batch], dtype=torch.long) for k in ("safer_sign", "unsafer_sign")}
        return {**self.padded([b["safer_input_ids"] for b in batch] + [b["unsafer_input_ids"] for b in batch]), **signs}


class PromptOnlyDataset(TokenizedDataset):
    """input_ids (B,T) left padded for generation (ending with the template's cue for the assistant), attention_mask
    (B,T), prompts: the user's last message (list of str), inputs: the raw inputs (a str, or the turns so far) to
    render again for another tokenizer. Prompts are de-duplicated; an item keeps its prompt's category (or None)."""

    DROP_REASON = "duplicate prompt, or no room for an answer"

    def __init__(self, *args, **kwargs):
        self.seen = set()
        super().__init__(*args, **kwargs)

    def preprocess(self, s: RawSample):
        prompt = chat_prompt(self.tokenizer, s["input"], self.chat_template)
        ids = torch.tensor(tokenize(self.tokenizer, prompt, self.chat_template)["input_ids"], dtype=torch.long)
        if prompt in self.seen or len(ids) >= self.max_length:
            return None
        self.seen.add(prompt)
        return {
            "input_ids": ids,
            "prompt": s["input"] if isinstance(s["input"], str) else s["input"][-1],
            "input": s["input"],
            "category": s.get("category"),
        }

    def collate(self, batch):
        return {
            **self.padded([b["input_ids"] for b in batch], left=True),
            "prompts": [b["prompt"] for b in batch],
            "inputs": [b["input"] for b in batch],
        }
