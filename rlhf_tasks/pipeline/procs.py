"""Processes started in sessions of their own, and stopping them with every descendant."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``argv`` in a session of its own (a terminal's Ctrl-C reaches only us; we stop
    its whole process group), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop_groups(procs: Iterable[subprocess.Popen], grace_s: float = 30) -> None:
    """SIGTERM to the process group of each of ``procs`` at once; SIGKILL to a group whose
    leader is still there after ``grace_s`` seconds."""
    procs = list(procs)
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"==> {' '.join(map(str, proc.args[:3]))} did not stop within {grace_s:.0f} s: SIGKILL", flush=True)
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=30)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # The group outlives its leader (a worker it forked): signal it even after the leader exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def become_subreaper() -> None:
    """On Linux, descendants orphaned while we run (a task runner, a stage in a session of its
    own) are re-parented to this process rather than to init, so that stopping finds them."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_child_subreaper = 36  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def stop_all(procs: Iterable[subprocess.Popen], grace_s: float = 30) -> None:
    """Stop ``procs``' process groups, then every descendant of ours still alive."""
    import psutil

    me = psutil.Process()
    before = me.children(recursive=True)
    stop_groups(procs, grace_s)
    left = {p for p in (*before, *me.children(recursive=True)) if _alive(p)}
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(left, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap_adopted(ours: Iterable[subprocess.Popen]) -> None:
    """Collect exited orphans re-parented to us (:func:`become_subreaper`); ``ours`` are left
    to their Popen, which reads their exit code."""
    import psutil

    pids = {p.pid for p in ours}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.pid not in pids and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
