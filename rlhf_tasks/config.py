"""Configuration: one typed tree (pydantic), one name per setting from the trigger form to
the DeepSpeed engine.

A run is described by a :class:`PipelineConfig`, loaded from a named preset YAML
(``rlhf_tasks/presets/<name>.yaml``) or a file path, then given values by config path:
a dict (``{"sft.learning_rate": 1e-4}``, what the trigger form sends, already typed) and/or
``key=value`` strings (the CLI's ``--set``, the form's free-text overrides; values parsed
as YAML). Every field is checked on construction; a bad value raises :class:`ConfigError`
naming the field, the value and what is allowed (``sft.zero_stage=5 is invalid: 0, 1, 2
or 3``), an unknown key says what was meant, so a bad value stops a run before any GPU
time is spent.

The tree::

    name, seed, device
    model      actor, rm (the reward model's starting point), tokenizer, ...
    data       datasets, data_split, max_seq_len, ...
    sft        an EngineConfig (optimiser, DeepSpeed, LoRA) + epochs, batch sizes, dtype, ...
    rm         the same for the reward model (step 2: metrics rm/*, task and CLI ``rm``)
    ppo        rollout/PPO settings + ``actor`` and ``critic``: one EngineConfig each
    resources  num_gpus, num_nodes, hostfile, gpu_hourly_usd (what the launcher starts, what cost/usd prices)
    tracking   MLflow server, experiment, registered model

Field names follow DeepSpeed-Chat's flags where one exists (``zero_stage``, ``offload``,
``dtype``, ``gradient_checkpointing``, ``lora_dim``, ``lora_module_name``,
``only_optimize_lora``, ``max_seq_len``, ``num_warmup_steps``, ``data_split``...), so a
DeepSpeed-Chat user can carry a recipe over. The trigger form's fields are these models'
fields, named by their config path, with the JSON schema generated here
(:func:`form_schema`), so the form and the config cannot drift apart.
"""

from __future__ import annotations

import copy
import difflib
import fcntl
import logging
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .storage import STAGES

PRESET_DIR = Path(__file__).parent / "presets"
log = logging.getLogger("rlhf_tasks")

Dtype = Literal["fp32", "fp16", "bf16"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
GenerationBackend = Literal["static", "hf"]
ZeroStage = Literal[0, 1, 2, 3]
Attention = Literal["sdpa", "eager", "flash_attention_2"]

# Keys of earlier versions -> their name now (an old key is refused with the new one named).
RENAMED = {
    "cost": "resources", "reward": "rm", "model.reward": "model.rm",
    "ppo.per_device_training_batch_size": "ppo.per_device_train_batch_size",
    **{f"ppo.{who}_{k}": f"ppo.{who}.{k}" for who in ("actor", "critic")
       for k in ("learning_rate", "weight_decay", "zero_stage", "gradient_checkpointing", "lora_dim",
                 "lora_module_name", "dropout")},
    **{f"ppo.{k}": f"ppo.actor.{k} and ppo.critic.{k}"
       for k in ("lr_scheduler_type", "num_warmup_steps", "max_grad_norm", "offload", "only_optimize_lora")},
}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


# -- field types: YAML/JSON scalars in, checked Python values out ------------------------------

def _int(v: Any) -> Any:
    if isinstance(v, bool):
        raise PydanticCustomError("rlhf_type", "an integer")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _number(v: Any) -> Any:
    if isinstance(v, bool):
        raise PydanticCustomError("rlhf_type", "a number")
    return v


def _comma_list(v: Any) -> Any:
    return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


Int = Annotated[int, BeforeValidator(_int)]
Float = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(min_length=1)]


def _rule(field: str, value: Any, allowed: str) -> PydanticCustomError:
    """A cross-field rule broken: reported as ``<section>.<field>=<value> is invalid: <allowed>``."""
    return PydanticCustomError("rlhf_rule", "{allowed}", {"field": field, "value": value, "allowed": allowed})


