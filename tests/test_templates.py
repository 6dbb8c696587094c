"""Chat templates (templates.py): `--chat_template model` (or a Jinja file) through apply_chat_template on a locally
built tokenizer with a ChatML template: SFT label masks that train exactly the assistant turns, prompts ending with the
generation prompt, preference and safety pairs; the saved template round trip (anchor and model); the refusals."""

import argparse
import json

import pytest
import torch

import data
import templates
from data import IGNORE_INDEX, RawDataset, RawSample
from templates import format_prompt
from toy import make_toy_model

SYSTEM = "You are a test assistant."
CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
U1, A1, U2, A2 = "How do I bake a cake?", "Mix the flour, then add the sugar.", "And then?", "Bake it for an hour."


class Rows(RawDataset):
    """Whatever samples a test puts in ROWS."""

    NAME, ROWS = "test-template-rows", []

    def records(self, path):
        return list(self.ROWS)


def dataset(cls, tok, *rows, max_length=256, chat_template="model"):
    Rows.ROWS = list(rows)
    return cls([(Rows.NAME, {"proportion": 1.0, "path": None})], tok, max_length, chat_template=chat_template)


def bpe(specials, texts=(U1, A1, U2, A2, SYSTEM, "system user assistant ### User: Bot:"), bos=None, **kwargs):
    """A small byte-level BPE as an HF tokenizer; with `bos`, it adds that token in front of every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    if bos:
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token=bos, **kwargs)


def chatml_tokenizer(eos_token="<|im_end|>"):
    """SmolLM2-like: ChatML with a default system message, EOS = <|im_end|> (Qwen base models': <|endoftext|>), no
    BOS."""
    tok = bpe(
        ["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        eos_token=eos_token,
        pad_token="<pad>",
        extra_special_tokens=[t for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>") if t != eos_token],
    )
    tok.chat_template = CHATML
    return tok


@pytest.fixture
def chatml():
    return chatml_tokenizer()


def chatml_base(path, eos_token="<|im_end|>", context=256):
    """A tiny random LlamaForCausalLM with chatml_tokenizer(eos_token) and its template, saved in `path` (a "chat
    model" as users bring them, for stage runs in --chat_template model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chatml_tokenizer(eos_token)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    templates.save_chat_template(tok, "model", path)
    return path


def scripted_model(tok, path, script: list[str], eos: list[str], context: int = 128):
    """A tiny LlamaForCausalLM whose next token depends only on the current one: `script` (tokens) is a chain, each
    token followed by the next (the last by the first), any other token by <pad> (greedy). Attention and MLP output
    zero, each scripted token's embedding is a one-hot code and lm_head maps the code to its successor (logit ~80).
    Saved in `path` with the tokenizer, its chat template and `eos` as the generation config's eos_token_id."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = tok.convert_tokens_to_ids(script)
    assert len(set(ids)) == len(ids) and tok.unk_token_id not in ids, script
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.model.norm.weight.fill_(1.0)  # the final norm turns a one-hot code into sqrt(64) = 8 times it
        for code, (token, successor) in enumerate(zip(ids, ids[1:] + ids[:1])):
            model.model.embed_tokens.weight[token, code] = 1.0
            model.lm_head.weight[successor, code] = 10.0
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(eos)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    templates.save_chat_template(tok, "model", path)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "base"
    make_toy_model(str(path))
    return path


def chatml_text(*turns, generation_prompt=False):
    """The ChatML text of turns (user, assistant, ...), written out by hand."""
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for i, turn in enumerate(turns):
        text += f"<|im_start|>{'assistant' if i % 2 else 'user'}\n{turn}<|im_end|>\n"
    return text + "<|im_start|>assistant\n" * generation_prompt


def trained_spans(tok, labels) -> list[str]:
    """The decoded runs of trained (not IGNORE_INDEX) labels."""
    runs, run = [], []
    for label in labels.tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs


# ----------------------------------------------------------------------------------------------------------------
# model mode: SFT, prompts, pairs


def test_sft_trains_exactly_every_assistant_turn(chatml):
    item = dataset(data.SupervisedDataset, chatml, RawSample(dialogue=[U1, A1, U2, A2]))[0]
    # the whole conversation, ending at the last end of turn (the template's newline after it is not ours)
    assert chatml.decode(item["input_ids"]) == chatml_text(U1, A1, U2, A2).removesuffix("\n")
    assert trained_spans(chatml, item["labels"]) == [f"{A1}<|im_end|>", f"{A2}<|im_end|>"]
    masked = chatml.decode(item["input_ids"][item["labels"] == IGNORE_INDEX])  # system, users, assistant headers
    assert masked == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
        f"<|im_start|>assistant\n\n<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sft_input_with_history_trains_the_last_answer_and_truncates(chatml, capsys):
    item = dataset(data.SupervisedDataset, chatml, RawSample(input=[U1, A1, U2], answer=A2))[0]
    assert chatml.decode(item["input_ids"]) == chatml_text(U1, A1, U2, A2).removesuffix("\n")
    assert trained_spans(chatml, item["labels"]) == [f"{A2}<|im_end|>"]  # earlier turns are context only
    n_prompt = len(chatml(chatml_text(U1, generation_prompt=True))["input_ids"])
    ds = dataset(
        data.SupervisedDataset,
        chatml,
        RawSample(input=U1, answer=A1 * 20),
        RawSample(input=U1 * 20, answer=A1),
        max_length=n_prompt + 3,
    )
    assert len(ds) == 1 and ds.truncated == 1 and len(ds[0]["input_ids"]) == n_prompt + 3  # the answer side cut
    assert (ds[0]["labels"][:n_prompt] == IGNORE_INDEX).all() and (ds[0]["labels"][n_prompt:] != IGNORE_INDEX).all()
    assert "1 samples, 1 truncated to max_length" in capsys.readouterr().out  # and the long prompt dropped


def test_prompts_end_with_the_generation_prompt(chatml):
    prompts = dataset(
        data.PromptOnlyDataset, chatml, RawSample(input=U1), RawSample(input=[U1, A1, U2]), RawSample(input=U1)
    )  # a duplicate: dropped
    assert len(prompts) == 2
    batch = prompts.collate([prompts[0], prompts[1]])
    lengths = batch["attention_mask"].sum(1).tolist()
    texts = [chatml.decode(row[-n:]) for row, n in zip(batch["input_ids"], lengths)]
    assert texts == [chatml_text(U1, generation_prompt=True), chatml_text(U1, A1, U2, generation_prompt=True)]
    assert texts[1].endswith(f"{U2}<|im_end|>\n<|im_start|>assistant\n")
    assert batch["prompts"] == [U1, U2] and batch["inputs"] == [U1, [U1, A1, U2]]
    assert (batch["input_ids"][0, : -lengths[0]] == chatml.pad_token_id).all()  # left padded
    assert templates.chat_prompt(chatml, [U1, A1, U2], "model") == texts[1]


def test_pairs_are_prompt_answer_and_end_of_turn(chatml):
    pair = RawSample(input=U1, answer=A1, other_answer=A2, better=False, safer=True, is_safe=True, is_other_safe=False)
    pref = dataset(data.PreferenceDataset, chatml, pair)
    batch = pref.collate([pref[0]])
    rows = [chatml.decode(r[m]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows == [chatml_text(U1, A2).removesuffix("\n"), chatml_text(U1, A1).removesuffix("\n")]  # better first
    safe = dataset(data.SafetyPreferenceDataset, chatml, pair)
    batch = safe.collate([safe[0]])
    rows = [chatml.decode(r[m]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows == [chatml_text(U1, A1).removesuffix("\n"), chatml_text(U1, A2).removesuffix("\n")]  # safer first
    assert batch["safer_sign"].tolist() == [-1] and batch["unsafer_sign"].tolist() == [1]
    # what a stage re-tokenizing an answer for a score model gets: the same sequence
    assert data.conversation_ids(chatml, U1, A1, "model") == safe[0]["safer_input_ids"].tolist()


def test_template_file_is_used_like_model(chatml, tmp_path):
    jinja = tmp_path / "plain.jinja"
    jinja.write_text(
        "{% for m in messages %}{{ ('### User: ' if m['role'] == 'user' else '### Bot: ') "
        "+ m['content'] + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '### Bot: ' }}"
        "{% endif %}"
    )
    assert templates.parse_chat_template(str(jinja)) == str(jinja)
    item = dataset(data.SupervisedDataset, chatml, RawSample(input=U1, answer=A1), chat_template=str(jinja))[0]
    assert chatml.chat_template == jinja.read_text()  # installed on the tokenizer
    assert chatml.decode(item["input_ids"]) == f"### User: {U1}<|im_end|>### Bot: {A1}<|im_end|>"
    assert trained_spans(chatml, item["labels"]) == [f"{A1}<|im_end|>"]
    assert templates.chat_prompt(chatml, U1, str(jinja)) == f"### User: {U1}<|im_end|>### Bot: "


def test_bos_is_written_once(tmp_path):
    """A tokenizer that adds BOS, with a template that writes it too (Llama style): model mode must not add a second
    one; the saved anchor template writes it, because anchor mode trained with the tokenizer's BOS."""
    tok = bpe(["<pad>", "<s>", "</s>"], bos="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "{{ bos_token }}" + CHATML.replace("<|im_end|>", "</s>").replace("<|im_start|>", "|")
    ids = dataset(data.SupervisedDataset, tok, RawSample(input=U1, answer=A1))[0]["input_ids"].tolist()
    assert ids[:2].count(tok.bos_token_id) == 1 and ids.count(tok.bos_token_id) == 1
    anchor = dataset(data.SupervisedDataset, tok, RawSample(input=U1, answer=A1), chat_template="anchor")[0]
    assert anchor["input_ids"].tolist() == tok(format_prompt(U1, "</s>") + A1 + "</s>")["input_ids"]
    templates.save_chat_template(tok, "anchor", tmp_path)
    assert tok.chat_template.startswith("{{- bos_token -}}")
    messages = [{"role": "user", "content": U1}]
    assert (
        tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        == tok(format_prompt(U1, "</s>"))["input_ids"]
    )


def test_stop_ids(chatml, toy, tmp_path):
    """What ends an answer: the EOS first, the generation config's list, the template's end of turn if special."""
    from transformers import GenerationConfig

    eot, eos = chatml.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert templates.stop_ids(chatml, "model") == [eot]
    assert templates.stop_ids(chatml, "model", GenerationConfig(eos_token_id=[eos, eot])) == [eot, eos]
    assert templates.stop_ids(chatml, "anchor", GenerationConfig(eos_token_id=eos)) == [eot, eos]
    base = chatml_tokenizer("<|endoftext|>")
    assert templates.stop_ids(base, "model") == [eos, eot]  # Qwen base: ChatML ends a turn with a token that is not EOS
    assert templates.stop_ids(base, "anchor") == [eos]  # the anchor's template ends a turn with the EOS
    plain = tmp_path / "plain.jinja"  # a turn that ends in ordinary text: nothing to stop at but the EOS
    plain.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' .\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    assert templates.set_chat_template(base, str(plain)) == "model" and templates.stop_ids(base, "model") == [eos]
    tok = templates.load_tokenizer(str(toy))
    assert templates.stop_ids(tok, "anchor") == [tok.eos_token_id]


# ----------------------------------------------------------------------------------------------------------------
# saved templates: apply_chat_template on our output prompts it exactly as it was trained


def test_saved_anchor_template_round_trip(toy, tmp_path):
    from transformers import AutoTokenizer

    tok = templates.load_tokenizer(str(toy))
    out = tmp_path / "sft"
    tok.save_pretrained(out)
    templates.save_chat_template(tok, "anchor", out)  # after save_pretrained ...
    tok.save_pretrained(tmp_path / "again")  # ... and a save_pretrained after it writes the same
    for folder in (out, tmp_path / "again"):
        saved = AutoTokenizer.from_pretrained(folder)
        u1, a1, u2 = "how do i bake a cake ?", "mix the flour .", "how do i brew green tea ?"
        single = [{"role": "user", "content": u1}]
        multi = single + [{"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
        render = lambda m, g=True, t=saved: t.apply_chat_template(m, add_generation_prompt=g, tokenize=False)  # noqa: E731
        assert render(single) == format_prompt(u1) and render(multi) == format_prompt([u1, a1, u2], "</s>")
        assert render(multi[:2], False) == format_prompt(u1) + a1 + "</s>"  # a finished conversation
        assert (
            saved.apply_chat_template(multi, add_generation_prompt=True)["input_ids"]
            == tok(format_prompt([u1, a1, u2], "</s>"))["input_ids"]
        )
        with pytest.raises(Exception, match="alternating user and assistant turns"):
            render([{"role": "system", "content": "be nice"}] + single)
    # trained in anchor mode, reloaded in model mode: the same samples
    row = RawSample(dialogue=[u1, a1, u2, "boil the water ."])
    saved = templates.load_tokenizer(str(out), chat_template="model")
    a = dataset(data.SupervisedDataset, tok, row, chat_template="anchor")[0]
    b = dataset(data.SupervisedDataset, saved, row)[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_saved_model_template_round_trip(chatml, tmp_path):
    from transformers import AutoTokenizer

    chatml.chat_template = {"default": CHATML, "tool_use": "{{ 'tools' }}"}  # named templates, as some models ship
    after, before = tmp_path / "after", tmp_path / "before"
    chatml.save_pretrained(after)
    assert (after / "additional_chat_templates" / "tool_use.jinja").exists()
    settings = json.loads((after / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{{ 'stale' }}"  # a legacy copy in the config
    (after / "tokenizer_config.json").write_text(json.dumps(settings))
    templates.save_chat_template(chatml, "model", after)  # after save_pretrained ...
    templates.save_chat_template(chatml, "model", before)  # ... or before it
    chatml.save_pretrained(before)
    for out in (after, before):
        saved = AutoTokenizer.from_pretrained(out)
        assert saved.chat_template == CHATML and not (out / "additional_chat_templates").exists()
        assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
        assert saved.apply_chat_template(
            [{"role": "user", "content": U1}], add_generation_prompt=True, tokenize=False
        ) == chatml_text(U1, generation_prompt=True)


# ----------------------------------------------------------------------------------------------------------------
# refusals


def test_model_mode_without_a_template_is_one_line(toy, tmp_path):
    with pytest.raises(ValueError, match=f"the tokenizer at {toy} has no chat template: use --chat_template anchor"):
        templates.load_tokenizer(str(toy), chat_template="model")
    tok = templates.load_tokenizer(str(toy))
    with pytest.raises(ValueError, match="has no chat template") as e:
        dataset(data.PromptOnlyDataset, tok, RawSample(input="how do i bake a cake ?"))
    assert "\n" not in str(e.value)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match=f"the chat template of {broken} cannot render a user message: "):
        templates.set_chat_template(tok, str(broken))
    with pytest.raises(argparse.ArgumentTypeError, match="give anchor, model or the path of a Jinja file"):
        templates.parse_chat_template("chatml")


def test_template_that_rewrites_earlier_turns_is_refused(chatml):
    """Some templates (reasoning models) render a past assistant turn differently from the last one: the turns
    cannot be located by prefixes, and training on guessed spans would be silently wrong."""
    chatml.chat_template = CHATML.replace("message['content']", "(message['content'] if loop.last else '...')")
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        dataset(data.SupervisedDataset, chatml, RawSample(dialogue=[U1, A1, U2, A2]))
