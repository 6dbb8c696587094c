"""rollout.generate: every cache and ZeRO-3 path decodes the same tokens as the policy's own `generate`.

The toy world's base model (a random 2-layer Llama, toy.make_toy_model) on CUDA when there is one, else the CPU.
Greedy decoding must give identical sequences with the dynamic and the static cache, over left-padded batches of
mixed prompt lengths in which some rows hit EOS mid-way; seeded sampling must give identical sequences too. That
holds exactly, not just in distribution: the static cache changes where keys and values are stored and how long the
masked attention is, not the logits beyond fp32 rounding (measured: 2.4e-7 at most over 30 steps, logits ~0.7), and
both paths draw the same random numbers in the same order (one multinomial per step over the same rows), so a
sample can only differ where the sampler's draw falls within that rounding of a tie. Were a backend to break that
(e.g. bf16 with fused kernels), the check to fall back to is a distribution test; none is needed in fp32 here.

Compiled decoding: on CUDA the tests run transformers' own compile (inductor, CUDA graphs). On CPU inductor takes
~30 s per model, too slow for the suite, so they compile with dynamo's "eager" backend: the same graph capture and
guards (which is what decides recompiles) without code generation; the greedy tests run the static cache without
compile (`compile=False`), which is what a CPU run gets by default anyway.
"""

import copy
import os
import socket

import pytest
import torch

import rollout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMPILE = None if DEVICE.type == "cuda" else "eager"  # None: transformers' own (inductor) on CUDA


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import toy

    path = tmp_path_factory.mktemp("gen") / "base"
    toy.make_toy_model(str(path))
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(DEVICE).eval()


def prompts(lengths, vocab, seed=0):
    """Left-padded (B, max(lengths)) random prompts of the given true lengths: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(4, vocab, (len(lengths), P), generator=g)  # 0-3 are the special tokens
    mask = torch.arange(P)[None, :] >= P - torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0).to(DEVICE), mask.long().to(DEVICE)


def mid_way_eos(policy, ids, mask, new):
    """A token that row 0 decodes greedily a few steps in: declared the EOS, some rows stop early, some do not."""
    out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return int(out[0, ids.shape[1] + 4])


@pytest.mark.parametrize("lengths", [[5, 3, 1, 5], [9, 9, 2], [17, 4, 11, 16, 8]])
def test_greedy_same_sequences_both_caches(policy, lengths, capsys, monkeypatch):
    from transformers import DynamicCache, StaticCache

    ids, mask = prompts(lengths, policy.config.vocab_size)
    new = 20
    eos = mid_way_eos(policy, ids, mask, new)
    common = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=eos)
    want = policy.generate(input_ids=ids, attention_mask=mask, **common)  # the policy's own generate
    P = ids.shape[1]
    stopped = (want[:, P:] == eos).any(1)
    assert stopped.any() and not stopped.all(), "the test needs rows that stop at EOS mid-way and rows that do not"
    monkeypatch.setattr(rollout, "_announced", set())
    for cache, kind in (("dynamic", DynamicCache), ("static", StaticCache)):
        got = rollout.generate(policy, ids, mask, cache=cache, compile=False, **common)
        assert torch.equal(got, want), f"{cache} cache decodes other tokens:\n{got}\n{want}"
        out = rollout.generate(policy, ids, mask, cache=cache, compile=False, return_dict_in_generate=True, **common)
        assert torch.equal(out.sequences, want) and type(out.past_key_values) is kind  # the cache asked for
        if cache == "static":  # one bucket (P + new <= 64 in every case here), whatever this call's lengths
            assert out.past_key_values.layers[0].keys.shape[2] == rollout.CACHE_BUCKET == 64
    printed = capsys.readouterr().out
    assert printed.count("generation: static KV cache") == printed.count("generation: dynamic KV cache") == 1
    assert rollout.default_cache(torch.device("cuda")) == "static" and rollout.default_cache("cpu") == "dynamic"


def test_sampling_same_sequences_both_caches(policy):
    """Seeded sampling (temperature, top-p, several answers per prompt) gives the same tokens on both caches."""
    ids, mask = prompts([6, 2, 6], policy.config.vocab_size, seed=1)
    common = dict(
        max_new_tokens=24,
        do_sample=True,
        temperature=0.9,
        top_p=0.95,
        num_return_sequences=2,
        pad_token_id=0,
        eos_token_id=3,
    )
    outs = {}
    for cache in ("dynamic", "static"):
        torch.manual_seed(123)
        outs[cache] = rollout.generate(policy, ids, mask, cache=cache, compile=False, **common)
    torch.manual_seed(124)
    other_seed = rollout.generate(policy, ids, mask, cache="dynamic", **common)
    assert outs["dynamic"].shape[0] == 6
    assert torch.equal(outs["static"], outs["dynamic"]), f"{outs['static']}\n{outs['dynamic']}"
    assert not torch.equal(other_seed, outs["dynamic"])  # the seed matters: the comparison above is not vacuous


def test_compiled_static_cache_compiles_once(policy):
    """Compiled decoding: other prompt and answer lengths reuse the compiled step (a recompile raises) while they fit
    the run's cache (max_cache_len, as the stages pass --max_length), and still decode the dynamic cache's tokens."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, (lengths, new) in enumerate([([7, 3, 7], 20), ([12, 12, 5], 31), ([40, 30, 9], 60), ([2, 4, 3], 9)]):
            ids, mask = prompts(lengths, policy.config.vocab_size, seed=seed)
            common = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=3)
            want = rollout.generate(policy, ids, mask, cache="dynamic", **common)
            got = rollout.generate(policy, ids, mask, max_cache_len=100, cache="static", compile=COMPILE, **common)
            assert torch.equal(got, want), f"prompt lengths {lengths}: {got}\n{want}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-3: one process, a DeepSpeed inference engine (as ppo_lag.py builds its frozen models and evaluate.py its
