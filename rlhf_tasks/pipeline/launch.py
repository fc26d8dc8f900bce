"""Run a stage as a subprocess and hand back its result: what the Airflow tasks call.

Light on imports on purpose (no torch): the scheduler-side process only builds the
command line, streams the child's output into the task log line by line, forwards
SIGTERM/SIGINT (Airflow's way of stopping a task) to the whole process group, and parses
the ``RLHF_RESULT`` line. Training happens in the child, where a crash cannot take the
Airflow worker down with it.

Several processes (``resources.num_gpus``, or ``resources.cpu_processes`` on CPU, times
``num_nodes``) are started by DeepSpeed's launcher, on GPUs and on CPU alike.
``python -m rlhf_tasks.pipeline.launch STAGE --output RUN`` does from a shell what the task
does, and with ``--node-rank I --master-addr A`` starts node I's part of a multi-node
launch without ssh (docs/production.md).
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
from ..storage import CONFIG_FILE, RESULT_PREFIX

log = logging.getLogger("rlhf_tasks.pipeline.launch")


class StageFailed(RuntimeError):
    """The stage's process exited non-zero; the message carries the last lines it printed,
    ``code`` its exit code."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


# Stages whose code runs one rank per GPU (or CPU process): DeepSpeed engines, sharded
# data, sharded evaluation prompts. prepare and register are single-process whatever the
# run's resources.
DISTRIBUTED_STAGES = ("sft", "rm", *ALGORITHMS, "evaluate")


class ResourceError(ValueError):
    """The run's num_gpus / num_nodes / hostfile cannot be launched as configured."""


@dataclass(frozen=True)
class Resources:
    """How many processes a distributed stage gets: ``per_node`` (GPUs, or CPU processes
    when ``cpu``) on each of ``num_nodes`` nodes (the first ones of ``hostfile``)."""

    per_node: int = 1
    num_nodes: int = 1
    hostfile: str | None = None
    cpu: bool = False

    @property
    def world_size(self) -> int:
        return self.per_node * self.num_nodes

    @property
    def setting(self) -> str:
        """The config field that sets ``per_node``, for messages."""
        return "resources.cpu_processes" if self.cpu else "resources.num_gpus"


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
    """The processes a distributed stage of this run gets (``resources.num_gpus`` per node,
    or ``resources.cpu_processes`` with ``device: cpu``, on ``resources.num_nodes`` hosts
    of ``resources.hostfile``), checked against the hostfile. On CPU the GPU count only
    prices the run."""
    r, cpu = cfg.resources, cfg.device == "cpu"
    res = Resources(r.cpu_processes if cpu else r.num_gpus, r.num_nodes, r.hostfile, cpu)
    if r.hostfile:
        hosts = read_hostfile(r.hostfile)
        if len(hosts) < r.num_nodes:
            raise ResourceError(f"{where}: resources.num_nodes={r.num_nodes} but {r.hostfile} lists {len(hosts)} host(s)")
        short = {h: s for h, s in list(hosts.items())[:r.num_nodes] if s < res.per_node}
        if short:
            raise ResourceError(f"{where}: {res.setting}={res.per_node} per node but {r.hostfile} gives fewer "
                                f"slots: {short}")
    return res


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
                visible_devices: str | None = None, *, no_ssh_node: tuple[int, str] | None = None) -> list[str]:
    """The command that runs ``stage``: plain python for one process, else the
    ``deepspeed`` launcher, which starts ``num_gpus`` processes per node (GPUs, or CPU
    processes: on CPU its ``--num_gpus`` counts processes) on every node of the hostfile
    and sets RANK/LOCAL_RANK/WORLD_SIZE for each. ``--no_local_rank``: the stage reads
    LOCAL_RANK from the environment, not from an argument.

    ``visible_devices`` (the worker's ``CUDA_VISIBLE_DEVICES``): on one node the
    launcher is told these devices by id (``--include localhost:2,3``); ``--num_gpus``
    would make it drop the variable and start on GPUs 0..N-1, which another worker may hold.
    ``no_ssh_node`` (node rank, master address): DeepSpeed's multi-node launch without ssh,
    started on every node of the hostfile with its own node rank (:func:`node_argv`).
    """
    if num_gpus * num_nodes <= 1 and not hostfile:
        return [sys.executable, "-u", "-m", "rlhf_tasks", stage, *args]
    argv = ["deepspeed"]
    devices = [d.strip() for d in (visible_devices or "").split(",") if d.strip()]
    if hostfile:
        argv += ["--hostfile", hostfile, "--num_nodes", str(num_nodes), "--num_gpus", str(num_gpus)]
        if no_ssh_node is not None:
            argv += ["--no_ssh", "--node_rank", str(no_ssh_node[0]), "--master_addr", no_ssh_node[1]]
    elif devices:
        if len(devices) < num_gpus:
            raise ResourceError(f"resources.num_gpus={num_gpus} but this worker sees {len(devices)} GPU(s) "
                                f"(CUDA_VISIBLE_DEVICES={visible_devices})")
        argv += ["--include", "localhost:" + ",".join(devices[:num_gpus])]
    else:
        argv += ["--num_gpus", str(num_gpus)]
    if master_port:
        argv += ["--master_port", str(master_port)]
    return [*argv, "--no_local_rank", "--module", "rlhf_tasks", stage, *args]


