"""LoRA adapters (peft) on any architecture: which layers get them (``lora_module_name``:
``auto`` or DeepSpeed-Chat's substring rule), adding them, merging them back into plain
weights (also under ZeRO-3), and the merged weights without merging."""

from __future__ import annotations

import torch
from torch import nn

from .params import is_partitioned, numel

LORA_AUTO = "auto"


def _projection_types() -> tuple[type, ...]:
    # GPT-2 builds its projections from transformers' Conv1D (a transposed Linear), which
    # peft adapts as well.
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def block_list_name(model: nn.Module) -> str:
    """Name of the model's stack of transformer blocks: the ``nn.ModuleList`` holding the
    most parameters (``decoder.layers`` in OPT, ``h`` in GPT-2 and Bloom, ``layers`` in
    Llama, Qwen2 and GPT-NeoX, with ``model.``/``transformer.``/``gpt_neox.`` in front for
    the causal-LM classes)."""
    lists = [(sum(map(numel, m.parameters())), n) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks: set lora_module_name")
    return max(lists)[1]


def lora_targets(model: nn.Module, module_name: str) -> list[str]:
    """Names of the projection layers that get adapters. ``auto``: every Linear (or GPT-2
    Conv1D) inside the transformer blocks – attention and MLP, not embeddings or heads –
    whatever the architecture calls them; else the layers whose name contains
    ``module_name`` (DeepSpeed-Chat's substring rule, e.g. ``decoder.layers.`` for OPT)."""
    types = _projection_types()
    if module_name == LORA_AUTO:
        prefix = block_list_name(model) + "."
        targets = [n for n, m in model.named_modules() if isinstance(m, types) and n.startswith(prefix)]
    else:
        targets = [n for n, m in model.named_modules() if isinstance(m, types) and module_name in n]
    if not targets:
        linear = [n for n, m in model.named_modules() if isinstance(m, types)][:5]
        raise ValueError(f"lora_module_name={module_name!r} matches no Linear layer of {type(model).__name__}; "
                         f"examples of names: {linear}; '{LORA_AUTO}' picks the transformer blocks' projections")
    return targets


def apply_lora(model: nn.Module, lora_dim: int, module_name: str = LORA_AUTO, *, alpha: float | None = None,
               only_optimize_lora: bool = False) -> nn.Module:
    """Add LoRA adapters (peft) to the layers :func:`lora_targets` picks (DeepSpeed-Chat's
    ``--lora_module_name``, or ``auto``). Returns the peft-wrapped model."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, module_name)
    cfg = LoraConfig(r=lora_dim, lora_alpha=alpha or lora_dim, target_modules=targets, lora_dropout=0.0, bias="none",
                     fan_in_fan_out=not isinstance(model.get_submodule(targets[0]), nn.Linear))
    peft_model = get_peft_model(model, cfg)
    if not only_optimize_lora:
        # DeepSpeed-Chat trains the base weights too unless --only_optimize_lora.
        for p in peft_model.parameters():
            p.requires_grad_(True)
    return peft_model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base layers so that ``final/`` is a plain HF model. Under
    ZeRO-3 each adapted layer is gathered whole on every rank while it merges (peft adds
    to the weight in place, which a partitioned weight cannot take) and re-partitioned."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    if not is_partitioned(model):
        return model.merge_and_unload()
    import deepspeed
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
                layer.merge()  # every rank merges the same whole weights; rank 0's are kept
    return model.unload()  # the base layers, now holding the merged weights


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights named as in the plain model that :func:`merge_lora` makes of it:
    each LoRA layer's effective weight (base + scaled B·A, what merging writes) under the
    base layer's name, no adapter tensors. Without LoRA: ``state_dict()``."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(model, PeftModel):
        return model.state_dict()
    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, BaseTunerLayer)}
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for key, t in layer.get_base_layer().state_dict().items():
            out[f"{name}.{key}"] = t
        if not layer.merged:
            w = out[f"{name}.weight"]
            out[f"{name}.weight"] = w + sum(layer.get_delta_weight(a) for a in layer.active_adapters).to(w.dtype)
    owned = tuple(f"{name}." for name in layers)
    out.update((k, t) for k, t in base.state_dict().items() if not k.startswith(owned))
    return out
