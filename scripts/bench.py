"""Benchmarks of whole models and of a ppo_lag.py step (each kernel alone: kernels/bench.py). Not a test; never in CI.

    python scripts/bench.py --rollout         # generation vs training time of one policy (a random 1.24B Llama)
    python scripts/bench.py --actor_memory    # one PPO actor micro-batch's peak memory: logits vs fused log-probs
    python scripts/bench.py --ppo_memory      # one PPO-Lag step's peak memory, full fine-tuning vs LoRA
    python scripts/bench.py --save_model DIR  # that policy as folders ppo_lag.py runs on (scripts/gpu_check.sh)

--rollout: a randomly initialised Llama of the given shape (default: Llama-3.2-1B's, 1.24B parameters) samples
--new_tokens tokens for --batch prompts of --prompt tokens through rollout.generate with the dynamic and with
the static KV cache (compiled decoding on CUDA: transformers compiles the decode step; the first call, which
compiles, is timed apart), beside one forward+backward (the log-prob loss through kernels.logprobs) over the
same batch of full sequences. The ratio generation / forward+backward is what a PPO step pays for sampling.
Answers never stop early (no EOS), so every call generates exactly --new_tokens tokens per sequence.

--save_model DIR: the same random Llama as ordinary HF folders, for the per-phase split of a real ppo_lag.py step
(time/generate, time/score, time/update; scripts/gpu_check.sh runs it): DIR/actor with the toy world's word-level
tokenizer padded with filler words to --vocab (every sampled id decodes), DIR/reward and DIR/cost (score models on
the actor's backbone with random heads), DIR/prompts.jsonl (toy requests lengthened with toy words to exactly
--prompt tokens in the anchor's template). The actor keeps an EOS token, so an answer may stop early, with
probability about 1 - (1 - 1/vocab)^new_tokens (0.2% at the default shape): train/response_len says.
"""

import argparse
import ctypes
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's modules
from kernels import gae, linear_logprobs, logprobs  # noqa: E402
from kernels.bench import DTYPES, peak_memory, proc_status  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# --ppo_memory: the peak memory of one PPO-Lag step of ppo_lag.py, full fine-tuning against LoRA.


