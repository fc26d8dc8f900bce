"""The memory plan: each stage's peak GPU memory from the config and the models'
``config.json`` alone, before any weights are downloaded or any GPU time is spent.

``python -m rlhf_tasks plan --preset P --set k=v ... [--gpu-memory-gb N] [--json] [--suggest]``
prints it; the ``prepare`` stage (the DAG's install task) plans against the worker's free
GPU memory and refuses a config that cannot fit, naming the stage, its planned peak and
the smallest change that fits (:func:`check`). Sizes are decimal GB, as the stages'
measured ``peak_memory_gb``. A stage's ``peak`` counts the tensors alive at once and what
PyTorch's caching allocator holds beside them at that moment (``allocator_cache``, see
:mod:`.stages`); ``allocated`` leaves that out. The CUDA context is in neither.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, PipelineConfig
from .fit import describe_fix, largest_batch, smallest_fix
from .stages import GB, PARTS, StagePlan, plan_stage, stage_names

log = logging.getLogger("rlhf_tasks")

GPU_MEMORY_ENV = "RLHF_PLAN_GPU_MEMORY_GB"  # the capacity to plan against, instead of the GPU's free memory
ROLES = ("actor", "rm")


# -- the models' config.json -------------------------------------------------------------------

def read_config(path: Path, trust_remote_code: bool = False):
    """A transformers config from a ``config.json`` file or a directory holding one; a plain
    dict when this transformers cannot build the architecture (unknown ``model_type``, or
    code shipped with the model: the planner never runs it) – the planner then uses formulas."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: no config.json there")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not JSON ({e})") from None
    from transformers import AutoConfig

    if raw.get("auto_map") and not (trust_remote_code and raw.get("model_type")):
        return raw
    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError):
        return raw


def model_config(name: str, trust_remote_code: bool = False, download: bool = False):
    """The config of ``model.actor``/``model.rm`` as models.py resolves the name: a local
    directory, ``builtin:tiny-opt`` (built on first use), or a hub id whose config.json is
    in the Hugging Face cache (or downloaded when ``download``, as prepare does)."""
    from ..runtime.models import resolve_model_path

    path = resolve_model_path(name)
    if Path(path).exists():
        return read_config(Path(path), trust_remote_code)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return read_config(Path(cached), trust_remote_code)
    if download:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    raise ConfigError(f"{name!r}: no config.json on this machine; give --model-config with the model's config.json "
                      "(e.g. --model-config actor=opt-1.3b/config.json rm=opt-350m/config.json)")


def model_configs(cfg: PipelineConfig, given: dict[str, Path] | None = None, download: bool = False) -> dict:
    given = given or {}
    return {role: read_config(given[role], cfg.model.trust_remote_code) if role in given
            else model_config(getattr(cfg.model, role), cfg.model.trust_remote_code, download) for role in ROLES}


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class Plan:
    gpu_memory_gb: float | None
    stages: dict[str, StagePlan]
    fixes: dict[str, dict | None] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)  # --suggest: the largest per-device batch that fits

    @property
    def capacity(self) -> int | None:
        return None if self.gpu_memory_gb is None else int(self.gpu_memory_gb * GB)

    def too_big(self) -> list[str]:
        """The stages whose tensors alive at once (``allocated``) exceed the GPU: they cannot run."""
        return [] if self.capacity is None else [s for s, p in self.stages.items() if p.allocated > self.capacity]

    def tight(self) -> list[str]:
        """The stages that fit only if PyTorch's caching allocator gives back what it holds (it
        does, before it reports out-of-memory, but a fragmented cache may not serve the
        optimizer step's new buffers): run, with a warning."""
        return [] if self.capacity is None else [s for s, p in self.stages.items()
                                                 if p.peak > self.capacity >= p.allocated]

    @property
    def fits(self) -> bool:
        return not self.too_big()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gpu_memory_gb": self.gpu_memory_gb, "fits": self.fits,
                               "stages": {s: p.to_json() for s, p in self.stages.items()}}
        for s, fix in self.fixes.items():
            out["stages"][s]["fix"] = None if fix is None else {**fix, "peak": round(fix["peak"] / GB, 3)}
        for s, b in self.batch.items():
            out["stages"][s]["largest_batch"] = b
        return out

    def messages(self) -> list[str]:
        return [describe_fix(self.stages[s], self.fixes.get(s), self.capacity) for s in self.too_big()]

    def warnings(self) -> list[str]:
        out = []
        for s in self.tight():
            p, fix = self.stages[s], self.fixes.get(s)
            safe = "" if fix is None else (f"; to be safe: {fix['change']} (--set "
                                           + " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                                      for k, v in fix["set"].items()) + ")")
            out.append(f"stage {s} fits only if PyTorch's allocator gives its cache back: {p.allocated / GB:.1f} GB "
                       f"of tensors alive at once, {p.peak / GB:.1f} GB with the cache, {self.capacity / GB:.1f} GB "
                       f"free{safe}")
        return out


