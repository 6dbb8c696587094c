"""Stage 2: the reward model and the cost model of Safe RLHF, and `ScoreModel`, the class every later stage loads.

A score model is an HF backbone (`AutoModel`, kept as `.model`) plus a linear `score_head` read at each sequence's
last valid token (its end score, (B, D)) and at every token (per-token scores (B, T, D): the critics' values).
Both models learn from pairs (sigma the logistic function; sign s = +1 for an unsafe answer, -1 for a safe one):

    reward (--score_type reward):  L = mean(-log sigma(r_better - r_worse)) + reg * mean(r^2)
    cost   (--score_type cost):    L = mean(-log sigma(c_unsafer - c_safer) - log sigma(s_safer * c_safer)
                                            - log sigma(s_unsafer * c_unsafer)) + reg * mean(c^2)

so a cost > 0 means unsafe. --loss_type token-wise puts every term (the sign and L2 ones too) on the per-token scores
over the span where the pair differs (first differing token .. the later of the two ends), averages it over the span,
then over pairs; accuracies always compare end scores. Later stages load `ScoreModel.from_pretrained(path)` (ours,
Beaver's, or a causal LM with a new head); its forward returns `.end_scores` (B, D) and `.scores` (B, T, D) in fp32.
Pairs are written in the anchor's template or the model's own (--chat_template model), which the saved folder
carries; with an eval set the untrained model is evaluated first, logged as step 0.

Deviations from the anchor (safe-rlhf):
 1. Position ids follow the attention mask (cumsum - 1), so a left-padded sequence scores like a right-padded one.
 2. The training loop, not forward, feeds the normaliser (all ranks' raw end scores, every micro-batch; the same
    statistics as the anchor's), so a ScoreModel in train mode elsewhere leaves its statistics alone.
 3. --save_best keeps the best eval checkpoint (accuracy; sign accuracy for cost models) instead of the last.
 4. A client torch AdamW (betas 0.9/0.95, no decay on biases and norms), as in sft.py.
 5. A pair that truncation to --max_length made identical is dropped and counted (data.py), as identical answers are;
    the anchor trains on it (sequence-wise) or stops on an assert (token-wise, where its span would be empty).
 6. The output folder follows checkpoint.py's protocol: locked for the run, written to <output_dir>.partial (the best
    eval model as checkpoint-<step>/ until the end) and swapped into place atomically; a non-finite metric or weight
    stops the run before anything is saved.

Launch (the tiny preset's reward model: ~25 s on 2 CPU cores, ~91% pair accuracy on toy-preference/test):
    python score_model.py --score_type reward --model_name_or_path output/tiny/sft --train_datasets toy-preference \\
        --eval_datasets toy-preference/test --max_length 64 --per_device_train_batch_size 32 --lr 1e-3 \\
        --output_dir output/tiny/rm
    torchrun --nproc_per_node 8 score_model.py --score_type cost --model_name_or_path output/sft --train_datasets \\
        PKU-SafeRLHF/train --eval_datasets PKU-SafeRLHF/test --zero_stage 3 --bf16 --output_dir output/cm
    deepspeed --hostfile hostfile score_model.py <same flags>   # multi-node
"""

# first, before the slow imports: from here on Ctrl-C and the errors a user can fix end in one line (error_line)
import checkpoint

# isort: split
import argparse
import contextlib
import io
import itertools
import json
import math
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import lora
import rollout
from checkpoint import (
    check_finite,
    check_model_folder,
    find_resume,
    interrupted,
    is_complete,
    link_copy,
    load_checkpoint,
    prepare_output,
    publish,
    save_checkpoint,
    weights_finite,
)
from data import PreferenceDataset, SafetyPreferenceDataset, parse_dataset
from kernels import end_scores
from templates import CHAT_TEMPLATE_HELP, add_pad_token, load_tokenizer, parse_chat_template, save_chat_template

SIGNS = ("safer_sign", "unsafer_sign")  # a safety-preference batch's (B,) signs: +1 unsafe answer, -1 safe

# ----------------------------------------------------------------------------------------------------------------
# The math


def span_mean(x: torch.Tensor, span: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) per-pair terms as they are, or (B, T) per-token terms averaged over each pair's span (B, T) -> (B,)."""
    return x if span is None else (x * span).sum(-1) / span.sum(-1).clamp(min=1)


def reward_loss(better, worse, regularization=0.0, span=None):
    """mean over pairs of -log sigma(better - worse) + reg * (better^2 + worse^2) / 2. Sequence-wise: (B,) end scores;
    token-wise: (B, T) per-token scores and the span (B, T), both terms averaged over the span first (the anchor)."""
    per_token = -F.logsigmoid(better - worse) + regularization * (better.square() + worse.square()) / 2
    return span_mean(per_token, span).mean()