def ppo_step_memory(spec: dict) -> dict:
    """Build ppo_lag.py's models at a Llama shape with random weights, as it does (DeepSpeed engines at ZeRO-0,
    torch AdamW, gradient checkpointing): six backbones (actor, ref, reward and cost models, two critics), or with
    LoRA three (actor + ref; each score model + its critic); then run one PPO-Lag step: 1) rollout of a prompt batch,
    2) old and reference log-probs, reward, cost and both critics' values, 3) GAE, 4) one PPO micro-batch for the
    actor and each critic (forward, backward, optimizer step: Adam's states appear here). Returns bytes: the memory
    the models hold once built, and the peak of each phase, all above what the process held before building them."""
    import argparse as ap

    import deepspeed
    from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

    import lora
    from lora import adapter_off
    from models import ScoreModel
    from ppo_lag import actor_loss_fn, critic_loss_fn, kl_shaped_rewards

    device, rank = torch.device(spec["device"]), spec["lora_rank"]
    gpu, dtype = device.type == "cuda", DTYPES[spec["dtype"]]
    H, layers, V = spec["hidden"], spec["layers"], spec["vocab"]
    config = LlamaConfig(
        hidden_size=H,
        num_hidden_layers=layers,
        vocab_size=V,
        intermediate_size=spec["intermediate"],
        num_attention_heads=max(1, H // 128),
        num_key_value_heads=max(1, H // 128),
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.use_cache = True  # generation uses the KV cache; training forwards pass use_cache=False
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    with open(Path(__file__).resolve().parent.parent / "ds_config.json") as f:
        base_config = json.load(f)
    B, P, L, mb = spec["prompts"], spec["prompt_len"], spec["new_tokens"], spec["micro_batch"]
    base_config.update(
        train_micro_batch_size_per_gpu=mb,
        gradient_accumulation_steps=1,
        train_batch_size=mb,
        bf16={"enabled": dtype == torch.bfloat16},
        zero_force_ds_cpu_optimizer=False,
    )
    lora_args = ap.Namespace(
        **{
            f"{who}_lora_{k}": v
            for who in ("actor", "critic")
            for k, v in (("rank", rank), ("alpha", 16.0), ("dropout", 0.0), ("target_modules", ["all-linear"]))
        }
    )

    def now():
        return torch.cuda.memory_allocated(device) if gpu else proc_status("VmRSS")

    def reset_peak():
        if gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak():
        return torch.cuda.max_memory_allocated(device) if gpu else proc_status("VmHWM")

    def engine(model, train):
        if not train:
            model.requires_grad_(False)
            return deepspeed.initialize(model=model, config=base_config)[0]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        return deepspeed.initialize(model=model, optimizer=opt, config=base_config)[0]

    def lm():
        with device:
            return LlamaForCausalLM._from_config(config, dtype=dtype)

    def score_model(score_type):
        with device:
            return ScoreModel(AutoModel.from_config(config, dtype=dtype), score_type=score_type)

    torch.manual_seed(0)
    reset_peak()
    before = now()
    actor_model = lm()
    actor_model.gradient_checkpointing_enable()
    if rank:
        actor_model = lora.add_lora(actor_model, lora_args, "actor_", "random")
    actor = engine(actor_model, train=True)
    ref = adapter_off(actor, actor.module) if rank else engine(lm(), train=False)
    critics, scorers = {}, {}
    for name in ("reward", "cost"):
        critic_model = score_model(name if rank else "critic")
        critic_model.gradient_checkpointing_enable()
        if rank:
            critic_model = lora.add_lora(critic_model, lora_args, "critic_", "random", modules_to_save=["score_head"])
        critics[name] = engine(critic_model, train=True)
        scorers[name] = adapter_off(critics[name], critics[name].module) if rank else engine(score_model(name), False)
    models = [actor, *critics.values()] + ([] if rank else [ref, *scorers.values()])
    out = {
        "params": sum(p.numel() for m in models for p in m.module.parameters()),
        "trained": sum(p.numel() for m in models for p in m.module.parameters() if p.requires_grad),
        "backbones": len(models),
        "built": now() - before,
        "optimizer": type(actor.optimizer).__name__,
    }

    def logp(model, seq, mask):
        logits = model(input_ids=seq, attention_mask=mask, use_cache=False).logits
        return logprobs(logits[:, P - 1 : -1], seq[:, P:])

    prompts = torch.randint(3, V, (B, P), device=device)
    for phase in ("rollout", "score", "actor", "critics"):
        reset_peak()
        if phase == "rollout":
            actor.eval()
            with torch.no_grad():
                seq = actor.module.generate(
                    input_ids=prompts,
                    attention_mask=torch.ones_like(prompts),
                    do_sample=True,
                    max_new_tokens=L,
                    min_new_tokens=L,
                    pad_token_id=0,
                )
            mask, response = torch.ones_like(seq), torch.ones(B, L, device=device)
        elif phase == "score":
            with torch.no_grad():
                old_logp, ref_logp = logp(actor, seq, mask), logp(ref, seq, mask)
                ret, adv = {}, {}
                for name, sign in (("reward", 1.0), ("cost", -1.0)):
                    end = scorers[name](seq, mask).end_scores[:, 0].float()
                    values = critics[name](seq, mask).scores[:, P - 1 : -1, 0]
                    rewards = kl_shaped_rewards(end, old_logp, ref_logp, response, 0.01, 50.0, sign)
                    adv[name], ret[name] = gae(rewards, values, response, 1.0, 0.95)
                    ret[name] = (ret[name], values)
        elif phase == "actor":
            actor.train()
            loss, _ = actor_loss_fn(
                logp(actor, seq[:mb], mask[:mb]), old_logp[:mb], adv["reward"][:mb], response[:mb], 0.2
            )
            actor.backward(loss)
            actor.step()
        else:
            for name, critic in critics.items():
                critic.train()
                values = critic(seq[:mb], mask[:mb]).scores[:, P - 1 : -1, 0]
                returns, old_values = ret[name]
                critic.backward(critic_loss_fn(values, old_values[:mb], returns[:mb], response[:mb], 5.0))
                critic.step()
        out[phase] = peak() - before
    out["after"] = now() - before
    return out


def ppo_memory(args) -> None:
    """Print the PPO-Lag step memory table: full fine-tuning and LoRA, each in a fresh process."""
    gpu = args.device == "cuda"
    shape = (
        dict(
            hidden=4096,
            layers=32,
            intermediate=11008,
            vocab=32000,
            prompts=16,
            prompt_len=256,
            new_tokens=256,
            micro_batch=16,
            dtype="bf16",
        )
        if args.ppo_shape == "7b"
        else dict(
            hidden=512,
            layers=4,
            intermediate=1376,
            vocab=8000,
            prompts=8,
            prompt_len=64,
            new_tokens=64,
            micro_batch=8,
            dtype="bf16",
        )
    )
    how = (
        "torch.cuda.max_memory_allocated, tensors only"
        if gpu
        else "process RSS high-water mark (VmHWM) above the RSS before building, glibc mmap threshold 1 MiB"
    )
    print(
        f"# one PPO-Lag step of ppo_lag.py (DeepSpeed ZeRO-0, {shape['dtype']}, torch AdamW, gradient checkpointing) "
        f"on {torch.cuda.get_device_name() if gpu else 'CPU'}; Llama shape hidden {shape['hidden']}, "
        f"{shape['layers']} layers, intermediate {shape['intermediate']}, vocab {shape['vocab']}; rollout "
        f"{shape['prompts']} prompts x ({shape['prompt_len']} + {shape['new_tokens']} new) tokens, PPO micro-batch "
        f"{shape['micro_batch']}; LoRA: rank {args.ppo_lora_rank} on every linear layer of actor and critics; "
        f"memory: {how}; GB = 1e9 bytes"
    )
    cols = ("built", "rollout", "score", "actor", "critics")
    print(
        "# built: the models once built; arithmetic: 2 bytes a weight (bf16) + 12 a trained one (DeepSpeed's fp32 "
        "master copy and Adam's two moments); each phase: its peak"
    )
    print(
        f"{'run':<10} {'backbones':>9} {'params':>14} {'trained':>14} {'arithmetic GB':>13} "
        + " ".join(f"{c + ' GB':>11}" for c in cols)
        + f" {'peak GB':>9}  optimizer"
    )
    for rank in (0, args.ppo_lora_rank):
        spec = {**shape, "device": args.device, "lora_rank": rank}
        cmd = [sys.executable, __file__, "--ppo_worker", json.dumps(spec)]
        env = {**os.environ, "TRITON_INTERPRET": "0", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        name = "full" if rank == 0 else f"LoRA r={rank}"
        if proc.returncode != 0:
            oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
            print(f"{name:<10} {'out of memory' if oom else 'failed: ' + proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        phases = " ".join(f"{r[c] / 1e9:11.2f}" for c in cols)
        top, arithmetic = max(r[c] for c in cols), 2 * r["params"] + 12 * r["trained"]
        print(
            f"{name:<10} {r['backbones']:>9} {r['params']:>14,} {r['trained']:>14,} {arithmetic / 1e9:13.2f} "
            f"{phases} {top / 1e9:9.2f}  {r['optimizer']}",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------------------
# Rollout: generation vs training time of one policy.


def _seconds(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def llama_config(args, max_positions, **special_tokens):
    """The rollout model's shape from the flags (--hidden ... --vocab), embeddings tied as in Llama-3.2-1B."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **special_tokens,
    )


def rollout_bench(args):
    """Generation tok/s with each KV cache beside forward+backward tok/s over the same batch, and their ratio."""
    from transformers import LlamaForCausalLM

    import rollout

    gpu, dt = args.device == "cuda", DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    B, P, N = args.batch, args.prompt, args.new_tokens
    max_positions = rollout.CACHE_BUCKET * -(-(P + N) // rollout.CACHE_BUCKET)
    config = llama_config(args, max_positions, pad_token_id=0, bos_token_id=None, eos_token_id=None)  # no EOS
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it runs: a 1.24B model initialises in seconds on a GPU
        model = LlamaForCausalLM(config).to(dt).eval()
    model.generation_config.eos_token_id = None
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(1, args.vocab, (B, P), device=args.device)
    mask = torch.ones_like(ids)
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    where += "" if gpu else f", load {os.getloadavg()[0]:.1f}"
    shape = f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, {args.kv_heads} KV heads"
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
    print(
        f"# rollout: random Llama {size} ({shape}, vocab {args.vocab}), {str(dt).removeprefix('torch.')}, batch {B}, "
        f"prompt {P}, {N} new tokens, sampled (temperature 1, top-p 1); {where}; best of {args.repeats} timed "
        "calls after a warm-up call"
    )

    compile = {"auto": None, "on": True, "off": False}[args.compile]
    rows = {}
    for cache in ("dynamic", "static"):

        def sample(cache=cache, new=N):
            return rollout.generate(
                model,
                ids,
                mask,
                max_new_tokens=new,
                cache=cache,
                compile=compile,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                pad_token_id=0,
            )

        # warm-up: the static cache's first call compiles (on CUDA), so it runs at full length; the dynamic one
        # only needs its kernels loaded
        first, out = _seconds(sample if cache == "static" else functools.partial(sample, new=8), args.device)
        times = [_seconds(sample, args.device) for _ in range(args.repeats)]
        t, out = min(times, key=lambda x: x[0])
        assert out.shape == (B, P + N), f"{cache}: {tuple(out.shape)} != {(B, P + N)}: an answer stopped early"
        rows[f"generate, {cache} cache"] = t, B * N, f"first call {first:.1f} s" if cache == "static" else ""
        del out
        if gpu:
            torch.cuda.empty_cache()

    # one forward+backward over the same B sequences of P + N tokens: the actor's log-prob loss
    model.train()
    seqs = torch.randint(1, args.vocab, (B, P + N), device=args.device)
    mb = args.train_micro_batch or B

    def train_step():
        for i in range(0, B, mb):
            logits = model(input_ids=seqs[i : i + mb], use_cache=False).logits
            logprobs(logits[:, :-1], seqs[i : i + mb, 1:]).mean().backward()
        model.zero_grad(set_to_none=True)

    _seconds(train_step, args.device)
    t = min(_seconds(train_step, args.device)[0] for _ in range(args.repeats))
    train = rows["forward+backward"] = t, B * (P + N), f"micro-batch {mb}" if mb < B else ""

    print(f"{'phase':<26} {'time s':>8} {'tok/s':>9} {'x fwd+bwd':>10}")
    for name, (t, tokens, note) in rows.items():
        print(f"{name:<26} {t:8.2f} {tokens / t:9.0f} {t / train[0]:10.2f}   {note}".rstrip())
    (dyn, *_), (stat, *_) = rows["generate, dynamic cache"], rows["generate, static cache"]
    print(f"static / dynamic generation speed: {dyn / stat:.2f}x")
    print("(tok/s: generated tokens per second for generate, sequence tokens per second for forward+backward)")
    if gpu:
        print(f"target: static >= 8x dynamic at batch 64: {'met' if dyn >= 8 * stat else 'NOT met'}")
        print(f"target: generation <= 1.5x forward+backward: {'met' if stat <= 1.5 * train[0] else 'NOT met'}")


# ----------------------------------------------------------------------------------------------------------
# --actor_memory: one PPO actor micro-batch on the rollout shape, log-probs from logits or fused.


def actor_memory(args):
    """Peak memory and time of one PPO actor micro-batch (forward + backward of a log-prob loss over --actor_batch
    sequences of --actor_len tokens) on the rollout model's shape: the logits path (lm_head, then kernels.logprobs:
    ppo_lag.py's default) against log-probs from the last hidden state (kernels.linear_logprobs: --fused_logprobs),
    with and without gradient checkpointing. Peak: above the model's weights, weight gradients included."""
    from transformers import LlamaForCausalLM

    gpu, dt = args.device == "cuda", DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if not gpu and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # RSS follows the live tensors (peak_memory)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "TRITON_INTERPRET": "0"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    B, T = args.actor_batch, args.actor_len
    config = llama_config(args, T, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dt).train()
    seqs = torch.randint(1, args.vocab, (B, T), device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# PPO actor micro-batch: random Llama {n_params / 1e6:,.0f}M (hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}), {str(dt).removeprefix('torch.')}, {B} x {T} tokens, forward + backward of the mean "
        f"log-prob; {where}; peak = memory above the weights (weight gradients included); best of {args.repeats}"
    )

    def step(fused):
        if fused:
            hidden = model.model(input_ids=seqs, use_cache=False).last_hidden_state
            lp = linear_logprobs(hidden[:, :-1], model.lm_head.weight, seqs[:, 1:])
        else:
            lp = logprobs(model(input_ids=seqs, use_cache=False).logits[:, :-1], seqs[:, 1:])
        lp.mean().backward()
        model.zero_grad(set_to_none=True)

    print(f"{'gradient checkpointing':<24} {'log-probs':<20} {'time s':>8} {'peak GB':>8} {'memory ratio':>12}")
    for checkpointing in (False, True):
        model.gradient_checkpointing_enable() if checkpointing else model.gradient_checkpointing_disable()
        peaks = {}
        for fused in (False, True):
            fn = functools.partial(step, fused)
            peaks[fused] = peak_memory(fn, args.device)  # its warm-up call compiles the kernels
            t = min(_seconds(fn, args.device)[0] for _ in range(args.repeats))
            ratio = f"{peaks[False] / peaks[True]:11.2f}x" if fused else ""
            how = "fused (hidden state)" if fused else "logits + kernel"
            print(
                f"{'on' if checkpointing else 'off':<24} {how:<20} {t:8.2f} {peaks[fused] / 1e9:8.3f} {ratio:>12}",
                flush=True,
            )
        met = peaks[False] >= 4 * peaks[True]
        print(
            f"target: fused peak <= 1/4 of the logits path (checkpointing {'on' if checkpointing else 'off'}): "
            f"{'met' if met else 'NOT met'}"
        )


# ----------------------------------------------------------------------------------------------------------
# --save_model: the rollout shape as folders ppo_lag.py reads, for the per-phase split of a real PPO-Lag step.

SAVE_MARKER = "bench_model.json"  # --save_model writes the shape here; a DIR holding it may be overwritten


def toy_tokenizer(vocab_size: int, model_max_length: int):
    """The toy world's word-level tokenizer (toy.toy_tokenizer) with its vocabulary padded by filler words
    `filler<id>` up to `vocab_size`, so that toy prompts still tokenize as words and every id a model of that
    vocabulary samples decodes to a word (and encodes back to the same id)."""
    import toy

    words = len(toy.toy_tokenizer().get_vocab())
    if vocab_size < words:
        raise SystemExit(f"error: --vocab {vocab_size} is below the toy tokenizer's {words} words; raise it")
    return toy.toy_tokenizer([f"filler{i}" for i in range(words, vocab_size)], model_max_length)


def long_prompts(tokenizer, n: int, length: int) -> list[str]:
    """n distinct toy requests, each preceded by random toy words so that its prompt in the anchor's template is
    exactly `length` tokens (BOS included): toy prompts alone are 15-25 tokens, a real dataset's are longer."""
    import random

    import templates
    import toy

    def n_tokens(text):
        return len(templates.tokenize(tokenizer, templates.chat_prompt(tokenizer, text))["input_ids"])

    words = [w for w in toy.toy_vocabulary() if w.isalpha() and w.islower()]  # one token each, not the template's
    rng, prompts = random.Random(0), []
    while len(prompts) < n:
        request = toy.toy_prompt(rng, rng.choice(sorted(toy.TOPICS)))
        fill = length - n_tokens(request)
        if fill < 0:
            raise SystemExit(
                f"error: --prompt {length} is shorter than a toy request in the template "
                f"({length - fill} tokens); raise --prompt"
            )
        prompts.append(" ".join(rng.choices(words, k=fill) + [request]))
        assert n_tokens(prompts[-1]) == length, (prompts[-1], n_tokens(prompts[-1]), length)
    return prompts


def save_model(args):
    """Write DIR/actor (a random LlamaForCausalLM of the rollout shape + the padded toy tokenizer), DIR/reward and
    DIR/cost (score models on its backbone with random heads, seeded 0 and 1, as tests/conftest.py's toy models),
    and DIR/prompts.jsonl (4 x --batch prompts of exactly --prompt tokens: 4 rollouts of --batch)."""
    import shutil

    from transformers import LlamaForCausalLM

    import rollout
    from models import ScoreModel

    rollout.silence_library_bars()  # transformers' load and save bars: on a terminal only
    out, dt = Path(args.save_model), DTYPES[args.dtype or "bf16"]  # bf16 on disk: ppo_lag.py casts on load
    if out.exists() and any(out.iterdir()) and not (out / SAVE_MARKER).exists():
        raise SystemExit(f"error: --save_model {out} is a non-empty folder this script did not write; give a new one")
    P, N = args.prompt, args.new_tokens
    max_length = rollout.CACHE_BUCKET * -(-(P + N) // rollout.CACHE_BUCKET)
    tokenizer = toy_tokenizer(args.vocab, max_length)  # bad input (--vocab, --prompt) stops here, before the model
    prompts = long_prompts(tokenizer, 4 * args.batch, P)
    for name in ("actor", "reward", "cost"):  # a folder from an earlier shape may hold other shard files
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(
        args,
        max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it runs: a 1.24B model initialises in seconds on a GPU
        model = LlamaForCausalLM._from_config(config, dtype=dt)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "actor")
    tokenizer.save_pretrained(out / "actor")
    del model
    for seed, name in enumerate(("reward", "cost")):
        torch.manual_seed(seed)
        ScoreModel.from_pretrained(str(out / "actor"), dtype=dt, score_type=name).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    with open(out / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    shape = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")}
    rollout_shape = {"batch": args.batch, "prompt": P, "new_tokens": N, "max_length": P + N}  # scripts/gpu_check.sh
    (out / SAVE_MARKER).write_text(json.dumps({**shape, "params": n_params, **rollout_shape}) + "\n")
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
    print(
        f"saved a random Llama of {size} parameters ({str(dt).removeprefix('torch.')}) to {out}/actor, "
        f"score models on its backbone to {out}/reward and {out}/cost, {len(prompts)} prompts of {P} tokens to "
        f"{out}/prompts.jsonl; a PPO-Lag run on them:\n"
        f"  python ppo_lag.py --actor_model_name_or_path {out}/actor --reward_model_name_or_path {out}/reward "
        f"--cost_model_name_or_path {out}/cost --train_datasets prompts:1.0:{out}/prompts.jsonl "
        f"--max_length {P + N} --per_device_prompt_batch_size {args.batch} --output_dir OUT ..."
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 1 to 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 is steadier when busy)")
    # what to run: one of
    p.add_argument("--rollout", action="store_true", help="generation vs training time of one policy")
    p.add_argument(
        "--actor_memory",
        action="store_true",
        help="peak memory of one PPO actor micro-batch on the rollout model, logits vs fused",
    )
    p.add_argument("--ppo_memory", action="store_true", help="peak memory of one PPO-Lag step, full vs LoRA")
    p.add_argument(
        "--save_model",
        metavar="DIR",
        default=None,
        help="write the rollout shape's random Llama (+ toy tokenizer), reward and cost models on its backbone and "
        "--batch x 4 prompts of --prompt tokens to DIR, for a ppo_lag.py run",
    )
    # the policy's shape (default Llama-3.2-1B's: 1.24B parameters) and the rollout's
    p.add_argument("--hidden", type=int, default=2048, help="rollout model: hidden size")
    p.add_argument("--intermediate", type=int, default=8192, help="rollout model: MLP size")
    p.add_argument("--layers", type=int, default=16, help="rollout model: layers")
    p.add_argument("--heads", type=int, default=32, help="rollout model: attention heads")
    p.add_argument("--kv_heads", type=int, default=8, help="rollout model: key/value heads")
    p.add_argument("--vocab", type=int, default=128256, help="rollout model: vocabulary size")
    p.add_argument("--batch", type=int, default=64, help="rollout: prompts per generate call")
    p.add_argument("--prompt", type=int, default=128, help="rollout: prompt tokens")
    p.add_argument("--new_tokens", type=int, default=256, help="rollout: tokens generated per prompt")
    p.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="rollout model dtype (default bf16 GPU, fp32 CPU)"
    )
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="static cache's compiled decoding: auto = on CUDA only (transformers' rule)",
    )
    p.add_argument("--train_micro_batch", type=int, default=None, help="forward+backward in chunks of this many")
    p.add_argument("--actor_batch", type=int, default=8, help="--actor_memory: sequences per micro-batch")
    p.add_argument("--actor_len", type=int, default=2048, help="--actor_memory: tokens per sequence")
    p.add_argument("--ppo_shape", choices=["small", "7b"], default=None, help="--ppo_memory: default 7b GPU, small CPU")
    p.add_argument("--ppo_lora_rank", type=int, default=8, help="--ppo_memory: LoRA rank of actor and critics")
    p.add_argument("--ppo_worker", default=None, help=argparse.SUPPRESS)  # internal: one PPO-Lag step
    args = p.parse_args()
    if args.ppo_worker:
        print(json.dumps(ppo_step_memory(json.loads(args.ppo_worker))))
        return
    if args.save_model:
        return save_model(args)
    if args.ppo_memory:
        args.ppo_shape = args.ppo_shape or ("7b" if args.device == "cuda" else "small")
        return ppo_memory(args)
    gpu = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "0"  # the torch fallbacks, as a CPU user runs them
    if args.actor_memory:
        args.repeats = args.repeats or (3 if gpu else 1)
        return actor_memory(args)
    if args.rollout:
        args.repeats = args.repeats or (1 if gpu else 3)  # GPU timings are steady; a shared CPU's are not
        return rollout_bench(args)
    p.error("pick one of --rollout, --actor_memory, --ppo_memory, --save_model DIR (each kernel: kernels/bench.py)")


if __name__ == "__main__":
    main()
