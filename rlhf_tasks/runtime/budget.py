"""The run's budget: ``resources.budget_usd`` and/or ``resources.budget_gpu_hours``.

What a run has spent is what the report counts (rlhf_tasks/runtime/cost.py): each finished
stage's ``cost/usd`` and ``cost/gpu_hours`` (result.json), plus the running stage's so far.
A stage checks it when it starts and, while it runs, every ``CHECK_EVERY_S`` seconds: at
``WARN_FRACTION`` of a limit it logs a warning (once), at the limit it stops, the reason in its
log, in ``budget.json`` of the run directory (which the report shows) and its exit code
:data:`EXIT_OVER_BUDGET`. No budget (the default): nothing is checked.

Airflow's own Deadline Alerts fix their interval when the DAG is parsed (or from an Airflow
Variable), not per run, and see time, not what a GPU-hour costs: the per-run budget of the
trigger form is enforced here, by the stages.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cost import cost_usd, gpu_hours, stage_cost

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..storage import RunDir

log = logging.getLogger("rlhf_tasks")

EXIT_OVER_BUDGET = 7
WARN_FRACTION = 0.8
CHECK_EVERY_S = 10.0
BUDGET_FILE = "budget.json"


class BudgetExceeded(RuntimeError):
    """The run has spent its budget; the message says what, where and how much."""


@dataclass(frozen=True)
class Spent:
    usd: float = 0.0
    gpu_hours: float = 0.0

    def __add__(self, other: Spent) -> Spent:
        return Spent(self.usd + other.usd, self.gpu_hours + other.gpu_hours)


def has_budget(cfg: PipelineConfig) -> bool:
    return cfg.resources.budget_usd is not None or cfg.resources.budget_gpu_hours is not None


def spent_by_others(cfg: PipelineConfig, run: RunDir, stage: str) -> Spent:
    """What the run's finished stages other than ``stage`` cost (as the report counts it: a
    result without its cost recorded is priced from its wall-clock)."""
    total = Spent()
    for path in sorted(run.path.glob("*/result.json")):
        r = json.loads(path.read_text())
        if r.get("stage") == stage or r.get("skipped"):
            continue
        total = total + Spent(*stage_cost(r.get("metrics") or {}, float(r.get("wall_clock_s") or 0.0),
                                          cfg.resources.gpu_hourly_usd, cfg.resources.world_size))
    return total


def verdict(cfg: PipelineConfig, spent: Spent) -> tuple[str, str] | None:
    """("stop" | "warn", why) when ``spent`` reaches a limit or WARN_FRACTION of one."""
    res = cfg.resources
    for used, limit, unit in ((spent.usd, res.budget_usd, "USD"), (spent.gpu_hours, res.budget_gpu_hours, "GPU-hours")):
        if limit is None:
            continue
        if used >= limit:
            return "stop", f"the run has spent {used:.4g} {unit} of its budget of {limit:.4g} {unit}"
        if used >= WARN_FRACTION * limit:
            return "warn", f"the run has spent {used:.4g} {unit}, {used / limit:.0%} of its budget of {limit:.4g} {unit}"
    return None


def record(run: RunDir, stage: str, reason: str, spent: Spent) -> None:
    from ..storage import write_json

    write_json(run.path / BUDGET_FILE, {"stage": stage, "reason": reason, "spent_usd": spent.usd,
                                        "spent_gpu_hours": spent.gpu_hours})


def check(cfg: PipelineConfig, run: RunDir, stage: str, current: Spent = Spent(), warned: set | None = None) -> None:
    """Raise BudgetExceeded (after recording it) when the run is at its limit; warn once at
    WARN_FRACTION."""
    if not has_budget(cfg):
        return
    spent = spent_by_others(cfg, run, stage) + current
    v = verdict(cfg, spent)
    if v is None:
        return
    kind, why = v
    if kind == "stop":
        reason = f"budget exceeded: {why}; {stage} stopped"
        log.error("%s: %s", stage, reason)
        record(run, stage, reason, spent)
        raise BudgetExceeded(reason)
    if warned is None or "warn" not in warned:
        log.warning("%s: budget warning: %s", stage, why)
        if warned is not None:
            warned.add("warn")


@contextmanager
def enforced(cfg: PipelineConfig, run: RunDir, stage: str, current: Callable[[], Spent]) -> Iterator[None]:
    """Check at the start, then every CHECK_EVERY_S in a thread: at the limit the main thread
    gets BudgetExceeded (through a signal handler, so a long computation stops at its next
    Python instruction)."""
    if not has_budget(cfg):
        yield
        return
    warned: set = set()
    check(cfg, run, stage, current(), warned)
    stop, reason = threading.Event(), []

    def raise_in_main(_signum, _frame) -> None:
        raise BudgetExceeded(reason[0] if reason else "budget exceeded")

    def watch() -> None:
        while not stop.wait(CHECK_EVERY_S):
            try:
                check(cfg, run, stage, current(), warned)
            except BudgetExceeded as e:
                reason.append(str(e))
                signal.raise_signal(signal.SIGUSR2)
                return

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR2, raise_in_main) if in_main else None
    watcher = threading.Thread(target=watch, name=f"budget-{stage}", daemon=True)
    if in_main:
        watcher.start()
    try:
        yield
    finally:
        stop.set()
        if in_main:
            signal.signal(signal.SIGUSR2, previous)


def current_of(cfg: PipelineConfig, elapsed_s: Callable[[], float], on_gpu: bool) -> Callable[[], Spent]:
    """The running stage's cost so far, as StageContext.cost_metrics prices it."""
    res = cfg.resources

    def now() -> Spent:
        s = elapsed_s()
        return Spent(cost_usd(s, res.gpu_hourly_usd, res.world_size, on_gpu), gpu_hours(s, res.world_size, on_gpu))
    return now
