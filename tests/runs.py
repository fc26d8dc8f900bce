"""Trained runs that the whole test session shares, and how a test builds on one.

Training is most of the suite's time, so each recipe is trained once per session:
``pipeline_through_airflow`` runs tiny-cpu's whole DAG through Airflow (with an SFT kill and
resume along the way, see tests/e2e/test_pipeline.py), and its run directory is also the
trained run that tests/test_training.py and the alignment-stage tests read. A test that
trains one more stage takes a ``fork_run`` of it: a new run directory where SFT and RM
have already finished, so that only its own stage runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhf_tasks.storage import RunDir

RESULT_PREFIX = "RLHF_RESULT "
# The e2e pipeline's bound: tiny-cpu through Airflow took 381 s on a 2-core AMD EPYC VM.
PIPELINE_TIMEOUT_S = 1500


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m rlhf_tasks ARGS`` in this environment (offline, CPU, the session storage)."""
    return subprocess.run([sys.executable, "-m", "rlhf_tasks", *args], capture_output=True, text=True, timeout=timeout)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    """The stage's result line, after checking it exited 0."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)][-1]
    return json.loads(line.removeprefix(RESULT_PREFIX))


def stage_result(run: RunDir, stage: str) -> dict:
    """A finished stage's result.json (what its RLHF_RESULT line said)."""
    return json.loads(run.result_path(stage).read_text())


def fork_run(src: RunDir, where: Path, *overrides: str, stages: tuple[str, ...] = ("sft", "rm")) -> RunDir:
    """A new run directory under ``where`` in which ``stages`` of ``src`` have finished: their
    final models and result.json copied (a few MB on tiny-cpu; a copy, so that nothing a
    test does reaches the shared run), and src's config.yaml, with ``overrides``
    (``key=value``, for the stages still to run) applied. Run the next stage with
    ``--output fork.path`` and no ``--preset``: it reads the fork's config."""
    from rlhf_tasks.config import PipelineConfig

    where.mkdir(parents=True, exist_ok=True)
    dst = RunDir(tempfile.mkdtemp(prefix="fork-", dir=where))
    PipelineConfig.load(src.config_path, list(overrides)).save(dst.config_path)
    for stage in stages:
        shutil.copytree(src.final(stage), dst.final(stage))
        result = stage_result(src, stage)
        result["final_dir"] = str(dst.final(stage))
        dst.result_path(stage).write_text(json.dumps(result))
    return dst


@dataclass
class PipelineRun:
    """One ``airflow dags test`` of the whole DAG, and where to read it back."""

    proc: subprocess.CompletedProcess
    run_dir: Path | None
    mlflow_url: str
    killed: dict
    elapsed: float
    log: Path

    def failure(self, stages: tuple[str, ...]) -> str | None:
        """Why ``stages`` cannot be read from this run, or None if they all finished."""
        if self.run_dir is None:
            return f"the pipeline made no run directory (exit {self.proc.returncode}); see {self.log}"
        missing = [s for s in stages if not (self.run_dir / s / "result.json").is_file()]
        return f"stages {missing} did not finish in {self.run_dir}; see {self.log}" if missing else None


def _kill_sft_after_first_checkpoint(storage: Path, stop: threading.Event, killed: dict) -> None:
    """Wait for sft/checkpoints/step-N/COMPLETE, then SIGKILL the sft stage process: the one
    holding the stage's lock, which names it (``pid N on host ...``), whether it was started
    cold or forked from the warm server (rlhf_tasks/pipeline/warm.py)."""
    while not stop.is_set():
        markers = list(storage.glob("runs/*/sft/checkpoints/step-*/COMPLETE"))
        if markers:
            lock = markers[0].parents[3] / ".locks" / "sft.lock"
            words = lock.read_text().split() if lock.is_file() else []
            if len(words) > 1 and words[0] == "pid":
                pid = int(words[1])
                killed["step"] = int(markers[0].parent.name.split("-")[1])
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
        time.sleep(0.2)


@contextlib.contextmanager
def pipeline_through_airflow(h: Path) -> Iterator[PipelineRun]:
    """tiny-cpu's whole DAG through ``airflow dags test`` against a real MLflow server (kept
    up until the context ends, for the tests that read it back). While SFT trains, its
    process is SIGKILLed right after its first complete checkpoint: Airflow retries the task,
    which must resume from that checkpoint."""
    from rlhf_tasks.pipeline import local
    from rlhf_tasks.pipeline.warm import warm_stages

    env = local.airflow_env(h)
    env["RLHF_HOME"] = str(h)
    env["RLHF_STORAGE"] = str(h / "storage")
    env.pop("MLFLOW_TRACKING_URI", None)
    # A checkpoint early in SFT, so that the kill lands mid-training.
    conf = {"preset": "tiny-cpu", "overrides": ["sft.checkpoint_every_steps=40"]}
    local.init_airflow(env)
    stop, killed = threading.Event(), {}
    watcher = threading.Thread(target=_kill_sft_after_first_checkpoint,
                               args=(Path(env["RLHF_STORAGE"]), stop, killed), daemon=True)
    with local.mlflow_server(h) as url, warm_stages(h, env):  # the stages forked warm, as make run does
        env["MLFLOW_TRACKING_URI"] = url
        watcher.start()
        t0 = time.time()
        try:
            proc = subprocess.run([local.bin_path("airflow"), "dags", "test", local.DAG_ID, "--conf", json.dumps(conf)],
                                  env=env, capture_output=True, text=True, timeout=PIPELINE_TIMEOUT_S)
        finally:
            stop.set()
        log = h / "dags_test.log"
        log.write_text(proc.stdout + proc.stderr)
        yield PipelineRun(proc=proc, run_dir=local.latest_run_dir(Path(env["RLHF_STORAGE"])), mlflow_url=url,
                          killed=killed, elapsed=time.time() - t0, log=log)
