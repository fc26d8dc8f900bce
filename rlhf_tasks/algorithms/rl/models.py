"""The models an RL step holds: the trained actor, its frozen reference, the frozen reward
model and, for PPO, the trained critic; and what they cost on the device.

The reference is the SFT policy the KL term keeps the actor near. When the actor trains
LoRA adapters only (``lora_dim > 0`` and ``only_optimize_lora``), its base weights *are*
the SFT weights, so the reference is the actor itself with its adapters switched off
(peft's ``disable_adapter``): no second copy on the device. Otherwise (full fine-tuning,
or LoRA that also trains the base weights, DeepSpeed-Chat's default) the reference is a
frozen copy loaded from the SFT output.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ...config import EngineConfig, PipelineConfig
from ...runtime.engine import (
    Batching,
    inference_config,
    inference_engine,
    initialize,
    partitioned_loading,
    torch_dtype,
)
from ...runtime.models import RewardModel, load_causal_lm, load_trainable, positions_from_mask
from ...runtime.params import numel
from ...runtime.stage import StageContext
from ..lm_head import token_log_probs


def actor_log_probs(model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) -> (B, T-1) fp32 log-prob of each next token under ``model``, through the LM
    head in chunks (algorithms/lm_head.py). ``action_mask`` (B, T-1): only the answer tokens
    are computed, the rest read 0 (every user selects them away); the prompt's positions
    never reach the head."""
    return token_log_probs(model, sequences, attention_mask, sequences[:, 1:], where=action_mask,
                           position_ids=positions_from_mask(attention_mask))


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
    def log_probs(self, sequences: torch.Tensor, attention_mask: torch.Tensor,
                  action_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.model is not None:
            return actor_log_probs(self.model, sequences, attention_mask, action_mask)
        with self.actor.module.disable_adapter():  # the SFT weights, exactly: LoRA B starts at 0 and only it trains
            return actor_log_probs(self.actor, sequences, attention_mask, action_mask)


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


@dataclass
class Models:
    """What an RL step holds: engines for what trains, plain modules (or ZeRO-3 inference
    engines) for what is frozen."""

    actor: Any  # DeepSpeed engine
    ref: Reference
    reward: Any  # RewardModel, or its ZeRO-3 inference engine; None when the reward is a verifier's
    critic: Any = None  # DeepSpeed engine (PPO), else None

    @property
    def engines(self) -> dict[str, Any]:
        """The trained engines by checkpoint subdirectory."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def memory(self) -> dict[str, float]:
        critic = {"critic": self.critic.module} if self.critic is not None else {}
        return memory_report(actor=self.actor.module, **critic, reference=self.ref.model,
                             reward=getattr(self.reward, "module", self.reward))

    def train(self, mode: bool = True) -> None:
        for e in self.engines.values():
            e.train(mode)


def _trainable(ctx: StageContext, name: str, section: EngineConfig, dtype: str, kind: str, batching: Batching):
    m = ctx.cfg.model
    model = load_trainable(name, section, dtype, ctx.world_size, kind=kind, trust_remote_code=m.trust_remote_code,
                           attn_implementation=m.attn_implementation)
    return initialize(model, section, batching, ctx.device, ctx.world_size)


def load_models(ctx: StageContext, sec, total_updates: int) -> Models:
    """The actor (from SFT) and, when the section has one, the critic (from the RM) as
    engines; the reference and the reward model frozen, partitioned under ZeRO-3."""
    cfg = ctx.cfg
    batching = Batching(sec.per_device_train_batch_size, sec.gradient_accumulation_steps, sec.dtype, total_updates)
    actor = _trainable(ctx, str(ctx.run.final("sft")), sec.actor, sec.dtype, "causal_lm", batching)
    critic = None
    if sec.critic_section is not None:
        # Without a reward model (a verifier's reward) the critic starts from the SFT actor,
        # its value head at zero.
        start = ctx.run.final("rm" if cfg.needs_reward_model() else "sft")
        critic = _trainable(ctx, str(start), sec.critic_section, sec.dtype, "reward", batching)
    zero3 = sec.actor.zero_stage == 3 or (sec.critic_section is not None and sec.critic_section.zero_stage == 3)
    ref = load_reference(ctx, cfg, sec.actor, sec.dtype, actor, sec.offload_reference_model)
    reward = load_reward_model(ctx, cfg, sec.dtype, zero3=zero3) if cfg.needs_reward_model() else None
    return Models(actor=actor, ref=ref, reward=reward, critic=critic)


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


def reads_reward_model(ctx: StageContext) -> bool:
    """Whether this stage loads the trained reward model: the run's reward includes it and the
    stage's own section scores with it (the stage may be run by name, not as the run's algorithm)."""
    return ctx.cfg.needs_reward_model() and getattr(ctx.cfg, ctx.name).trains_with_reward_model()


def require_outputs(ctx: StageContext, *stages: str) -> None:
    for name in stages:
        path = ctx.run.final(name)
        if not path.is_dir():
            raise FileNotFoundError(f"{ctx.name} needs the {name} stage's output {path}: run `{name}` first")
