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
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ALGORITHMS, PipelineConfig
from ..storage import CONFIG_FILE

RESULT_PREFIX = "RLHF_RESULT "
log = logging.getLogger("rlhf_tasks.pipeline.launch")


class StageFailed(RuntimeError):
    """The stage's process exited non-zero; the message carries the last lines it printed."""


# Stages whose code runs one rank per GPU (DeepSpeed engines, sharded data). The others
# (prepare, evaluate, register) are single-process whatever the run's resources.
DISTRIBUTED_STAGES = ("sft", "rm", *ALGORITHMS)


class ResourceError(ValueError):
    """The run's num_gpus / num_nodes / hostfile cannot be launched as configured."""


@dataclass(frozen=True)
class Resources:
    """How many processes a distributed stage gets: ``num_gpus`` per node on
    ``num_nodes`` nodes (the first ones of ``hostfile``)."""

    num_gpus: int = 1
    num_nodes: int = 1
    hostfile: str | None = None

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes


_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)(\s.*)?$")


def read_hostfile(path: str | Path) -> dict[str, int]:
    """``host slots=N`` lines (DeepSpeed's format; ``#`` comments and blank lines skipped)
    -> {host: slots}. Raises :class:`ResourceError` naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ResourceError(f"resources.hostfile={str(path)!r}: no such file (it must exist on the worker that starts "
                            "the stage, e.g. on the shared volume)")
    hosts: dict[str, int] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m:
            raise ResourceError(f"{p}:{n}: {raw.strip()!r} is not 'hostname slots=N'")
        if m.group(1) in hosts:
            raise ResourceError(f"{p}:{n}: host {m.group(1)!r} is listed twice")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ResourceError(f"{p}: no 'hostname slots=N' line")
    return hosts



def resources_for(cfg: PipelineConfig, where: str = "config") -> Resources:
    """The processes a distributed stage of this run gets (``resources.num_gpus`` per node
    on ``resources.num_nodes`` hosts of ``resources.hostfile``), checked against the
    hostfile. ``device: cpu`` runs one process: there the GPU count only prices the run."""
    if cfg.device == "cpu":
        return Resources()
    r = cfg.resources
    if r.hostfile:
        hosts = read_hostfile(r.hostfile)
        if len(hosts) < r.num_nodes:
            raise ResourceError(f"{where}: resources.num_nodes={r.num_nodes} but {r.hostfile} lists {len(hosts)} host(s)")
        short = {h: s for h, s in list(hosts.items())[:r.num_nodes] if s < r.num_gpus}
        if short:
            raise ResourceError(f"{where}: resources.num_gpus={r.num_gpus} per node but {r.hostfile} gives fewer "
                                f"slots: {short}")
    return Resources(r.num_gpus, r.num_nodes, r.hostfile)


def run_resources(run_dir: str | Path) -> Resources:
    """The one place the launcher learns a run's resources: the run directory's
    ``config.yaml`` (written when the run was resolved, with the trigger form's values
    applied). No config yet: one process."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return Resources()
    return resources_for(PipelineConfig.load(path), str(path))


def launch_argv(stage: str, args: list[str], num_gpus: int = 1, num_nodes: int = 1,
                hostfile: str | None = None, master_port: int | None = None,
                visible_devices: str | None = None) -> list[str]:
    """The command that runs ``stage``: plain python for one process, else the
    ``deepspeed`` launcher, which starts one process per GPU (on every node of the
    hostfile) and sets RANK/LOCAL_RANK/WORLD_SIZE for each.

    ``visible_devices`` (the worker's ``CUDA_VISIBLE_DEVICES``): on one node the
    launcher is told these devices by id (``--include localhost:2,3``); ``--num_gpus``
    would make it drop the variable and start on GPUs 0..N-1, which another worker may hold.
    """
    if num_gpus * num_nodes <= 1 and not hostfile:
        return [sys.executable, "-u", "-m", "rlhf_tasks", stage, *args]
    argv = ["deepspeed"]
    devices = [d.strip() for d in (visible_devices or "").split(",") if d.strip()]
    if hostfile:
        argv += ["--hostfile", hostfile, "--num_nodes", str(num_nodes), "--num_gpus", str(num_gpus)]
    elif devices:
        if len(devices) < num_gpus:
            raise ResourceError(f"resources.num_gpus={num_gpus} but this worker sees {len(devices)} GPU(s) "
                                f"(CUDA_VISIBLE_DEVICES={visible_devices})")
        argv += ["--include", "localhost:" + ",".join(devices[:num_gpus])]
    else:
        argv += ["--num_gpus", str(num_gpus)]
    if master_port:
        argv += ["--master_port", str(master_port)]
    return [*argv, "--module", "rlhf_tasks", stage, *args]


def run_stage(stage: str, run_dir: str | Path, *, env: dict[str, str] | None = None,
              echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``python -m rlhf_tasks <stage> --output run_dir`` (or the DeepSpeed launcher)
    and return the parsed ``RLHF_RESULT`` payload. The stage reads the run's config.yaml
    (written when the run was resolved); a distributed stage gets the processes that
    config asks for (:func:`run_resources`)."""
    args = ["--output", str(run_dir)]
    res = run_resources(run_dir) if stage in DISTRIBUTED_STAGES else Resources()
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    argv = launch_argv(stage, args, res.num_gpus, res.num_nodes, res.hostfile,
                       visible_devices=child_env.get("CUDA_VISIBLE_DEVICES"))
    echo = echo or (lambda line: print(line, flush=True))
    echo(f"$ {' '.join(argv)}")
    proc = None
    if argv[0] == sys.executable:  # one process: forked from the warm server when one runs (make run)
        from . import warm

        proc = warm.start([stage, *args], child_env)
    if proc is None:
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
