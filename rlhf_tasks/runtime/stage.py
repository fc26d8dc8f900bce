"""What every stage shares: seeding, device and process group, the run directory, the
MLflow run (resumed on retry), wall-clock time and cost, and the final result record."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ALGORITHMS, STAGES, PipelineConfig
from ..storage import MARKER, RunDir, StageResult, latest_checkpoint, write_json
from ..tracking import TrackerLike, open_stage_tracker
from . import budget
from .cost import cost_usd, gpu_hours
from .engine import init_distributed, resolve_device
from .watchdog import Watchdog, phase, watching

log = logging.getLogger("rlhf_tasks")

# Metric prefixes as named in the design (the reward stage logs under rm/).
METRIC_PREFIX = {**{s: s for s in STAGES}, "evaluate": "eval"}
# A finished stage waits up to RLHF_MLFLOW_FLUSH_TIMEOUT_S for its last metrics to be sent
# (how long a stage waits for the server at start, and holds metrics through an outage:
# tracking.runs.MLFLOW_START_TIMEOUT_S and MLFLOW_OUTAGE_BUDGET_S).
# Read when a stage ends, not at import: a warm stage process imported this module earlier
# (rlhf_tasks/pipeline/warm.py).
def mlflow_flush_timeout_s() -> float:
    return float(os.environ.get("RLHF_MLFLOW_FLUSH_TIMEOUT_S") or 60.0)


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


def stage_seed(name: str, cfg: PipelineConfig) -> int:
    """The seed of a stage's own randomness (initialisation, dropout, sampling, batch order):
    ``alignment_seed`` for step 3 when set, else ``seed``. The data split always uses ``seed``."""
    return cfg.alignment_seed if name in ALGORITHMS and cfg.alignment_seed is not None else cfg.seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def own_streams(ctx: StageContext) -> None:
    """From here on each rank draws its own random stream (dropout masks, sampled answers):
    every rank starts from the same seed, so that the models they build are the same, and
    would otherwise draw the same numbers for different batches. One process: unchanged."""
    if ctx.world_size > 1:
        seed_everything(stage_seed(ctx.name, ctx.cfg) + 1_000_003 * ctx.rank)


@dataclass(frozen=True)
class StageEnd:
    """How a stage ended, measured once: its time and cost (``time/wall_clock_s``,
    ``cost/gpu_hours``, ``cost/usd``; logged to MLflow and stored in result.json alike) and
    its metric points (``tracking/points_*``, counted after the last flush)."""

    cost: dict[str, float]
    points: dict[str, float]


@dataclass
class StageContext:
    """Handed to a stage's body by :func:`stage_run`."""

    name: str
    cfg: PipelineConfig
    run: RunDir
    device: torch.device
    rank: int
    world_size: int
    tracker: TrackerLike
    prefix: str
    started: float = field(default_factory=time.time)
    previous_elapsed_s: float = 0.0  # wall-clock of earlier attempts (restored from a checkpoint)
    end: StageEnd | None = None  # set once, by stage_run, when the body has returned or raised

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
            from ..tracking import plot_curves

            self.tracker.log_figure(plot_curves(history, f"{self.name} ({self.cfg.name})"), f"plots/{self.name}_curves.png")

    def cost_metrics(self) -> dict[str, float]:
        elapsed, res, on_gpu = self.elapsed_s, self.cfg.resources, self.device.type == "cuda"
        gpus = res.world_size
        # CPU seconds of this process (this attempt; a warm-started stage's own, without the
        # imports its server paid): wall-clock on a shared machine says more about the others.
        return {"time/wall_clock_s": elapsed, "time/cpu_s": time.process_time(),
                "cost/gpu_hours": gpu_hours(elapsed, gpus, on_gpu),
                "cost/usd": cost_usd(elapsed, res.gpu_hourly_usd, gpus, on_gpu)}


@contextlib.contextmanager
def stage_run(name: str, cfg: PipelineConfig, run: RunDir) -> Iterator[StageContext]:
    """Set up a stage; when its body returns or raises, :func:`end_stage` times and costs it
    once and closes its MLflow run with the right status (``ctx.end`` holds the figures)."""
    setup_logging()
    seed_everything(stage_seed(name, cfg))
    device = resolve_device(cfg.device)
    bound_min = cfg.resources.collective_timeout_minutes
    # The process group's own timeout is the backstop; the watchdog, which names the phase,
    # fires a minute before it.
    rank, world = init_distributed(device, bound_min + 1.0)
    refuse_other_world(name, run, world)
    tracker = open_stage_tracker(name, cfg, run, rank)
    ctx = StageContext(name=name, cfg=cfg, run=run, device=device, rank=rank, world_size=world, tracker=tracker,
                       prefix=METRIC_PREFIX[name])
    log.info("%s: device=%s world_size=%d rank=%d run=%s mlflow_run=%s", name, device, world, rank, run.path,
             tracker.run_id)
    dog = Watchdog(name, rank, world, bound_min * 60, on_hang=lambda _msg: tracker.close("FAILED", timeout=2.0)) \
        if world > 1 else None
    status = "FAILED"
    try:
        with watching(dog), phase("loading"):
            yield ctx
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ctx.end = end_stage(ctx, status)


