"""Real stage processes for the fault tests: start ``python -m rlhf_tasks <stage>``, follow
its log line by line (the ``<stage>: step N/M`` lines say where training is), kill it
with SIGKILL at a chosen moment, read its result."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_tasks.storage import MARKER, RunDir

# Small tiny-cpu runs: a checkpoint every few steps, a log line every step.
INTERVAL = {"sft": 8, "rm": 8, "ppo": 3}
TOTAL = {"sft": 24, "rm": 24, "ppo": 9}
FAST = ["data.max_eval_samples=32", "tracking.system_metrics=false",
        *(f"{s}.{k}" for s in ("sft", "rm") for k in (
            "epochs=1", f"max_steps={TOTAL[s]}", f"checkpoint_every_steps={INTERVAL[s]}", "log_every_steps=1")),
        "ppo.epochs=1", f"ppo.max_steps={TOTAL['ppo']}", f"ppo.checkpoint_every_steps={INTERVAL['ppo']}",
        "ppo.log_every_steps=1"]
# The metrics of each stage that a resumed run must reproduce.
KEY_METRICS = {"sft": ("perplexity", "eval_loss"), "rm": ("accuracy", "chosen_score", "rejected_score"),
               "ppo": ("reward_first", "reward_last", "kl_last")}
STEP_LINE = re.compile(r"\b(sft|rm|ppo|grpo|rloo|dpo): step (\d+)/(\d+)")
RESUMED_LINE = re.compile(r"resumed from (\S+) \((?:step|iteration) (\d+)")
STAGE_TIMEOUT_S = float(os.environ.get("RLHF_FAULT_STAGE_TIMEOUT_S", "600"))


def fault_seeds(default: list[int]) -> list[int]:
    """Kill moments per stage: the CI default, or seeds 1..N with RLHF_FAULT_SEEDS=N."""
    n = int(os.environ.get("RLHF_FAULT_SEEDS") or 0)
    return list(range(1, n + 1)) if n > 0 else default


class StageProc:
    """One stage process; its combined stdout/stderr is collected by a thread."""

    def __init__(self, stage: str, run_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.stage = stage
        argv = [sys.executable, "-u", "-m", "rlhf_tasks", stage, "--output", str(run_dir), *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True)
        self.lines: list[str] = []
        self.steps: list[int] = []
        self.killed = False
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                if (m := STEP_LINE.search(line)) and m.group(1) == self.stage:
                    self.steps.append(int(m.group(2)))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    @property
    def last_step(self) -> int:
        with self._cv:
            return self.steps[-1] if self.steps else 0

    def wait_for(self, pred: Callable[[], bool], timeout: float = STAGE_TIMEOUT_S, poll: float = 0.02) -> bool:
        """Wait until ``pred()`` holds (True) or the process has exited (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            if self.proc.poll() is not None and not self._reader.is_alive():
                return pred()
            with self._cv:
                self._cv.wait(poll)
        raise TimeoutError(f"{self.stage}: condition not reached in {timeout:.0f} s; last lines:\n{self.tail()}")

    def wait_step(self, step: int, timeout: float = STAGE_TIMEOUT_S) -> bool:
        return self.wait_for(lambda: self.last_step >= step, timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: no handler, no cleanup, as on a lost machine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        self.killed = True

    def finish(self, timeout: float = STAGE_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        return code

    def result(self, timeout: float = STAGE_TIMEOUT_S) -> dict:
        code = self.finish(timeout)
        assert code == 0, f"{self.stage} exited {code}:\n{self.tail()}"
        line = [ln for ln in self.lines if ln.startswith("RLHF_RESULT ")][-1]
        return json.loads(line.removeprefix("RLHF_RESULT "))

    def resumed_from(self) -> int | None:
        """The step this process resumed from (its log), None if it started afresh."""
        found = [RESUMED_LINE.search(ln) for ln in self.lines]
        found = [m for m in found if m]
        return int(found[-1].group(2)) if found else None

    def text(self) -> str:
        with self._cv:
            return "\n".join(self.lines)

    def tail(self, n: int = 40) -> str:
        with self._cv:
            return "\n".join(self.lines[-n:])

    def __enter__(self) -> StageProc:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def complete_steps(run: RunDir, stage: str) -> list[int]:
    root = run.checkpoints(stage)
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / MARKER).is_file())


def partial_dirs(run: RunDir, stage: str) -> list[str]:
    root = run.checkpoints(stage)
    return sorted(p.name for p in root.glob(".step-*")) if root.is_dir() else []


def run_stage(stage: str, run_dir: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run a stage to the end; its result."""
    with StageProc(stage, run_dir, *args, env=env) as p:
        return p.result()
