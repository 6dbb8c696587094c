"""Triton kernels for the hot spots of RLHF, each beside its PyTorch reference (the `*_ref` functions).

    logprobs(logits, labels, temperature=1.0) -> (B, T) fp32     log softmax(logits / temperature)[labels]
    cross_entropy(logits, labels, ignore_index=-100) -> scalar    the SFT / PTX loss, built on logprobs
    linear_logprobs(hidden, weight, labels, temperature=1.0) -> (B, T) fp32   the same from the last hidden state
                                                                  and the lm_head weight, the logits never whole
    head_gives_logprobs(model, targets): a context in which a causal LM's forward returns those as its .logits
    gae(rewards, values, mask, gamma, lam) -> (advantages, returns)
    end_scores(hidden, attention_mask, weight, bias=None, return_all=False) -> (B, D) [, (B, T, D)]

Each dispatches at call time by `use_triton` (kernels/_dispatch.py, the one copy of the rule): the Triton kernel
when the tensors are on CUDA or TRITON_INTERPRET=1 is set (which must happen before triton is first imported), a
memory-lean torch path otherwise, so CPU-only users never launch a kernel. `python kernels/bench.py` compares
them with the code every peer uses.
"""

from kernels._dispatch import use_triton
from kernels.end_scores import end_scores, end_scores_ref
from kernels.gae import gae, gae_ref
from kernels.linear_logprobs import fused_head_problem, head_gives_logprobs, linear_logprobs, linear_logprobs_ref
from kernels.logprobs import cross_entropy, logprobs, logprobs_ref, mean_nll

__all__ = [
    "cross_entropy",
    "end_scores",
    "end_scores_ref",
    "fused_head_problem",
    "gae",
    "gae_ref",
    "head_gives_logprobs",
    "linear_logprobs",
    "linear_logprobs_ref",
    "logprobs",
    "logprobs_ref",
    "mean_nll",
    "use_triton",
]
