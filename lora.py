"""LoRA (Hu et al., 2021) for every training stage, through peft: each adapted linear layer computes

    h = W x + (alpha / r) * B A x        W frozen; A (r x in) random, B (out x r) zero at the start, both trained

so a stage trains r * (in + out) numbers per layer instead of in * out, and keeps Adam states for those only. At the
start B = 0, so the adapted model is exactly the model it was loaded from; with the adapter switched off
(`with model.disable_adapter():`) it is that model again at any time, which is how PPO gets its frozen reference
and its frozen reward and cost models without loading them a second time.

What a stage saves: by default an ordinary model folder with W + (alpha / r) * B A folded into the weights, which
every stage, chat and evaluate load as any other model. With --save_adapter_only, peft's adapter folder instead:
adapter_config.json (rank, alpha, target modules, and base_model_name_or_path: the model it was trained from,
absolute for a local folder, itself maybe an adapter folder), adapter_model.safetensors (A, B and, for a score model,
its trained head), the tokenizer, arguments.json, for a policy its generation_config.json (the stop ids), and for a
score model a config.json with the score fields (head shape, score type, normaliser statistics). Every stage accepts
such a folder as a model path: it loads the base and folds the adapter in.
"""

import json
import os
from pathlib import Path

PEFT_PREFIX = "base_model.model."  # peft's name for the wrapped model inside a PeftModel's state dict

# ----------------------------------------------------------------------------------------------------------------
# Flags: the same four for each trained model (a prefix tells PPO's actor and critics apart)


def add_arguments(parser, prefix: str = "") -> None:
    who = {"actor_": " of the actor", "critic_": " of both critics"}.get(prefix, "")
    add = parser.add_argument
    add(f"--{prefix}lora_rank", type=int, default=0, help=f"LoRA rank r{who} (0: full fine-tuning)")
    add(f"--{prefix}lora_alpha", type=float, default=16.0, help="LoRA scale alpha: the update is (alpha / r) * B A")
    add(f"--{prefix}lora_dropout", type=float, default=0.0, help="dropout on the input of the LoRA branch")
    add(
        f"--{prefix}lora_target_modules",
        nargs="+",
        default=["all-linear"],
        help="names of the linear layers to adapt (e.g. q_proj v_proj); all-linear: every one of the backbone",
    )


def check_arguments(parser, args, prefix: str = "", saved: bool = True) -> None:
    """The --{prefix}lora_* flags' ranges; saved: this is the model whose adapter --save_adapter_only would save."""
    rank, alpha, dropout = (getattr(args, f"{prefix}lora_{k}") for k in ("rank", "alpha", "dropout"))
    if rank < 0 or not 0 < alpha < float("inf") or not 0 <= dropout < 1:
        parser.error(
            f"--{prefix}lora_rank must be >= 0 (0: full fine-tuning), --{prefix}lora_alpha finite and > 0, "
            f"--{prefix}lora_dropout in [0, 1); got {rank}, {alpha}, {dropout}"
        )
    if saved and getattr(args, "save_adapter_only", False) and not rank:
        whose = f"the {prefix.rstrip('_')}'s" if prefix else "a"
        parser.error(f"--save_adapter_only saves {whose} LoRA adapter: pass --{prefix}lora_rank > 0")


# ----------------------------------------------------------------------------------------------------------------
# Wrapping a model


