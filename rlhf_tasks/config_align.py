"""Step 3's sections, one per alignment algorithm (the config's ``algorithm`` picks one):
PPO (actor and critic engines), GRPO and RLOO (no critic: the group is the baseline), DPO
(no rollouts), and the reward terms every RL step adds to the reward model's score."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .config_train import EngineConfig, SupervisedConfig
from .config_types import Bool, Dtype, Float, GenerationBackend, Int, Section, _rule


class PPOEngineConfig(EngineConfig):
    """A PPO engine: DeepSpeed-Chat's step-3 defaults (100 warm-up steps, no dropout); a
    partly given ``ppo.actor``/``ppo.critic`` keeps them for the rest."""

    num_warmup_steps: Annotated[Int, Field(ge=0)] = 100
    dropout: Annotated[Float, Field(ge=0, lt=1)] | None = 0.0
    """None keeps the model's own; 0.0 disables (DeepSpeed-Chat's --dropout)"""


class ActorEngineConfig(PPOEngineConfig):
    """``ppo.actor``: the actor's engine (starts from the SFT model)."""

    learning_rate: Annotated[Float, Field(gt=0, lt=1)] = 9.65e-6
    """Peak learning rate (DeepSpeed-Chat's actor_learning_rate)"""


class CriticEngineConfig(PPOEngineConfig):
    """``ppo.critic``: the critic's engine (starts from the reward model)."""

    learning_rate: Annotated[Float, Field(gt=0, lt=1)] = 5e-6
    """Peak learning rate (DeepSpeed-Chat's critic_learning_rate)"""


class RLConfig(Section):
    """What every RL step (ppo, grpo, rloo) has: the walk over the third phase's prompts, the
    actor's engine, the KL to the reference, PPO's clipped update, rollout sampling, and
    checkpoints."""

    epochs: Annotated[Int, Field(ge=1)] = 1
    """Passes over the prompts of the third data phase"""
    max_steps: Annotated[Int, Field(ge=0)] = 0
    """Iterations (rollout + update); 0 = all prompts"""
    per_device_generation_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Prompts per rollout per GPU"""
    per_device_train_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Answers per micro-batch of the update, per GPU"""
    ppo_epochs: Annotated[Int, Field(ge=1)] = 1
    gradient_accumulation_steps: Annotated[Int, Field(ge=1)] = 1
    dtype: Dtype = "bf16"
    """Precision of the trained and frozen models"""
    actor: ActorEngineConfig = Field(default_factory=ActorEngineConfig)
    """The actor's engine (starts from the SFT model)"""
    offload_reference_model: Bool = False
    kl_coef: Annotated[Float, Field(ge=0)] = 0.1
    """KL coefficient (to the SFT reference)"""
    clip_reward_value: Annotated[Float, Field(gt=0)] = 5.0
    cliprange: Annotated[Float, Field(ge=0)] = 0.2
    # Generation
    temperature: Annotated[Float, Field(gt=0)] = 1.0
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[Int, Field(ge=0)] = 0
    generation_backend: GenerationBackend = "static"
    """static: our decode loop on a preallocated KV cache (CUDA graphs on GPU), the same tokens
    as HF under greedy decoding; hf: transformers' generate() (ppo/generation.py)"""
    generation_cuda_graphs: Bool = True
    """static backend on CUDA: replay each decode step as a CUDA graph"""
    # Bookkeeping
    checkpoint_every_steps: Annotated[Int, Field(ge=0)] = 50
    keep_checkpoints: Annotated[Int, Field(ge=1)] = 2
    log_every_steps: Annotated[Int, Field(ge=1)] = 1


class PPOConfig(RLConfig):
    """Step 3: PPO on the SFT actor against the reward model (DeepSpeed-Chat's defaults)."""

    critic: CriticEngineConfig = Field(default_factory=CriticEngineConfig)
    """The critic's engine (starts from the reward model)"""
    adaptive_kl: Bool = False
    kl_target: Annotated[Float, Field(gt=0)] = 6.0
    kl_horizon: Annotated[Int, Field(ge=1)] = 10000
    cliprange_value: Annotated[Float, Field(ge=0)] = 0.2
    gamma: Annotated[Float, Field(gt=0, le=1)] = 1.0
    lam: Annotated[Float, Field(gt=0, le=1)] = 0.95
    whiten_advantages: Bool = False
    """DeepSpeed-Chat uses the raw GAE advantages; true normalises them per rollout batch
    (mean 0, std 1 over the answer tokens), as TRL and OpenRLHF do"""
    unsupervised_coef: Annotated[Float, Field(ge=0)] = 0.0
    """>0 mixes the SFT loss on the SFT share (DeepSpeed-Chat's unsup_coef)"""
    enable_ema: Bool = False
    ema_decay: Annotated[Float, Field(gt=0, le=1)] = 0.992
    eval_prompts: Annotated[Int, Field(ge=1)] = 64
    """Held-out prompts evaluate answers (with these generation settings), whichever algorithm ran"""

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.enable_ema and self.actor.zero_stage == 3:
            raise _rule("enable_ema", True, "the EMA is a whole fp32 copy of the actor on every rank, which "
                                            "ZeRO-3 (actor.zero_stage=3) is there to avoid; use actor.zero_stage <= 2")
        return self


