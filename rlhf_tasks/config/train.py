"""The sections of a trained model: its engine (optimiser, DeepSpeed, LoRA), and the
supervised stages built on it, SFT (step 1) and the reward model (step 2)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from .types import Bool, Dtype, Float, Int, Scheduler, Section, Str, ZeroStage, _rule


class EngineConfig(Section):
    """One trained model's optimiser, DeepSpeed and LoRA settings: ``sft`` and ``rm`` are
    one each (plus their loop settings), PPO has two, ``ppo.actor`` and ``ppo.critic``.
    ``rlhf_tasks.runtime.engine.initialize`` builds a DeepSpeed engine from exactly this."""

    learning_rate: Annotated[Float, Field(gt=0, lt=1)] = 1e-4
    """Peak learning rate"""
    weight_decay: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    """AdamW weight decay (not on biases and norms)"""
    adam_betas: tuple[Annotated[Float, Field(ge=0, lt=1)], Annotated[Float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    lr_scheduler_type: Scheduler = "cosine"
    num_warmup_steps: Annotated[Int, Field(ge=0)] = 0
    max_grad_norm: Annotated[Float, Field(ge=0)] = 1.0
    """Gradient clipping (0 disables)"""
    dropout: Annotated[Float, Field(ge=0, lt=1)] | None = None
    """None keeps the model's own; 0.0 disables (DeepSpeed-Chat's --dropout)"""
    zero_stage: ZeroStage = 0
    """ZeRO stage"""
    offload: Bool = False
    """ZeRO-Offload of optimizer state (and parameters at stage 3) to CPU"""
    gradient_checkpointing: Bool = False
    lora_dim: Annotated[Int, Field(ge=0)] = 0
    """LoRA dim (0 = full fine-tuning)"""
    lora_alpha: Annotated[Float, Field(gt=0)] | None = None
    """None = lora_dim (scaling 1)"""
    lora_module_name: Str = "auto"
    """auto: every projection inside the transformer blocks, any architecture; else a
    module-name substring as in DeepSpeed-Chat (decoder.layers. for OPT)"""
    only_optimize_lora: Bool = False

    @model_validator(mode="after")
    def _check_engine(self) -> EngineConfig:
        if self.offload and self.zero_stage == 0:
            raise _rule("offload", True, "offload needs zero_stage >= 1 (ZeRO-Offload moves the partitioned "
                                         "optimizer state)")
        if self.only_optimize_lora and self.lora_dim == 0:
            raise _rule("only_optimize_lora", True, "needs lora_dim > 0")
        if self.only_optimize_lora and self.gradient_checkpointing and self.zero_stage == 3:
            raise _rule("only_optimize_lora", True, "cannot be combined with gradient_checkpointing under ZeRO-3")
        return self


class SupervisedConfig(EngineConfig):
    """A stage trained on a fixed dataset (SFT, RM): its engine plus the loop around it."""

    epochs: Annotated[Int, Field(ge=1)] = 1
    """Epochs"""
    max_steps: Annotated[Int, Field(ge=0)] = 0
    """Optimizer steps; 0 = run all epochs"""
    per_device_train_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Micro-batch per GPU"""
    per_device_eval_batch_size: Annotated[Int, Field(ge=1)] = 16
    gradient_accumulation_steps: Annotated[Int, Field(ge=1)] = 1
    dtype: Dtype = "bf16"
    """Training precision"""
    eval_every_steps: Annotated[Int, Field(ge=0)] = 0
    """0 = once per epoch"""
    checkpoint_every_steps: Annotated[Int, Field(ge=0)] = 200
    keep_checkpoints: Annotated[Int, Field(ge=1)] = 2
    log_every_steps: Annotated[Int, Field(ge=1)] = 10


class SFTConfig(SupervisedConfig):
    """Step 1: supervised fine-tuning of the actor on prompt + chosen answer."""

    train_on_prompt: Bool = False
    """Loss on prompt tokens too (DeepSpeed-Chat does); default: answer only"""


class RMConfig(SupervisedConfig):
    """Step 2: reward model (LM backbone + scalar head) with the pairwise loss."""
