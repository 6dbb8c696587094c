"""How every stage samples from a policy: Hugging Face `generate`, plus the two things that make rollouts fast.

    seq = rollout.generate(actor, input_ids, attention_mask, max_new_tokens=N, max_cache_len=args.max_length,
                           cache="static", gather="auto", synced_gpus=world_size > 1, do_sample=True, pad_token_id=pad)

1. A static KV cache with compiled decoding. The default DynamicCache grows by concatenation every token and each
   decode step (B new tokens) is a few hundred small kernel launches: a 1.24B Llama at batch 64 sampled 1,265 tok/s
   on an H200, 12,983 tok/s with `cache_implementation="static"`. With a static cache on CUDA,
   transformers compiles the decode step itself (torch.compile of the forward, mode "reduce-overhead": CUDA graphs)
   and keeps the compiled callable on the model. The prefill runs eagerly, so prompt lengths never recompile (the
   tests check it; no prompt-length buckets are needed). What would recompile is the cache's shape: its length is
   the callers' --max_length (max_cache_len) rounded up to a multiple of CACHE_BUCKET tokens, and it never shrinks
   (transformers keeps the longest seen), so a run compiles once. A new batch size compiles once more (dynamo then
   marks that dimension dynamic, so a third size does not). The cache's memory is allocated per call at that one
   shape and freed after it, so the PPO update can use it in between.
2. ZeRO-3 without an all-gather per layer per token. Under ZeRO-3 every forward gathers each layer's weights and
   frees them after (with `synced_gpus=True` across ranks so all join every step): for 256 tokens that is 256 full
   gathers of the model (DeepSpeedExamples #718: 72 s vs 0.8 s). When the whole model fits on the device, gather
   it once around the call (`deepspeed.zero.GatheredParameters`) and take DeepSpeed's per-module fetch/release hooks
   off meanwhile, as DeepSpeed's own `unwrap_model_for_generation` and TRL do (without that, the release hook
   re-partitions every layer after its forward); each rank then decodes on its own, no `synced_gpus` needed.
   gather="auto" gathers when parameters + KV cache fit in FIT_FRACTION of the free device memory (CPU: of
   MemAvailable) on every rank, "always" / "never" force it.

3. A progress bar per call (`desc`), one tick per decoding step, for the long silent waits of a real model: rank 0
   only, only on a terminal, drawn once it has run PROGRESS_DELAY seconds. `progress` below is the one rule every
   stage's bars follow (generation, PPO micro-batches, SFT and score-model intervals and evals); NANO_PROGRESS=0 turns
   them off, NANO_PROGRESS=1 draws them even when stderr is not a terminal.

Sampled tokens follow the same distribution on every path: the paths change where keys, values and weights live,
not the logits beyond fp32 rounding (tests/test_generation.py: identical greedy sequences, identical seeded samples).
"""

import contextlib
import os
import sys

import torch

CACHE_BUCKET = 64  # tokens: static cache lengths are multiples of this
FIT_FRACTION = 0.8  # gather="auto": parameters + KV cache must fit in this fraction of the free device memory
_announced = set()  # the path messages already printed (each once per process)
PROGRESS_DELAY = 1.0  # seconds: a bar is drawn only once its loop has run this long (short waits stay silent)


def show_progress() -> bool:
    """Whether progress bars are drawn: on rank 0, when stderr (where tqdm writes) is a terminal. Log files, CI and
    redirected output get no carriage-return redraws, and other ranks no copies of rank 0's bar. NANO_PROGRESS=0 turns
    the bars off; NANO_PROGRESS=1 draws them on rank 0 as if stderr were a terminal (tests, `tail -f` of a log)."""
    setting = os.environ.get("NANO_PROGRESS", "")
    if setting not in ("", "0", "1"):
        raise SystemExit(
            f"error: NANO_PROGRESS={setting!r}: use 0 (no progress bars) or 1 (bars on rank 0 even when "
            "stderr is not a terminal), or leave it unset"
        )
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun and deepspeed, and by each stage's preamble
    return rank == 0 and setting != "0" and (setting == "1" or sys.stderr.isatty())


def progress(iterable=None, **kwargs):
    """A tqdm bar (iterate it, or `.update()` it) where `show_progress()`, else a disabled tqdm: the same object that
    draws nothing and costs nothing. leave=False: a finished bar erases itself, so the metrics lines stay readable."""
    from tqdm import tqdm

    kwargs = {"leave": False, "delay": PROGRESS_DELAY, "dynamic_ncols": True, **kwargs}
    return tqdm(iterable, disable=not show_progress(), **kwargs)