# policies), every parameter partitioned (persistence threshold 0: by default the toy model's small tensors would
# stay whole and hide a missing gather).


@pytest.fixture(scope="module")
def zero3(policy):
    deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is not installed (the GPU image lacks it)")
    import torch.distributed as dist

    created = not dist.is_initialized()
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.get(key) for key in keys}  # restored below: stage subprocesses of later tests inherit
    if created:  # the environment, and would all try to listen on this process group's port
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoids a 30 s JIT build on CPU
        deepspeed.init_distributed(dist_backend="nccl" if DEVICE.type == "cuda" else "gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=copy.deepcopy(policy), config=config)
    engine.eval()
    yield engine
    if created:
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def whole_at_each_step(engine, **kwargs):
    """Generate through rollout.generate; return (sequences, [parameters whole at step t for each step])."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import LogitsProcessor, LogitsProcessorList

    params = list(engine.module.parameters())
    whole = []

    class Spy(LogitsProcessor):
        def __call__(self, input_ids, scores):
            whole.append(all(p.ds_status == ZeroParamStatus.AVAILABLE for p in params))
            return scores

    seq = rollout.generate(engine, logits_processor=LogitsProcessorList([Spy()]), **kwargs)
    return seq, whole


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_zero3_gathered_generation(policy, zero3, cache, monkeypatch):
    """gather="always" decodes the plain model's greedy tokens with every parameter whole at every step, and
    leaves the engine as it was (partitioned, DeepSpeed's hooks back: a later forward still matches the plain model).
    gather="never" decodes the same tokens by fetching per module (parameters not whole between steps), which is
    what shows the gather above is what kept them whole. "auto" follows the free-memory estimate."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    ids, mask = prompts([8, 3, 6], policy.config.vocab_size, seed=2)
    common = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=3,
        cache=cache,
        compile=False,
    )
    want = policy.generate(**{k: v for k, v in common.items() if k not in ("cache", "compile")})
    hooks = len(zero3.optimizer.forward_hooks)

    got, whole = whole_at_each_step(zero3, gather="always", **common)
    assert torch.equal(got, want) and len(whole) == 16 and all(whole), whole
    assert len(zero3.optimizer.forward_hooks) == hooks > 0  # the fetch/release hooks are back
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in zero3.module.parameters())  # re-partitioned
    with torch.no_grad():  # the engine still works as before: DeepSpeed's hooks gather and release per module
        torch.testing.assert_close(zero3(ids, attention_mask=mask).logits, policy(ids, attention_mask=mask).logits)
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in zero3.module.parameters())

    got, whole = whole_at_each_step(zero3, gather="never", **common)
    assert torch.equal(got, want) and not any(whole), whole

    for free, gathered in ((2**10, False), (2**50, True)):  # 1 KiB free: cannot fit; 1 PiB: fits
        monkeypatch.setattr(rollout, "_free_device_bytes", lambda device, free=free: free)
        got, whole = whole_at_each_step(zero3, gather="auto", **common)
        assert torch.equal(got, want) and all(whole) == gathered and any(whole) == gathered, (free, whole)

    with pytest.raises(ValueError, match="pass the engine"):  # the hooks live on the engine, not its module
        rollout.generate(zero3.module, gather="always", **common)


