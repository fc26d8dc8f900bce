"""`make ui` as a newcomer types it: from the repository root, in a shell that has not
activated the virtualenv (its bin is not on PATH), on two free ports other than 8080.

Both UIs must answer, listen on loopback only, and run a DAG triggered through the REST
API (``ingest_preferences`` on a bundled sample: the scheduler, the LocalExecutor and the
task runner's calls to the Execution API, in well under a minute); then Ctrl-C (SIGINT to
the terminal's foreground process group) or SIGTERM to make must leave no process behind.
Every process `make ui` starts inherits its RLHF_HOME, a fresh directory per test: a
process still carrying it afterwards is one it left. A last, fast test covers what the DAG
run cannot show cheaply: a process that left its group (a stage) is stopped too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from rlhf_tasks.runtime.ranks import free_port
from tests.e2e.topology import REPO, ApiError, http_json, tail, wait_until

DAG_ID = "ingest_preferences"
SAMPLE = "sample:Dahoas/rm-static"
# Bounds, not expectations: on a 2-core VM the UIs answer in about a minute, the run takes ~40 s.
START_TIMEOUT_S = 420
RUN_TIMEOUT_S = 300
STOP_TIMEOUT_S = 120


@dataclass
class MakeUi:
    proc: subprocess.Popen
    home: Path
    log: Path
    api_port: int
    mlflow_port: int
    api_url: str = ""
    mlflow_url: str = ""

    def __post_init__(self) -> None:
        self.api_url, self.mlflow_url = (f"http://127.0.0.1:{port}" for port in (self.api_port, self.mlflow_port))

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"make ui exited with {self.proc.returncode}:\n{self.output()}")

    def output(self) -> str:
        logs = [self.log, *sorted((self.home / "airflow" / "ui-logs").glob("*.log")),
                self.home / "mlflow" / "server.log"]
        return "\n".join(f"===== {log} =====\n{tail(log, 40)}" for log in logs)


def plain_shell_env(home: Path) -> dict[str, str]:
    """The environment of a shell without the venv activated; state under ``home``."""
    venv_bins = {Path(sys.executable).parent.resolve(), (REPO / ".venv" / "bin").resolve()}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() not in venv_bins]
    drop = ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI", "RLHF_STORAGE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k not in drop}
    env.update(PATH=os.pathsep.join(path or ["/usr/bin", "/bin"]), RLHF_HOME=str(home),
               HF_DATASETS_CACHE=str(home / "hf-datasets"))
    return env


def two_free_ports() -> tuple[int, int]:
    ports: set[int] = set()
    while len(ports) < 2:
        if (port := free_port()) != 8080:
            ports.add(port)
    return tuple(sorted(ports))


def _as_from_a_terminal() -> None:
    # A session of its own, as a terminal's job: the test sends SIGINT to the whole group as
    # Ctrl-C does. SIGINT as a terminal leaves it (a background pytest may have it ignored).
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def processes_of(home: Path) -> list[psutil.Process]:
    """Processes whose environment holds RLHF_HOME=``home``: started by that `make ui`."""
    needle = f"RLHF_HOME={home}".encode()
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and \
                    needle in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.fixture
def make_ui(tmp_path) -> Iterator[MakeUi]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    if subprocess.run(["make", "-q", "venv"], cwd=REPO, env=plain_shell_env(tmp_path)).returncode != 0:
        pytest.skip("the venv is not up to date (run `make venv`): `make ui` would install packages first")
    home, log = tmp_path / "home", tmp_path / "make-ui.log"
    api_port, mlflow_port = two_free_ports()
    with open(log, "ab") as out:
        proc = subprocess.Popen(["make", "ui", f"AIRFLOW_PORT={api_port}", f"MLFLOW_PORT={mlflow_port}"],
                                cwd=REPO, env=plain_shell_env(home), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_as_from_a_terminal)
    ui = MakeUi(proc, home, log, api_port, mlflow_port)
    try:
        yield ui
    finally:
        if proc.poll() is None:
            print(ui.output(), file=sys.stderr)
        for p in [*processes_of(home), proc]:  # only after a failure: the test stopped them
            try:
                p.kill()
            except (psutil.Error, ProcessLookupError):
                pass
        proc.wait(timeout=30)


def wait_for_both_uis(ui: MakeUi) -> None:
    def up() -> bool:
        ui.check_alive()
        with urllib.request.urlopen(f"{ui.mlflow_url}/health", timeout=5) as r:
            assert r.read() == b"OK"
        return http_json("GET", f"{ui.api_url}/api/v2/monitor/health")["metadatabase"]["status"] == "healthy"

    wait_until("both UIs answer", up, START_TIMEOUT_S, 2.0, on_timeout=ui.output)


def listening(procs: list[psutil.Process]) -> dict[int, set[str]]:
    """Port -> addresses that ``procs`` listen on (TCP, IPv4 and IPv6)."""
    pids = {p.pid for p in procs}
    out: dict[int, set[str]] = {}
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            out.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
    return out


def token(ui: MakeUi) -> str:
    """Log in as the newcomer does: the admin password SimpleAuthManager generated."""
    passwords = json.loads((ui.home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
    body = {"username": "admin", "password": passwords["admin"]}
    return http_json("POST", f"{ui.api_url}/auth/token", body)["access_token"]


def run_ingest_dag(ui: MakeUi) -> dict:
    """Trigger ``ingest_preferences`` through the REST API; what its task returned."""
    api, tok = f"{ui.api_url}/api/v2", token(ui)

    def parsed() -> dict | None:
        ui.check_alive()
        errors = http_json("GET", f"{api}/importErrors", token=tok)["import_errors"]
        assert not errors, errors
        try:
            return http_json("GET", f"{api}/dags/{DAG_ID}", token=tok)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    wait_until(f"DAG {DAG_ID} parsed", parsed, START_TIMEOUT_S, 2.0, on_timeout=ui.output)
    http_json("PATCH", f"{api}/dags/{DAG_ID}", {"is_paused": False}, token=tok)
    run_id = http_json("POST", f"{api}/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"path": SAMPLE}},
                       token=tok)["dag_run_id"]
    run_url = f"{api}/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"

    def finished() -> dict | None:
        ui.check_alive()
        run = http_json("GET", run_url, token=tok)
        return run if run["state"] in ("success", "failed") else None

    run = wait_until(f"run {run_id} finished", finished, RUN_TIMEOUT_S, 2.0, on_timeout=ui.output)
    tis = http_json("GET", f"{run_url}/taskInstances", token=tok)["task_instances"]
    assert {ti["task_id"]: ti["state"] for ti in tis} == {"validate_and_publish": "success"}, (run, ui.output())
    # The task's log, read from disk (make ui runs no log server).
    log = http_json("GET", f"{run_url}/taskInstances/validate_and_publish/logs/1", token=tok)
    assert "Pre Execute" in json.dumps(log["content"]), log
    return http_json("GET", f"{run_url}/taskInstances/validate_and_publish/xcomEntries/return_value",
                     token=tok)["value"]


def stop_and_check_nothing_left(ui: MakeUi, send) -> None:
    started = psutil.Process(ui.proc.pid).children(recursive=True)
    assert len(started) >= 6, [p.cmdline() for p in started]  # python, mlflow, 4 Airflow components...
    send()
    try:
        ui.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"make ui still running {STOP_TIMEOUT_S} s after the signal:\n{ui.output()}")
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    left += [p for p in processes_of(ui.home) if p not in left]
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert "stopping the UIs" in ui.log.read_text(), ui.output()


@pytest.mark.e2e
@pytest.mark.slow
def test_make_ui_from_a_plain_shell_runs_a_dag_on_loopback_and_ctrl_c_stops_all(make_ui):
    wait_for_both_uis(make_ui)
    procs = psutil.Process(make_ui.proc.pid).children(recursive=True)
    ports = listening(procs)
    assert make_ui.api_port in ports and make_ui.mlflow_port in ports, ports
    # The UIs on loopback only, and nothing else of theirs on another address (the log servers
    # Airflow would start bind every interface on 8793/8794).
    assert all(addrs <= {"127.0.0.1", "::1"} for addrs in ports.values()), ports
    assert 8080 not in ports

    result = run_ingest_dag(make_ui)
    assert result["path"] == SAMPLE and result["rows"]["train"] > 0, result

    # Ctrl-C: the terminal sends SIGINT to its foreground process group (make and python).
    stop_and_check_nothing_left(make_ui, lambda: os.killpg(make_ui.proc.pid, signal.SIGINT))


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_to_make_stops_every_process(make_ui):
    wait_for_both_uis(make_ui)
    # `kill <make>` (a CI time limit): make forwards SIGTERM to python, which stops the rest.
    stop_and_check_nothing_left(make_ui, lambda: make_ui.proc.send_signal(signal.SIGTERM))


# In a process of its own: becoming a subreaper would change how the test process's orphans end.
_ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
from rlhf_tasks.pipeline import procs

procs.become_subreaper()
log = Path(sys.argv[1])
# A leader whose child moves to a session of its own (as a stage does) and outlives it.
child = "import subprocess; p = subprocess.Popen(['sleep', '600'], start_new_session=True); print(p.pid, flush=True)"
leader = procs.spawn([sys.executable, "-c", child + "; import time; time.sleep(600)"], log)
while not log.read_text().strip():
    time.sleep(0.1)
print(log.read_text().strip(), flush=True)
procs.stop_all([leader], grace_s=10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")
def test_stopping_finds_a_process_that_left_its_group(tmp_path):
    out = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path / "leader.log")], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    orphan = int(out.split()[0])
    # Not in the leader's group: only the sweep of our descendants can have stopped it.
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE, orphan