def silence_library_bars():
    """transformers ("Loading weights", "Writing model shards") and datasets ("Generating train split") draw their
    own tqdm bars wherever the output goes: hold them to `show_progress()` too. Call it early in a stage."""
    if show_progress():
        return
    from transformers.utils import logging

    logging.disable_progress_bar()  # huggingface_hub's as well
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported (data.py, later)


@contextlib.contextmanager
def token_progress(max_new_tokens, desc, processors=None):
    """A bar over one `generate` call's decoding steps: yields the `logits_processor` to pass to it, the caller's own
    `processors` (or None) and, when bars are on, one more that ticks once per step (the prefill's first token
    included) and returns the scores untouched, so the tokens cannot change. Bars off: generate gets exactly what it
    would without this. A rank whose rows all finished early stops ticking.
    A tick is host-side only, and it follows the device: generate syncs on its stop flag every step (off MPS)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Tick(LogitsProcessor):
        def __call__(self, input_ids, scores):
            bar.update()
            return scores

    with progress(total=max_new_tokens, desc=desc, unit="tok") as bar:
        yield processors if bar.disable else LogitsProcessorList([*(processors or []), Tick()])


def default_cache(device) -> str:
    """The --generation_cache default: static (compiled decoding) on CUDA; dynamic elsewhere, where torch.compile
    only adds compile time (transformers compiles the static path on CUDA only unless asked)."""
    return "static" if torch.device(device).type == "cuda" else "dynamic"


def _announce(message):
    if message not in _announced:
        _announced.add(message)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"generation: {message}", flush=True)


def _free_device_bytes(device) -> int:
    """Free memory where the gathered parameters would live: the GPU's, or the machine's RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _gather_fits(module, rows, cache_len, device) -> bool:
    """Whether the full parameters (ds_numel: the unpartitioned size) plus a KV cache for `rows` sequences of
    `cache_len` tokens fit in FIT_FRACTION of the free memory. Decided on every rank, agreed by a MIN all-reduce:
    the gather is collective, all ranks must take the same path."""
    params = list(module.parameters())
    param_bytes = sum(p.ds_numel * p.element_size() for p in params)
    c = module.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    kv_bytes = 2 * c.num_hidden_layers * rows * kv_heads * head_dim * cache_len * params[0].element_size()
    fits = torch.tensor(int(param_bytes + kv_bytes <= FIT_FRACTION * _free_device_bytes(device)), device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
    return bool(fits.item())


@contextlib.contextmanager
def gathered_for_generation(engine):
    """ZeRO-3: all parameters of `engine.module` gathered once, DeepSpeed's per-module fetch/release hooks off, for
    the whole block; partitioned again and the hooks back on after it (also on an exception)."""
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)  # training engine / inference engine
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        start_hook = offload.module._forward_pre_hooks[offload.fwd_pre_hook.id]  # resets the prefetch trace per step
        for handle in [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]:
            handle.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # the fetch/release hooks; invalidates the trace
            offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_hook)