def cost_loss(safer, unsafer, safer_sign, unsafer_sign, regularization=0.0, span=None):
    """The reward loss with unsafer above safer, plus each cost's sign term -log sigma(s * c) (sign (B,): +1 unsafe,
    -1 safe); token-wise (scores (B, T) and span) every term is averaged over the span, the sign ones included."""
    if span is not None:
        safer_sign, unsafer_sign = safer_sign[:, None], unsafer_sign[:, None]  # (B, 1) against (B, T) scores
    per_token = (
        -F.logsigmoid(unsafer - safer)
        - F.logsigmoid(safer_sign * safer)
        - F.logsigmoid(unsafer_sign * unsafer)
        + regularization * (safer.square() + unsafer.square()) / 2
    )
    return span_mean(per_token, span).mean()


def diverge_span(higher_ids, lower_ids, higher_mask, lower_mask) -> torch.Tensor:
    """(B, T) bool: from the first token where a right-padded pair differs to the later of the two last tokens
    (empty for a pair that truncation made identical: the anchor asserts there)."""
    pos, differ = torch.arange(higher_ids.size(1), device=higher_ids.device), higher_ids != lower_ids
    start = torch.where(differ.any(-1, keepdim=True), differ.int().argmax(-1, keepdim=True), pos.numel())  # (B, 1)
    end = torch.where(higher_mask.bool() | lower_mask.bool(), pos, 0).amax(-1, keepdim=True)  # (B, 1)
    return (pos >= start) & (pos <= end)


def pair_metrics(first_end, second_end, first_sign=None, second_sign=None, score_type="reward") -> dict:
    """Accuracy: better > worse (reward) or unsafer > safer (cost; first = safer); sign accuracy: sign * cost > 0."""
    higher, lower = (first_end, second_end) if score_type == "reward" else (second_end, first_end)
    metrics = {"accuracy": (higher > lower).float().mean()}
    if first_sign is not None:
        metrics["accuracy_sign"] = torch.cat([first_sign * first_end, second_sign * second_end]).gt(0).float().mean()
    return metrics