def stage_env(res: Resources, env: dict[str, str] | None = None) -> dict[str, str]:
    """The stage's environment: the caller's plus ``env``, unbuffered output, this
    environment's ``bin`` first on PATH (the ``deepspeed`` launcher and the python it starts
    are this virtualenv's, whoever started the worker) and, on CPU, DeepSpeed's CPU
    accelerator (its launcher must not look for GPUs)."""
    child = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    env_bin = os.path.dirname(sys.executable)
    child["PATH"] = os.pathsep.join([env_bin, *(p for p in child.get("PATH", "").split(os.pathsep) if p != env_bin)])
    if res.cpu:
        child["DS_ACCELERATOR"] = "cpu"
        if res.world_size > 1:
            child.pop("CUDA_VISIBLE_DEVICES", None)  # the CPU accelerator reads it as its device list
    return child


def node_argv(stage: str, run_dir: str | Path, node_rank: int, master_addr: str, master_port: int) -> list[str]:
    """The command to start on node ``node_rank`` of the run's hostfile for DeepSpeed's
    multi-node launch without ssh: every node runs it, with its own rank, against the same
    run directory on storage they all see (docs/production.md)."""
    res = run_resources(run_dir)
    if not res.hostfile:
        raise ResourceError(f"{run_dir}: resources.hostfile is not set; a launch without ssh needs the hostfile "
                            "that lists the nodes")
    if not 0 <= node_rank < res.num_nodes:
        raise ResourceError(f"--node-rank {node_rank} is outside resources.num_nodes={res.num_nodes}")
    return launch_argv(stage, ["--output", str(run_dir)], res.per_node, res.num_nodes, res.hostfile, master_port,
                       no_ssh_node=(node_rank, master_addr))


def run_stage(stage: str, run_dir: str | Path, *, env: dict[str, str] | None = None,
              echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``python -m rlhf_tasks <stage> --output run_dir`` (or the DeepSpeed launcher)
    and return the parsed ``RLHF_RESULT`` payload. The stage reads the run's config.yaml
    (written when the run was resolved); a distributed stage gets the processes that
    config asks for (:func:`run_resources`)."""
    args = ["--output", str(run_dir)]
    res = run_resources(run_dir) if stage in DISTRIBUTED_STAGES else Resources()
    child_env = stage_env(res, env)
    # One node: a port of our own for the ranks' rendezvous (DeepSpeed's default, 29500, is
    # taken by the other stage when SFT and RM run side by side on one worker).
    port = free_port() if res.world_size > 1 and not res.hostfile else None
    argv = launch_argv(stage, args, res.per_node, res.num_nodes, res.hostfile, port,
                       visible_devices=None if res.cpu else child_env.get("CUDA_VISIBLE_DEVICES"))
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
        raise StageFailed(f"stage {stage!r} exited with code {code}; last lines:\n" + "\n".join(tail[-15:]), code)
    return result


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def free_port() -> int:
    """A free TCP port on loopback (no torch import here: runtime.ranks has the same)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """``python -m rlhf_tasks.pipeline.launch STAGE --output RUN [--node-rank I --master-addr A]``:
    the stage as the DAG's task runs it (its processes from the run's config.yaml), or, with
    ``--node-rank``, this node's part of a multi-node launch without ssh."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rlhf_tasks.pipeline.launch", description=main.__doc__)
    ap.add_argument("stage")
    ap.add_argument("--output", required=True, type=Path, help="the run directory (its config.yaml is read)")
    ap.add_argument("--node-rank", type=int, default=None, help="this node's index in the hostfile (no-ssh launch)")
    ap.add_argument("--master-addr", default=None, help="node 0's address the others reach (no-ssh launch)")
    ap.add_argument("--master-port", type=int, default=29500)
    a = ap.parse_args(argv)
    if a.node_rank is None:
        result = run_stage(a.stage, a.output)
        print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)
        return 0
    if not a.master_addr:
        ap.error("--node-rank needs --master-addr (node 0's address)")
    cmd = node_argv(a.stage, a.output, a.node_rank, a.master_addr, a.master_port)
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=stage_env(run_resources(a.output)))


if __name__ == "__main__":
    sys.exit(main())