def generate(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens,
    max_cache_len=None,
    cache=None,
    gather="auto",
    synced_gpus=False,
    compile=None,
    desc="generate",
    **sampling,
):
    """Sample (or greedily decode) continuations; returns the sequences (B * num_return_sequences, P + new), as
    `model.generate` would.

    model: a causal LM, or a DeepSpeed engine holding one (needed for the ZeRO-3 gather: its hooks live there).
    max_cache_len: the static cache's length, e.g. --max_length (rounded up to CACHE_BUCKET; at least prompt + new
        tokens): one fixed size for the whole run, so that no later call needs a longer cache and a recompile.
    cache: "static" or "dynamic"; None picks `default_cache(device)`.
    gather: ZeRO-3 only: "auto", "always" or "never" (see the module docstring).
    synced_gpus: what the caller needs without the gather (ZeRO-3, several ranks); the gathered path drops it.
    compile: static cache only. None: transformers' rule (compiled decoding on CUDA, eager elsewhere); False: eager;
        True or a torch.compile backend name ("eager" in the CPU tests: dynamo's capture and guards without code
        generation): compiled on any device.
    desc: the progress bar's label (token_progress: rank 0, on a terminal, once the call runs PROGRESS_DELAY s).
    sampling: everything else `generate` takes (do_sample, temperature, top_p, pad_token_id, eos_token_id, ...).
    """
    from transformers.generation.configuration_utils import CompileConfig

    if cache not in (None, "static", "dynamic") or gather not in ("auto", "always", "never"):
        raise ValueError(f"cache must be static/dynamic/None and gather auto/always/never, got {cache!r}, {gather!r}")
    engine = model if hasattr(model, "module") and hasattr(model, "optimizer") else None  # a DeepSpeedEngine
    module = engine.module if engine is not None else model
    device = input_ids.device
    cache = cache or default_cache(device)
    P = input_ids.shape[1]
    cache_len = -(-max(P + max_new_tokens, max_cache_len or 0) // CACHE_BUCKET) * CACHE_BUCKET
    rows = input_ids.shape[0] * sampling.get("num_return_sequences", 1)

    # ZeRO-3: gather once around the call, or keep the per-module fetch (and synced_gpus) per token
    zero3 = any(hasattr(p, "ds_id") for p in module.parameters())
    gathered = zero3 and (gather == "always" or gather == "auto" and _gather_fits(module, rows, cache_len, device))
    if gathered and engine is None:
        raise ValueError(
            "gathering ZeRO-3 parameters for generation needs the DeepSpeed engine (its hooks live "
            "there): pass the engine, not engine.module"
        )
    where = ""
    if zero3:
        where = "; ZeRO-3 parameters gathered once per call" if gathered else "; ZeRO-3 per-module fetch per token"
        where += "" if gathered or not synced_gpus else " (synced_gpus)"

    kwargs = {}
    if cache == "static":
        if not hasattr(module.generation_config, "max_cache_len"):  # transformers PR #46424; 5.23 has it
            raise RuntimeError("the static cache needs a transformers whose generate takes max_cache_len (5.23 does)")
        kwargs = {"cache_implementation": "static", "max_cache_len": cache_len}
        if zero3 and not gathered:
            compile = False  # DeepSpeed's fetch hooks are compiler-disabled: graph breaks at every layer
        if compile is False:
            kwargs["disable_compile"] = True
        elif compile is not None:  # forced (transformers compiles on CUDA only by itself)
            backend = compile if isinstance(compile, str) else "inductor"
            config = CompileConfig(backend=backend, mode="reduce-overhead" if backend == "inductor" else None)
            config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
            kwargs["compile_config"] = config
        compiled = compile is not False and (compile is not None or device.type == "cuda")
        how = f"compiled decoding ({compile if isinstance(compile, str) else 'inductor'})" if compiled else "eager"
        _announce(f"static KV cache ({cache_len} tokens), {how}{where}")
    else:
        _announce(f"dynamic KV cache{where}")

    with gathered_for_generation(engine) if gathered else contextlib.nullcontext():
        with token_progress(max_new_tokens, desc, sampling.pop("logits_processor", None)) as processors:
            return module.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                synced_gpus=synced_gpus and not gathered,
                logits_processor=processors,
                **kwargs,
                **sampling,
            )


# ----------------------------------------------------------------------------------------------------------------
# What a sampled answer is, and how a score model reads it: one place for PPO's rollouts and the arena


def response_mask(response, stop_ids):
    """(B, L) bool: tokens up to and including the first stop token (stop_ids: an id, or a tensor of ids such as the
    EOS and the chat template's end of turn); works when pad == eos."""
    is_stop = torch.isin(response, torch.as_tensor(stop_ids, device=response.device))
    return (is_stop.long().cumsum(-1) - is_stop.long()) == 0


def reads_policy_tokens(score_tok, policy_tok, chat_template) -> bool:
    """Can a score model read the policy's token ids as they are? Only with the same vocabulary, EOS and template;
    otherwise the conversation is re-tokenized for it (score_conversations)."""
    same_template = chat_template == "anchor" or score_tok.chat_template == policy_tok.chat_template
    return (
        score_tok.get_vocab() == policy_tok.get_vocab()
        and score_tok.eos_token_id == policy_tok.eos_token_id
        and (same_template)
    )


def score_conversations(model, seq, attention_mask, retokenize=None):
    """The score model's end score (B,) fp32 of each conversation (prompt + answer) in seq (B, T), the policy's
    token ids with its attention mask (the answer's tokens after its first stop masked out).
    retokenize: None when the model reads the policy's ids (reads_policy_tokens), else (score_tok, chat_template,
    inputs (B,), answers (B,)): the conversation is written again from the prompts and answer texts, in the score
    model's tokenizer and the template, as its training pairs were (data.conversation_ids)."""
    from data import conversation_ids

    device = seq.device
    if retokenize is not None:
        tok, chat_template, inputs, answers = retokenize
        tok.pad_token = tok.pad_token or tok.eos_token  # padding is masked: any id will do
        ids = [torch.tensor(conversation_ids(tok, x, y, chat_template)) for x, y in zip(inputs, answers)]
        seq = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tok.pad_token_id).to(device)
        attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
    return model(seq, attention_mask.long().to(device)).end_scores[:, 0].float()
