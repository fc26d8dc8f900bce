"""The ``prepare`` stage (the DAG's ``install`` task): fail fast, before any GPU time.

It checks the worker (packages, torch and CUDA, DeepSpeed and its ops, free disk),
resolves and saves the config, loads both models' configs and the tokenizer, reads and
validates every dataset and caches the tokenised shares of all three phases on shared
storage, plans every stage's peak GPU memory against the worker's free GPU memory
(``plan.json``; a stage that cannot fit is refused here, exit 2, with the smallest change
that fits), writes ``environment.json`` and opens the MLflow parent run.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, PipelineConfig
from ..storage import RunDir, storage_root, write_json

log = logging.getLogger("rlhf_tasks")

PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "peft", "tokenizers", "safetensors", "mlflow-skinny")
MIN_FREE_GB_GPU = 20.0  # a 1.3B model's checkpoints (fp32 Adam state) need ~16 GB each
MIN_FREE_GB_CPU = 1.0


class EnvironmentError_(RuntimeError):
    """The worker cannot run the pipeline (missing package, no GPU, no disk)."""


def check_packages() -> dict[str, str]:
    versions, missing = {}, []
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            if name == "mlflow-skinny":
                try:
                    versions["mlflow"] = md.version("mlflow")
                    continue
                except md.PackageNotFoundError:
                    pass
            missing.append(name)
    if missing:
        raise EnvironmentError_(f"missing Python packages on this worker: {missing}; install requirements.txt")
    return versions


def check_torch(cfg: PipelineConfig) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                            "cuda_version": torch.version.cuda}
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EnvironmentError_("config asks for device=cuda but this worker has no usable GPU "
                                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
        info["gpu_memory_gb"] = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(n)]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        if cfg.device == "cpu":  # the GPUs are not used: resources.num_gpus only prices the run
            return info
        if n < cfg.resources.num_gpus:
            raise EnvironmentError_(f"resources.num_gpus={cfg.resources.num_gpus} but this worker has {n} GPU(s)")
        uses_bf16 = "bf16" in cfg.dtypes()
        if uses_bf16 and not info["bf16_supported"]:
            raise EnvironmentError_(f"bf16 requested but {info['gpus'][0]} does not support it: use dtype=fp16")
    return info


def check_resources(cfg: PipelineConfig, torch_info: dict[str, Any]) -> dict[str, Any]:
    """The processes the launcher will start for the training stages, resolved by the
    launcher's own function from this config: a missing or short hostfile fails here,
    before any GPU stage."""
    from .launch import ResourceError, resources_for

    try:
        res = resources_for(cfg, "config")
    except ResourceError as e:
        raise ConfigError(str(e)) from None
    if res.world_size > 1 and not res.cpu and not res.hostfile and not torch_info["cuda_available"]:
        raise EnvironmentError_(f"resources.num_gpus={res.per_node} asks for {res.per_node} processes but this worker "
                                "has no GPU (with device=cpu, resources.cpu_processes sets the processes and num_gpus "
                                "only prices the run)")
    return {"num_gpus": cfg.resources.num_gpus, "processes_per_node": res.per_node, "num_nodes": res.num_nodes,
            "hostfile": res.hostfile, "world_size": res.world_size, "device": "cpu" if res.cpu else "gpu"}


def check_deepspeed(cfg: PipelineConfig) -> dict[str, Any]:
    """Import DeepSpeed and, where the run needs one, build its CPU-Adam op now (the
    first JIT build takes about a minute; better here than inside a GPU task)."""
    from ..runtime.engine import prepare_environment

    arch = prepare_environment()
    import deepspeed

    info: dict[str, Any] = {"deepspeed": deepspeed.__version__, "torch_cuda_arch_list": arch}
    if any(e.offload for e in cfg.engines().values()):
        from deepspeed.ops.op_builder import CPUAdamBuilder

        t0 = time.time()
        CPUAdamBuilder().load()
        info["cpu_adam_build_s"] = round(time.time() - t0, 1)
    return info


def check_disk(path: Path, needed_gb: float) -> dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free / 2**30
    if free < needed_gb:
        raise EnvironmentError_(f"only {free:.1f} GiB free on {path}, need at least {needed_gb:.0f} GiB for checkpoints")
    return {"storage": str(path), "free_gb": round(free, 1)}


def check_models(cfg: PipelineConfig) -> tuple[dict[str, Any], Any]:
    """Load the configs and tokenizer (downloading into the HF cache when given hub ids,
    building the tiny default when asked): a typo in a model name fails here."""
    from transformers import AutoConfig

    from ..data.chat import renderer
    from ..runtime.models import load_tokenizer, resolve_model_path

    info: dict[str, Any] = {}
    for role in ("actor", "rm"):
        name = getattr(cfg.model, role)
        try:
            path = resolve_model_path(name)
            c = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        except Exception as e:  # noqa: BLE001 – HF raises many types; the message matters
            raise ConfigError(f"model.{role}={name!r} cannot be loaded: {e}") from None
        info[role] = {"name": name, "path": path, "model_type": c.model_type}
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.actor, cfg.model.trust_remote_code)
    try:  # chat_template=always on a tokenizer without one fails here, before any training
        template = renderer(tok, cfg.model.chat_template).template
    except ValueError as e:
        raise ConfigError(str(e)) from None
    info["tokenizer"] = {"vocab_size": len(tok), "pad": tok.pad_token, "eos": tok.eos_token, "chat_template": template}
    return info, tok


def human_rows(ds) -> int:
    """How many rows of a blended phase dataset came from people's labels (``human``)."""
    from ..data.formats import HUMAN

    if "source" not in ds.column_names:
        return 0
    return sum(1 for s in ds["source"] if s == HUMAN or s.startswith(f"{HUMAN}:"))