def test_zero3_gathered_compiled_compiles_once(policy, zero3):
    """Compiled decoding on gathered ZeRO-3 parameters: each call gathers the weights into new storage; the
    compiled step must still be reused (no recompile) and decode the plain model's tokens."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, lengths in enumerate([[7, 3, 7], [12, 12, 5]]):
            ids, mask = prompts(lengths, policy.config.vocab_size, seed=seed)
            common = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=3)
            want = policy.generate(input_ids=ids, attention_mask=mask, **common)
            got = rollout.generate(zero3, ids, mask, cache="static", gather="always", compile=COMPILE, **common)
            assert torch.equal(got, want), f"prompt lengths {lengths}: {got}\n{want}"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch._dynamo.reset()


def test_zero3_two_ranks_different_lengths(tmp_path):
    """Two ranks (torchrun, gloo on CPU / nccl on GPUs) decode different numbers of steps: with the per-module
    fetch, `synced_gpus` keeps the early rank joining the other's all-gathers; gathered once, each rank decodes on
    its own. Both must give each rank the plain model's tokens, and neither may hang."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (the GPU image lacks it)")
    if DEVICE.type == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs on a CUDA machine")
    import subprocess
    import sys

    import toy
    from conftest import ROOT

    toy.make_toy_model(str(tmp_path / "base"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        __file__,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)  # a hang fails
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(root):
    """Run by test_zero3_two_ranks_different_lengths on each rank."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank) if DEVICE.type == "cuda" else DEVICE
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if DEVICE.type == "cuda" else "gloo")
    plain = AutoModelForCausalLM.from_pretrained(f"{root}/base", dtype=torch.float32).to(device).eval()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=copy.deepcopy(plain), config=config)
    ids, mask = (t.to(device) for t in prompts([6, 3], plain.config.vocab_size, seed=rank))
    common = dict(max_new_tokens=5 if rank == 0 else 15, do_sample=False, pad_token_id=0)  # rank 0 stops early
    want = plain.generate(input_ids=ids, attention_mask=mask, **common)
    for gather in ("always", "never", "auto"):
        for cache in ("dynamic", "static"):
            got = rollout.generate(
                engine, ids, mask, gather=gather, cache=cache, compile=False, synced_gpus=True, **common
            )
            assert torch.equal(got, want), f"rank {rank}, gather {gather}, {cache} cache:\n{got}\n{want}"
    open(f"{root}/rank{rank}.ok", "w").close()


if __name__ == "__main__":
    import sys

    _two_rank_worker(sys.argv[1])
