"""The MLflow runs of a pipeline run: one parent run per run directory, one child run per
stage (resumed by a retried task), their tags, and the one rule for the tracking URI."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .calls import open_run
from .client import Tracker
from .interface import NullTracker, TrackerLike

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..storage import RunDir

# A stage waits this long for the MLflow server at start, then trains on and opens its run
# in the background once the server answers; metrics are kept (bounded buffer) through an
# outage of up to MLFLOW_OUTAGE_BUDGET_S and sent when it ends.
MLFLOW_START_TIMEOUT_S = 10.0
MLFLOW_OUTAGE_BUDGET_S = 24 * 3600.0


def tracking_uri(cfg: PipelineConfig) -> str | None:
    """The tracking server of a run, the same for every task: the config's
    ``tracking.tracking_uri`` (the explicit choice for this run) first, then
    ``$MLFLOW_TRACKING_URI`` (the deployment's default); None (tracking off) if neither."""
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def git_commit() -> str | None:
    """The code's short commit hash, ``+dirty`` when tracked files differ from it; None
    outside a git checkout. Tagged on every run (``git.commit``) and in benchmark results."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "") if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


def airflow_tags() -> dict[str, str]:
    """Airflow exports its context to task subprocesses as AIRFLOW_CTX_* variables."""
    names = {"AIRFLOW_CTX_DAG_ID": "airflow.dag_id", "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
             "AIRFLOW_CTX_TASK_ID": "airflow.task_id", "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number"}
    return {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}


def run_tags() -> dict[str, str]:
    """Where a run comes from: the code's git commit (when known) and the Airflow task."""
    return {**({"git.commit": c} if (c := git_commit()) else {}), **airflow_tags()}


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
        tags = {"rlhf.run_dir": str(run.path), "rlhf.preset": cfg.name, "rlhf.kind": "pipeline", **run_tags()}
        parent = Tracker.start(uri, cfg.tracking.experiment,
                               run_name=os.environ.get("AIRFLOW_CTX_DAG_RUN_ID") or run.path.name,
                               start_timeout_s=start_timeout_s, tags=tags)
        if parent.run_id:
            parent.log_params(cfg.to_dict())
            id_file.write_text(parent.run_id)
        parent.close("RUNNING")  # stays open until the register stage ends it
        return parent.run_id


def open_stage_tracker(name: str, cfg: PipelineConfig, run: RunDir, rank: int) -> TrackerLike:
    """The stage's MLflow run, nested under the pipeline's parent run and resumed by a
    retried task; a :class:`NullTracker` on ranks other than 0 or with tracking off.
    A server down at start does not stop the stage: the run (and its parent) open once
    it answers."""
    uri = tracking_uri(cfg)
    if not uri or rank != 0:
        return NullTracker()

    parent = ensure_parent_run(cfg, run, start_timeout_s=MLFLOW_START_TIMEOUT_S)
    id_file = run.stage(name) / "mlflow_run_id"
    resume = id_file.read_text().strip() if id_file.is_file() else None
    tags = {"rlhf.stage": name, "rlhf.preset": cfg.name, "rlhf.run_dir": str(run.path), **run_tags()}

    def open_fn(client: Any) -> Any:
        """One attempt: the parent run first (it may not exist yet), then the stage's run."""
        parent_id = parent or ensure_parent_run(cfg, run, start_timeout_s=0)
        if parent_id is None:
            raise ConnectionError("the pipeline's parent run cannot be opened yet")
        opened = open_run(client, cfg.tracking.experiment, name, parent_id, resume, tags)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(opened.info.run_id)
        return opened

    tracker = Tracker.open(uri, open_fn, system_metrics=cfg.tracking.system_metrics,
                           start_timeout_s=MLFLOW_START_TIMEOUT_S if parent else 0, defer=True,
                           retry_budget_s=MLFLOW_OUTAGE_BUDGET_S)
    tracker.log_params(cfg.to_dict())
    return tracker
