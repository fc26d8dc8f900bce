"""The embedded default: the whole DAG through Airflow on one machine, no GPU, no network.

``python -m rlhf_tasks.local run`` (``make run``) prepares an Airflow home with SQLite
metadata, starts an MLflow tracking server on loopback (SQLite store, artifacts on
disk), runs the ``rlhf_pipeline`` DAG with ``airflow dags test`` on the ``tiny-cpu``
preset, then prints the run report and how to open both UIs.
``python -m rlhf_tasks.local ui`` (``make ui``) starts the Airflow UI and the MLflow UI
on that same state.

State lives in ``$RLHF_HOME`` (default ``.rlhf`` in the current directory, ignored by
git). ``RLHF_STORAGE`` and ``MLFLOW_TRACKING_URI`` are honoured when set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .launch import free_port

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "rlhf_pipeline"


def home() -> Path:
    return Path(os.environ.get("RLHF_HOME") or Path.cwd() / ".rlhf").resolve()


def bin_path(name: str) -> str:
    """An executable of this virtualenv (``airflow``, ``mlflow``), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def airflow_env(h: Path, dags_folder: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RLHF_STORAGE", str(h / "storage"))
    env.update({
        "AIRFLOW_HOME": str(h / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
        or f"sqlite:///{h / 'airflow' / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "RLHF_RETRY_DELAY_S": env.get("RLHF_RETRY_DELAY_S", "5"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def mlflow_server(h: Path, port: int | None = None, quiet: bool = True) -> Iterator[str]:
    """A real ``mlflow server`` on loopback over the embedded store; yields its URL."""
    d = h / "mlflow"
    (d / "artifacts").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(d / "server.log", "a")
    proc = subprocess.Popen(
        [bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts")],
        stdout=log if quiet else None, stderr=subprocess.STDOUT if quiet else None, start_new_session=True)
    try:
        wait_http(f"{url}/health", 120, proc)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def airflow(args: list[str], env: dict[str, str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path("airflow"), *args], env=env, check=check, **kw)


def init_airflow(env: dict[str, str], gpu_slots: int = 1) -> None:
    """Create or upgrade the metadata DB and the ``gpu`` pool (idempotent)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow(["db", "migrate"], env, stdout=subprocess.DEVNULL)
    airflow(["pools", "set", "gpu", str(gpu_slots), "GPU slots: 1 serialises SFT and RM on one GPU"], env,
            stdout=subprocess.DEVNULL)


def run_pipeline(conf: dict, env: dict[str, str], run_id: str | None = None) -> int:
    """``airflow dags test``: the real DAG, scheduled by Airflow's own loop, tasks in-process."""
    args = ["dags", "test", DAG_ID, "--conf", json.dumps(conf)]
    if run_id:
        args += ["--run-id", run_id] if _supports_run_id(env) else []
    return airflow(args, env, check=False).returncode


def _supports_run_id(env: dict[str, str]) -> bool:
    out = airflow(["dags", "test", "--help"], env, check=False, capture_output=True, text=True).stdout
    return "--run-id" in out


def latest_run_dir(storage: Path) -> Path | None:
    runs = sorted((storage / "runs").glob("*"), key=lambda p: p.stat().st_mtime) if (storage / "runs").is_dir() else []
    return runs[-1] if runs else None


def cmd_run(args) -> int:
    h = home()
    env = airflow_env(h)
    print(f"==> state in {h} (Airflow home, MLflow store, shared storage)", flush=True)
    t0 = time.time()
    init_airflow(env)
    conf = {"preset": args.preset, "overrides": args.set or []}
    with contextlib.ExitStack() as stack:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_TRACKING_URI"] = stack.enter_context(mlflow_server(h))
        print(f"==> MLflow tracking at {env['MLFLOW_TRACKING_URI']}", flush=True)
        print(f"==> running DAG {DAG_ID} through Airflow ({conf})", flush=True)
        code = run_pipeline(conf, env)
    run_dir = latest_run_dir(Path(env["RLHF_STORAGE"]))
    print(f"\n==> pipeline {'succeeded' if code == 0 else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    if run_dir and (run_dir / "report.md").is_file():
        print((run_dir / "report.md").read_text())
    print(f"Run directory: {run_dir}\nOpen the UIs on this state:  make ui   "
          "(Airflow http://127.0.0.1:8080, MLflow http://127.0.0.1:5000)")
    return code


def cmd_ui(args) -> int:
    h = home()
    env = airflow_env(h)
    init_airflow(env)
    env["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI") or f"http://127.0.0.1:{args.mlflow_port}"
    env["AIRFLOW__API__PORT"] = str(args.airflow_port)
    with mlflow_server(h, args.mlflow_port, quiet=True) as url:
        print(f"MLflow UI:  {url}")
        print(f"Airflow UI: http://127.0.0.1:{args.airflow_port}  (login printed below by 'airflow standalone'; "
              f"password in {h / 'airflow'}/simple_auth_manager_passwords.json.generated)", flush=True)
        proc = subprocess.Popen([bin_path("airflow"), "standalone"], env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            return proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_tasks.local", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the whole pipeline through Airflow")
    r.add_argument("--preset", default="tiny-cpu")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    u = sub.add_parser("ui", help="start the Airflow and MLflow UIs on the embedded state")
    u.add_argument("--airflow-port", type=int, default=8080)
    u.add_argument("--mlflow-port", type=int, default=5000)
    args = ap.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_ui(args)


if __name__ == "__main__":
    sys.exit(main())
