"""The embedded default: the whole DAG through Airflow on one machine, no GPU, no network.

``python -m rlhf_tasks.pipeline.local run`` (``make run``) prepares an Airflow home with SQLite
metadata, starts an MLflow tracking server on loopback (SQLite store, artifacts on
disk), runs the ``rlhf_pipeline`` DAG with ``airflow dags test`` on the ``tiny-cpu``
preset, then prints the run report and how to open both UIs.
``python -m rlhf_tasks.pipeline.local ui`` (``make ui``) starts the Airflow UI (api-server,
scheduler, dag-processor, triggerer: what ``airflow standalone`` runs) and the MLflow UI on
that same state, both on loopback, until Ctrl-C or SIGTERM stops every process it started.

State lives in ``$RLHF_HOME`` (default ``.rlhf`` in the current directory, ignored by
git). ``RLHF_STORAGE`` and ``MLFLOW_TRACKING_URI`` are honoured when set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..runtime.ranks import free_port
from .procs import become_subreaper, reap_adopted, spawn, stop_all, stop_groups
from .warm import warm_stages

REPO = Path(__file__).resolve().parents[2]  # rlhf_tasks/pipeline/local.py -> the repository
DAG_ID = "rlhf_pipeline"
DEFAULT_AIRFLOW_PORT = 8080
DEFAULT_MLFLOW_PORT = 5000
LOOPBACK = "127.0.0.1"
# The Airflow components of `make ui`, as `airflow standalone` runs them. No log server
# (--skip-serve-logs): it binds every interface on fixed ports 8793/8794, and the api-server
# reads the task logs from the same disk.
UI_COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server", "--host", LOOPBACK, "--workers", "1"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}


def home() -> Path:
    return Path(os.environ.get("RLHF_HOME") or Path.cwd() / ".rlhf").resolve()


def bin_path(name: str) -> str:
    """An executable of this virtualenv (``airflow``, ``mlflow``), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def venv_first(path: str) -> str:
    """``path`` with this virtualenv's bin first: `airflow`, `deepspeed`, `uvicorn` are started
    by name, and a newcomer's shell has not activated the venv."""
    venv_bin = str(Path(sys.executable).parent)
    return os.pathsep.join([venv_bin, *(p for p in path.split(os.pathsep) if p and p != venv_bin)])


def home_secret(h: Path) -> str:
    """This home's JWT signing key, made once (readable by its owner only)."""
    path = h / "airflow" / "jwt_secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_text().strip()