class RewardTermsConfig(Section):
    """The reward an RL step (ppo, grpo, rloo) optimises: the reward model's score plus these
    weighted rule-based terms, each logged on its own (``<stage>/reward_<term>``). A length
    term counters the best-known reward hack, answers that grow because the RM likes length."""

    length_coef: Float = 0.0
    """Weight of the answer length (tokens / answer budget, in [0, 1]); < 0 penalises long answers"""
    repetition_coef: Float = 0.0
    """Weight of the repetition (share of repeated n-grams in the answer, in [0, 1]); < 0 penalises it"""
    repetition_ngram: Annotated[Int, Field(ge=1, le=16)] = 3
    """n of the n-grams the repetition term counts"""
    function: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] | None = None
    """module:function installed on the worker, f(prompts, answers) -> rewards; needs RLHF_ALLOW_REWARD_FUNCTION=1"""
    function_coef: Float = 1.0
    """Weight of the function's reward"""


CRITIC_KEYS = ("critic", "cliprange_value", "gamma", "lam", "whiten_advantages", "unsupervised_coef")


class GroupConfig(RLConfig):
    """GRPO and RLOO: ``group_size`` answers per prompt sampled in one batch, each answer's
    advantage taken against the other answers to its prompt; no critic is loaded, trained or
    checkpointed. The update is PPO's clipped surrogate on the actor alone."""

    per_device_generation_batch_size: Annotated[Int, Field(ge=1)] = 4
    """Prompts per rollout per GPU (each answered group_size times)"""
    group_size: Annotated[Int, Field(ge=2)] = 4
    """Answers per prompt (G)"""
    kl_coef: Annotated[Float, Field(ge=0)] = 0.05
    """KL coefficient (to the SFT reference)"""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """token: mean over every answer token of the batch; sequence: mean per answer, then over answers"""

    @model_validator(mode="before")
    @classmethod
    def _no_critic(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if given := [k for k in CRITIC_KEYS if k in data]:
                raise _rule(given[0], data[given[0]], "GRPO and RLOO train no critic (the other answers to a "
                                                      "prompt are the baseline): remove the critic settings")
        return data


class GRPOConfig(GroupConfig):
    """GRPO (Shao et al. 2024): advantage = (reward - group mean) / group std."""

    scale_rewards: Bool = True
    """Divide by the group's standard deviation; false = Dr. GRPO (Liu et al. 2025), mean-centred only"""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """loss: k3 estimate of KL(pi || ref) added to the loss x kl_coef (GRPO); reward: subtracted from the reward"""
    loss_aggregation: Literal["token", "sequence"] = "sequence"


class RLOOConfig(GroupConfig):
    """RLOO (Ahmadian et al. 2024): baseline = mean reward of the other answers to the prompt;
    the KL to the reference is part of the reward."""


class DPOConfig(SupervisedConfig):
    """Step 3 with ``algorithm: dpo``: direct preference optimisation of the SFT actor on the
    third phase's pairs (rlhf_tasks/dpo.py). The reference log-probs are computed once,
    before the first update, so only the policy is on the device while it trains."""

    learning_rate: Annotated[Float, Field(gt=0, lt=1)] = 5e-7
    """Peak learning rate (5e-7: Zephyr-7B's DPO recipe; DPO drifts fast at SFT's rates)"""
    dropout: Annotated[Float, Field(ge=0, lt=1)] | None = 0.0
    """0 by default: with dropout the policy's log-probs at step 0 would not equal the reference's"""
    beta: Annotated[Float, Field(gt=0)] = 0.1
    """Strength of the implicit KL to the SFT model (implicit reward = beta x log-ratio)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta x margin); ipo: (margin - 1/(2 beta))^2 on per-token mean log-probs"""
    label_smoothing: Annotated[Float, Field(ge=0, lt=0.5)] = 0.0
    """sigmoid only: the share of pairs taken to be mislabelled (conservative DPO)"""
    sft_coef: Annotated[Float, Field(ge=0)] = 0.0
    """Weight of the chosen answers' per-token NLL added to the loss (RPO, Pang et al. 2024): DPO
    alone can lower the chosen answers' likelihood too, and with it what the policy generates"""
    pairs: Literal["dataset", "generated"] = "dataset"
    """dataset: the third phase's labelled pairs; generated: the SFT actor's own answers to those
    prompts, the reward model's best of `candidates` against its worst (on-policy pairs)"""
    candidates: Annotated[Int, Field(ge=2, le=64)] = 4
    """pairs=generated: answers sampled per prompt (with the ppo section's sampling settings)"""
    generated_prompts: Annotated[Int, Field(ge=1)] | None = None
    """pairs=generated: how many of the third phase's training prompts are answered (none: all)"""

    @model_validator(mode="after")
    def _check_dpo(self) -> DPOConfig:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise _rule("label_smoothing", self.label_smoothing, "label smoothing applies to loss_type=sigmoid only")
        if self.zero_stage == 3:
            # The reference pass runs on the loaded model before its engine exists; a ZeRO-3
            # model holds only shards until the engine gathers them.
            raise _rule("zero_stage", 3, "0, 1 or 2 for dpo (its reference log-probs are computed before "
                                         "the engine exists, which a ZeRO-3 model needs to run)")
        return self
