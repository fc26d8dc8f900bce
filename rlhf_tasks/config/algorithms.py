"""Step 3, the alignment algorithms: each one's config section and, in :data:`ALGORITHMS`,
its row: the one place an algorithm is declared. The config's ``algorithm`` choices and
sections, the CLI's commands, the DAG's step-3 tasks and form, preflight's inputs, the
report's names and the memory plan are read from the table; adding an algorithm is a
section and a row here, its stage module, and its tests.

The RL algorithms (ppo, grpo, rloo) share one loop (rlhf_tasks/algorithms/rl/loop.py)
and differ by settings: the advantage estimator and the policy loss, by name (their
pure functions are registered in rlhf_tasks/algorithms/maths/), a critic or not, the
KL in the reward or in the loss. The offline ones learn without rollouts, dpo from pairs,
kto from unpaired answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .sections import SamplingConfig
from .train import EngineConfig, SupervisedConfig
from .types import Bool, Dtype, Float, Int, Section, _rule

# The registered maths (rlhf_tasks/algorithms/maths/: a test holds the two lists equal).
PolicyLoss = Literal["ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo"]
AdvantageEstimator = Literal["gae", "group_norm", "group_mean", "rloo", "reinforce_pp_baseline"]


# -- the RL sections ------------------------------------------------------------------------------

class PPOEngineConfig(EngineConfig):
    """An RL engine: DeepSpeed-Chat's step-3 defaults (100 warm-up steps, no dropout); a
    partly given ``ppo.actor``/``ppo.critic`` keeps them for the rest."""

    num_warmup_steps: Annotated[Int, Field(ge=0)] = 100
    dropout: Annotated[Float, Field(ge=0, lt=1)] | None = 0.0
    """None keeps the model's own; 0.0 disables (DeepSpeed-Chat's --dropout)"""


class ActorEngineConfig(PPOEngineConfig):
    """``<algo>.actor``: the actor's engine (starts from the SFT model)."""

    learning_rate: Annotated[Float, Field(gt=0, lt=1)] = 9.65e-6
    """Peak learning rate (DeepSpeed-Chat's actor_learning_rate)"""


class CriticEngineConfig(PPOEngineConfig):
    """``ppo.critic``: the critic's engine (starts from the reward model)."""

    learning_rate: Annotated[Float, Field(gt=0, lt=1)] = 5e-6
    """Peak learning rate (DeepSpeed-Chat's critic_learning_rate)"""