def check_data(cfg: PipelineConfig, tok) -> dict[str, Any]:
    """Build (and cache) every phase's tokenised train/eval share."""
    from ..data.phases import ppo_prompts, rm_pairs, sft_rows

    counts: dict[str, Any] = {}
    for stage, loader in (("sft", sft_rows), ("rm", rm_pairs), ("ppo", ppo_prompts)):
        for split in ("train", "eval"):
            ds, reports = loader(cfg, tok, split)
            counts[f"{stage}/{split}"] = len(ds)
            if stage == "rm" and split == "train":
                counts["rm/train_human"] = human_rows(ds)
            for r in reports:
                log.info("prepare: %s", r)
        if counts[f"{stage}/train"] == 0:
            raise ConfigError(f"data.data_split={cfg.data.data_split!r} leaves the {stage} phase no training rows")
    return counts


def check_memory(cfg: PipelineConfig, run_dir: RunDir):
    """The memory plan against this worker's GPU (rlhf_tasks.plan.check): a stage that cannot
    fit raises ConfigError. A failure of the planner itself only warns: a plan is advice,
    and an architecture it cannot handle must not block a run that may well fit."""
    from .. import plan

    try:
        return plan.check(cfg, run_dir.path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 – see the docstring
        log.warning("prepare: the memory plan failed (%s: %s); continuing without it", type(e).__name__, e)
        return None


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    from ..runtime.stage import setup_logging
    from ..tracking import Tracker, ensure_parent_run, tracking_uri

    setup_logging()
    t0 = time.time()
    report: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                              "host": platform.node(), "run_dir": str(run_dir.path)}
    report["packages"] = check_packages()
    report["torch"] = check_torch(cfg)
    report["resources"] = check_resources(cfg, report["torch"])
    gpu = report["torch"]["cuda_available"] and cfg.device != "cpu"
    report["disk"] = check_disk(storage_root(), MIN_FREE_GB_GPU if gpu else MIN_FREE_GB_CPU)
    report["deepspeed"] = check_deepspeed(cfg)
    report["models"], tok = check_models(cfg)
    report["data"] = check_data(cfg, tok)
    report["human_pairs"] = report["data"].pop("rm/train_human")
    memory = check_memory(cfg, run_dir)
    if memory is not None:
        report["memory_plan"] = memory.to_json()
    report["prepare_s"] = round(time.time() - t0, 1)
    write_json(run_dir.path / "environment.json", report)
    parent = ensure_parent_run(cfg, run_dir)
    if parent:
        t = Tracker.start(tracking_uri(cfg), cfg.tracking.experiment, run_name="", resume_run_id=parent)
        t.log_artifact(str(run_dir.path / "environment.json"), "environment")
        # The reward model's training pairs that people labelled (0 without a human: dataset).
        t.log_params({"data/human_pairs": report["human_pairs"]})
        if memory is not None:
            from ..plan import metrics as plan_metrics

            t.log_metrics(plan_metrics(memory), step=0)
            t.log_artifact(str(run_dir.path / "plan.json"), "environment")
        t.close("RUNNING")
    log.info("prepare: worker ok, %s rows per phase/split, %.1f s", report["data"], report["prepare_s"])
    return {"stage": "prepare", "run_dir": str(run_dir.path), "mlflow_parent_run_id": parent,
            "data": report["data"], "human_pairs": report["human_pairs"],
            "environment": str(run_dir.path / "environment.json")}