class Section(BaseModel):
    """A config section: unknown keys refused, field comments are the form's descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# -- models, data -------------------------------------------------------------------------------

class ModelConfig(Section):
    """Which models the pipeline starts from: a Hugging Face hub id (``facebook/opt-1.3b``),
    a local directory made with ``save_pretrained``, or ``builtin:tiny-opt`` (a small
    OPT-architecture model and BPE tokenizer built from the bundled sample data, no download)."""

    actor: Str = "builtin:tiny-opt"
    """Actor (step 1 starts from it): hub id, local directory or builtin:tiny-opt"""
    rm: Str = "builtin:tiny-opt"
    """Reward model (step 2 starts from it; the PPO critic starts from the trained RM)"""
    tokenizer: Str | None = None
    """Tokenizer; default: the actor's"""
    trust_remote_code: Bool = False
    """Run a model's own Python code (also needs RLHF_ALLOW_REMOTE_CODE=1 on the worker)"""
    attn_implementation: Attention = "sdpa"
    """Attention kernel; a model without it (Bloom has no sdpa) loads with eager and a warning"""


class DataConfig(Section):
    """Datasets and how they are shared between the three phases.

    ``datasets`` entries: a hub id of a seed dataset (``Dahoas/rm-static``) or of raw HH
    transcripts (``Anthropic/hh-rlhf``), the same with a local location
    (``Dahoas/rm-static=/data/rm-static``), a bundled sample (``sample:Dahoas/rm-static``)
    or a local json/jsonl/parquet/csv file or directory with prompt/chosen/rejected columns
    (or only chosen/rejected whole conversations, read as HH transcripts). ``data_split``
    gives SFT, RM and PPO disjoint shares of every dataset, as in DeepSpeed-Chat (``2,4,4``).
    """

    datasets: Annotated[list[Str], BeforeValidator(_comma_list), Field(min_length=1)] = \
        Field(default_factory=lambda: ["sample:Dahoas/rm-static"])
    """Datasets: hub ids, sample:<id>, <id>=<dir> or local files"""
    data_split: Annotated[str, Field(pattern=r"^\s*\d+(\.\d+)?\s*,\s*\d+(\.\d+)?\s*,\s*\d+(\.\d+)?\s*$")] = "2,4,4"
    """SFT,RM,PPO shares of every dataset, e.g. 2,4,4"""
    max_seq_len: Annotated[Int, Field(ge=8)] = 512
    """Max prompt+answer tokens"""
    max_prompt_seq_len: Annotated[Int, Field(ge=1)] = 256
    """Max prompt tokens (PPO answers get max_seq_len - max_prompt_seq_len)"""
    max_eval_samples: Annotated[Int, Field(ge=0)] = 2000
    """Cap on held-out rows evaluated per stage (0 = all)"""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if sum(self.split_weights()) <= 0:
            raise _rule("data_split", self.data_split,
                        "three non-negative comma-separated weights for SFT,RM,PPO such as '2,4,4'")
        if self.max_prompt_seq_len >= self.max_seq_len:
            raise _rule("max_prompt_seq_len", self.max_prompt_seq_len,
                        f"an integer in [1, max_seq_len={self.max_seq_len})")
        return self

    def split_weights(self) -> list[float]:
        return [float(p) for p in self.data_split.split(",")]


# -- training -----------------------------------------------------------------------------------

class EngineConfig(Section):
    """One trained model's optimiser, DeepSpeed and LoRA settings: ``sft`` and ``rm`` are
    one each (plus their loop settings), PPO has two, ``ppo.actor`` and ``ppo.critic``.
    ``rlhf_tasks.engine.initialize`` builds a DeepSpeed engine from exactly this."""

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


PPO_ENGINE_DEFAULTS = {
    "actor": {"learning_rate": 9.65e-6, "num_warmup_steps": 100, "dropout": 0.0},
    "critic": {"learning_rate": 5e-6, "num_warmup_steps": 100, "dropout": 0.0},
}


