"""Configuration: one typed tree (pydantic), one name per setting from the trigger form to
the DeepSpeed engine.

A run is a :class:`PipelineConfig`, loaded from a named preset YAML (``presets/<name>.yaml``)
or a file path, then given values by config path: a dict (``{"sft.learning_rate": 1e-4}``,
the trigger form's, typed) and/or ``key=value`` strings (the CLI's ``--set``, the form's
overrides; YAML values): :mod:`rlhf_tasks.config.load`. Every field is checked on
construction; a bad value raises :class:`ConfigError` naming the field, the value and what
is allowed (``sft.zero_stage=5 is invalid: 0, 1, 2 or 3``), an unknown key says what was
meant (:mod:`rlhf_tasks.config.errors`), so a bad value stops a run before any GPU time.

The tree::

    name, seed, device
    model      actor, rm (the reward model's starting point), tokenizer, ...
    data       datasets, data_split, max_seq_len, ...
    sft        an EngineConfig (optimiser, DeepSpeed, LoRA) + epochs, batch sizes, dtype, ...
    rm         the same for the reward model (step 2: metrics rm/*, task and CLI ``rm``)
    reward     what the RL steps optimise: the reward model's score and/or a verifier + shaping terms
    sampling   how evaluate, DPO's generated pairs, chat and labelling sample answers
    evaluate   held-out prompts, batch, precision of the evaluate stage
    resources  num_gpus, num_nodes, hostfile, gpu_hourly_usd (what the launcher starts, what cost/usd prices)
    tracking   MLflow server, experiment, registered model
    algorithm  the step-3 algorithm, and a section for each in the table
               (rlhf_tasks/config/algorithms.py): ppo, grpo, rloo, dpo, kto

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
from pydantic import Field, ValidationError, create_model, model_validator

from . import form, load
from .algorithms import ALGORITHMS, Algorithm, AlgorithmName
from .errors import ConfigError, explain
from .load import flatten, list_presets  # noqa: F401 - the config API, from here
from .sections import (
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    ResourcesConfig,
    RewardConfig,
    SamplingConfig,
    TrackingConfig,
)
from .train import EngineConfig, RMConfig, SFTConfig
from .types import Int, Section, Str, _rule

# The stages of a run, in order: each has a directory of its own in the run, a CLI command, a
# DAG task and an MLflow metric prefix (the reward model's stage logs under rm/).
STAGES = ("sft", "rm", *ALGORITHMS, "evaluate")


class RunSettings(Section):
    """The whole run but step 3's sections, which :data:`PipelineConfig` adds from the
    algorithm table."""

    name: Str = "custom"
    seed: Annotated[Int, Field(ge=0)] = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    algorithm: AlgorithmName = "ppo"
    """The alignment step after SFT and the reward model"""
    alignment_seed: Annotated[Int, Field(ge=0)] | None = None
    """Seed of the alignment step (rollouts, batch order, dropout; None: seed); varies it, not the data split"""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> RunSettings:
        if self.device == "cpu":
            for name in ("sft", "rm", "evaluate", *ALGORITHMS):
                if getattr(self, name).dtype == "fp16":
                    raise _rule(f"{name}.dtype", "fp16", "fp16 needs a GPU; use fp32 or bf16 on device=cpu")
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(explain(e, type(self).model_json_schema())) from None

    # -- step 3 -----------------------------------------------------------------------------------

    @property
    def step3(self) -> Algorithm:
        """The table's row of the run's algorithm."""
        return ALGORITHMS[self.algorithm]

    @property
    def step3_section(self) -> Any:
        """The run's algorithm's config section (``cfg.ppo`` for ``algorithm: ppo``)."""
        return getattr(self, self.algorithm)

    def engines(self) -> dict[str, EngineConfig]:
        """Every trained model's engine section by config path: sft, rm and step 3's
        (``ppo.actor``, ``ppo.critic``; the offline algorithms' section is its own)."""
        sec = self.step3_section
        step3 = {f"{self.algorithm}.{k}": getattr(sec, k) for k in ("actor", "critic") if hasattr(sec, k)}
        return {"sft": self.sft, **({"rm": self.rm} if self.needs_reward_model() else {}),
                **(step3 or {self.algorithm: sec})}

    def dtypes(self) -> set[str]:
        """The precisions the run's stages compute in."""
        return {self.sft.dtype, self.rm.dtype, self.step3_section.dtype, self.evaluate.dtype}

    def needs_reward_model(self) -> bool:
        """Whether the run trains a reward model: whenever the reward's source includes it
        (evaluate and the champion gate score with it, and step 3 where it scores). A verifier
        alone needs none: the DAG's ``rm`` task skips itself."""
        return self.reward.source != "verifier"

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
        return cls.from_dict(load.load_raw(preset, values, overrides))


# The run's config: RunSettings plus one section per algorithm of the table, named as the
# algorithm (cfg.ppo, cfg.grpo, ...).
PipelineConfig = create_model(
    "PipelineConfig", __base__=RunSettings, __module__=__name__,
    __doc__="The whole run: models, data, the stages' sections, resources and tracking.",
    **{a.name: (a.section, Field(default_factory=a.section, description=f"{a.title}: {a.summary}"))
       for a in ALGORITHMS.values()},
)


def form_schema(sections: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """{config path: JSON schema + ``section``} for the trigger form's fields (``sections``:
    form section -> config paths), from :class:`PipelineConfig`'s JSON schema."""
    return form.form_schema(PipelineConfig.model_json_schema(), sections)


__all__ = ["ALGORITHMS", "STAGES", "Algorithm", "ConfigError", "EngineConfig", "PipelineConfig", "flatten",
           "form_schema", "list_presets"]