def lr_lambda(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """LR multiplier: linear warmup 0 -> 1 over warmup_steps, then cosine/linear decay to 0 or constant."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)  # the rule of transformers' schedulers (and so of the anchor)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(0.0, 1.0 - progress) if kind == "linear" else 1.0


# ----------------------------------------------------------------------------------------------------------------
# The model


class Normalizer(nn.Module):
    """Running statistics of end scores in buffers `mean`, `var`, `count` (state-dict keys `normalizer.*`)."""

    def __init__(self, normalizer_type: str | None, dim: int, momentum: float = 0.9):
        super().__init__()
        if normalizer_type not in (None, "RunningMeanStd", "ExponentialMovingAverage"):
            raise ValueError(f"normalizer_type {normalizer_type!r}: use RunningMeanStd or ExponentialMovingAverage")
        self.normalizer_type, self.momentum = normalizer_type, momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:  # x: (N, D), N >= 2; no host sync
        """The anchor's updates, from mean 0, var 1, count 0; both use the Bessel-corrected batch variance."""
        x, n, count = x.float(), x.size(0), self.count.float()
        mean, var, batch_mean, batch_var = self.mean.float(), self.var.float(), x.mean(0), x.var(0, correction=1)
        if self.normalizer_type == "RunningMeanStd":
            # Chan et al.'s merge of (count, mean, var) with the batch's (n, mean, var), taking var * count as the
            # sum of squares: so the first batch sets var = its sample variance, and later var runs a little above
            # the population variance of all scores seen (by the sum of the batches' variances / count)
            total, delta = count + n, batch_mean - mean
            mean, var = mean + delta * n / total, (var * count + batch_var * n + delta**2 * count * n / total) / total
        elif self.normalizer_type == "ExponentialMovingAverage":  # the first batch moves (0, 1) by 1 - momentum
            m = self.momentum
            mean, var = m * mean + (1 - m) * batch_mean, m * var + (1 - m) * batch_var
        self.mean.copy_(mean), self.var.copy_(var), self.count.add_(n)

    def normalize(self, x: torch.Tensor, score_type: str) -> torch.Tensor:
        """reward: (x - mean) / std; cost: x / std (scale only: the sign, unsafe or safe, survives); critic: x."""
        std = self.var.float().sqrt() + 1e-8
        if score_type == "reward":
            return (x - self.mean.float()) / std
        return x / std if score_type == "cost" else x


class ScoreOutput(NamedTuple):
    end_scores: torch.Tensor  # (B, D) fp32, at each sequence's last valid token
    scores: torch.Tensor  # (B, T, D) fp32, per token


class ScoreHead(nn.Linear):
    """nn.Linear(H, D) read by the end-score kernel: a module of its own, so ZeRO-3 gathers its weights around its
    forward and its backward (a weight read by the parent's forward is gone again by the backward)."""

    def forward(self, hidden, attention_mask):  # (B, T, H), (B, T) -> (B, D), (B, T, D) fp32
        return end_scores(hidden, attention_mask, self.weight, self.bias, return_all=True)


def head_tensors(path: str) -> dict[str, torch.Tensor]:
    """The `score_head.*` and `normalizer.*` tensors of a checkpoint (safetensors or .bin, sharded or not)."""
    from safetensors import safe_open

    wanted, root, out = ("score_head.", "normalizer."), Path(path), {}
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = root / f"{single}.index.json"
        files = {single} if (root / single).exists() else set()
        if index.exists():  # sharded: open only the shards that hold head tensors
            files = {f for k, f in json.loads(index.read_text())["weight_map"].items() if k.startswith(wanted)}
        for f in files:
            if f.endswith(".safetensors"):
                with safe_open(root / f, "pt") as st:
                    out.update({k: st.get_tensor(k) for k in st.keys() if k.startswith(wanted)})
            else:
                state = torch.load(root / f, map_location="cpu", weights_only=True, mmap=True)
                out.update({k: v for k, v in state.items() if k.startswith(wanted)})
    return out


class ScoreModel(nn.Module):
    """Backbone `model` + `score_head` (+ `normalizer`, applied to the outputs when `do_normalize`)."""

    def __init__(
        self,
        backbone,
        score_dim=1,
        score_bias=True,
        score_type="reward",
        do_normalize=False,
        normalizer_type=None,
        momentum=0.9,
    ):
        super().__init__()
        if score_type not in ("reward", "cost", "critic"):
            raise ValueError(f"score_type {score_type!r}: use reward, cost or critic")
        self.model, self.config = backbone, backbone.config
        self.score_head = ScoreHead(self.config.hidden_size, score_dim, bias=score_bias, dtype=backbone.dtype)
        self.normalizer = Normalizer(normalizer_type, score_dim, momentum)
        self.score_type, self.do_normalize = score_type, do_normalize

    def gradient_checkpointing_enable(self, **kwargs):
        enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers 5's name for it
        (enable or self.model.gradient_checkpointing_enable)(**kwargs)

    def forward(self, input_ids, attention_mask, **kwargs) -> ScoreOutput:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        ).last_hidden_state  # (B, T, H)
        end, scores = self.score_head(hidden, attention_mask)
        if self.do_normalize:
            end, scores = (self.normalizer.normalize(x, self.score_type) for x in (end, scores))
        return ScoreOutput(end_scores=end, scores=scores)

    def save_config(self, path):
        """config.json: the backbone's config + the score fields (alone in a LoRA adapter folder, see lora.py)."""
        n = self.normalizer
        self.config.update(
            {
                "score_dim": self.score_head.out_features,
                "score_bias": self.score_head.bias is not None,
                "score_type": self.score_type,
                "do_normalize": self.do_normalize,
                "normalizer_type": n.normalizer_type,
                "momentum": n.momentum,
                "mean": n.mean.tolist(),
                "var": n.var.tolist(),
            }
        )
        self.config.architectures = [type(self.model).__name__.removesuffix("Model") + "ForScore"]
        self.config.save_pretrained(path)

    def save_pretrained(self, path, state_dict=None, max_shard_size="5GB"):
        """config.json (the backbone's + score fields) and safetensors; pass the gathered state_dict under ZeRO-3."""
        from huggingface_hub import save_torch_state_dict

        self.save_config(path)
        state_dict = {k: v.contiguous() for k, v in (self.state_dict() if state_dict is None else state_dict).items()}
        # safetensors wants each tensor to own its storage; ZeRO-3's gathered ones can be views of a shared buffer
        state_dict = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in state_dict.items()}
        save_torch_state_dict(state_dict, path, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path, dtype=None, **overrides) -> "ScoreModel":
        """A score folder (ours or Beaver's), or a causal LM / backbone folder (then the score head is new).
        Overrides: score_dim, score_bias, score_type, do_normalize, normalizer_type, momentum; the rest go to HF."""
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        if lora.adapter_base(path) is not None:  # a LoRA adapter folder (lora.py): its base with the adapter folded in
            return cls._from_adapter(path, dtype, **overrides)
        config = AutoConfig.from_pretrained(path, trust_remote_code=overrides.get("trust_remote_code", False))
        extra = head_tensors(path)
        is_score = "score_head.weight" in extra
        if is_score and not hasattr(config, "score_bias"):  # Beaver v1.0: the legacy key `bias`, or none
            config.score_bias = config.__dict__.pop("bias", "score_head.bias" in extra)
        names = ("score_dim", "score_bias", "score_type", "do_normalize", "normalizer_type", "momentum")
        fields = {k: overrides.pop(k, getattr(config, k, None) if is_score else None) for k in names}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists score_head / lm_head as unexpected: we know
        # our backbone keys are model.* whatever the backbone's own prefix; HF strips a causal LM's itself
        backbone, info = AutoModel.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            output_loading_info=True,
            key_mapping={r"^model\.": ""} if is_score else None,
            **overrides,
        )
        hf_logging.set_verbosity(verbosity)
        if info["missing_keys"] or info["mismatched_keys"]:
            raise ValueError(
                f"{path}: backbone weights missing or mis-shaped: "
                f"{sorted(info['missing_keys'])[:5]} {sorted(info['mismatched_keys'])[:5]}"
            )
        model = cls(backbone, **{k: v for k, v in fields.items() if v is not None})
        if not is_score:
            print(f"{path} has no score head: a new {model.score_head.out_features} x {config.hidden_size} one")
            return model
        # the head, zero bias when the checkpoint has none, the normaliser buffers (else the config's mean / var)
        state = {f"normalizer.{k}": torch.tensor(v) for k in ("mean", "var") if (v := getattr(config, k, None))}
        own = model.state_dict()  # tensors that share storage with the parameters and buffers
        with torch.no_grad():
            if model.score_head.bias is not None:
                model.score_head.bias.zero_()
            for k, v in (state | extra).items():
                if k in own:  # Beaver's count is 0-d, ours (1,)
                    own[k].copy_(v.reshape(own[k].shape))
        return model

    @classmethod
    def _from_adapter(cls, path, dtype=None, **overrides) -> "ScoreModel":
        """A score model's adapter folder: its base (ours, Beaver's, a causal LM, another adapter folder) with the
        adapter and the trained head folded in, and the saved score fields. A causal LM's: its backbone, a new head."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        names = ("score_dim", "score_bias", "score_type", "do_normalize", "normalizer_type", "momentum")
        if not (Path(path) / "config.json").is_file():  # sft.py --save_adapter_only: no score fields, no head
            fields = {k: overrides.pop(k) for k in names if k in overrides}
            lm = lora.from_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=dtype, **overrides)
            model = cls(lm.base_model, **fields)
            print(f"{path} has no score head: a new {model.score_head.out_features} x {lm.config.hidden_size} one")
            return model
        saved = json.loads((Path(path) / "config.json").read_text())  # ScoreModel.save_config's fields
        fields = {k: saved[k] for k in names if saved.get(k) is not None}
        model = cls.from_pretrained(lora.adapter_base(path), dtype, **{**fields, **overrides})
        model = PeftModel.from_pretrained(model, path).merge_and_unload().requires_grad_(True)
        with torch.no_grad():  # the statistics the normaliser had when the adapter was saved
            for k in ("mean", "var"):
                if saved.get(k) is not None:
                    getattr(model.normalizer, k).copy_(torch.tensor(saved[k]))
        return model


def plot_scores(path, first, second, first_sign=None, second_sign=None, score_type="reward"):
    """Histogram of eval end scores as a PNG: better vs worse answers (reward), safe vs unsafe ones (cost)."""
    from matplotlib.figure import Figure

    scores, groups = torch.cat([first, second]), {"better": first, "worse": second}
    if score_type == "cost":
        signs = torch.cat([first_sign, second_sign])
        groups = {"safe": scores[signs < 0], "unsafe": scores[signs > 0]}
    ax = (fig := Figure(figsize=(6, 4))).subplots()
    for label, values in groups.items():
        ax.hist(
            values.tolist(),
            bins=40,
            range=(scores.min().item(), scores.max().item() + 1e-6),
            alpha=0.6,
            label=f"{label} ({len(values)})",
        )
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set(xlabel=f"{score_type} (end score)", ylabel="answers", title=f"eval {score_type} scores")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")


# ----------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # data
    add("--train_datasets", type=parse_dataset, nargs="+", required=True, help="NAME[:PROPORTION[:PATH]] ...")
    add("--eval_datasets", type=parse_dataset, nargs="+", default=None, help="NAME[:PROPORTION[:PATH]] ...")
    add("--eval_split_ratio", type=float, default=None, help="hold out this fraction of train for eval")
    add("--max_length", type=int, default=512, help="tokens per sequence (answers truncated)")
    add(
        "--chat_template",
        type=parse_chat_template,
        default="anchor",
        help=f"how a prompt and answer are written (and saved with the model): {CHAT_TEMPLATE_HELP}",
    )
    # model
    add("--model_name_or_path", required=True, help="init: an SFT model folder (new head) or a score model")
    add("--trust_remote_code", action="store_true", help="allow custom model code from the folder/hub")
    lora.add_arguments(parser)
    add("--save_adapter_only", action="store_true", help="save the LoRA adapter folder (+ head), not merged")
    add("--score_type", choices=["reward", "cost"], required=True, help="train a reward or a cost model")
    add("--normalizer_type", choices=["RunningMeanStd", "ExponentialMovingAverage"], help="track end-score statistics")
    add("--normalizer_momentum", type=float, default=0.9, help="ExponentialMovingAverage momentum")
    add("--normalize_score_during_training", action="store_true", help="loss on normalised scores; do_normalize")
    # algorithm
    add(
        "--loss_type",
        choices=["sequence-wise", "token-wise"],
        default="sequence-wise",
        help="Bradley-Terry on end scores, or on per-token scores where the answers differ",
    )
    add("--regularization", type=float, default=0.001, help="L2 coefficient on the scores the loss sees")
    # optimisation
    add("--epochs", type=int, default=2, help="passes over the train set")
    add("--max_steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)")
    add("--per_device_train_batch_size", type=int, default=16, help="pairs per micro-batch per rank")
    add("--per_device_eval_batch_size", type=int, default=16, help="pairs per eval batch per rank")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--lr", type=float, default=2e-5, help="peak learning rate")
    add("--lr_scheduler_type", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warmup")
    add("--lr_warmup_ratio", type=float, default=0.03, help="fraction of steps with linear warmup")
    add("--weight_decay", type=float, default=0.1, help="AdamW decay (not on biases and norms)")
    add("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    # logging
    add("--output_dir", required=True, help="final HF folder (written via <output_dir>.partial)")
    add("--logging_steps", type=int, default=10, help="optimizer steps between metrics lines")
    add("--eval_interval", type=int, default=0, help="optimizer steps between evals (and each epoch end)")
    add("--save_best", action="store_true", help="save the best eval checkpoint instead of the last")
    add("--save_interval", type=int, default=0, help="optimizer steps between full checkpoints (0: none)")
    add("--save_total_limit", type=int, default=None, help="keep only the newest K checkpoints (default: all)")
    add(
        "--resume_from_checkpoint",
        default="auto",
        help="auto: continue from the newest complete checkpoint in <output_dir>.partial, if any; "
        "PATH: from that checkpoint-<step> folder; none: start over (discards the old checkpoints)",
    )
    add("--plot_histogram", action="store_true", help="write score_histogram.png of the saved model's eval")
    add("--log_type", choices=["none", "wandb", "tensorboard"], default="none", help="extra metrics sink")
    add("--log_project", default="nano-safe-rlhf", help="wandb project / tensorboard sub-folder")
    # system
    add("--seed", type=int, default=42, help="seed for data order, subsets and the new head")
    add("--zero_stage", type=int, choices=[0, 1, 2, 3], default=0, help="DeepSpeed ZeRO stage")
    add("--offload", choices=["none", "parameter", "optimizer", "all"], default="none", help="to CPU")
    add("--bf16", action="store_true", help="bfloat16 weights and compute")
    add("--ds_config", default=str(Path(__file__).with_name("ds_config.json")), help="DeepSpeed JSON")
    add("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; ignored")
    args = parser.parse_args()
    ranges = {**checkpoint.TRAIN_RANGES, "regularization": "finite and >= 0", "normalizer_momentum": "[0, 1]"}
    checkpoint.check_ranges(parser, args, ranges)  # the anchor skips a negative --regularization: refused here
    if args.eval_split_ratio is not None and (args.eval_datasets or not 0 < args.eval_split_ratio < 1):
        parser.error("--eval_split_ratio must be in (0, 1) and cannot be combined with --eval_datasets")
    if (args.save_best or args.plot_histogram) and not (args.eval_datasets or args.eval_split_ratio):
        parser.error("--save_best and --plot_histogram need --eval_datasets or --eval_split_ratio")
    if args.normalize_score_during_training and not args.normalizer_type:
        parser.error("--normalize_score_during_training needs --normalizer_type")
    offload_param, offload_optimizer = args.offload in ("parameter", "all"), args.offload in ("optimizer", "all")
    if offload_param and args.zero_stage != 3 or offload_optimizer and args.zero_stage == 0:
        parser.error(f"--offload {args.offload} needs --zero_stage 3 (parameters) or >= 1 (optimizer)")
    lora.check_arguments(parser, args)
    if args.save_adapter_only and not args.lora_rank:
        parser.error("--save_adapter_only saves a LoRA adapter: pass --lora_rank > 0")
    # a missing or broken model stops here, before any process group, folder or data; a causal LM (new head) and a
    # score model (its head kept) are both fine
    check_model_folder(args.model_name_or_path, "any", "--model_name_or_path")
    from transformers import AutoConfig

    rollout.silence_library_bars()  # "Loading weights" / "Writing model shards": in a terminal only, as our own bars
    try:  # a config.json that transformers cannot read (an unknown model_type, remote code not allowed, ...)
        AutoConfig.from_pretrained(lora.root_model(args.model_name_or_path), trust_remote_code=args.trust_remote_code)
    except Exception as e:
        raise SystemExit(
            f"error: --model_name_or_path {args.model_name_or_path!r}: its config does not load "
            f"({type(e).__name__}: {e}); pass a Hugging Face model folder"
        ) from None

    # distributed preamble: a plain `python score_model.py` is a world of one
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed
    import torch.distributed as dist

    # ZeRO-3 calls collectives that torch 2.13 deprecates: one warning per call would bury the metrics lines
    warnings.filterwarnings("ignore", ".*is deprecated. Please use `torch.distributed", FutureWarning)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a 30 s JIT compile on CPU
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    master_process = rank == 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    torch.manual_seed(args.seed)

    def print0(*a, **k):
        if master_process:
            print(*a, **k, flush=True)

    partial = Path(f"{os.path.normpath(args.output_dir)}.partial")
    if master_process:  # lock <output_dir>, check it can be written, recover an interrupted swap: before slow work
        partial = prepare_output(args.output_dir, vars(args), args.resume_from_checkpoint)
    dist.barrier()
    # a checkpoint to continue from (flags compared with the saved ones: a mismatch stops here, before any data);
    # the eval is RNG-free, but --save_best picks its model by it, so the eval flags must match too
    resume_dir = find_resume(partial, args.resume_from_checkpoint, vars(args), ignored=("plot_histogram",))

    # data; a batch's rows [:B] are better/safer, rows [B:] worse/unsafer
    Dataset = PreferenceDataset if args.score_type == "reward" else SafetyPreferenceDataset
    try:
        tokenizer = load_tokenizer(args.model_name_or_path, padding_side="right", chat_template=args.chat_template)
        with contextlib.nullcontext() if master_process else contextlib.redirect_stdout(io.StringIO()):
            kwargs = dict(max_length=args.max_length, seed=args.seed, chat_template=args.chat_template)
            train_dataset = Dataset(args.train_datasets, tokenizer, **kwargs)
            eval_dataset = args.eval_datasets and Dataset(args.eval_datasets, tokenizer, **kwargs)
    except ValueError as e:  # no usable samples, nothing fits max_length, hub unreachable, no chat template, ...
        raise SystemExit(f"error: {e}") from None
    collate = train_dataset.collate
    if args.eval_split_ratio:
        n_eval = max(1, round(args.eval_split_ratio * len(train_dataset)))
        train_dataset, eval_dataset = torch.utils.data.random_split(
            train_dataset, [len(train_dataset) - n_eval, n_eval], generator=torch.Generator().manual_seed(args.seed)
        )
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch = micro * accum * world_size
    if len(train_dataset) < global_batch:
        raise SystemExit(
            f"error: {len(train_dataset)} train pairs < one global batch of {global_batch} "
            f"(= {micro} per device x {accum} accumulation x {world_size} ranks); lower the batch flags"
        )
    # DistributedSampler pads each rank to the same count, so every rank runs the same steps (ZeRO-3 needs that)
    train_sampler = torch.utils.data.DistributedSampler(train_dataset, world_size, rank, shuffle=True, seed=args.seed)
    # its own generator: iter(loader) would otherwise draw from the global RNG, once more on a resumed run
    train_loader = torch.utils.data.DataLoader(
        train_dataset, micro, sampler=train_sampler, collate_fn=collate, generator=torch.Generator()
    )
    # and the eval loader its own too: an eval (step 0's included) draws nothing from the global RNG (dropout's)
    eval_loader = (
        None
        if eval_dataset is None
        else torch.utils.data.DataLoader(
            eval_dataset,
            args.per_device_eval_batch_size,
            collate_fn=collate,
            generator=torch.Generator(),
            sampler=torch.utils.data.DistributedSampler(eval_dataset, world_size, rank, shuffle=False),
        )
    )
    steps_per_epoch = len(train_loader) // accum
    total_steps = args.epochs * steps_per_epoch
    total_steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
    # as transformers' schedulers (the anchor's): int(ratio * steps) warm-up steps, none for "constant"
    warmup_steps = 0 if args.lr_scheduler_type == "constant" else int(args.lr_warmup_ratio * total_steps)
    print0(
        f"train {len(train_dataset):,} pairs, eval {len(eval_dataset or []):,} | global batch {global_batch} = "
        f"{micro} x {accum} accum x {world_size} ranks | {total_steps} steps, {warmup_steps} warmup"
    )

    # model, optimizer, engine
    model = ScoreModel.from_pretrained(
        args.model_name_or_path,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        score_type=args.score_type,
        do_normalize=False,  # the loop normalises
        normalizer_type=args.normalizer_type,
        momentum=args.normalizer_momentum,
        trust_remote_code=args.trust_remote_code,
    )
    if args.save_adapter_only and tokenizer.pad_token is None:  # the new pad row would live outside the adapter
        raise SystemExit(
            "error: --save_adapter_only: the tokenizer has no pad token, so the embeddings grow by one "
            "row that an adapter folder cannot carry; save merged (drop the flag) or add a pad token"
        )
    add_pad_token(tokenizer, model.model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_rank:  # the backbone frozen with adapters; the head trained whole (a copy: see lora.py)
        model = lora.add_lora(model, args, "", args.model_name_or_path, modules_to_save=["score_head"])
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]  # matrices decay; biases, norms not
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95))  # none empty
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, total_steps, warmup_steps, args.lr_scheduler_type)
    )
    with open(args.ds_config) as f:
        ds_config = json.load(f)
    ds_config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        train_batch_size=global_batch,
        bf16={**ds_config.get("bf16", {}), "enabled": args.bf16},
    )
    ds_config.setdefault("zero_optimization", {}).update(
        stage=args.zero_stage,
        offload_param={"device": "cpu" if offload_param else "none"},
        offload_optimizer={"device": "cpu" if offload_optimizer else "none"},
    )
    if offload_optimizer:
        ds_config["zero_force_ds_cpu_optimizer"] = False  # we pass a torch optimizer on purpose
    print0(f"deepspeed config: {json.dumps(ds_config)}")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    sink = None  # an optional extra metrics sink: sink(metrics, step)
    if master_process and args.log_type == "wandb":
        import wandb

        sink = wandb.init(project=args.log_project, config=vars(args)).log
    elif master_process and args.log_type == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(partial / "tensorboard" / args.log_project)
        sink = lambda metrics, step: [writer.add_scalar(k, v, step) for k, v in metrics.items()]  # noqa: E731

    def log(step, metrics):
        metrics = {k: v.item() if torch.is_tensor(v) else v for k, v in metrics.items()}
        check_finite(metrics, step)  # all-reduced values: every rank stops together, before anything is saved
        fields = [
            f"{k} {v:,.0f}" if k.startswith("perf/") else f"{k} {v:.2e}" if k.endswith("/lr") else f"{k} {v:.4f}"
            for k, v in metrics.items()
        ]
        print0(" | ".join([f"step {step}/{total_steps}", *fields]))
        if master_process:
            with open(partial / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if sink:
            sink(metrics, step=step)

    def evaluate():
        """Eval metrics over every rank's pairs, and the pairs' end scores (for the histogram)."""
        engine.eval()
        parts = []  # per batch: first half, second half of the end scores (+ their signs for cost)
        with torch.no_grad():
            for batch in rollout.progress(eval_loader, desc="eval", unit="batch"):  # rank 0, terminal (rollout.py)
                ids, mask = batch["input_ids"].to(engine.device), batch["attention_mask"].to(engine.device)
                end = engine(ids, mask).end_scores[:, 0].cpu()  # (2B,)
                parts.append([*end.chunk(2), *(batch[k] for k in SIGNS if k in batch)])
        gathered = [None] * world_size
        dist.all_gather_object(gathered, parts)
        engine.train()
        pairs = [torch.cat(column) for column in zip(*(p for rank_parts in gathered for p in rank_parts))]
        scores, kind = torch.cat(pairs[:2]), args.score_type
        metrics = {f"eval/{k}": v for k, v in pair_metrics(*pairs, score_type=kind).items()}
        return {**metrics, f"eval/{kind}_mean": scores.mean(), f"eval/{kind}_std": scores.std()}, pairs

    def model_writer(eval_pairs=None):
        """All ranks: check the weights are finite (never a non-finite model: one host sync a save) and, under ZeRO-3,
        gather the partitioned weights into rank 0's copy; returns rank 0's writer of the model folder (LoRA: merged, or
        the adapter folder with --save_adapter_only)."""
        finite = torch.tensor(float(weights_finite(engine.module)), device=engine.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # a NaN in one rank's ZeRO partition stops every rank
        check_finite({"weights": 1.0 if finite.item() else math.nan}, step)
        zero3 = args.zero_stage == 3
        state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()

        def write(path):
            module = engine.module.get_base_model() if args.lora_rank else engine.module  # the ScoreModel
            module.do_normalize = args.normalize_score_during_training  # saved for inference (see the loop)
            lora.save_pretrained(engine.module, path, state_dict, args.save_adapter_only)  # LoRA: merged by default
            module.do_normalize = False
            tokenizer.save_pretrained(path)
            save_chat_template(tokenizer, args.chat_template, path)  # the template it was trained in, for serving
            if args.plot_histogram and eval_pairs:
                plot_scores(Path(path) / "score_histogram.png", *eval_pairs, score_type=args.score_type)

        return write

    def save(path, eval_pairs=None):
        """The HF folder, arguments.json last: it marks the folder complete."""
        write = model_writer(eval_pairs)
        if master_process:
            write(path)
            with open(Path(path) / "arguments.json", "w") as f:
                json.dump(vars(args), f, indent=2)
        dist.barrier()

    # the loop: better and worse answers in one forward, a pairwise loss, backward; DeepSpeed owns gradient
    # accumulation (engine.backward scales the loss by 1/accum, engine.step only updates on every accum-th micro-batch)
    engine.train()
    names = ["train/loss", "train/accuracy"] + (["train/accuracy_sign"] if args.score_type == "cost" else [])
    running = torch.zeros(len(names) + 2, device=engine.device)  # (sums of the names' values, micro-batches, tokens)
    step, micro_step, start_epoch, skip, best, best_dir, eval_pairs = 0, 0, 0, 0, -1.0, None, None
    bar = None  # over the micro-batches to the next metrics line
    if resume_dir is not None:  # weights, optimizer, LR schedule, RNG, and where the loop stood
        state = load_checkpoint(resume_dir, {"model": engine})
        step, micro_step, start_epoch, skip = state["step"], state["micro_step"], state["epoch"], state["position"]
        best = state["best"]
        running = torch.tensor(state["running"], device=engine.device)  # the sums since the last metrics line
        best_dir = partial / state["best_dir"] if state["best_dir"] else None
        if master_process:  # the best model as of the checkpoint; a later best of the killed run is found again
            for path in partial.glob("best-*"):
                if path != best_dir:
                    shutil.rmtree(path)
            if best_dir and not is_complete(best_dir):
                if not is_complete(resume_dir / "best"):
                    raise SystemExit(
                        f"error: {resume_dir} has no copy of {best_dir.name}; pass an earlier "
                        "--resume_from_checkpoint, or none to start over"
                    )
                link_copy(resume_dir / "best", best_dir)
    t0 = time.time()
    try:  # Ctrl-C: one line, exit 130, the .partial left in place
        if eval_loader and resume_dir is None:  # step 0 (as the anchor): the untrained model's eval, to compare the
            log(0, evaluate()[0])  # later ones with; never a --save_best candidate
            t0 = time.time()
        for epoch in range(start_epoch, args.epochs):
            train_sampler.set_epoch(epoch)  # the epoch's order depends on (seed, epoch) only: a resume skips into it
            for position, batch in enumerate(itertools.islice(train_loader, skip, None), start=skip + 1):
                if bar is None:
                    steps_to_line = min(args.logging_steps - step % args.logging_steps, total_steps - step)
                    bar = rollout.progress(total=steps_to_line * accum - micro_step % accum, desc="train", unit="mb")
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                ids, mask, signs = batch["input_ids"], batch["attention_mask"], [batch[k] for k in SIGNS if k in batch]
                B = ids.size(0) // 2
                # 1) score both halves in one forward: raw end scores (2B, 1) and per-token scores (2B, T, 1)
                end, scores = engine(ids, mask)
                # 2) the normaliser tracks the raw end scores of all ranks; the loss may see the normalised ones
                if args.normalizer_type:
                    gathered = [torch.empty_like(end) for _ in range(world_size)]
                    dist.all_gather(gathered, end.detach().contiguous())
                    engine.module.normalizer.update(torch.cat(gathered))
                if args.normalize_score_during_training:
                    end, scores = (engine.module.normalizer.normalize(x, args.score_type) for x in (end, scores))
                # 3) the pairwise loss (module docstring); token-wise: on the span where the pair differs
                end, scores = end[:, 0], scores[..., 0]
                span, x = None, end  # sequence-wise: end scores (2B,); token-wise: per-token scores (2B, T)
                if args.loss_type == "token-wise":
                    span, x = diverge_span(ids[:B], ids[B:], mask[:B], mask[B:]), scores
                if args.score_type == "reward":
                    loss = reward_loss(x[:B], x[B:], args.regularization, span)
                else:
                    loss = cost_loss(x[:B], x[B:], *signs, args.regularization, span)
                # 4) backward, and (on boundaries) the optimizer and LR step
                engine.backward(loss)
                engine.step()
                metrics = pair_metrics(end[:B].detach(), end[B:].detach(), *signs, score_type=args.score_type)
                running += torch.stack(
                    [loss.detach().float(), *metrics.values(), torch.ones_like(loss), mask.sum().float()]
                )
                micro_step += 1
                bar.update()
                if micro_step % accum:
                    continue
                step += 1
                # 5) log / eval (every --eval_interval steps and each epoch end) / save the best
                if step % args.logging_steps == 0 or step == total_steps:
                    bar.close()  # erased before the line is printed
                    bar = None
                    dist.all_reduce(running)
                    log(
                        step,
                        {
                            **dict(zip(names, running[:-2] / running[-2])),
                            "train/lr": scheduler.get_last_lr()[0],
                            "train/epoch": step / steps_per_epoch,
                            "perf/tok_per_sec": running[-1] / (time.time() - t0),
                        },
                    )
                    running.zero_()
                    t0 = time.time()
                if eval_loader and (
                    args.eval_interval
                    and step % args.eval_interval == 0
                    or step % steps_per_epoch == 0
                    or step == total_steps
                ):
                    t_eval = time.time()
                    metrics, eval_pairs = evaluate()
                    log(step, metrics)
                    key = "eval/accuracy" if args.score_type == "reward" else "eval/accuracy_sign"
                    if args.save_best and metrics[key].item() > best:  # kept as best-<step>/ until the end
                        previous, best_dir, best = best_dir, partial / f"best-{step}", metrics[key].item()
                        save(best_dir, eval_pairs)
                        if master_process and previous:
                            shutil.rmtree(previous)  # only once the new best is whole
                        print0(f"best {key} {best:.4f} at step {step}: saved")
                    t0 += time.time() - t_eval  # eval (and save) time does not count against throughput
                if args.save_interval and step % args.save_interval == 0 and step < total_steps:
                    t_save = time.time()
                    state = {
                        "epoch": epoch,
                        "position": position,
                        "micro_step": micro_step,
                        "best": best,
                        "best_dir": best_dir and best_dir.name,
                    }
                    save_checkpoint(
                        partial,
                        step,
                        {"model": engine},
                        state,
                        model_writer(),
                        vars(args),
                        args.save_total_limit,
                        rank_state={"running": running.tolist()},
                        folders=best_dir and {"best": best_dir},
                    )
                    t0 += time.time() - t_save
                if step == total_steps:
                    break
            skip = 0
            if step == total_steps:
                break

        # the final model: the last one, or the best checkpoint's files moved up (arguments.json last)
        if not args.save_best:
            save(partial, eval_pairs)
        elif master_process:  # linked, so a kill at any instant leaves best-<step>/ whole for the re-run
            link_copy(best_dir, partial)
            shutil.rmtree(best_dir)  # partial is complete: a kill here leaves junk that publish deletes
    except KeyboardInterrupt:
        interrupted(step, partial)

    # swap it into place atomically (the previous model stays whole until the new one is)
    if master_process:
        publish(partial, args.output_dir)
        print0(f"saved {args.output_dir}")
    dist.barrier()
    dist.destroy_process_group()  # else gloo's threads can abort the exit of the other ranks


if __name__ == "__main__":
    main()