class PPOConfig(Section):
    """Step 3: PPO on the SFT actor against the reward model (DeepSpeed-Chat's defaults)."""

    epochs: Annotated[Int, Field(ge=1)] = 1
    """Passes over the PPO prompts"""
    max_steps: Annotated[Int, Field(ge=0)] = 0
    """PPO iterations (rollout + update); 0 = all prompts"""
    per_device_generation_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Prompts per rollout per GPU"""
    per_device_train_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Micro-batch per GPU of the actor and critic updates"""
    ppo_epochs: Annotated[Int, Field(ge=1)] = 1
    gradient_accumulation_steps: Annotated[Int, Field(ge=1)] = 1
    dtype: Dtype = "bf16"
    """Precision of the actor, critic, reference and reward models"""
    actor: EngineConfig = Field(default_factory=lambda: EngineConfig(**PPO_ENGINE_DEFAULTS["actor"]))
    """The actor's engine (starts from the SFT model)"""
    critic: EngineConfig = Field(default_factory=lambda: EngineConfig(**PPO_ENGINE_DEFAULTS["critic"]))
    """The critic's engine (starts from the reward model)"""
    offload_reference_model: Bool = False
    # PPO hyper-parameters
    kl_coef: Annotated[Float, Field(ge=0)] = 0.1
    """KL penalty coefficient"""
    adaptive_kl: Bool = False
    kl_target: Annotated[Float, Field(gt=0)] = 6.0
    kl_horizon: Annotated[Int, Field(ge=1)] = 10000
    clip_reward_value: Annotated[Float, Field(gt=0)] = 5.0
    cliprange: Annotated[Float, Field(ge=0)] = 0.2
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
    eval_prompts: Annotated[Int, Field(ge=1)] = 64

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.enable_ema and self.actor.zero_stage == 3:
            raise _rule("enable_ema", True, "the EMA is a whole fp32 copy of the actor on every rank, which "
                                            "ZeRO-3 (actor.zero_stage=3) is there to avoid; use actor.zero_stage <= 2")
        return self

    @model_validator(mode="before")
    @classmethod
    def _engine_defaults(cls, data: Any) -> Any:
        """A partly given ``actor``/``critic`` section keeps PPO's defaults for the rest
        (DeepSpeed-Chat's learning rates, 100 warm-up steps, no dropout)."""
        if isinstance(data, dict):
            data = dict(data)
            for who, defaults in PPO_ENGINE_DEFAULTS.items():
                if isinstance(data.get(who), dict):
                    data[who] = {**defaults, **data[who]}
        return data


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


