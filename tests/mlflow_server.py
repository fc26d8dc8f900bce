"""A real ``mlflow server`` on loopback for tests: SQLite backend store, proxied
artifacts in a temporary directory, a free port. Shared by the tracking tests and
the end-to-end tests.

The server can be stopped and started again on the same port and store, which is
how the tests simulate a tracking server that is briefly down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from rlhf_tasks.runtime.ranks import free_port

# Cold start of `mlflow server` (imports, SQLite migrations) is ~5-15 s on 2 CPU cores.
START_TIMEOUT_S = 90.0


def _mlflow_bin() -> str:
    """The ``mlflow`` script next to this interpreter (the project's virtualenv)."""
    candidate = Path(sys.executable).with_name("mlflow")
    return str(candidate) if candidate.is_file() else "mlflow"


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before answering {url}/health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server at {url} did not answer /health within {timeout_s:.0f} s")


class MlflowServer:
    """One server process over a fixed store and port; ``stop()`` then ``start()``
    brings it back with the same data (an outage, as seen by clients)."""

    def __init__(self, tmp_dir: Path, port: int | None = None):
        self.dir = Path(tmp_dir)
        (self.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.dir / "server.log", "ab")
        env = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
        self.proc = subprocess.Popen(
            [_mlflow_bin(), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
             "--artifacts-destination", str(self.dir / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        try:
            wait_healthy(self.url, START_TIMEOUT_S, self.proc)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill the whole process group (the server forks uvicorn/gunicorn workers)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.proc = None


def start_mlflow_server(tmp_dir: Path) -> tuple[str, Callable[[], None]]:
    """Start a server storing everything under ``tmp_dir``; returns (url, stop)."""
    server = MlflowServer(tmp_dir)
    server.start()
    return server.url, server.stop