def make_plan(cfg: PipelineConfig, configs: dict, gpu_memory_gb: float | None = None, suggest: bool = False,
              fixes: bool = True) -> Plan:
    """Plan every stage of ``cfg``'s recipe; with a capacity, the fix of each stage that does
    not fit (``fixes``) and, with ``suggest``, each stage's largest per-device batch."""
    plan = Plan(gpu_memory_gb, {s: plan_stage(cfg, configs, s) for s in stage_names(cfg)})
    if plan.capacity is not None and fixes:
        plan.fixes = {s: smallest_fix(cfg, configs, s, plan.capacity) for s in plan.too_big() + plan.tight()}
    if suggest and plan.capacity is not None:
        plan.batch = {s: largest_batch(cfg, configs, s, plan.capacity) for s in plan.stages}
    return plan


def render(plan: Plan) -> str:
    """The plan as a table: one row per stage, one column per part, GB per GPU."""
    head = ["stage", "phase", *PARTS, "peak", "fits"]
    rows = []
    for s, p in plan.stages.items():
        parts = p.parts
        fits = ("–" if plan.capacity is None else "yes" if p.peak <= plan.capacity else
                "NO" if p.allocated > plan.capacity else "tight")
        rows.append([s, p.peak_phase, *(f"{parts[k] / GB:.2f}" for k in PARTS), f"{p.peak / GB:.2f}", fits])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head, *rows]]
    cap = "no GPU capacity given" if plan.capacity is None else f"{plan.gpu_memory_gb:g} GB per GPU"
    out = [f"Memory plan (GB per GPU; {cap})", *lines]
    out += [f"  {s}: largest per-device batch that fits: {b}" for s, b in plan.batch.items()]
    out += [f"  {m}" for m in plan.messages()] + [f"  warning: {m}" for m in plan.warnings()]
    untraced = [s for s, p in plan.stages.items() if not p.traced]
    if untraced:
        out.append(f"  {', '.join(untraced)}: the model could not be traced; activations from formulas")
    return "\n".join(out)


# -- the worker's GPU, prepare's check -------------------------------------------------------------

def gpu_capacity_gb(device: str = "auto") -> float | None:
    """What to plan against: ``RLHF_PLAN_GPU_MEMORY_GB`` when set, else the smallest free
    memory of the visible GPUs as CUDA reports it, else None (no GPU, or ``device=cpu``:
    plan, never refuse)."""
    if os.environ.get(GPU_MEMORY_ENV):
        try:
            return float(os.environ[GPU_MEMORY_ENV])
        except ValueError:
            raise ConfigError(f"{GPU_MEMORY_ENV}={os.environ[GPU_MEMORY_ENV]!r} is not a number of GB") from None
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())) / GB


def check(cfg: PipelineConfig, run_path: Path) -> Plan:
    """Prepare's check: plan against the worker's GPU, write ``plan.json`` into the run
    directory, and raise :class:`ConfigError` (exit 2) naming each stage that does not fit,
    its planned peak and the smallest change that does. Without a GPU it only plans."""
    capacity = gpu_capacity_gb(cfg.device)
    plan = make_plan(cfg, model_configs(cfg, download=True), capacity)
    Path(run_path).mkdir(parents=True, exist_ok=True)
    (Path(run_path) / "plan.json").write_text(json.dumps(plan.to_json(), indent=2, sort_keys=True))
    log.info("prepare: %s", render(plan))
    if not plan.fits:
        raise ConfigError("the config does not fit this worker's GPU: " + "; ".join(plan.messages()))
    return plan


def metrics(plan: Plan) -> dict[str, float]:
    """``plan/<stage>/peak_gb`` and ``plan/<stage>/<part>_gb`` for MLflow."""
    out = {}
    for s, p in plan.stages.items():
        out[f"plan/{s}/peak_gb"] = p.peak / GB
        out.update({f"plan/{s}/{k}_gb": v / GB for k, v in p.parts.items()})
    return out