class GroupConfig(Section):
    """GRPO and RLOO: ``group_size`` answers per prompt sampled in one batch, each answer's
    advantage taken against the other answers to its prompt; no critic is loaded, trained or
    checkpointed. The update is PPO's clipped surrogate on the actor alone."""

    epochs: Annotated[Int, Field(ge=1)] = 1
    """Passes over the prompts of the third data phase"""
    max_steps: Annotated[Int, Field(ge=0)] = 0
    """Iterations (rollout + update); 0 = all prompts"""
    per_device_generation_batch_size: Annotated[Int, Field(ge=1)] = 4
    """Prompts per rollout per GPU (each answered group_size times)"""
    group_size: Annotated[Int, Field(ge=2)] = 4
    """Answers per prompt (G)"""
    per_device_train_batch_size: Annotated[Int, Field(ge=1)] = 8
    """Answers per micro-batch of the update"""
    ppo_epochs: Annotated[Int, Field(ge=1)] = 1
    gradient_accumulation_steps: Annotated[Int, Field(ge=1)] = 1
    dtype: Dtype = "bf16"
    """Precision of the actor, reference and reward models"""
    actor: EngineConfig = Field(default_factory=lambda: EngineConfig(**PPO_ENGINE_DEFAULTS["actor"]))
    """The actor's engine (starts from the SFT model)"""
    offload_reference_model: Bool = False
    kl_coef: Annotated[Float, Field(ge=0)] = 0.05
    """KL coefficient (to the SFT reference)"""
    clip_reward_value: Annotated[Float, Field(gt=0)] = 5.0
    cliprange: Annotated[Float, Field(ge=0)] = 0.2
    loss_aggregation: Literal["token", "sequence"] = "token"
    """token: mean over every answer token of the batch; sequence: mean per answer, then over answers"""
    temperature: Annotated[Float, Field(gt=0)] = 1.0
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[Int, Field(ge=0)] = 0
    generation_backend: GenerationBackend = "static"
    generation_cuda_graphs: Bool = True
    checkpoint_every_steps: Annotated[Int, Field(ge=0)] = 50
    keep_checkpoints: Annotated[Int, Field(ge=1)] = 2
    log_every_steps: Annotated[Int, Field(ge=1)] = 1

    @model_validator(mode="before")
    @classmethod
    def _no_critic(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if given := [k for k in CRITIC_KEYS if k in data]:
                raise _rule(given[0], data[given[0]], "GRPO and RLOO train no critic (the other answers to a "
                                                      "prompt are the baseline): remove the critic settings")
            if isinstance(data.get("actor"), dict):
                data = {**data, "actor": {**PPO_ENGINE_DEFAULTS["actor"], **data["actor"]}}
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


# -- where it runs, where it is tracked -----------------------------------------------------------

class ResourcesConfig(Section):
    """The GPUs a run uses and their price. The launcher (``rlhf_tasks.launch.run_resources``)
    starts ``num_gpus`` processes per node for sft, rm and ppo, on the first ``num_nodes``
    hosts of ``hostfile`` (DeepSpeed's ``host slots=N`` file, which must exist on the worker
    that starts the stage); ``device: cpu`` runs one process. ``cost/usd`` = wall-clock
    hours x ``gpu_hourly_usd`` x ``num_gpus`` x ``num_nodes``."""

    num_gpus: Annotated[Int, Field(ge=1, le=1024)] = 1
    """GPUs per node for each training stage (>1 uses the deepspeed launcher)"""
    num_nodes: Annotated[Int, Field(ge=1)] = 1
    hostfile: Str | None = None
    """DeepSpeed hostfile; required for num_nodes > 1"""
    gpu_hourly_usd: Annotated[Float, Field(ge=0)] = 0.0
    """Price of one GPU-hour, for cost/usd"""

    @model_validator(mode="after")
    def _check(self) -> ResourcesConfig:
        if self.num_nodes > 1 and not self.hostfile:
            raise _rule("hostfile", None, "required when num_nodes > 1")
        return self

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes


class TrackingConfig(Section):
    """Where metrics go. ``tracking_uri`` None means the ``MLFLOW_TRACKING_URI``
    environment variable, and tracking is off when neither is set."""

    tracking_uri: str | None = None
    experiment: Str = "rlhf"
    registered_model: Str = "rlhf-actor"
    system_metrics: Bool = True

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        # A file:/sqlite: store would let a config (a trigger-form override) write anywhere on
        # the worker; a local store is the operator's choice, through MLFLOW_TRACKING_URI.
        if self.tracking_uri is not None and not self.tracking_uri.startswith(("http://", "https://", "databricks")):
            raise _rule("tracking_uri", self.tracking_uri,
                        "an http(s):// MLflow server URL, or null (a local store is set with MLFLOW_TRACKING_URI)")
        return self


class PipelineConfig(Section):
    """The whole run: models, data, the three stages, resources and tracking."""

    name: Str = "custom"
    seed: Annotated[Int, Field(ge=0)] = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    algorithm: Literal["ppo", "grpo", "rloo", "dpo"] = "ppo"
    """The alignment step after SFT and the reward model"""
    alignment_seed: Annotated[Int, Field(ge=0)] | None = None
    """Seed of the alignment step's sampling (None: seed); varies it without changing the data split"""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    rloo: RLOOConfig = Field(default_factory=RLOOConfig)
    reward_terms: RewardTermsConfig = Field(default_factory=RewardTermsConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.device == "cpu":
            for name in ("sft", "rm", "ppo", "grpo", "rloo"):
                if getattr(self, name).dtype == "fp16":
                    raise _rule(f"{name}.dtype", "fp16", "fp16 needs a GPU; use fp32 or bf16 on device=cpu")
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(_explain(e)) from None

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a mapping, got {d!r}")
        return cls(**d)

    @classmethod
    def load(cls, preset: str | Path, values: dict[str, Any] | list[str] | None = None,
             overrides: list[str] | None = None) -> PipelineConfig:
        """A preset (name or YAML path), then ``values`` by config path (typed, e.g. the
        trigger form's ``{"sft.learning_rate": 1e-4}``), then ``key=value`` strings
        (parsed as YAML). A list as ``values`` is taken as ``overrides`` (the CLI's form)."""
        if isinstance(values, list):
            values, overrides = None, [*values, *(overrides or [])]
        raw = load_preset_dict(preset)
        for key, value in (values or {}).items():
            set_path(raw, key, copy.deepcopy(value))
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)


# -- errors: pydantic's report -> "field=value is invalid: what is allowed" ---------------------------

def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _lookup(model: type[BaseModel], path: tuple) -> tuple[type[BaseModel] | None, Any]:
    """(the model holding the field at ``path``, the field's annotation)."""
    holder: Any = model
    hint: Any = None
    for part in path:
        if isinstance(part, int) or not (isinstance(holder, type) and issubclass(holder, BaseModel)):
            return None, hint
        f = holder.model_fields.get(part)
        if f is None:
            return holder, None
        hint = f.annotation
        parent, holder = holder, _base_type(f.annotation)
    return parent, hint


def _unwrap(hint: Any) -> tuple[Any, list[Any]]:
    """``Annotated[int, Field(ge=1), ...] | None`` -> (int, [the Annotated metadata])."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            metadata += list(hint.__metadata__)
            hint = typing.get_args(hint)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                return hint, metadata
            hint = args[0]
        else:
            return hint, metadata


def _base_type(hint: Any) -> Any:
    return _unwrap(hint)[0]


def _bounds(model: type[BaseModel] | None, name: str) -> str | None:
    if model is None or name not in model.model_fields:
        return None
    f = model.model_fields[name]
    lo = hi = None
    for m in [*f.metadata, *_unwrap(f.annotation)[1]]:  # Field(gt=...) -> annotated_types.Gt(gt=...)
        for attr, bracket in (("gt", "("), ("ge", "["), ("lt", ")"), ("le", "]")):
            if isinstance(getattr(m, attr, None), (int, float)):
                if attr[0] == "g":
                    lo = (bracket, getattr(m, attr))
                else:
                    hi = (bracket, getattr(m, attr))
    kind = "an integer" if _base_type(f.annotation) is int else "a number"
    if lo and hi:
        if kind == "an integer" and lo[0] == "[" and hi[0] == "]":
            return f"an integer in [{lo[1]}, {hi[1]}]"
        return f"{kind} in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{kind} {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"{kind} {'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return None


def _allowed_literal(values: tuple) -> str:
    if all(isinstance(v, int) for v in values):
        return ", ".join(str(v) for v in values[:-1]) + f" or {values[-1]}"
    return f"one of {list(values)}"


def _unknown_key(path: str, model: type[BaseModel] | None) -> str:
    if path in RENAMED:
        return f"unknown config key '{path}' (renamed: use '{RENAMED[path]}')"
    head = path.split(".")[0]
    if head in RENAMED and "." in path:
        return f"unknown config key '{path}' (the '{head}' section is now '{RENAMED[head]}')"
    known = list(model.model_fields) if model else []
    prefix = path.rpartition(".")[0]
    close = difflib.get_close_matches(path.rpartition(".")[2], known, n=1)
    if close:
        return f"unknown config key '{path}' (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
    return f"unknown config key '{path}'; known keys: {sorted(known)}"


def _explain(e: ValidationError) -> str:
    msgs = []
    for err in e.errors():
        loc, kind, ctx, value = tuple(err["loc"]), err["type"], err.get("ctx") or {}, err.get("input")
        path = _loc(loc)
        holder, hint = _lookup(PipelineConfig, loc) if loc else (None, None)
        base = _base_type(hint)
        if kind == "extra_forbidden":
            msgs.append(_unknown_key(path, holder))
            continue
        if kind == "rlhf_rule":
            field = ctx["field"]
            path = f"{path}.{field}" if path else field
            msgs.append(f"{path}={ctx['value']!r} is invalid: {ctx['allowed']}")
            continue
        if kind == "model_type" or kind == "model_attributes_type":
            msgs.append(f"{path or 'config'} must be a mapping, got {value!r}")
            continue
        name = next((p for p in reversed(loc) if isinstance(p, str)), "")
        if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            if base is float:
                value = float(value)
            elif base is int:
                value = int(value)
            allowed = _bounds(holder, name) if not isinstance(loc[-1], int) else None
            allowed = allowed or err["msg"].removeprefix("Input should be ")
        elif kind == "literal_error":
            allowed = _allowed_literal(typing.get_args(base)) if typing.get_origin(base) is Literal \
                else err["msg"].removeprefix("Input should be ")
        elif kind == "rlhf_type":
            allowed = err["msg"]
        elif kind in ("int_parsing", "int_from_float", "int_type"):
            allowed = "an integer"
        elif kind in ("float_parsing", "float_type"):
            allowed = "a number"
        elif kind in ("bool_type", "bool_parsing"):
            allowed = "true or false"
        elif kind == "none_required" or (kind.endswith("_type") and value is None):
            allowed = "a value (null is not allowed here)"
        elif kind in ("list_type", "tuple_type"):
            allowed = "a list"
        elif kind == "too_short" and typing.get_origin(base) is list:
            allowed = "a non-empty list of dataset names or paths" if name == "datasets" else "a non-empty list"
        elif kind in ("too_short", "too_long") and typing.get_origin(base) is tuple:
            allowed = f"a list of {len(typing.get_args(base))} numbers"
        elif kind == "missing" and loc and isinstance(loc[-1], int):
            path = _loc(loc[:-1])
            allowed = "two numbers in [0, 1)" if loc[-2] == "adam_betas" else f"a list of {loc[-1] + 1} or more items"
        elif kind == "string_too_short":
            allowed = "a non-empty string"
        elif kind == "string_pattern_mismatch" and name == "data_split":
            allowed = "three non-negative comma-separated weights for SFT,RM,PPO such as '2,4,4'"
        else:
            allowed = err["msg"]
        msgs.append(f"{path}={value!r} is invalid: {allowed}")
    return "\n".join(dict.fromkeys(msgs))


# -- presets, values by path, key=value strings ----------------------------------------------------

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset_dict(preset: str | Path) -> dict[str, Any]:
    path = Path(preset)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {str(preset)!r} not found: choose one of {list_presets()} or give a YAML file path")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw["a"]["b"]["c"] = value`` for ``key="a.b.c"``, making sections as needed."""
    key = key.strip()
    node = raw
    parts = key.split(".")
    if not key or not all(parts):
        raise ConfigError(f"{key!r} is not a config path such as sft.learning_rate")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p!r} is not a section")
    node[parts[-1]] = value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key=value, e.g. sft.learning_rate=1e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    set_path(raw, key, parsed)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: config paths and their values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- the run directory's config.yaml --------------------------------------------------------------

