"""Configuration: one typed tree (pydantic), one name per setting from the trigger form to
the DeepSpeed engine.

A run is a :class:`PipelineConfig`, loaded from a named preset YAML (``presets/<name>.yaml``)
or a file path, then given values by config path: a dict (``{"sft.learning_rate": 1e-4}``,
the trigger form's, typed) and/or ``key=value`` strings (the CLI's ``--set``, the form's
overrides; YAML values): :mod:`rlhf_tasks.config_load`. Every field is checked on
construction; a bad value raises :class:`ConfigError` naming the field, the value and what
is allowed (``sft.zero_stage=5 is invalid: 0, 1, 2 or 3``), an unknown key says what was
meant (:mod:`rlhf_tasks.config_errors`), so a bad value stops a run before any GPU time.

The tree::

    name, seed, device
    model      actor, rm (the reward model's starting point), tokenizer, ...
    data       datasets, data_split, max_seq_len, ...
    sft        an EngineConfig (optimiser, DeepSpeed, LoRA) + epochs, batch sizes, dtype, ...
    rm         the same for the reward model (step 2: metrics rm/*, task and CLI ``rm``)
    ppo        rollout/PPO settings + ``actor`` and ``critic``: an EngineConfig each (PPO's defaults)
    dpo        the DPO step (``algorithm: dpo``): an EngineConfig + loop settings + beta, loss_type
    resources  num_gpus, num_nodes, hostfile, gpu_hourly_usd (what the launcher starts, what cost/usd prices)
    tracking   MLflow server, experiment, registered model

Field names follow DeepSpeed-Chat's flags where one exists (``zero_stage``, ``offload``,
``dtype``, ``gradient_checkpointing``, ``lora_dim``, ``lora_module_name``,
``only_optimize_lora``, ``max_seq_len``, ``num_warmup_steps``, ``data_split``...), so a
DeepSpeed-Chat user can carry a recipe over. Numbers and booleans are strict (``true`` is
no integer, ``"0.1"`` no number), bounds are ``Field`` bounds: the models' JSON schema is
the trigger form (:func:`form_schema`), so the form and the config cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError, model_validator

from . import config_form, config_load
from .config_align import (  # noqa: F401 - step 3's sections, importable from here as before
    ActorEngineConfig,
    CriticEngineConfig,
    DPOConfig,
    GroupConfig,
    GRPOConfig,
    PPOConfig,
    RewardTermsConfig,
    RLOOConfig,
)
from .config_errors import RENAMED, ConfigError, explain  # noqa: F401 - the config API, from here as before
from .config_load import PRESET_DIR, apply_override, flatten, list_presets, load_preset_dict, set_path  # noqa: F401
from .config_train import EngineConfig, RMConfig, SFTConfig, SupervisedConfig  # noqa: F401
from .config_types import (  # noqa: F401
    Bool,
    Dtype,
    Float,
    GenerationBackend,
    Int,
    Scheduler,
    Section,
    Str,
    ZeroStage,
    _rule,
)

Attention = Literal["sdpa", "eager", "flash_attention_2"]


def _comma_list(v: Any) -> Any:
    return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v


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
    """Three non-negative comma-separated weights: the SFT,RM,PPO shares of every dataset, e.g. 2,4,4"""
    max_seq_len: Annotated[Int, Field(ge=8)] = 512
    """Max prompt+answer tokens"""
    max_prompt_seq_len: Annotated[Int, Field(ge=1)] = 256
    """Max prompt tokens (PPO answers get max_seq_len - max_prompt_seq_len)"""
    max_eval_samples: Annotated[Int, Field(ge=0)] = 2000
    """Cap on held-out rows evaluated per stage (0 = all)"""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if sum(self.split_weights()) <= 0:
            raise _rule("data_split", self.data_split, "weights that sum to more than 0, e.g. 2,4,4")
        if self.max_prompt_seq_len >= self.max_seq_len:
            raise _rule("max_prompt_seq_len", self.max_prompt_seq_len,
                        f"an integer in [1, max_seq_len={self.max_seq_len})")
        return self

    def split_weights(self) -> list[float]:
        return [float(p) for p in self.data_split.split(",")]


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
    champion_approval: Literal["auto", "human"] = "auto"
    """auto: the champion alias moves when the held-out reward is better; human: a person decides"""
    approval_timeout_minutes: Annotated[Float, Field(gt=0)] = 1440.0
    """With human approval: unanswered this long, the current champion stays"""

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
    """Seed of the alignment step (rollouts, batch order, dropout; None: seed); varies it, not the data split"""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    rloo: RLOOConfig = Field(default_factory=RLOOConfig)
    reward_terms: RewardTermsConfig = Field(default_factory=RewardTermsConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.device == "cpu":
            for name in ("sft", "rm", "ppo", "grpo", "rloo", "dpo"):
                if getattr(self, name).dtype == "fp16":
                    raise _rule(f"{name}.dtype", "fp16", "fp16 needs a GPU; use fp32 or bf16 on device=cpu")
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(explain(e, type(self).model_json_schema())) from None

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
        return cls.from_dict(config_load.load_raw(preset, values, overrides))


def form_schema(sections: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """{config path: JSON schema + ``section``} for the trigger form's fields (``sections``:
    form section -> config paths), from :class:`PipelineConfig`'s JSON schema."""
    return config_form.form_schema(PipelineConfig.model_json_schema(), sections)


# Last: run_config builds on PipelineConfig (importable from here as before).
from .run_config import resolve_run_config  # noqa: E402,F401
