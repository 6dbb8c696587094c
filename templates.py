"""Conversations as text and token ids, for every stage: the anchor's prompt template, chat templates (the anchor's,
the tokenizer's own, or a Jinja file), and a model folder's tokenizer, checked against its model. data.py's tokenized
datasets build their tensors from chat_spans; save_chat_template makes a saved folder carry the template it was
trained with, so any serving tool prompts it as we trained it.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------------
# The anchor's prompt template

# Identical to the anchor's, so released Beaver models work. Note: no space after "ASSISTANT:".
PROMPT_BEGIN = "BEGINNING OF CONVERSATION: "
PROMPT_USER = "USER: {input} "
PROMPT_ASSISTANT = "ASSISTANT:"
PROMPT_TEMPLATE = PROMPT_BEGIN + PROMPT_USER + PROMPT_ASSISTANT


def as_turns(input: str | list[str]) -> list[str]:
    """A user's message, or the turns so far (user, assistant, ..., user), as a list of turns."""
    return [input] if isinstance(input, str) else list(input)


def format_prompt(input: str | list[str], eos_token: str = "</s>") -> str:
    """`BEGINNING OF CONVERSATION: USER: {u1} ASSISTANT:{a1}</s>USER: {u2} ASSISTANT:` for a list of turns."""
    turns = as_turns(input)
    if len(turns) % 2 != 1:
        raise ValueError("a multi-turn input must alternate user/assistant and end with the user's turn")
    text = PROMPT_BEGIN
    for i, turn in enumerate(turns):
        text += PROMPT_USER.format(input=turn) + PROMPT_ASSISTANT if i % 2 == 0 else turn + eos_token
    return text


# ----------------------------------------------------------------------------------------------------------------
# Chat templates: every conversation becomes text and token ids here, in one of two modes.
# `anchor`: format_prompt's text, tokenized with the tokenizer's own special tokens (BOS), as the anchor did.
# `model` (or a Jinja file, installed as the tokenizer's chat_template): tokenizer.apply_chat_template's text,
# tokenized without special tokens (the template writes its own), as apply_chat_template(tokenize=True) does.

CHAT_TEMPLATE_HELP = "anchor (the anchor's `BEGINNING OF CONVERSATION:` template), model (the tokenizer's) or a .jinja"


def parse_chat_template(value: str) -> str:
    """`anchor`, `model` or an existing Jinja file; usable as argparse `type=`."""
    if value in ("anchor", "model") or os.path.isfile(value):
        return value
    raise argparse.ArgumentTypeError(f"chat template {value!r}: give anchor, model or the path of a Jinja file")


def set_chat_template(tokenizer, chat_template: str = "anchor") -> str:
    """Install a Jinja file's template on the tokenizer and check that `model` has one that renders; returns the
    mode, "anchor" or "model". A ValueError (one line) when it cannot be used."""
    if chat_template == "anchor":
        return "anchor"
    where = f"the tokenizer at {tokenizer.name_or_path}"
    if chat_template != "model":
        try:
            tokenizer.chat_template, where = Path(chat_template).read_text(encoding="utf-8"), chat_template
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the chat template {chat_template}: {e}") from None
    if not tokenizer.chat_template:
        raise ValueError(
            f"{where} has no chat template: use --chat_template anchor, or a Jinja file "
            f"(--chat_template path/to/template.jinja)"
        )
    try:
        render(tokenizer, ["Hi"], "model", generation_prompt=True)
    except Exception as e:  # a Jinja syntax error, a template that wants a system message, ...
        raise ValueError(f"the chat template of {where} cannot render a user message: {root_cause(e)}") from None
    return "model"