def resolve_run_config(run_path: Path, cfg: PipelineConfig | None) -> PipelineConfig:
    """The run directory's config.yaml is the source of truth for every stage of a run:
    the first stage (or the DAG's install task) writes it; later ones must agree with it,
    so a resumed or retried run can never silently mix settings. ``cfg`` None: use the
    saved one."""
    run_path = Path(run_path)
    run_path.mkdir(parents=True, exist_ok=True)
    config_path = run_path / "config.yaml"
    with open(run_path / ".config.lock", "w") as lock:  # stages starting side by side read/write it in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        if config_path.is_file():
            saved = PipelineConfig.load(config_path)
            if cfg is None or cfg.to_dict() == saved.to_dict():
                return saved
            started = [s for s in STAGES if (run_path / s).is_dir()]
            if started:
                new, old = flatten(cfg.to_dict()), flatten(saved.to_dict())
                diff = [k for k in new if new[k] != old.get(k)]
                raise ConfigError(f"{config_path} already holds a different config (keys {diff[:8]}) and stages "
                                  f"{started} have started with it: use a new --output directory, or drop "
                                  "--preset/--set to reuse the saved one")
            log.info("replacing %s: no stage has started with it yet", config_path)
        if cfg is None:
            raise ConfigError(f"{config_path} does not exist: give --preset (and --set) for a new run")
        cfg.save(config_path)
        return cfg