def refuse_other_world(name: str, run: RunDir, world: int) -> None:
    """A stage whose newest complete checkpoint was written by another number of ranks is
    refused before anything loads: its ZeRO optimizer state is split by rank and its data
    position counts each rank's batches, so it resumes only on as many ranks as wrote it."""
    found = latest_checkpoint(run.checkpoints(name))
    if found is None:
        return
    step, path = found
    saved = json.loads((path / MARKER).read_text()).get("world_size")
    if saved is not None and saved != world:
        raise ValueError(f"{name}: the newest complete checkpoint {path} (step {step}) was written by {saved} "
                         f"rank(s) and this attempt has {world}: a checkpoint resumes only on as many ranks as wrote "
                         f"it (its ZeRO optimizer state is split by rank, its data position counts each rank's "
                         f"batches). Run the stage on {saved} rank(s) (resources.cpu_processes on CPU, "
                         f"resources.num_gpus x resources.num_nodes on GPUs), or remove {path.parent} to train the "
                         "stage afresh")


def end_stage(ctx: StageContext, status: str) -> StageEnd:
    """Cost the stage once, log that, wait (up to MLFLOW_FLUSH_TIMEOUT_S) for its metrics to
    reach the server, count them, and close the run; the last log line gives the counts."""
    cost = ctx.cost_metrics()
    points: dict[str, float] = {}
    if ctx.is_main:
        ctx.tracker.log_metrics(cost, step=0)
        ctx.tracker.flush(timeout=mlflow_flush_timeout_s())
        points = {f"tracking/{k}": float(v) for k, v in ctx.tracker.stats().items()}
    ctx.tracker.close(status, timeout=1.0)  # flushed above: what is still pending is dropped, counted
    if ctx.is_main:
        log.info("%s: %s", ctx.name, points_line(ctx.tracker.stats()))
    return StageEnd(cost=cost, points=points)


def points_line(stats: dict[str, int]) -> str:
    return ("mlflow metric points: produced {points_produced}, sent {points_sent}, dropped {points_dropped}, "
            "invalid {points_invalid}, pending {points_pending}").format(**stats)


def finished(name: str, run_dir: RunDir) -> StageResult | None:
    """The saved result of a stage that already finished in this run (a re-run is a no-op)."""
    done = run_dir.result(name)
    if done is not None:
        log.info("%s: already finished in %s, nothing to do", name, done.final_dir)
        done.skipped = True
    return done


def finish(ctx: StageContext, end: StageEnd, final_dir: Path, metrics: dict[str, float]) -> StageResult:
    """Write result.json (the DAG reads it) and return the result: the body's metrics, the
    cost and the point counts of ``end``."""
    result = StageResult(stage=ctx.name, final_dir=str(final_dir),
                         metrics={**metrics, "cost_usd": end.cost["cost/usd"],
                                  "cost_gpu_hours": end.cost["cost/gpu_hours"], **end.points},
                         mlflow_run_id=ctx.tracker.run_id, wall_clock_s=round(end.cost["time/wall_clock_s"], 3))
    if ctx.is_main:
        write_json(ctx.run.result_path(ctx.name), dataclasses.asdict(result))
    return result


StageBody = Callable[[StageContext], tuple[Path, dict[str, float]]]
StageEntry = Callable[..., StageResult]


def stage(name: str | None = None) -> Callable[[StageBody], StageEntry]:
    """``@stage("sft") def run(ctx) -> (final_dir, metrics)`` makes the stage's entry point
    ``run(cfg, run_dir) -> StageResult``: a stage that already finished in the run returns
    its saved result (a re-run is a no-op); otherwise the body runs inside
    :func:`stage_run` and, once its MLflow run is closed, :func:`finish` records what it
    returned with the stage's cost. ``@stage()``: one body for several stages (the RL
    algorithms), called ``run(cfg, run_dir, name=<stage>)``."""
    def wrap(body: StageBody) -> StageEntry:
        @functools.wraps(body)
        def run(cfg: PipelineConfig, run_dir: RunDir, name: str | None = name) -> StageResult:
            if name is None:
                raise TypeError(f"{body.__module__}.{body.__name__} runs several stages: give name=<stage>")
            if (done := finished(name, run_dir)) is not None:
                return done
            with stage_run(name, cfg, run_dir) as ctx, budget.enforced(
                    cfg, run_dir, name, budget.current_of(cfg, lambda: ctx.elapsed_s, ctx.device.type == "cuda")):
                final_dir, metrics = body(ctx)
            assert ctx.end is not None  # set by stage_run on the way out
            return finish(ctx, ctx.end, final_dir, metrics)
        return run
    return wrap
