"""Configuration: one dataclass per stage, validated on construction.

A run is described by a :class:`PipelineConfig`, loaded from a named preset YAML
(``rlhf_tasks/presets/<name>.yaml``) or a file path, then overridden with dotted
``key=value`` pairs (``sft.learning_rate=1e-4``). Every dataclass checks its own
fields in ``__post_init__`` and raises :class:`ConfigError` naming the field, the value
and what is allowed, so that a bad value stops a run before any GPU time is spent.

Field names follow DeepSpeed-Chat's flags where one exists (``zero_stage``,
``offload``, ``dtype``, ``gradient_checkpointing``, ``lora_dim``, ``lora_module_name``,
``only_optimize_lora``, ``max_seq_len``, ``num_warmup_steps``, ``data_split``...), so a
DeepSpeed-Chat user can carry a recipe over.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

Dtype = Literal["fp32", "fp16", "bf16"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
GenerationBackend = Literal["static", "hf"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, where: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{where}={value!r} is invalid: {allowed}")


def _check_literal(obj: Any, name: str, where: str) -> None:
    """Check a Literal-typed field against its allowed values."""
    hint = typing.get_type_hints(type(obj))[name]
    allowed = typing.get_args(hint)
    _check(getattr(obj, name) in allowed, f"{where}.{name}", getattr(obj, name), f"one of {list(allowed)}")


@dataclass
class ModelConfig:
    """Which models the pipeline starts from.

    A name is a Hugging Face hub id (``facebook/opt-1.3b``), a local directory made
    with ``save_pretrained``, or ``builtin:tiny-opt`` – a small OPT-architecture model
    and BPE tokenizer built from the bundled sample data (no download).
    """

    actor: str = "builtin:tiny-opt"
    reward: str = "builtin:tiny-opt"
    tokenizer: str | None = None  # default: the actor's
    trust_remote_code: bool = False
    # "sdpa", "eager" or "flash_attention_2"; a model without the kernel (Bloom has no sdpa)
    # loads with eager attention and a warning
    attn_implementation: str = "sdpa"

    def validate(self, where: str = "model") -> None:
        for name in ("actor", "reward"):
            v = getattr(self, name)
            _check(isinstance(v, str) and v.strip() != "", f"{where}.{name}", v, "a hub id, a local directory or builtin:tiny-opt")
        _check(
            self.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
            f"{where}.attn_implementation",
            self.attn_implementation,
            "one of ['sdpa', 'eager', 'flash_attention_2']",
        )


@dataclass
class DataConfig:
    """Datasets and how they are shared between the three phases.

    ``datasets`` entries: a hub id of a seed dataset (``Dahoas/rm-static``) or of raw HH
    transcripts (``Anthropic/hh-rlhf``), the same with a local location
    (``Dahoas/rm-static=/data/rm-static``), a bundled sample (``sample:Dahoas/rm-static``)
    or a local json/jsonl/parquet/csv file or directory with prompt/chosen/rejected columns
    (or only chosen/rejected whole conversations, read as HH transcripts). ``data_split`` gives SFT, RM and PPO disjoint
    shares of every dataset, as in DeepSpeed-Chat (``2,4,4``).
    """

    datasets: list[str] = field(default_factory=lambda: ["sample:Dahoas/rm-static"])
    data_split: str = "2,4,4"
    max_seq_len: int = 512
    max_prompt_seq_len: int = 256
    max_eval_samples: int = 2000  # cap on held-out rows evaluated per stage (0 = all)

    def validate(self, where: str = "data") -> None:
        _check(
            isinstance(self.datasets, list) and len(self.datasets) > 0 and all(isinstance(d, str) and d for d in self.datasets),
            f"{where}.datasets",
            self.datasets,
            "a non-empty list of dataset names or paths",
        )
        parts = str(self.data_split).split(",")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = []
        _check(
            len(nums) == 3 and all(n >= 0 for n in nums) and sum(nums) > 0,
            f"{where}.data_split",
            self.data_split,
            "three non-negative comma-separated weights for SFT,RM,PPO such as '2,4,4'",
        )
        _check(isinstance(self.max_seq_len, int) and self.max_seq_len >= 8, f"{where}.max_seq_len", self.max_seq_len, "an integer >= 8")
        _check(
            isinstance(self.max_prompt_seq_len, int) and 1 <= self.max_prompt_seq_len < self.max_seq_len,
            f"{where}.max_prompt_seq_len",
            self.max_prompt_seq_len,
            f"an integer in [1, max_seq_len={self.max_seq_len})",
        )
        _check(isinstance(self.max_eval_samples, int) and self.max_eval_samples >= 0, f"{where}.max_eval_samples", self.max_eval_samples, "an integer >= 0")

    def split_weights(self) -> list[float]:
        return [float(p) for p in str(self.data_split).split(",")]


@dataclass
class TrainConfig:
    """Optimisation and DeepSpeed settings shared by the SFT and reward-model stages."""

    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    lr_scheduler_type: Scheduler = "cosine"
    num_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    dropout: float | None = None  # None keeps the model's own; 0.0 disables (DeepSpeed-Chat's --dropout)
    # DeepSpeed
    zero_stage: int = 0
    offload: bool = False  # ZeRO-Offload of optimizer state (and params at stage 3) to CPU
    dtype: Dtype = "bf16"
    gradient_checkpointing: bool = False
    # LoRA (peft); lora_dim 0 = full fine-tuning
    lora_dim: int = 0
    lora_alpha: float | None = None  # None = lora_dim (scaling 1)
    # "auto": every projection inside the transformer blocks, for any architecture (OPT,
    # GPT-2, Llama, Qwen2, GPT-NeoX, Bloom...); else a module-name substring as in
    # DeepSpeed-Chat ("decoder.layers." for OPT)
    lora_module_name: str = "auto"
    only_optimize_lora: bool = False
    # Bookkeeping
    eval_every_steps: int = 0  # 0 = once per epoch
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 2
    log_every_steps: int = 10

    def validate(self, where: str) -> None:
        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, f"{where}.{name}", v, f"an integer >= {minimum}")

        for name in ("epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "keep_checkpoints", "log_every_steps"):
            pos_int(name)
        for name in ("max_steps", "num_warmup_steps", "eval_every_steps", "checkpoint_every_steps", "lora_dim"):
            pos_int(name, 0)
        _check(isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1, f"{where}.learning_rate", self.learning_rate, "a number in (0, 1)")
        _check(isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < 1, f"{where}.weight_decay", self.weight_decay, "a number in [0, 1)")
        _check(self.max_grad_norm >= 0, f"{where}.max_grad_norm", self.max_grad_norm, "a number >= 0 (0 disables clipping)")
        betas = tuple(self.adam_betas)
        _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"{where}.adam_betas", self.adam_betas, "two numbers in [0, 1)")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, f"{where}.dropout", self.dropout, "null or a number in [0, 1)")
        _check(self.zero_stage in (0, 1, 2, 3), f"{where}.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        _check(not (self.offload and self.zero_stage == 0), f"{where}.offload", self.offload,
               "offload needs zero_stage >= 1 (ZeRO-Offload moves the partitioned optimizer state)")
        _check_literal(self, "dtype", where)
        _check_literal(self, "lr_scheduler_type", where)
        _check(isinstance(self.lora_module_name, str) and self.lora_module_name != "", f"{where}.lora_module_name", self.lora_module_name, "a non-empty module-name substring")
        _check(not (self.only_optimize_lora and self.lora_dim == 0), f"{where}.only_optimize_lora", True, "needs lora_dim > 0")
        _check(not (self.only_optimize_lora and self.gradient_checkpointing and self.zero_stage == 3), f"{where}.only_optimize_lora", True,
               "cannot be combined with gradient_checkpointing under ZeRO-3")


@dataclass
class SFTConfig(TrainConfig):
    """Step 1: supervised fine-tuning of the actor on prompt + chosen answer."""

    train_on_prompt: bool = False  # loss on prompt tokens too (DeepSpeed-Chat does); default: answer only

    def __post_init__(self) -> None:
        self.validate("sft")


@dataclass
class RewardConfig(TrainConfig):
    """Step 2: reward model (LM backbone + scalar head) with the pairwise loss."""

    def __post_init__(self) -> None:
        self.validate("reward")


@dataclass
class PPOConfig:
    """Step 3: PPO on the SFT actor against the reward model (DeepSpeed-Chat's defaults)."""

    epochs: int = 1  # passes over the PPO prompt share
    max_steps: int = 0  # PPO iterations (rollout + update); 0 = all prompts
    per_device_generation_batch_size: int = 8
    per_device_training_batch_size: int = 8
    ppo_epochs: int = 1
    gradient_accumulation_steps: int = 1
    actor_learning_rate: float = 9.65e-6
    critic_learning_rate: float = 5e-6
    actor_weight_decay: float = 0.0
    critic_weight_decay: float = 0.0
    lr_scheduler_type: Scheduler = "cosine"
    num_warmup_steps: int = 100
    max_grad_norm: float = 1.0
    # PPO hyper-parameters
    kl_coef: float = 0.1
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    clip_reward_value: float = 5.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    # DeepSpeed-Chat uses the raw GAE advantages; True normalises them per rollout batch
    # (mean 0, std 1 over the answer tokens), as TRL and OpenRLHF do.
    whiten_advantages: bool = False
    unsupervised_coef: float = 0.0  # >0 mixes the SFT loss on the SFT share (DeepSpeed-Chat's unsup_coef)
    enable_ema: bool = False
    ema_decay: float = 0.992
    # Generation
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # "static": our decode loop on a preallocated KV cache (CUDA graphs on GPU), same tokens
    # as HF under greedy decoding; "hf": transformers' generate() (ppo/generation.py).
    generation_backend: GenerationBackend = "static"
    generation_cuda_graphs: bool = True  # static backend on CUDA: replay each decode step as a CUDA graph
    # DeepSpeed
    actor_zero_stage: int = 0
    critic_zero_stage: int = 0
    offload: bool = False
    offload_reference_model: bool = False
    dtype: Dtype = "bf16"
    actor_gradient_checkpointing: bool = False
    critic_gradient_checkpointing: bool = False
    actor_lora_dim: int = 0
    actor_lora_module_name: str = "auto"  # as lora_module_name
    critic_lora_dim: int = 0
    critic_lora_module_name: str = "auto"
    only_optimize_lora: bool = False
    actor_dropout: float | None = 0.0
    critic_dropout: float | None = 0.0
    # Bookkeeping
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 2
    log_every_steps: int = 1
    eval_prompts: int = 64

    def __post_init__(self) -> None:
        w = "ppo"
        for name in ("epochs", "per_device_generation_batch_size", "per_device_training_batch_size", "ppo_epochs",
                     "gradient_accumulation_steps", "keep_checkpoints", "log_every_steps", "kl_horizon", "eval_prompts"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{w}.{name}", v, "an integer >= 1")
        for name in ("max_steps", "num_warmup_steps", "checkpoint_every_steps", "actor_lora_dim", "critic_lora_dim", "top_k"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{w}.{name}", v, "an integer >= 0")
        for name in ("actor_learning_rate", "critic_learning_rate"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and 0 < v < 1, f"{w}.{name}", v, "a number in (0, 1)")
        for name in ("kl_coef", "clip_reward_value", "cliprange", "cliprange_value", "unsupervised_coef", "max_grad_norm"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v >= 0, f"{w}.{name}", v, "a number >= 0")
        _check(self.clip_reward_value > 0, f"{w}.clip_reward_value", self.clip_reward_value, "a number > 0")
        _check(self.kl_target > 0, f"{w}.kl_target", self.kl_target, "a number > 0")
        for name in ("gamma", "lam", "ema_decay", "top_p"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and 0 < v <= 1, f"{w}.{name}", v, "a number in (0, 1]")
        _check(self.temperature > 0, f"{w}.temperature", self.temperature, "a number > 0")
        for name in ("actor_zero_stage", "critic_zero_stage"):
            _check(getattr(self, name) in (0, 1, 2, 3), f"{w}.{name}", getattr(self, name), "0, 1, 2 or 3")
        _check(not (self.offload and min(self.actor_zero_stage, self.critic_zero_stage) == 0), f"{w}.offload", self.offload,
               "offload needs actor_zero_stage and critic_zero_stage >= 1")
        _check_literal(self, "dtype", w)
        _check_literal(self, "lr_scheduler_type", w)
        _check_literal(self, "generation_backend", w)
        _check(not (self.only_optimize_lora and self.actor_lora_dim == 0 and self.critic_lora_dim == 0),
               f"{w}.only_optimize_lora", True, "needs actor_lora_dim or critic_lora_dim > 0")
        for name in ("actor_dropout", "critic_dropout"):
            v = getattr(self, name)
            _check(v is None or 0.0 <= v < 1.0, f"{w}.{name}", v, "null or a number in [0, 1)")


@dataclass
class TrackingConfig:
    """Where metrics go. ``tracking_uri`` None means the ``MLFLOW_TRACKING_URI``
    environment variable, and tracking is off when neither is set."""

    tracking_uri: str | None = None
    experiment: str = "rlhf"
    registered_model: str = "rlhf-actor"
    system_metrics: bool = True

    def validate(self, where: str = "tracking") -> None:
        _check(isinstance(self.experiment, str) and self.experiment != "", f"{where}.experiment", self.experiment, "a non-empty name")
        _check(isinstance(self.registered_model, str) and self.registered_model != "", f"{where}.registered_model", self.registered_model, "a non-empty name")
        # A file:/sqlite: store would let a config (a trigger-form override) write anywhere on
        # the worker; a local store is the operator's choice, through MLFLOW_TRACKING_URI.
        _check(self.tracking_uri is None or str(self.tracking_uri).startswith(("http://", "https://", "databricks")),
               f"{where}.tracking_uri", self.tracking_uri,
               "an http(s):// MLflow server URL, or null (a local store is set with MLFLOW_TRACKING_URI)")


@dataclass
class CostConfig:
    """The GPUs a run uses, and their price: ``cost/usd`` = wall-clock hours x
    ``gpu_hourly_usd`` x ``num_gpus`` x ``num_nodes``.

    The launcher (``rlhf_tasks.launch.run_resources``) reads the same three fields from
    the run's config.yaml: ``num_gpus`` processes per node for sft, reward and ppo, on the
    first ``num_nodes`` hosts of ``hostfile`` (DeepSpeed's ``host slots=N`` file, which
    must exist on the worker that starts the stage). ``device: cpu`` runs one process.
    """

    gpu_hourly_usd: float = 0.0
    num_gpus: int = 1  # per node
    num_nodes: int = 1
    hostfile: str | None = None  # DeepSpeed hostfile; required for num_nodes > 1

    def validate(self, where: str = "cost") -> None:
        _check(isinstance(self.gpu_hourly_usd, (int, float)) and self.gpu_hourly_usd >= 0, f"{where}.gpu_hourly_usd", self.gpu_hourly_usd, "a number >= 0")
        _check(isinstance(self.num_gpus, int) and self.num_gpus >= 1, f"{where}.num_gpus", self.num_gpus, "an integer >= 1")
        _check(isinstance(self.num_nodes, int) and self.num_nodes >= 1, f"{where}.num_nodes", self.num_nodes, "an integer >= 1")
        _check(not (self.num_nodes > 1 and not self.hostfile), f"{where}.hostfile", self.hostfile, "required when num_nodes > 1")
        _check(self.hostfile is None or (isinstance(self.hostfile, str) and self.hostfile.strip() != ""),
               f"{where}.hostfile", self.hostfile, "null or the path of a DeepSpeed hostfile")


@dataclass
class PipelineConfig:
    """The whole run: models, data, the three stages, tracking and cost."""

    name: str = "custom"
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check_literal(self, "device", "pipeline")
        self.model.validate()
        self.data.validate()
        self.tracking.validate()
        self.cost.validate()
        if self.device == "cpu":
            for stage in (self.sft, self.reward, self.ppo):
                _check(stage.dtype != "fp16", f"{'ppo' if stage is self.ppo else ('sft' if stage is self.sft else 'reward')}.dtype",
                       stage.dtype, "fp16 needs a GPU; use fp32 or bf16 on device=cpu")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for stage in ("sft", "reward"):
            d[stage]["adam_betas"] = list(d[stage]["adam_betas"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        return _build(cls, d, "")

    @classmethod
    def load(cls, preset: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
        """Load a preset by name or path, apply ``key=value`` overrides, validate."""
        raw = load_preset_dict(preset)
        if isinstance(overrides, dict):
            overrides = [f"{k}={_dump_scalar(v)}" for k, v in overrides.items()]
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)


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


def _dump_scalar(v: Any) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. sft.learning_rate=1e-4")
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce YAML scalars to the annotated type (ints for floats, '1e-4' strings...)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        _check(type(None) in args, where, value, "a value (null is not allowed here)")
        return None
    if origin in (typing.Union, __import__("types").UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where) if len(non_none) == 1 else value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}={value!r} is invalid: a number") from None
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), where, value, "a number")
        return float(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _check(isinstance(value, int) and not isinstance(value, bool), where, value, "an integer")
        return value
    if hint is bool:
        _check(isinstance(value, bool), where, value, "true or false")
        return value
    if hint is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), where, value, "a string")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, list), where, value, "a list")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), where, value, "a list")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    return value


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in d if k not in known]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(known), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {sorted(known)}"
        raise ConfigError(f"unknown config key '{prefix}{k}'{hint}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)
