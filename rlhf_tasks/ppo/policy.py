"""The models every RL step holds: the trained actor, its frozen reference, the frozen
reward model (PPO adds a critic), and what they cost on the device.

The reference is the SFT policy the KL term keeps the actor near. When the actor trains
LoRA adapters only (``lora_dim > 0`` and ``only_optimize_lora``), its base weights *are*
the SFT weights, so the reference is the actor itself with its adapters switched off
(peft's ``disable_adapter``): no second copy on the device. Otherwise (full fine-tuning,
or LoRA that also trains the base weights, DeepSpeed-Chat's default) the reference is a
frozen copy loaded from the SFT output.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..config import EngineConfig, PipelineConfig
from ..engine import (
    Batching,
    inference_config,
    inference_engine,
    initialize,
    loading_config,
    partitioned_loading,
    torch_dtype,
)
from ..models import RewardModel, apply_lora, load_causal_lm, numel, positions_from_mask
from ..stage import StageContext
from .losses import log_probs_from_logits


def actor_log_probs(model, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T-1) log-prob of each next token under ``model``."""
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=positions_from_mask(attention_mask), use_cache=False).logits
    return log_probs_from_logits(logits[:, :-1], sequences[:, 1:])


def shares_reference(a: EngineConfig) -> bool:
    """Whether the actor's frozen base weights can serve as the reference policy."""
    return bool(a.lora_dim) and a.only_optimize_lora


class Reference:
    """The frozen reference policy: a model of its own, or the actor with adapters off."""

    def __init__(self, model: torch.nn.Module | None, actor_engine=None):
        self.model, self.actor = model, actor_engine

    @property
    def shared(self) -> bool:
        return self.model is None

    @torch.no_grad()
    def log_probs(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.model is not None:
            return actor_log_probs(self.model, sequences, attention_mask)
        with self.actor.module.disable_adapter():  # the SFT weights, exactly: LoRA B starts at 0 and only it trains
            return actor_log_probs(self.actor, sequences, attention_mask)


def model_bytes(model: torch.nn.Module | None) -> int:
    """Bytes of a model's parameters and buffers (full sizes, also as ZeRO-3 shards); 0 for None."""
    if model is None:
        return 0
    return (sum(numel(p) * p.element_size() for p in model.parameters())
            + sum(b.numel() * b.element_size() for b in model.buffers()))


def memory_report(**models: torch.nn.Module | None) -> dict[str, float]:
    """``memory/<name>_bytes`` for each model held (0 when shared or absent) and the total.
    Optimizer states and activations are not counted: these are the resident weights."""
    out = {f"memory/{k}_bytes": float(model_bytes(m)) for k, m in models.items()}
    out["memory/models_bytes"] = sum(out.values())
    return out


def load_actor(ctx: StageContext, cfg: PipelineConfig, a: EngineConfig, dtype: str, total_updates: int,
               micro_batch: int, accumulation: int):
    """The actor's DeepSpeed engine, from the SFT output, with LoRA when configured."""
    sft = str(ctx.run.final("sft"))
    with partitioned_loading(loading_config(a, dtype, ctx.world_size)):
        actor = load_causal_lm(sft, dropout=a.dropout, trust_remote_code=cfg.model.trust_remote_code,
                               attn_implementation=cfg.model.attn_implementation,
                               gradient_checkpointing=a.gradient_checkpointing)
    if a.lora_dim:
        actor = apply_lora(actor, a.lora_dim, a.lora_module_name, alpha=a.lora_alpha,
                           only_optimize_lora=a.only_optimize_lora)
    batching = Batching(micro_batch, accumulation, dtype, total_updates)
    return initialize(actor, a, batching, ctx.device, ctx.world_size)


def load_reference(ctx: StageContext, cfg: PipelineConfig, a: EngineConfig, dtype: str, actor_engine,
                   offload: bool = False) -> Reference:
    """The reference policy, partitioned like the actor under ZeRO-3 (or offloaded)."""
    if shares_reference(a):
        return Reference(None, actor_engine)
    zero3 = offload or a.zero_stage == 3
    with partitioned_loading(inference_config(dtype, offload, ctx.world_size)) if zero3 else nullcontext():
        ref = load_causal_lm(str(ctx.run.final("sft")), dtype=torch_dtype(dtype),
                             trust_remote_code=cfg.model.trust_remote_code,
                             attn_implementation=cfg.model.attn_implementation)
    ref.requires_grad_(False)
    return Reference(inference_engine(ref, dtype, offload, ctx.world_size) if zero3 else ref.to(ctx.device).eval())


def load_reward_model(ctx: StageContext, cfg: PipelineConfig, dtype: str, zero3: bool):
    """The frozen reward model from the RM output (partitioned when the stage runs ZeRO-3)."""
    with partitioned_loading(inference_config(dtype, False, ctx.world_size)) if zero3 else nullcontext():
        reward = RewardModel.from_pretrained(str(ctx.run.final("rm")), dtype=torch_dtype(dtype),
                                             trust_remote_code=cfg.model.trust_remote_code,
                                             attn_implementation=cfg.model.attn_implementation)
    reward.requires_grad_(False)
    return inference_engine(reward, dtype, False, ctx.world_size) if zero3 else reward.to(ctx.device).eval()


def require_outputs(ctx: StageContext, *stages: str) -> None:
    for name in stages:
        path = ctx.run.final(name)
        if not path.is_dir():
            raise FileNotFoundError(f"{ctx.name} needs the {name} stage's output {path}: run `{name}` first")


def window_mean(series: list[tuple[int, float]], first: bool, frac: float = 0.2) -> float:
    """Mean of the first or last 20% of a noisy per-iteration series (reward, KL)."""
    k = max(1, int(len(series) * frac))
    window = series[:k] if first else series[-k:]
    return sum(v for _, v in window) / len(window)
