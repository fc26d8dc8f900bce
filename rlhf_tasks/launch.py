"""Run a stage as a subprocess and hand back its result: what the Airflow tasks call.

Light on imports on purpose (no torch): the scheduler-side process only builds the
command line, streams the child's output into the task log line by line, forwards
SIGTERM/SIGINT (Airflow's way of stopping a task) to the whole process group, and parses
the ``RLHF_RESULT`` line. Training happens in the child, where a crash cannot take the
Airflow worker down with it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULT_PREFIX = "RLHF_RESULT "
log = logging.getLogger("rlhf_tasks.launch")


class StageFailed(RuntimeError):
    """The stage's process exited non-zero; the message carries the last lines it printed."""


def launch_argv(stage: str, args: list[str], num_gpus: int = 1, num_nodes: int = 1,
                hostfile: str | None = None, master_port: int | None = None) -> list[str]:
    """The command that runs ``stage``: plain python for one process, else the
    ``deepspeed`` launcher, which starts one process per GPU (on every node of the
    hostfile) and sets RANK/LOCAL_RANK/WORLD_SIZE for each."""
    if num_gpus * num_nodes <= 1:
        return [sys.executable, "-u", "-m", "rlhf_tasks", stage, *args]
    argv = ["deepspeed"]
    if hostfile:
        argv += ["--hostfile", hostfile, "--num_nodes", str(num_nodes)]
    argv += ["--num_gpus", str(num_gpus)]
    if master_port:
        argv += ["--master_port", str(master_port)]
    return [*argv, "--module", "rlhf_tasks", stage, *args]


def run_stage(stage: str, run_dir: str | Path, *, preset: str | None = None, overrides: list[str] | None = None,
              num_gpus: int = 1, num_nodes: int = 1, hostfile: str | None = None, env: dict[str, str] | None = None,
              echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``python -m rlhf_tasks <stage> --output run_dir`` (or the DeepSpeed launcher)
    and return the parsed ``RLHF_RESULT`` payload."""
    args = ["--output", str(run_dir)]
    if preset:
        args += ["--preset", preset]
    for o in overrides or []:
        args += ["--set", o]
    argv = launch_argv(stage, args, num_gpus, num_nodes, hostfile)
    echo = echo or (lambda line: print(line, flush=True))
    echo(f"$ {' '.join(argv)}")
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=child_env, start_new_session=True)

    def forward(signum, _frame):
        echo(f"received signal {signum}: stopping the {stage} stage (it resumes from its last checkpoint)")
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} \
        if _in_main_thread() else {}
    result: dict[str, Any] | None = None
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT_PREFIX):
                try:
                    result = json.loads(line[len(RESULT_PREFIX):])
                except json.JSONDecodeError:
                    echo(f"unreadable result line: {line[:200]}")
                continue
            echo(line)
            tail = (tail + [line])[-30:]
        code = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    if code != 0 or result is None:
        raise StageFailed(f"stage {stage!r} exited with code {code}; last lines:\n" + "\n".join(tail[-15:]))
    return result


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
