"""Warm stage processes for the embedded pipeline: the imports paid once, not per stage.

Every stage is its own process (a crash cannot take Airflow down, SIGTERM stops it, the
OS frees its memory). Started cold, each spends seconds of CPU importing torch,
transformers, DeepSpeed, MLflow and datasets before its first step: on tiny-cpu, six
stage processes pay this more often than they train. ``python -m rlhf_tasks.pipeline.warm
SOCKET`` (started by ``local.py``'s ``make run``) imports them once and waits on a Unix
socket; :func:`start` asks it for a stage, and it forks: the child is a new process with
everything imported, running ``python -m rlhf_tasks <args>``'s ``main`` with the task's
environment, its output on a pipe the caller reads, in a session of its own (the caller
signals its group as it would a ``Popen``'s). The child reports its pid, then its exit
code; a child killed by a signal closes the socket without a code.

Only where it is safe to fork a process that imported torch: no CUDA (a forked child
cannot use a CUDA context its parent made, so the server refuses to serve on a machine
with a GPU), one process per stage (DeepSpeed's launcher starts its own), and the same
environment the server was started in for what libraries read when imported (``local.py``
starts it with the pipeline's). Anywhere else :func:`start` returns None and the caller
starts the stage cold.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

SOCKET_ENV = "RLHF_WARM_SOCKET"  # set by local.py: where the server listens
PRELOAD = ("torch", "numpy", "transformers", "datasets", "deepspeed", "mlflow", "peft", "safetensors.torch",
           "transformers.models.opt.modeling_opt", "deepspeed.runtime.engine", "rlhf_tasks.pipeline.cli")


def _stage_modules() -> list[str]:
    from .cli import STAGE_MODULES

    return sorted({m.partition(":")[0] for m in STAGE_MODULES.values()})


class WarmProcess:
    """What ``launch.run_stage`` uses of a ``Popen``: ``pid``, ``stdout`` (text lines),
    ``poll``, ``wait`` and ``returncode``."""

    def __init__(self, conn: socket.socket, stdout_fd: int):
        self.conn = conn
        self.pid = int(json.loads(conn.recv(4096))["pid"])  # the child's first message
        self.stdout = os.fdopen(stdout_fd, "r", buffering=1, errors="replace")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.conn], [], [], 0)[0]:
            self._read_code()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self.conn], [], [], timeout)[0]:
                raise TimeoutError(f"warm stage process {self.pid} still running after {timeout} s")
            self._read_code()
        return self.returncode

    def _read_code(self) -> None:
        msg = self.conn.recv(4096)
        # No message: the child died without reporting (SIGKILL); -9 as Popen would say.
        self.returncode = int(json.loads(msg)["code"]) if msg else -signal.SIGKILL
        self.conn.close()


def start(args: list[str], env: dict[str, str]) -> WarmProcess | None:
    """``python -m rlhf_tasks ARGS`` forked from the warm server, or None when no server
    answers at ``$RLHF_WARM_SOCKET`` (then start it cold)."""
    path = env.get(SOCKET_ENV)
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    read, write = os.pipe()
    request = {"args": args, "env": env, "cwd": os.getcwd()}
    try:
        socket.send_fds(conn, [json.dumps(request).encode()], [write])
        return WarmProcess(conn, read)
    except (OSError, ValueError, KeyError):  # the server went away, or the child failed before it began
        conn.close()
        with contextlib.suppress(OSError):
            os.close(read)
        return None
    finally:
        os.close(write)


@contextlib.contextmanager
def warm_stages(home: Path, env: dict[str, str]) -> Iterator[None]:
    """The server for the duration of the block (``make run``, the tests' twin of it), its
    log in ``home/warm-stages.log``; ``env`` (the pipeline's) gets its socket."""
    sock = str(Path(tempfile.gettempdir()) / f"rlhf-warm-{os.getpid()}.sock")  # a socket path: <= 107 bytes
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "warm-stages.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-u", "-m", "rlhf_tasks.pipeline.warm", sock], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    env[SOCKET_ENV] = sock
    try:
        yield
    finally:
        env.pop(SOCKET_ENV, None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _child(conn: socket.socket, request: dict, out_fd: int) -> None:
    """In the forked child: become the stage process, run it, report, exit. Never returns."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["rlhf_tasks", *request["args"]]
        conn.send(json.dumps({"pid": os.getpid()}).encode())
        from .cli import main

        code = main(request["args"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 – a stage's crash is reported as its exit code, as in a cold process
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # what interpreter exit would run (MLflow's, the tracker's)
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"code": code}).encode())
        os._exit(code)


def _reap(*_) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def serve(path: str) -> None:
    """Import what the stages need, then fork a stage per request until SIGTERM."""
    import torch

    if torch.cuda.is_available():
        print(f"warm stages: not serving on a machine with a GPU ({path})", file=sys.stderr)
        return
    for name in (*PRELOAD, *_stage_modules()):
        importlib.import_module(name)
    # Each child is reaped when it ends (no zombies), which also adds its CPU time to the
    # server's, and so to whoever waits for the server (`time make run` counts the stages).
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(8)
    print(f"warm stages: serving on {path}", file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = server.accept()
            try:
                msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 1)
                if not fds:
                    raise ValueError("no output descriptor")
                request = json.loads(msg)
            except (OSError, ValueError):
                conn.close()
                continue
            if os.fork() == 0:
                server.close()
                _child(conn, request, fds[0])
            os.close(fds[0])
            conn.close()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


if __name__ == "__main__":
    serve(sys.argv[1])
