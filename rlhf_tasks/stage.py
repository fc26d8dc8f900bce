"""What every stage shares: seeding, device and process group, the run directory, the
MLflow run (resumed on retry), wall-clock time and cost, and the final result record."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import PipelineConfig
from .engine import init_distributed, resolve_device
from .storage import RunDir, StageResult, write_json

log = logging.getLogger("rlhf_tasks")

# Metric prefixes as named in the design (the reward stage logs under rm/).
METRIC_PREFIX = {"sft": "sft", "reward": "rm", "ppo": "ppo", "evaluate": "eval"}
# A stage waits this long for the MLflow server at start, then trains on and opens its run
# in the background once the server answers; metrics are kept (bounded queue) through an
# outage of up to MLFLOW_OUTAGE_BUDGET_S and sent when it ends.
# A finished stage waits up to RLHF_MLFLOW_FLUSH_TIMEOUT_S for its last metrics to be sent.
MLFLOW_START_TIMEOUT_S = 10.0
MLFLOW_OUTAGE_BUDGET_S = 24 * 3600.0
MLFLOW_FLUSH_TIMEOUT_S = float(os.environ.get("RLHF_MLFLOW_FLUSH_TIMEOUT_S") or 60.0)


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Per-file progress bars of datasets/transformers flood a task log; ours is enough.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Every random generator a stage draws from, saved in its checkpoints: a resumed
    run samples (PPO rollouts, dropout) exactly as the uninterrupted run would have."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    """Restore :func:`get_rng_state` (a checkpoint from before it existed has none)."""
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def airflow_tags() -> dict[str, str]:
    """Airflow exports its context to task subprocesses as AIRFLOW_CTX_* variables."""
    names = {"AIRFLOW_CTX_DAG_ID": "airflow.dag_id", "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
             "AIRFLOW_CTX_TASK_ID": "airflow.task_id", "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number"}
    return {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}


def tracking_uri(cfg: PipelineConfig) -> str | None:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def ensure_parent_run(cfg: PipelineConfig, run: RunDir, start_timeout_s: float = 60.0) -> str | None:
    """One MLflow parent run per pipeline run; its id is kept in the run directory so
    that every stage (and every retry) nests under the same parent. None when tracking
    is off or the server did not answer within ``start_timeout_s`` (0: one attempt)."""
    uri = tracking_uri(cfg)
    if not uri:
        return None
    id_file = run.path / "mlflow_parent_run_id"
    run.path.mkdir(parents=True, exist_ok=True)
    with open(run.path / ".mlflow_parent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if id_file.is_file():
            return id_file.read_text().strip()
        from .tracking import Tracker

        parent = Tracker.start(uri, cfg.tracking.experiment, run_name=os.environ.get("AIRFLOW_CTX_DAG_RUN_ID") or run.path.name,
                               start_timeout_s=start_timeout_s, tags={"rlhf.run_dir": str(run.path), "rlhf.preset": cfg.name, "rlhf.kind": "pipeline",
                                     **({"git.commit": c} if (c := git_commit()) else {}), **airflow_tags()})
        if parent.run_id:
            parent.log_params(cfg.to_dict())
            id_file.write_text(parent.run_id)
        parent.close("RUNNING")  # stays open until the register stage ends it
        return parent.run_id


@dataclass
class StageContext:
    """Handed to a stage's body by :func:`stage_run`."""

    name: str
    cfg: PipelineConfig
    run: RunDir
    device: torch.device
    rank: int
    world_size: int
    tracker: Any
    prefix: str
    started: float = field(default_factory=time.time)
    previous_elapsed_s: float = 0.0  # wall-clock of earlier attempts (restored from a checkpoint)
    cost_logged: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stage_dir(self) -> Path:
        return self.run.stage(self.name)

    @property
    def elapsed_s(self) -> float:
        return self.previous_elapsed_s + time.time() - self.started

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.is_main:
            self.tracker.log_metrics({k if "/" in k else f"{self.prefix}/{k}": float(v) for k, v in metrics.items()},
                                     step=step)

    def log_history(self, history: dict[str, list[tuple[int, float]]]) -> None:
        """Curves of every recorded metric as one image artifact."""
        if self.is_main and self.tracker.run_id:
            from .tracking import plot_curves

            self.tracker.log_figure(plot_curves(history, f"{self.name} ({self.cfg.name})"), f"plots/{self.name}_curves.png")

    def cost_metrics(self) -> dict[str, float]:
        hours = self.elapsed_s / 3600
        gpus = self.cfg.cost.num_gpus * self.cfg.cost.num_nodes if self.device.type == "cuda" else 0
        return {"time/wall_clock_s": self.elapsed_s, "cost/gpu_hours": hours * gpus,
                "cost/usd": hours * self.cfg.cost.gpu_hourly_usd * max(gpus, 1 if self.device.type == "cuda" else 0)}