def render(tokenizer, turns: list[str], chat_template: str, generation_prompt: bool) -> str:
    """Text of a conversation (user, assistant, ... turns): ending with the assistant's cue when generation_prompt
    (the turns end with the user's), else with the last assistant turn and its end of turn."""
    if chat_template == "anchor":
        eos = tokenizer.eos_token
        return format_prompt(turns, eos) if generation_prompt else format_prompt(turns[:-1], eos) + turns[-1] + eos
    messages = [{"role": "assistant" if i % 2 else "user", "content": turn} for i, turn in enumerate(turns)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize(tokenizer, text: str | list[str], chat_template: str = "anchor", **kwargs):
    """The tokenizer's encoding (input_ids, attention_mask) of rendered text: with its special tokens for the anchor's
    text, without them for a chat template's (which writes its own BOS)."""
    return tokenizer(text, add_special_tokens=chat_template == "anchor", **kwargs)


def chat_prompt(tokenizer, input: str | list[str], chat_template: str = "anchor") -> str:
    """The prompt for generation: the user's message (or the turns so far, ending with the user's) and the cue."""
    return render(tokenizer, as_turns(input), chat_template, generation_prompt=True)


def chat_spans(tokenizer, turns: list[str], chat_template: str = "anchor") -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a conversation ending with an assistant turn, and each assistant turn's [start, end) span: the
    tokens that the turn adds to the conversation before it, through its end-of-turn token. Rendering prefix by
    prefix works for any template, without `{% generation %}` markers (which most templates lack)."""
    ids_of = lambda text: tokenize(tokenizer, text, chat_template)["input_ids"]  # noqa: E731
    text = render(tokenizer, turns, chat_template, generation_prompt=False)
    ids, spans = ids_of(text), []
    for k in range(1, len(turns), 2):
        before = render(tokenizer, turns[:k], chat_template, generation_prompt=True)
        through = text if k == len(turns) - 1 else render(tokenizer, turns[: k + 1], chat_template, False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "the chat template renders earlier turns differently once more turns follow (or its "
                "generation prompt differs from an assistant turn's start), so assistant turns cannot "
                "be located: give --chat_template a Jinja file without that"
            )
        start = common_prefix(ids_of(before), ids)
        end = len(ids) if through is text else common_prefix(ids_of(through), ids)
        spans.append((start, end_of_turn(tokenizer, ids, start, end)))
    return ids, spans


def common_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading ids a and b share: where a prefix's tokens stop matching the whole's (a token merging
    across the boundary goes to the later part)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def end_of_turn(tokenizer, ids: list[int], start: int, end: int) -> int:
    """Where the span ids[start:end] ends: after its last special token (the end of turn) when only whitespace follows
    it. ChatML writes `<|im_end|>\\n`: the newline is the template's, not the model's to generate or to be scored at."""
    special = special_ids(tokenizer)
    for j in range(end, start, -1):
        if ids[j - 1] in special:
            return j if not tokenizer.decode(ids[j:end]).strip() else end
    return end


def special_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens, the added ones marked special included (ChatML's <|im_start|>)."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def stop_ids(tokenizer, chat_template: str = "anchor", generation_config=None) -> list[int]:
    """The ids that end an answer, for generate(eos_token_id=...) and a saved generation_config.json: the tokenizer's
    EOS, the EOS list of the model's generation config (Llama 3 and Qwen list several), and the chat template's end of
    turn when it is a special token (ChatML's <|im_end|> on a tokenizer whose EOS is <|endoftext|>): the last token
    of a rendered assistant turn that is not whitespace."""
    text = render(tokenizer, ["Hi", "Hello"], chat_template, generation_prompt=False)
    ids = tokenize(tokenizer, text, chat_template)["input_ids"]
    last = next((i for i in reversed(ids) if tokenizer.decode([i]).strip()), None)
    listed = getattr(generation_config, "eos_token_id", None)  # an int, a list or None
    found = [tokenizer.eos_token_id, *(listed if isinstance(listed, list) else [listed])]
    found += [last] if last in special_ids(tokenizer) else []
    return list(dict.fromkeys(i for i in found if i is not None))  # in order, once each: the EOS first


def anchor_jinja(tokenizer) -> str:
    """The anchor's template as Jinja, so apply_chat_template on our saved folders gives exactly the token ids we
    trained on: BOS only if the tokenizer adds one, no system role, user and assistant turns alternating."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return ("{{- bos_token -}}" if adds_bos else "") + (
        "{{- 'BEGINNING OF CONVERSATION: ' -}}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'user' and loop.index0 % 2 == 0 -%}{{- 'USER: ' + message['content'] + ' ' -}}\n"
        "{%- elif message['role'] == 'assistant' and loop.index0 % 2 == 1 -%}"
        "{{- 'ASSISTANT:' + message['content'] + eos_token -}}\n"
        "{%- else -%}{{- raise_exception('this model was trained on alternating user and assistant turns, starting "
        "with the user, without a system message') -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}\n"
    )


def save_chat_template(tokenizer, chat_template: str, output_dir: str) -> None:
    """Make the tokenizer in output_dir carry, as its chat_template, the template it was trained with (before or after
    tokenizer.save_pretrained(output_dir): both write the same), so any serving tool prompts it as we trained it."""
    mode = set_chat_template(tokenizer, chat_template)  # a Jinja file: installed (again) and checked
    template = anchor_jinja(tokenizer) if mode == "anchor" else tokenizer.get_chat_template()
    tokenizer.chat_template = template  # one template: a later save_pretrained writes this one file
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    shutil.rmtree(out / "additional_chat_templates", ignore_errors=True)  # other named templates would not apply
    config = out / "tokenizer_config.json"
    if config.exists() and "chat_template" in (settings := json.loads(config.read_text())):
        del settings["chat_template"]  # the legacy place: one template, one place
        config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def root_cause(e: BaseException) -> str:
    """The innermost exception of a chain, as one short line: transformers wraps a template's error, datasets a
    file parser's (data.py's loaders name it too)."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer of a model folder, checked against the model's config.json


FIT_VOCAB = (
    "pass the tokenizer the model was trained with, or resize the embeddings (resize_token_embeddings) and "
    "save the model again"
)


def model_config(path: str) -> dict:
    """A model folder's config.json ({} for a hub id or a LoRA adapter folder, which have none here)."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text()) if path and file.is_file() else {}
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e}): it is cut or damaged; save the model again") from None


