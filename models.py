"""The score model every stage after SFT loads: the reward and cost models (score_model.py trains them), PPO's critics
and the arena's scorers.

A score model is an HF backbone (`AutoModel`, kept as `.model`) plus a linear `score_head` read at each sequence's
last valid token (its end score, (B, D)) and at every token (per-token scores (B, T, D): the critics' values), both
fp32, and a `normalizer` of running end-score statistics. Position ids follow the attention mask (cumsum - 1), so a
left-padded sequence scores like a right-padded one.

    model = ScoreModel.from_pretrained(path)        # ours, Beaver's, a causal LM (a new head), or a LoRA adapter folder
    end, scores = model(input_ids, attention_mask)  # .end_scores (B, D), .scores (B, T, D)

Saved as an HF folder: config.json (the backbone's config + the score fields: head shape, score type, normaliser
statistics) and safetensors with keys model.*, score_head.*, normalizer.*.
"""

import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import lora
from kernels import end_scores

# ----------------------------------------------------------------------------------------------------------------


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
        """A score folder (ours or Beaver's), a causal LM / backbone folder (then the score head is new), or a LoRA
        adapter folder of either (lora.py): its base loaded the same way, the adapter and trained head folded in.
        Overrides: score_dim, score_bias, score_type, do_normalize, normalizer_type, momentum; the rest go to HF."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        names = ("score_dim", "score_bias", "score_type", "do_normalize", "normalizer_type", "momentum")
        base = lora.adapter_base(path)
        if base is not None and not (Path(path) / "config.json").is_file():
            # sft.py --save_adapter_only: a causal LM's adapter, no score fields, no head: its backbone, a new head
            fields = {k: overrides.pop(k) for k in names if k in overrides}
            lm = lora.from_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=dtype, **overrides)
            model = cls(lm.base_model, **fields)
            print(f"{path} has no score head: a new {model.score_head.out_features} x {lm.config.hidden_size} one")
            return model
        if base is not None:  # a score model's adapter: its base (any kind here, maybe an adapter folder) + the adapter
            from peft import PeftModel

            saved = json.loads((Path(path) / "config.json").read_text())  # save_config's fields
            fields = {k: saved[k] for k in names if saved.get(k) is not None}
            model = cls.from_pretrained(base, dtype, **{**fields, **overrides})
            model = PeftModel.from_pretrained(model, path).merge_and_unload().requires_grad_(True)
            with torch.no_grad():  # the statistics the normaliser had when the adapter was saved
                for k in ("mean", "var"):
                    if saved.get(k) is not None:
                        getattr(model.normalizer, k).copy_(torch.tensor(saved[k]))
            return model

        # a model folder: the backbone, and the head and normaliser of a score folder
        config = AutoConfig.from_pretrained(path, trust_remote_code=overrides.get("trust_remote_code", False))
        extra = head_tensors(path)
        is_score = "score_head.weight" in extra
        if is_score and not hasattr(config, "score_bias"):  # Beaver v1.0: the legacy key `bias`, or none
            config.score_bias = config.__dict__.pop("bias", "score_head.bias" in extra)
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