def target_modules(model, names: list[str], exclude: list[str], flag: str = "--lora_target_modules") -> list[str]:
    """all-linear -> the leaf names of every linear layer (nn.Linear, or GPT-2's Conv1D) but the output head and
    `exclude` (a score head); other names are checked to exist, so a typo stops the run before training."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head
    } - set(exclude)
    if names == ["all-linear"]:
        return sorted(linear)
    if unknown := set(names) - linear:
        raise SystemExit(
            f"error: {flag} {' '.join(sorted(unknown))}: no such linear layer in "
            f"{type(model).__name__}; it has {' '.join(sorted(linear))} (or pass all-linear)"
        )
    return names


def add_lora(model, args, prefix: str, base_path: str, modules_to_save: list[str] | None = None):
    """`model` frozen inside a peft wrapper, with trainable rank-r adapters on its target layers and trainable copies
    of `modules_to_save` (a score model's head: with the adapter switched off, the original head answers again)."""
    from peft import LoraConfig, get_peft_model

    get = lambda k: getattr(args, f"{prefix}lora_{k}")  # noqa: E731
    causal = hasattr(model, "generate")  # PeftModelForCausalLM keeps generate(); a ScoreModel needs no task type
    config = LoraConfig(
        r=get("rank"),
        lora_alpha=get("alpha"),
        lora_dropout=get("dropout"),
        target_modules=target_modules(
            model, get("target_modules"), modules_to_save or [], f"--{prefix}lora_target_modules"
        ),
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM" if causal else None,
    )
    model = get_peft_model(model, config)
    # the adapter folder names the folder it was trained from: absolute, so it loads from any working directory
    model.peft_config["default"].base_model_name_or_path = (
        os.path.abspath(base_path) if Path(base_path).is_dir() else base_path
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"LoRA r={get('rank')} alpha={get('alpha'):g} on {' '.join(sorted(config.target_modules))}"
        f"{' + ' + ' '.join(modules_to_save) if modules_to_save else ''}: {trainable:,} of {total:,} parameters "
        f"trained ({trainable / total:.2%})"
    )
    return model


# ----------------------------------------------------------------------------------------------------------------
# Saving: the adapter folded into the weights, or the adapter folder


def merged_state_dict(model, state_dict: dict) -> dict:
    """The state dict of the plain model inside peft-wrapped `model`: W + (alpha / r) * B A for every adapted layer
    (fp32 arithmetic, W's dtype), the trained copy of each module_to_save in place of the original, no adapter keys.
    `state_dict`: model.state_dict(), or under ZeRO-3 the gathered one (rank 0), so nothing here is collective; the
    live weights are never written to, so training can go on after an intermediate save."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        merged[key] = value
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if not isinstance(layer, LoraLinear) or layer.use_dora.get("default") or layer.lora_bias.get("default"):
            raise ValueError(f"{name}: only plain LoRA on linear layers is folded in here ({type(layer).__name__})")
        a, b = (state_dict[f"{name}.lora_{x}.default.weight"].float() for x in "AB")  # (r, in), (out, r)
        delta = (b @ a) * layer.scaling["default"]  # (out, in)
        key = f"{name.removeprefix(PEFT_PREFIX)}.weight"
        w = merged[key]
        merged[key] = (w.float() + (delta.T if layer.fan_in_fan_out else delta)).to(w.dtype)  # Conv1D stores W^T
    return merged


def save_pretrained(model, path, state_dict=None, adapter_only: bool = False) -> None:
    """What a stage's save block calls for its trained model (on rank 0; state_dict: the gathered one under ZeRO-3):
    a plain model saves as before; a peft-wrapped one as the plain model with the adapter folded in, or, adapter_only,
    as peft's adapter folder (+ the score fields of a score model: its `save_config`)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model.save_pretrained(path, state_dict=state_dict)
    state_dict = model.state_dict() if state_dict is None else state_dict
    base = model.get_base_model()
    if adapter_only:
        model.save_pretrained(path, state_dict=state_dict, save_embedding_layers=False)
        if hasattr(base, "save_config"):
            base.save_config(path)
        if getattr(base, "generation_config", None) is not None:  # a policy's stop ids (sft.py sets them), as merged
            base.generation_config.save_pretrained(path)
    else:
        base.save_pretrained(path, state_dict=merged_state_dict(model, state_dict))


# ----------------------------------------------------------------------------------------------------------------
# Loading an adapter folder


def adapter_base(path) -> str | None:
    """The model an adapter folder was trained from, or None when `path` is not an adapter folder."""
    config = Path(path) / "adapter_config.json"
    return json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None


def root_model(path) -> str:
    """The ordinary model folder at the bottom of a chain of adapter folders (`path` itself when it is one)."""
    while (base := adapter_base(path)) is not None:
        path = base
    return path


def from_pretrained(load, path, **kwargs):
    """load(path, **kwargs) (e.g. AutoModelForCausalLM.from_pretrained) for a model folder; for an adapter folder, its
    base loaded the same way (an adapter folder too, maybe) with the adapter folded in, every weight trainable."""
    base = adapter_base(path)
    if base is None:
        return load(path, **kwargs)
    from peft import PeftModel

    model = PeftModel.from_pretrained(from_pretrained(load, base, **kwargs), path).merge_and_unload()
    if (Path(path) / "generation_config.json").is_file():  # the adapter's own (stop ids), not its base's
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.requires_grad_(True)  # peft froze the base; a stage that loads it decides what it trains


def adapter_off(model, peft_model, normalize=False):
    """`model` (an engine or module around `peft_model`) with the LoRA adapters and trained head copies switched off:
    the model it was loaded as. With LoRA this is PPO's frozen reference (the actor) and its frozen reward and cost
    models (each inside its critic), so none is loaded twice. normalize: apply the score model's normaliser, as its
    do_normalize would (the critic's values, with the adapter on, stay raw)."""

    def forward(*args, **kwargs):
        with peft_model.disable_adapter():
            out = model(*args, **kwargs)
        if normalize:
            score_model = peft_model.get_base_model()
            out = type(out)(*(score_model.normalizer.normalize(x, score_model.score_type) for x in out))
        return out

    forward.module = peft_model  # what it runs, for code that reaches inside (kernels.head_gives_logprobs)
    return forward
