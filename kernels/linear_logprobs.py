"""Token log-probabilities straight from the last hidden state, `log softmax(h W^T / temperature)[label]`, without
ever holding the (B, T, V) logits.

The actor's usual log-prob path is `lm_head` then `logprobs`: the (B, T, V) logits exist in the model's dtype
(8 x 2048 x 128256 in bf16: 4.2 GB), are kept for backward, and their gradient is as large again. `logprobs` already
avoids the fp32 copies; this removes the logits themselves. Rows (b, t) go through in chunks of R rows:

    forward   Z_c = H_c W^T (R, V)  ->  log p and log-sum-exp per row (the log-prob kernel)  ->  Z_c dropped
    backward  Z_c = H_c W^T again   ->  G_c = g (onehot - softmax(Z_c / temperature)) / temperature (the kernel)
              dH_c = G_c W,  dW += G_c^T H_c

so the extra memory is two (R, V) chunks (Z_c and G_c) plus B*T fp32 numbers (out and the saved log-sum-exp), and
the price is one more H_c W^T per chunk in backward (the lm_head's forward FLOPs once more), paid instead of writing
and re-reading the logits and their gradient. With a frozen head (no dW: a LoRA actor) there is no such price: since
G = g (onehot - softmax) / temperature scales each row by g, forward keeps U = G W at g = 1 (as small as H) and
backward is dH = g U. R is set so that one chunk holds CHUNK_BYTES (GPU: large enough for
full-speed GEMMs; CPU: the torch fallback's own chunk size, whose GEMMs are at speed much sooner). dW sums the chunks in
the weight's dtype (each GEMM accumulates in fp32 inside; bf16 rounds once per chunk). No bias (lm_heads have none).
"""

import contextlib
import importlib
import inspect

import torch

from kernels._dispatch import use_triton

LP = importlib.import_module("kernels.logprobs")  # the module, so its launchers are looked up at call time

CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 16 * 2**20}  # one (R, V) chunk of logits in the hidden's dtype


def linear_logprobs_ref(hidden, weight, labels, temperature=1.0):
    """The unfused path, the spec: the whole (B, T, V) logits, then log_softmax + gather."""
    return LP.logprobs_ref(hidden @ weight.t(), labels, temperature)


def chunk_rows(V, element_size, chunk_bytes):
    """Rows per chunk: one (R, V) chunk of logits in chunk_bytes, a multiple of 64 rows when that many fit (whole
    GEMM tiles), at least 1."""
    rows = max(1, chunk_bytes // (V * element_size))
    return rows - rows % 64 if rows >= 64 else rows


def _kernels(x):
    """The log-prob kernel's forward and backward for this tensor (Triton or the torch fallback: the one rule)."""
    return (LP._fwd_triton, LP._bwd_triton) if use_triton(x) else (LP._fwd_torch, LP._bwd_torch)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, rows, frozen_head):
        D = hidden.size(-1)
        h, y = hidden.reshape(-1, D), labels.reshape(-1)  # (N, D), (N,): a copy only if hidden is not contiguous
        fwd, bwd = _kernels(h)
        out = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        # the log-sum-exp per row for backward; the torch fallback recomputes softmax there and returns none
        lse = torch.empty_like(out) if use_triton(h) else None
        # A frozen head (a LoRA actor): dH = g * U with U = (onehot - softmax) W / temperature, which needs no g, so
        # U is made here from the logits at hand and backward is one multiply: no recomputed GEMM at all
        u = torch.empty_like(h) if frozen_head else None
        for r0 in range(0, h.size(0), rows):
            z = (h[r0 : r0 + rows] @ weight.t())[None]  # (1, R, V): the only logits alive
            o, s = fwd(z, y[r0 : r0 + rows][None], 1.0 / temperature)
            out[r0 : r0 + rows] = o[0]
            if lse is not None:
                lse[r0 : r0 + rows] = s[0]
            if frozen_head:
                ones = torch.ones_like(o)
                torch.mm(bwd(z, y[r0 : r0 + rows][None], s, ones, 1.0 / temperature)[0], weight, out=u[r0 : r0 + rows])
            del z
        if frozen_head:
            ctx.save_for_backward(u)
        else:
            ctx.save_for_backward(h, weight, y, lse)
        ctx.temperature, ctx.rows, ctx.shape, ctx.frozen_head = temperature, rows, hidden.shape, frozen_head
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.frozen_head:
            (u,) = ctx.saved_tensors
            dh = (grad_out.reshape(-1, 1).float() * u).to(u.dtype)
            return dh.view(ctx.shape), None, None, None, None, None
        h, weight, y, lse = ctx.saved_tensors
        _, bwd = _kernels(h)
        g = grad_out.reshape(-1).float()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        rows = ctx.rows
        for r0 in range(0, h.size(0), rows):
            h_c = h[r0 : r0 + rows]
            z = (h_c @ weight.t())[None]  # recomputed: (1, R, V)
            s = lse[r0 : r0 + rows][None] if lse is not None else None
            G = bwd(z, y[r0 : r0 + rows][None], s, g[r0 : r0 + rows][None], 1.0 / ctx.temperature)[0]  # (R, V)
            del z
            if need_h:
                torch.mm(G, weight, out=dh[r0 : r0 + rows])
            if need_w:
                dw.addmm_(G.t(), h_c)
            del G
        return (dh.view(ctx.shape) if need_h else None), dw, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, rows: int | None = None
) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[labels] -> (B, T) fp32, differentiable w.r.t. hidden and weight.

    hidden: (B, T, D) the last hidden state (after the final norm), already shifted to the positions that predict
    labels; weight: (V, D) the lm_head's (a tied embedding is fine: autograd sums both gradients); labels: (B, T),
    outside [0, V) give 0 and no gradient. rows: rows per chunk (default: CHUNK_BYTES of logits per chunk, by device).
    """
    assert hidden.dim() == 3 and labels.shape == hidden.shape[:2], (hidden.shape, labels.shape)
    assert weight.dim() == 2 and weight.size(1) == hidden.size(-1), (weight.shape, hidden.shape)
    assert weight.dtype == hidden.dtype, f"hidden is {hidden.dtype} but the lm_head weight is {weight.dtype}"
    budget = CHUNK_BYTES["cuda" if hidden.is_cuda else "cpu"]
    rows = rows or chunk_rows(weight.size(0), hidden.element_size(), budget)
    frozen_head = torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
    return _LinearLogProbs.apply(hidden, weight, labels, float(temperature), int(rows), frozen_head)


# ----------------------------------------------------------------------------------------------------------
# Wiring into a Hugging Face causal LM: its lm_head gives log-probs instead of logits for one forward.


def causal_lm(model):
    """The Hugging Face model inside a DeepSpeed engine and/or a PEFT wrapper (LoRA layers stay in it)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "disable_adapter") else model