def _open_tracker(name: str, cfg: PipelineConfig, run: RunDir, rank: int):
    uri = tracking_uri(cfg)
    from .tracking import NullTracker, Tracker

    if not uri or rank != 0:
        return NullTracker()

    # Server down at start: train anyway; the run (and its parent) open once it answers.
    parent = ensure_parent_run(cfg, run, start_timeout_s=MLFLOW_START_TIMEOUT_S)
    id_file = run.stage(name) / "mlflow_run_id"
    resume = id_file.read_text().strip() if id_file.is_file() else None
    tags = {"rlhf.stage": name, "rlhf.preset": cfg.name, "rlhf.run_dir": str(run.path), **airflow_tags()}
    if c := git_commit():
        tags["git.commit"] = c

    def opened(run_id: str) -> None:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)

    tracker = Tracker.start(uri, cfg.tracking.experiment, run_name=name,
                            parent_run_id=parent or (lambda: ensure_parent_run(cfg, run, start_timeout_s=0)),
                            resume_run_id=resume, tags=tags, system_metrics=cfg.tracking.system_metrics,
                            start_timeout_s=MLFLOW_START_TIMEOUT_S if parent else 0, defer=True, on_open=opened,
                            retry_budget_s=MLFLOW_OUTAGE_BUDGET_S)
    tracker.log_params(cfg.to_dict())
    return tracker


def load_run_config(run: RunDir, cfg: PipelineConfig | None) -> PipelineConfig:
    """The run directory's config.yaml is the source of truth for every stage of a run:
    the first stage writes it; later ones must agree with it (so a resumed or retried
    run can never silently mix settings)."""
    run.path.mkdir(parents=True, exist_ok=True)
    with open(run.path / ".config.lock", "w") as lock:  # stages starting side by side read/write it in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _load_run_config(run, cfg)


def _load_run_config(run: RunDir, cfg: PipelineConfig | None) -> PipelineConfig:
    if run.config_path.is_file():
        saved = PipelineConfig.load(run.config_path)
        if cfg is None or cfg.to_dict() == saved.to_dict():
            return saved
        started = [s for s in ("sft", "reward", "ppo", "evaluate") if run.stage(s).is_dir()]
        if started:
            new, old = _flat(cfg.to_dict()), _flat(saved.to_dict())
            diff = [k for k in new if new[k] != old.get(k)]
            raise ValueError(f"{run.config_path} already holds a different config (keys {diff[:8]}) and stages "
                             f"{started} have started with it: use a new --output directory, or drop --preset/--set "
                             "to reuse the saved one")
        log.info("replacing %s: no stage has started with it yet", run.config_path)
    if cfg is None:
        raise ValueError(f"{run.config_path} does not exist: give --preset (and --set) for a new run")
    cfg.save(run.config_path)
    return cfg


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def stage_run(name: str, cfg: PipelineConfig, run: RunDir) -> Iterator[StageContext]:
    """Set up a stage, time it, and close its MLflow run with the right status."""
    setup_logging()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    tracker = _open_tracker(name, cfg, run, rank)
    ctx = StageContext(name=name, cfg=cfg, run=run, device=device, rank=rank, world_size=world, tracker=tracker,
                       prefix=METRIC_PREFIX[name])
    log.info("%s: device=%s world_size=%d run=%s mlflow_run=%s", name, device, world, run.path, tracker.run_id)
    status = "FAILED"
    try:
        yield ctx
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if ctx.is_main and not ctx.cost_logged:
            ctx.tracker.log_metrics(ctx.cost_metrics(), step=0)
        # finish() has already waited for the metrics (cost_logged): do not wait twice.
        ctx.tracker.close(status, timeout=1.0 if ctx.cost_logged else MLFLOW_FLUSH_TIMEOUT_S)
        if ctx.is_main:
            log.info("%s: %s", name, _points_line(ctx.tracker.stats()))


def _points_line(stats: dict[str, int]) -> str:
    return ("mlflow metric points: produced {points_produced}, sent {points_sent}, dropped {points_dropped}, "
            "invalid {points_invalid}, pending {points_pending}").format(**stats)


def tracking_metrics(ctx: StageContext) -> dict[str, float]:
    """Flush the stage's metrics (cost included) and count them: ``tracking/points_*``."""
    if not ctx.cost_logged:
        ctx.tracker.log_metrics(ctx.cost_metrics(), step=0)
        ctx.cost_logged = True
    ctx.tracker.flush(timeout=MLFLOW_FLUSH_TIMEOUT_S)
    return {f"tracking/{k}": float(v) for k, v in ctx.tracker.stats().items()}


def finished(name: str, run_dir: RunDir) -> StageResult | None:
    """The saved result of a stage that already finished in this run (a re-run is a no-op)."""
    done = run_dir.result(name)
    if done is not None:
        log.info("%s: already finished in %s, nothing to do", name, done.final_dir)
        done.skipped = True
    return done


def finish(ctx: StageContext, final_dir: Path, metrics: dict[str, float]) -> StageResult:
    """Write result.json (the DAG reads it) and return the result."""
    metrics = {**metrics, "cost_usd": ctx.cost_metrics()["cost/usd"]}
    if ctx.is_main:
        metrics.update(tracking_metrics(ctx))
    result = StageResult(stage=ctx.name, final_dir=str(final_dir), metrics=metrics,
                         mlflow_run_id=ctx.tracker.run_id, wall_clock_s=round(ctx.elapsed_s, 3))
    if ctx.is_main:
        write_json(ctx.run.result_path(ctx.name), _result_dict(result))
    return result


def _result_dict(r: StageResult) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(r)