def model_limit(path: str, key: str) -> int | None:
    """A size from a model folder's config.json (or its text_config): "vocab_size", the embedding rows, or
    "max_position_embeddings"; None where the folder has no config.json."""
    config = model_config(path)
    return config.get(key) or config.get("text_config", {}).get(key)


def load_tokenizer(path: str, padding_side: str = "right", chat_template: str = "anchor"):
    """The tokenizer of a model folder, checked for an EOS token and for the chat template it will render with; and,
    from the folder's config.json, that transformers knows the model and its embeddings have a row for every id."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config, config_file = model_config(path), Path(path) / "config.json"  # a hub id: from_pretrained checks
    if (model_type := config.get("model_type")) not in (None, *CONFIG_MAPPING_NAMES) and "auto_map" not in config:
        raise ValueError(
            f"{config_file} names model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know; correct it (e.g. llama) or upgrade transformers"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    except Exception:  # a cut or damaged JSON file: name it (the parser's message names neither it nor a fix)
        for file in sorted(Path(path).glob("*.json")) if Path(path).is_dir() else []:
            try:
                json.loads(file.read_text())
            except ValueError as e:
                raise ValueError(
                    f"{file} is not valid JSON ({e}): it is cut or damaged; copy it again from the model it came from"
                ) from None
        raise
    rows = model_limit(path, "vocab_size")  # an id past them: an IndexError in the first forward (added ones: the data)
    if rows and tokenizer.vocab_size > rows:
        raise ValueError(
            f"the tokenizer at {path} has {tokenizer.vocab_size} tokens but the model's embeddings have "
            f"{rows} rows (vocab_size in {config_file}): {FIT_VOCAB}"
        )
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; set eos_token in its tokenizer_config.json")
    set_chat_template(tokenizer, chat_template)
    return tokenizer


def check_fits_model(tokenizer, seqs: list, max_length: int) -> None:
    """That tokenized data (1-D tensors of ids, cut to max_length) fits the model of the tokenizer's folder, by its
    config.json: every id has an embedding row and no sequence is longer than its positions; else a ValueError."""
    rows, top = model_limit(tokenizer.name_or_path, "vocab_size"), max(int(ids.max()) for ids in seqs)
    if rows and top >= rows:  # a token added to the tokenizer but not to the model
        raise ValueError(
            f"the data has the token {tokenizer.convert_ids_to_tokens(top)!r} (id {top}), past the "
            f"{rows} embedding rows of {tokenizer.name_or_path}: {FIT_VOCAB}"
        )
    positions, longest = model_limit(tokenizer.name_or_path, "max_position_embeddings"), max(map(len, seqs))
    if positions and longest > positions:  # learned positions: an IndexError; rotary ones: untrained angles
        raise ValueError(
            f"--max_length {max_length} lets through samples of {longest} tokens, beyond the "
            f"{positions} positions of {tokenizer.name_or_path} (max_position_embeddings in its "
            f"config.json): pass --max_length {positions} or less"
        )


def add_pad_token(tokenizer, model) -> None:
    """Give the tokenizer a pad token if it has none; new embedding rows start at the mean of the old ones."""
    if tokenizer.pad_token is not None:
        return
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    print(f"added a pad token: embeddings {old} -> {len(tokenizer)}")