def fused_head_problem(model) -> str | None:
    """Why the model's logits are not exactly `last hidden state @ lm_head.weight^T` (None when they are): a bias, or
    a scaling after the head (Gemma's soft-capping, Cohere's logit scale), which the fused path would leave out."""
    lm = causal_lm(model)
    head, config = lm.get_output_embeddings(), lm.config
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return f"{type(lm).__name__}'s output layer is not a bias-free linear layer"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) != 1.0:
        return f"{type(lm).__name__} scales its logits after the output layer"
    return None


@contextlib.contextmanager
def head_gives_logprobs(model, targets, temperature=1.0):
    """Within: the model's lm_head returns log p(target) (B, k) fp32 for the k hidden states it is given (the last k
    positions: transformers' logits_to_keep), from `linear_logprobs`, instead of the (B, k, V) logits; so
    `model(...).logits` is that. targets (B, T): position t's target (the token at t + 1; outside [0, V): 0, no
    gradient). The model's own forward runs, DeepSpeed's hooks on the head included: ZeRO-3 gathers its weight for
    the call and again for its backward, as for any layer. `model` may be wrapped (engine, PEFT)."""
    head = causal_lm(model).get_output_embeddings()

    def forward(hidden):
        return linear_logprobs(hidden, head.weight, targets[:, targets.size(1) - hidden.size(1) :], temperature)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def token_logprobs(model, inputs: dict, P: int = 1, fused: bool = False):
    """log p(x_t | x_<t) for t >= P of a causal LM's inputs["input_ids"] (B, T) -> (B, T - P) fp32 (inputs["labels"],
    when given, are the targets instead; labels outside the vocabulary, e.g. -100, give 0). Only the positions that
    predict them get logits (transformers' logits_to_keep), then `logprobs`; fused: the lm_head itself gives the
    log-probs for that forward (head_gives_logprobs), the same numbers without the (B, T, V) logits."""
    labels = inputs.get("labels", inputs["input_ids"])[:, P:]
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    keep = labels.size(1) + 1  # positions P - 1 .. T - 1 (the last predicts nothing and is dropped)
    inputs["use_cache"] = False
    lm = causal_lm(model)
    if "logits_to_keep" in inspect.signature(getattr(lm, "forward", lm)).parameters:
        inputs["logits_to_keep"] = keep  # the prompt's logits are never computed
    if not fused:
        return LP.logprobs(model(**inputs).logits[:, -keep:-1], labels)
    targets = torch.nn.functional.pad(labels, (P - 1, 1), value=-100)  # position t predicts token t + 1
    with head_gives_logprobs(model, targets):
        return model(**inputs).logits[:, -keep:-1]  # the "logits" are log p(target) now: (B, T - P)