class RLConfig(SamplingConfig):
    """What every RL step has: the walk over the third phase's prompts, the actor's engine,
    the KL to the reference, the clipped update by a registered policy loss, rollout
    sampling, checkpoints."""

    epochs: Annotated[Int, Field(ge=1)] = 1
    """Passes over the prompts of the third data phase"""
    max_steps: Annotated[Int, Field(ge=0)] = 0
    """Iterations (rollout + update); 0 = all prompts"""
    per_device_generation_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Prompts per rollout per GPU"""
    per_device_train_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Answers per micro-batch of the update, per GPU"""
    ppo_epochs: Annotated[Int, Field(ge=1)] = 1
    """Passes of the update over each rollout batch"""
    gradient_accumulation_steps: Annotated[Int, Field(ge=1)] = 1
    dtype: Dtype = "bf16"
    """Precision of the trained and frozen models"""
    actor: ActorEngineConfig = Field(default_factory=ActorEngineConfig)
    """The actor's engine (starts from the SFT model)"""
    offload_reference_model: Bool = False
    kl_coef: Annotated[Float, Field(ge=0)] = 0.1
    """KL coefficient (to the SFT reference)"""
    loss: PolicyLoss = "ppo"
    """Policy loss, by name: ppo, grpo, dr_grpo, dapo, gspo or cispo (rlhf_tasks/algorithms/maths/policy.py)"""
    cliprange: Annotated[Float, Field(ge=0)] | None = None
    """Lower clip range of the importance ratio (1 - cliprange); None: the loss's own (0.2 for ppo)"""
    cliprange_high: Annotated[Float, Field(ge=0)] | None = None
    """Upper clip range (1 + cliprange_high; DAPO's clip-higher); None: the loss's own"""
    # Bookkeeping
    checkpoint_every_steps: Annotated[Int, Field(ge=0)] = 50
    keep_checkpoints: Annotated[Int, Field(ge=1)] = 2
    log_every_steps: Annotated[Int, Field(ge=1)] = 1

    # What the one RL loop reads of a section besides its fields: the answers per prompt and
    # the critic's engine (None: no critic).
    @property
    def answers_per_prompt(self) -> int:
        return 1

    @property
    def critic_section(self) -> EngineConfig | None:
        return None

    def trains_with_reward_model(self) -> bool:
        return True

    @model_validator(mode="after")
    def _whole_steps(self) -> RLConfig:
        # DeepSpeed steps after every gradient_accumulation_steps micro-batches: a remainder
        # would be stepped with the next iteration's first micro-batches, and the step-level
        # token mean (rl/update.py) would be taken over the wrong tokens.
        answers = self.per_device_generation_batch_size * self.answers_per_prompt
        micro = -(-answers // self.per_device_train_batch_size)
        if micro % self.gradient_accumulation_steps:
            raise _rule("gradient_accumulation_steps", self.gradient_accumulation_steps,
                        f"a divisor of the {micro} micro-batches of an iteration ({answers} answers per rollout, "
                        f"per_device_train_batch_size {self.per_device_train_batch_size})")
        return self


class PPOConfig(RLConfig):
    """Step 3: PPO on the SFT actor against the reward model, with a critic initialised from
    it (DeepSpeed-Chat's defaults): GAE advantages, the KL to the reference per token in the
    reward, clipped policy and value losses."""

    critic: CriticEngineConfig = Field(default_factory=CriticEngineConfig)
    """The critic's engine (starts from the reward model)"""
    advantage: Literal["gae"] = "gae"
    """Advantage estimator: GAE from the critic's values"""
    kl_penalty: Literal["reward"] = "reward"
    """The KL to the reference: subtracted from each token's reward"""
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

    @property
    def critic_section(self) -> EngineConfig:
        return self.critic

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.enable_ema and self.actor.zero_stage == 3:
            raise _rule("enable_ema", True, "the EMA is a whole fp32 copy of the actor on every rank, which "
                                            "ZeRO-3 (actor.zero_stage=3) is there to avoid; use actor.zero_stage <= 2")
        if self.loss in ("gspo",):
            raise _rule("loss", self.loss, "a per-token loss (ppo, dapo, cispo, grpo, dr_grpo): GAE gives each "
                                           "token its own advantage, which a sequence-level ratio cannot use")
        return self


CRITIC_KEYS = ("critic", "cliprange_value", "gamma", "lam", "whiten_advantages", "unsupervised_coef")


class GroupConfig(RLConfig):
    """GRPO-style group sampling: ``group_size`` answers per prompt in one batch, each
    answer's advantage taken against the other answers to its prompt (``advantage``); no
    critic is loaded, trained or checkpointed. The update is the registered ``loss`` on the
    actor alone."""

    per_device_generation_batch_size: Annotated[Int, Field(ge=1)] = 4
    """Prompts per rollout per GPU (each answered group_size times)"""
    group_size: Annotated[Int, Field(ge=2)] = 4
    """Answers per prompt (G)"""
    kl_coef: Annotated[Float, Field(ge=0)] = 0.05
    """KL coefficient (to the SFT reference)"""
    advantage: AdvantageEstimator = "group_norm"
    """group_norm: (r - group mean) / group std (GRPO); group_mean: r - group mean (Dr. GRPO); rloo:
    r - mean of the other answers; reinforce_pp_baseline: r - group mean, then normalised over the batch"""
    kl_penalty: Literal["reward", "loss"] = "loss"
    """loss: k3 estimate of KL(pi || ref) added to the loss x kl_coef (GRPO); reward: subtracted from the reward"""
    dynamic_sampling: Bool = False
    """DAPO: drop the groups whose answers all got the same reward (no signal) and refill the batch"""
    max_sampling_rounds: Annotated[Int, Field(ge=1)] = 3
    """dynamic_sampling: rollouts of new prompts at most, per iteration, to refill the batch"""

    @property
    def answers_per_prompt(self) -> int:
        return self.group_size

    @model_validator(mode="before")
    @classmethod
    def _no_critic(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if given := [k for k in CRITIC_KEYS if k in data]:
                raise _rule(given[0], data[given[0]], "GRPO and RLOO train no critic (the other answers to a "
                                                      "prompt are the baseline): remove the critic settings")
        return data

    @model_validator(mode="after")
    def _check_group(self) -> GroupConfig:
        if self.advantage == "gae":
            raise _rule("advantage", "gae", "a group estimator (group_norm, group_mean, rloo, "
                                            "reinforce_pp_baseline): GAE needs a critic, which only ppo trains")
        return self


class GRPOConfig(GroupConfig):
    """GRPO (Shao et al. 2024) and the losses built on it since: DAPO, Dr. GRPO, GSPO, CISPO,
    REINFORCE++-baseline (``loss``, ``advantage``, ``dynamic_sampling``)."""

    loss: PolicyLoss = "grpo"


class RLOOConfig(GroupConfig):
    """RLOO (Ahmadian et al. 2024): baseline = mean reward of the other answers to the prompt;
    the KL to the reference is part of the reward."""

    advantage: AdvantageEstimator = "rloo"
    kl_penalty: Literal["reward", "loss"] = "reward"


# -- the offline sections ---------------------------------------------------------------------------

class DPOConfig(SupervisedConfig):
    """Step 3 with ``algorithm: dpo``: direct preference optimisation of the SFT actor on the
    third phase's pairs (rlhf_tasks/algorithms/dpo.py). The reference log-probs are computed
    once, before the first update, so only the policy is on the device while it trains."""

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
    """pairs=generated: answers sampled per prompt (with the sampling section's settings)"""
    generated_prompts: Annotated[Int, Field(ge=1)] | None = None
    """pairs=generated: how many of the third phase's training prompts are answered (none: all)"""

    def trains_with_reward_model(self) -> bool:
        return self.pairs == "generated"

    @model_validator(mode="after")
    def _check_dpo(self) -> DPOConfig:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise _rule("label_smoothing", self.label_smoothing, "label smoothing applies to loss_type=sigmoid only")
        return self


class KTOConfig(SupervisedConfig):
    """Step 3 with ``algorithm: kto``: Kahneman-Tversky optimisation of the SFT actor on unpaired
    answers, each desirable or undesirable (rlhf_tasks/algorithms/kto.py): the third phase's
    chosen answers and rejected ones, and the answers people judged both bad. As DPO, the
    reference log-probs are computed once, before the first update."""

    learning_rate: Annotated[Float, Field(gt=0, lt=1)] = 5e-7
    """Peak learning rate"""
    dropout: Annotated[Float, Field(ge=0, lt=1)] | None = 0.0
    """0 by default: with dropout the policy's log-probs at step 0 would not equal the reference's"""
    beta: Annotated[Float, Field(gt=0)] = 0.1
    """Strength of the implicit KL to the SFT model (implicit reward = beta x log-ratio)"""
    desirable_weight: Annotated[Float, Field(gt=0)] = 1.0
    """lambda_D, the weight of a desirable answer's loss (the paper: keep lambda_D n_D / (lambda_U n_U)
    in [1, 4/3], n the answers of each kind)"""
    undesirable_weight: Annotated[Float, Field(gt=0)] = 1.0
    """lambda_U, the weight of an undesirable answer's loss"""
    answers: Literal["dataset", "generated"] = "dataset"
    """dataset: the third phase's chosen (desirable) and rejected (undesirable) answers; generated: the SFT
    actor's own answers to those prompts, the reward model's best of `candidates` desirable, its worst
    undesirable. Either way with the answers people labelled (a `human` dataset, both bad included)"""
    candidates: Annotated[Int, Field(ge=2, le=64)] = 4
    """answers=generated: answers sampled per prompt (with the sampling section's settings)"""
    generated_prompts: Annotated[Int, Field(ge=1)] | None = None
    """answers=generated: how many of the third phase's training prompts are answered (none: all)"""

    def trains_with_reward_model(self) -> bool:
        return self.answers == "generated"


# -- the table --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Algorithm:
    """One alignment algorithm. ``name`` is everywhere the same: the config's ``algorithm``
    value and section, the CLI command, the DAG task, the run's stage directory and the
    MLflow metric prefix (``<name>/reward``)."""

    name: str
    title: str  # in the report and the DAG's docs
    section: type[Section]  # its config section, cfg.<name>
    stage: str  # "module:function" of its stage entry point, run(cfg, run_dir) -> StageResult
    summary: str  # one line: what it does
    # sampled answers scored as it trains, fixed pairs, or fixed unpaired answers
    learns_from: Literal["rollouts", "pairs", "answers"]
    holds: tuple[str, ...]  # the models on the device while it trains
    form: tuple[str, ...] = ()  # its fields on the DAG's trigger form (keys of its section)

    @property
    def rollouts(self) -> bool:
        return self.learns_from == "rollouts"

    @property
    def sequences_per_example(self) -> int:
        """Sequences one training example puts through the policy with gradients (a pair: two)."""
        return 2 if self.learns_from == "pairs" else 1


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("ppo", "PPO", PPOConfig, "rlhf_tasks.algorithms.rl.loop:run",
              "PPO (DeepSpeed-Chat's step 3): a critic from the reward model, GAE, clipped policy and value losses",
              "rollouts", ("actor", "critic", "reference", "reward"),
              ("epochs", "max_steps", "per_device_generation_batch_size", "kl_coef", "actor.learning_rate",
               "critic.learning_rate", "actor.lora_dim", "actor.zero_stage", "critic.zero_stage", "dtype")),
    Algorithm("grpo", "GRPO", GRPOConfig, "rlhf_tasks.algorithms.rl.loop:run",
              "group sampling, no critic: GRPO and, by loss and advantage, DAPO, Dr. GRPO, GSPO, CISPO, "
              "REINFORCE++-baseline", "rollouts", ("actor", "reference", "reward"),
              ("max_steps", "group_size", "per_device_generation_batch_size", "loss", "advantage", "kl_coef",
               "kl_penalty", "cliprange", "cliprange_high", "dynamic_sampling", "actor.learning_rate")),
    Algorithm("rloo", "RLOO", RLOOConfig, "rlhf_tasks.algorithms.rl.loop:run",
              "group sampling, no critic: each answer against the mean of the other answers to its prompt",
              "rollouts", ("actor", "reference", "reward"),
              ("max_steps", "group_size", "kl_coef", "actor.learning_rate")),
    Algorithm("dpo", "DPO", DPOConfig, "rlhf_tasks.algorithms.dpo:run",
              "DPO on preference pairs (the dataset's, or the SFT actor's own answers ranked by the reward model)",
              "pairs", ("policy",),
              ("pairs", "candidates", "generated_prompts", "epochs", "max_steps", "beta", "loss_type",
               "learning_rate", "lora_dim")),
    Algorithm("kto", "KTO", KTOConfig, "rlhf_tasks.algorithms.kto:run",
              "KTO on unpaired answers, each desirable or undesirable (the dataset's chosen and rejected, or the "
              "SFT actor's own ranked by the reward model; the answers people judged both bad)", "answers",
              ("policy",),
              ("answers", "candidates", "generated_prompts", "epochs", "max_steps", "beta", "desirable_weight",
               "undesirable_weight", "learning_rate", "lora_dim")),
)}
AlgorithmName = Literal[tuple(ALGORITHMS)]  # type: ignore[valid-type]