# -- the trigger form, generated from the models ---------------------------------------------------

def field_schema(path: str) -> dict[str, Any]:
    """The JSON schema of one config field (``sft.learning_rate``), nullable: an empty form
    field keeps the preset's value. Bounds, enums and description come from the model."""
    model: Any = PipelineConfig
    parts = path.split(".")
    for p in parts[:-1]:
        model = _base_type(model.model_fields[p].annotation)
    name = parts[-1]
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or name not in model.model_fields:
        raise ConfigError(f"{path!r} is not a config field")
    prop = dict(model.model_json_schema(mode="validation")["properties"][name])
    if "anyOf" in prop:  # Optional[...] -> the non-null branch
        branch = next(b for b in prop.pop("anyOf") if b.get("type") != "null")
        prop.update(branch)
    out: dict[str, Any] = {k: prop[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                                                "pattern", "minLength", "items", "minItems") if k in prop}
    if "enum" in prop or "const" in prop:
        out["enum"] = [None, *prop.get("enum", [prop.get("const")])]
    for m in [*model.model_fields[name].metadata, *_unwrap(model.model_fields[name].annotation)[1]]:
        for attr, key in (("gt", "exclusiveMinimum"), ("ge", "minimum"), ("lt", "exclusiveMaximum"), ("le", "maximum")):
            if isinstance(getattr(m, attr, None), (int, float)):
                out[key] = getattr(m, attr)
    kind = prop.get("type") or ("integer" if all(isinstance(v, int) for v in prop.get("enum", [])) else "string")
    out["type"] = ["null", kind]
    out["title"] = path
    desc = model.model_fields[name].description
    out["description"] = (desc or name.replace("_", " ").capitalize()).split("\n")[0].strip() + " (empty: the preset's)"
    return out


def form_schema(sections: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """{config path: JSON schema + ``section``} for the trigger form's fields."""
    return {path: {**field_schema(path), "section": section} for section, paths in sections.items() for path in paths}