def airflow_env(h: Path, dags_folder: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RLHF_STORAGE", str(h / "storage"))
    env["PATH"] = venv_first(env.get("PATH", ""))
    env.update({
        "AIRFLOW_HOME": str(h / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder or REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
        or f"sqlite:///{h / 'airflow' / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        # One signing key for every component: unset, each process that starts before airflow.cfg
        # exists makes its own, and the api-server refuses the scheduler's task tokens (403).
        "AIRFLOW__API_AUTH__JWT_SECRET": env.get("AIRFLOW__API_AUTH__JWT_SECRET") or home_secret(h),
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


def mlflow_process(h: Path, port: int, log: Path) -> subprocess.Popen:
    """A real ``mlflow server`` on loopback over the embedded store (SQLite, artifacts on disk)."""
    d = h / "mlflow"
    (d / "artifacts").mkdir(parents=True, exist_ok=True)
    # No job runner (GenAI scorers): its consumer processes cost CPU the pipeline needs.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return spawn([bin_path("mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination",
                  str(d / "artifacts")], log, env)


@contextlib.contextmanager
def mlflow_server(h: Path, port: int | None = None) -> Iterator[str]:
    """:func:`mlflow_process` for the duration of the block; yields its URL."""
    port = port or free_port()
    url = f"http://{LOOPBACK}:{port}"
    proc = mlflow_process(h, port, h / "mlflow" / "server.log")
    try:
        wait_http(f"{url}/health", 120, proc)
        yield url
    finally:
        stop_groups([proc])


def airflow(args: list[str], env: dict[str, str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path("airflow"), *args], env=env, check=check, **kw)


# `airflow db migrate` and `airflow pools set` by Airflow's own CLI in one process: one import of it.
_INIT_AIRFLOW = """
import sys
from airflow.cli.cli_parser import get_parser
for argv in (["db", "migrate"], ["pools", "set", "gpu", sys.argv[1], sys.argv[2]]):
    args = get_parser().parse_args(argv)
    args.func(args)
"""


def init_airflow(env: dict[str, str], gpu_slots: int = 1) -> None:
    """Create or upgrade the metadata DB and the ``gpu`` pool (idempotent)."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", _INIT_AIRFLOW, str(gpu_slots), "GPU slots: 1 serialises SFT and RM on one GPU"],
                   env=env, check=True, stdout=subprocess.DEVNULL)


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
    conf = {"preset": args.preset, "overrides": args.set or []}
    with contextlib.ExitStack() as stack:
        # MLflow and the warm stages import while Airflow sets up its database (two cores, three start-ups)
        mlflow = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            port = free_port()
            mlflow = mlflow_process(h, port, h / "mlflow" / "server.log")
            stack.callback(stop_groups, [mlflow])
            env["MLFLOW_TRACKING_URI"] = f"http://{LOOPBACK}:{port}"
        stack.enter_context(warm_stages(h, env))  # the stages the DAG launches fork from it
        init_airflow(env)
        if mlflow is not None:
            wait_http(f"{env['MLFLOW_TRACKING_URI']}/health", 120, mlflow)
        print(f"==> MLflow tracking at {env['MLFLOW_TRACKING_URI']}", flush=True)
        print(f"==> running DAG {DAG_ID} through Airflow ({conf})", flush=True)
        code = run_pipeline(conf, env)
    run_dir = latest_run_dir(Path(env["RLHF_STORAGE"]))
    print(f"\n==> pipeline {'succeeded' if code == 0 else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    if run_dir and (run_dir / "report.md").is_file():
        print((run_dir / "report.md").read_text())
    mlflow_ui = os.environ.get("MLFLOW_TRACKING_URI") or f"http://{LOOPBACK}:{DEFAULT_MLFLOW_PORT}"
    print(f"Run directory: {run_dir}\nOpen the UIs on this state:  make ui   "
          f"(Airflow http://{LOOPBACK}:{DEFAULT_AIRFLOW_PORT}, MLflow {mlflow_ui}; "
          f"other ports: make ui AIRFLOW_PORT={DEFAULT_AIRFLOW_PORT + 1} MLFLOW_PORT={DEFAULT_MLFLOW_PORT + 1})")
    return code


def ui_env(h: Path, airflow_port: int, mlflow_url: str) -> dict[str, str]:
    """:func:`airflow_env` for the UI components: the API on loopback, its URL in
    ``AIRFLOW__API__BASE_URL``."""
    env = airflow_env(h)
    api_url = f"http://{LOOPBACK}:{airflow_port}"
    env.update({
        "AIRFLOW__API__HOST": LOOPBACK,
        "AIRFLOW__API__PORT": str(airflow_port),
        "AIRFLOW__API__BASE_URL": api_url,
        # Where the task runner reports to; unset, Airflow calls http://localhost:8080/execution/
        # whatever the api-server's port, and kills the task when it gets no answer.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        "MLFLOW_TRACKING_URI": mlflow_url,
    })
    # The tasks train on the CPUs the single api-server worker (and SQLite) answer them from:
    # Airflow's 5 s per call kills a task whose start or heartbeat waits longer (seen: 48 s at
    # load 23 on 2 cores).
    env.setdefault("AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT", "120")
    return env


def check_port_free(port: int, make_var: str) -> None:
    """Fail before starting anything when ``port`` is taken on loopback."""
    with socket.socket() as s:
        # As the servers bind: a port held only by closed connections (TIME_WAIT) is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError as e:
            raise SystemExit(f"port {port} on {LOOPBACK} is taken ({e.strerror}); choose another: "
                             f"make ui {make_var}={free_port()}") from None


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_ui(args) -> int:
    h = home()
    external_mlflow = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow_url = external_mlflow or f"http://{LOOPBACK}:{args.mlflow_port}"
    if not external_mlflow and args.mlflow_port == args.airflow_port:
        raise SystemExit(f"the Airflow and MLflow UIs need two ports, got {args.airflow_port} twice")
    check_port_free(args.airflow_port, "AIRFLOW_PORT")
    if not external_mlflow:
        check_port_free(args.mlflow_port, "MLFLOW_PORT")
    env = ui_env(h, args.airflow_port, mlflow_url)
    api_url = env["AIRFLOW__API__BASE_URL"]
    logs = {name: h / "airflow" / "ui-logs" / f"{name}.log" for name in UI_COMPONENTS}
    logs["mlflow"] = h / "mlflow" / "server.log"
    procs: dict[str, subprocess.Popen] = {}
    become_subreaper()
    # Ctrl-C, `kill`, or make forwarding its SIGTERM. SIGINT explicitly: a shell starting us in
    # the background (`make ui &`) leaves it ignored, and Python then never raises KeyboardInterrupt.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        init_airflow(env)
        if not external_mlflow:
            procs["mlflow"] = mlflow_process(h, args.mlflow_port, logs["mlflow"])
        for name, argv in UI_COMPONENTS.items():
            port = ["--port", str(args.airflow_port)] if name == "api-server" else []
            procs[name] = spawn([bin_path("airflow"), *argv, *port], logs[name], env)
        if not external_mlflow:
            wait_http(f"{mlflow_url}/health", 180, procs["mlflow"])
        wait_http(f"{api_url}/api/v2/monitor/health", 300, procs["api-server"])
        print_ui_banner(h, api_url, mlflow_url, logs)
        return supervise(procs, logs)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as e:
        print(f"make ui: {e}\n{log_tails(logs)}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the stopping short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("==> stopping the UIs and everything they started", flush=True)
        stop_all(procs.values())
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def print_ui_banner(h: Path, api_url: str, mlflow_url: str, logs: dict[str, Path]) -> None:
    passwords = Path(airflow_env(h)["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    try:
        login = ", ".join(f"{user} / {pw}" for user, pw in json.loads(passwords.read_text()).items())
    except (OSError, ValueError):
        login = "see the api-server log"
    print(f"\nAirflow UI: {api_url}   login {login}  (from {passwords})\n"
          f"MLflow UI:  {mlflow_url}\nLogs: {logs['api-server'].parent}/, {logs['mlflow']}\n"
          "Ctrl-C stops both.\n", flush=True)


def supervise(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> int:
    """Until one of ``procs`` exits (then its code, its log's tail printed) or a signal."""
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(f"make ui: {name} exited with code {proc.returncode}\n{log_tails({name: logs[name]})}",
                      file=sys.stderr)
                return proc.returncode or 1
        reap_adopted(procs.values())
        time.sleep(1)


def log_tails(logs: dict[str, Path], lines: int = 30) -> str:
    out = []
    for name, log in logs.items():
        text = log.read_text(errors="replace").splitlines()[-lines:] if log.is_file() else []
        out.append(f"--- {name}: {log} ---\n" + "\n".join(text))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf_tasks.pipeline.local", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the whole pipeline through Airflow")
    r.add_argument("--preset", default="tiny-cpu")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    u = sub.add_parser("ui", help="start the Airflow and MLflow UIs on the embedded state")
    u.add_argument("--airflow-port", type=int, default=DEFAULT_AIRFLOW_PORT)
    u.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT,
                   help="unused when MLFLOW_TRACKING_URI names a server already running")
    args = ap.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_ui(args)


if __name__ == "__main__":
    sys.exit(main())
