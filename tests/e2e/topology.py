"""The production topology of docker-compose.yml, natively on this machine, for tests.

Same moving parts as the containers, without a container engine: PostgreSQL (a fresh
database each for Airflow and for MLflow), Redis as the Celery broker (a database index of
its own), Airflow's api-server, scheduler and dag-processor on the CeleryExecutor, a CPU
worker on the ``default`` queue and a "GPU" worker on the ``gpu`` queue (the same code,
on CPU here), and an MLflow server on PostgreSQL. Every process runs in its own process
group with its log in ``<root>/logs``; ``stop()`` ends them all, and whatever they
started, and drops the databases.

Only the standard library is imported at module level: the workers import
``worker_hostname`` from here as Airflow's ``hostname_callable``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_tasks.runtime.ranks import free_port

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "rlhf_pipeline"
PG_ADMIN_DSN = os.environ.get("RLHF_E2E_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL = os.environ.get("RLHF_E2E_PG_URL", "postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("RLHF_E2E_REDIS_URL", "redis://127.0.0.1:6379")
# The environment variable that marks every process of one topology (and their children).
MARKER = "RLHF_E2E_TOPOLOGY"


def worker_hostname() -> str:
    """Airflow ``[core] hostname_callable`` of the test workers: both run on this machine,
    so each gets a name of its own and task instances show which one ran them."""
    return os.environ.get("RLHF_E2E_HOSTNAME") or socket.getfqdn()


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class ApiError(RuntimeError):
    def __init__(self, method: str, url: str, status: int, body: str):
        super().__init__(f"{method} {url} -> {status}: {body[:2000]}")
        self.status = status


def http_json(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise ApiError(method, url, e.code, e.read().decode(errors="replace")) from None
    return json.loads(raw) if raw else None


def wait_until(what: str, check, timeout_s: float, interval_s: float = 1.0, on_timeout=None) -> Any:
    """Call ``check()`` until it returns something truthy; bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, ApiError) as e:  # not up yet
            last_error = e
        time.sleep(interval_s)
    details = on_timeout() if on_timeout else ""
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (last error: {last_error})\n{details}")


@dataclass
class Topology:
    """One native production topology under ``root``. Use as a context manager."""

    root: Path
    gpu_pool_slots: int = 1
    admin_user: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    # Users with SimpleAuthManager's "user" role (they may run and answer DAGs): labellers in
    # the human-feedback tests.
    users: tuple[str, ...] = ("alice", "bob", "mallory")
    passwords: dict[str, str] = field(default_factory=dict)
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    api_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    redis_db: int | None = None
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)

    # ---- names and URLs ------------------------------------------------------------------
    @property
    def airflow_db(self) -> str:
        return f"rlhf_e2e_airflow_{self.session}"

    @property
    def mlflow_db(self) -> str:
        return f"rlhf_e2e_mlflow_{self.session}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    # ---- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> Topology:
        try:
            self.start()
        except BaseException:
            print(self.log_tails(), file=sys.stderr)
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            print(self.log_tails(), file=sys.stderr)
        self.stop()

    def start(self, start_timeout_s: float = 300) -> None:
        for d in (self.storage, self.airflow_home, self.log_dir, self.root / "mlflow-artifacts"):
            d.mkdir(parents=True, exist_ok=True)
        self._create_databases()
        self._claim_redis_db()
        env = self.env()
        t0 = time.monotonic()
        self._run(["airflow", "db", "migrate"], env, "db-migrate", timeout_s=start_timeout_s)
        self._run(["airflow", "pools", "set", "gpu", str(self.gpu_pool_slots), "GPU slots"], env, "pools",
                  timeout_s=120)
        self._spawn("mlflow", [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                               "--workers", "1", "--backend-store-uri", self._pg_url(self.mlflow_db, "postgresql+psycopg2"),
                               "--serve-artifacts", "--artifacts-destination", str(self.root / "mlflow-artifacts")],
                    # No job runner: its consumer processes cost CPU the pipeline needs.
                    {**env, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self._spawn("api-server", [_bin("airflow"), "api-server", "--host", "127.0.0.1", "--port",
                                   str(self.api_port), "--workers", "1"], env)
        self._spawn("scheduler", [_bin("airflow"), "scheduler"], env)
        self._spawn("dag-processor", [_bin("airflow"), "dag-processor"], env)
        for name, queue in (("cpu-worker", "default"), ("gpu-worker", "gpu")):
            worker_env = {**env, "RLHF_E2E_HOSTNAME": name,
                          "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.worker_hostname"}
            # --skip-serve-logs: the api-server reads the task logs from the same disk.
            self._spawn(name, [_bin("airflow"), "celery", "worker", "--queues", queue, "--celery-hostname",
                               f"{name}@%h", "--concurrency", "2" if queue == "default" else "1",
                               "--skip-serve-logs"], worker_env)
        remaining = max(60.0, start_timeout_s - (time.monotonic() - t0))
        self._wait_http(f"{self.mlflow_url}/health", "mlflow", remaining)
        self._wait_http(f"{self.api_url}/api/v2/monitor/health", "api-server", remaining)
        self.wait_for_dag(remaining)

    def stop(self) -> None:
        """Stop every process (and their children), then drop the databases. Idempotent."""
        self._terminate(list(self.procs.values()))
        self.procs.clear()
        self._kill_marked_leftovers()
        self._release_redis_db()
        self._drop_databases()

    # ---- environment -------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The environment of every Airflow process (compose's x-airflow-env, natively)."""
        from cryptography.fernet import Fernet

        passwords = self.airflow_home / "passwords.json"
        if not passwords.exists():
            self.passwords.update({u: secrets.token_urlsafe(16) for u in self.users}, **{self.admin_user: self.admin_password})
            passwords.write_text(json.dumps(self.passwords))
            passwords.chmod(0o600)
        broker = f"{REDIS_URL}/{self.redis_db}"
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("AIRFLOW__") or k in ("AIRFLOW_HOME", "AIRFLOW_CONFIG")]:
            del env[key]
        env.update({
            MARKER: self.session,
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join([f"{self.admin_user}:admin",
                                                                  *(f"{u}:user" for u in self.users)]),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self._pg_url(self.airflow_db, "postgresql+psycopg2"),
            "AIRFLOW__CELERY__BROKER_URL": broker,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self._pg_url(self.airflow_db, "postgresql+psycopg2"),
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "172800",
            "AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME": "172800",
            # A task's calls to the api-server (default 5 s): on a loaded 2-core machine one
            # took 48 s, the client gave up and its retry was refused (400), failing the task.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "120",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # The workers import worker_hostname from this file.
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
            "RLHF_STORAGE": str(self.storage),
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RLHF_RETRY_DELAY_S": "5",
            "TOKENIZERS_PARALLELISM": "false",
        })
        # Secrets are generated once per topology: every process must see the same ones.
        cached = self.root / "env.json"
        if cached.exists():
            env.update(json.loads(cached.read_text()))
        else:
            keep = {k: env[k] for k in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
                                        "AIRFLOW__API__SECRET_KEY")}
            cached.write_text(json.dumps(keep))
            cached.chmod(0o600)
        return env

    def _pg_url(self, db: str, scheme: str) -> str:
        return f"{scheme}://{PG_URL}/{db}"

    # ---- PostgreSQL and Redis ------------------------------------------------------------
    def _pg_admin(self, *statements: str) -> None:
        import psycopg2

        conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
        finally:
            conn.close()

    def _create_databases(self) -> None:
        self._pg_admin(f'CREATE DATABASE "{self.airflow_db}"', f'CREATE DATABASE "{self.mlflow_db}"')

    def _drop_databases(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_admin(*(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)' for db in (self.airflow_db, self.mlflow_db)))

    def _claim_redis_db(self) -> None:
        """The first empty Redis database (1-15), claimed with a key so that a concurrent
        test session picks another one."""
        import redis

        for index in range(1, 16):
            client = redis.Redis.from_url(f"{REDIS_URL}/{index}", socket_timeout=5)
            try:
                if client.dbsize() == 0 and client.set("rlhf-e2e:owner", self.session, nx=True, ex=6 * 3600):
                    self.redis_db = index
                    return
            finally:
                client.close()
        raise RuntimeError(f"no free Redis database on {REDIS_URL} (1-15 all hold keys)")

    def _release_redis_db(self) -> None:
        if self.redis_db is None:
            return
        import redis

        client = redis.Redis.from_url(f"{REDIS_URL}/{self.redis_db}", socket_timeout=5)
        with contextlib.suppress(Exception):
            if client.get("rlhf-e2e:owner") == self.session.encode():
                client.flushdb()
        client.close()
        self.redis_db = None

    # ---- processes --------------------------------------------------------------------
    def _run(self, argv: list[str], env: dict[str, str], name: str, timeout_s: float) -> None:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as f:
            proc = subprocess.run([_bin(argv[0]), *argv[1:]], env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, start_new_session=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{tail(log)}")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, cwd=self.root, start_new_session=True)

    @staticmethod
    def _terminate(procs: list[subprocess.Popen], grace_s: float = 20) -> None:
        """SIGTERM to every process group at once, SIGKILL to those still there after ``grace_s``."""
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def _marked_pids(self) -> list[int]:
        """Processes started by this topology that left their process group (a stage
        runs in a session of its own): found by the marker in their environment."""
        needle = f"{MARKER}={self.session}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
        return pids

    def _kill_marked_leftovers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._marked_pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if not pids:
                return
            time.sleep(3)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"processes exited: {dead}\n{self.log_tails()}")

    def _wait_http(self, url: str, name: str, timeout_s: float) -> None:
        def up() -> bool:
            self.check_alive()
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status == 200

        wait_until(f"{name} at {url}", up, timeout_s, 1.0, on_timeout=lambda: tail(self.log_dir / f"{name}.log"))

    # ---- Airflow REST API -------------------------------------------------------------
    def token(self, user: str | None = None) -> str:
        """A JWT for the REST API from SimpleAuthManager's ``POST /auth/token`` (the admin's,
        or ``user``'s)."""
        user = user or self.admin_user
        if user not in self._tokens or self._tokens[user][1] < time.monotonic():
            password = self.admin_password if user == self.admin_user else self.passwords[user]
            token = http_json("POST", f"{self.api_url}/auth/token", {"username": user, "password": password})
            self._tokens[user] = (token["access_token"], time.monotonic() + 600)
        return self._tokens[user][0]

    def api(self, method: str, path: str, body: Any = None, user: str | None = None) -> Any:
        return http_json(method, f"{self.api_url}/api/v2{path}", body, token=self.token(user))

    def wait_for_dag(self, timeout_s: float = 180, dag_id: str = DAG_ID) -> dict:
        """Until the dag-processor has parsed and serialised the DAG (import errors fail fast)."""

        def parsed() -> dict | None:
            self.check_alive()
            errors = self.api("GET", "/importErrors")["import_errors"]
            mine = [e for e in errors if dag_id in e.get("filename", "")]
            if mine:
                raise RuntimeError(f"{dag_id} failed to import: {mine[0]['stack_trace'][-3000:]}")
            try:
                return self.api("GET", f"/dags/{dag_id}")
            except ApiError as e:
                if e.status == 404:
                    return None
                raise

        return wait_until(f"DAG {dag_id} parsed", parsed, timeout_s, 2.0,
                          on_timeout=lambda: tail(self.log_dir / "dag-processor.log"))

    def unpause(self, dag_id: str = DAG_ID) -> None:
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    def trigger(self, conf: dict[str, Any], run_id: str | None = None, dag_id: str = DAG_ID) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"/dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def dag_runs(self, dag_id: str = DAG_ID) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns?order_by=-start_date&limit=20")["dag_runs"]

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, dict]:
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{_quote(run_id)}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti for ti in tis}

    def wait_for_run(self, run_id: str, timeout_s: float, dag_id: str = DAG_ID) -> dict:
        """Until the run finishes; its final record (state ``success`` or ``failed``)."""

        def finished() -> dict | None:
            self.check_alive()
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{_quote(run_id)}")
            return run if run["state"] in ("success", "failed") else None

        try:
            return wait_until(f"run {run_id} finished", finished, timeout_s, 5.0,
                              on_timeout=lambda: self.run_report(run_id, dag_id))
        except TimeoutError:
            # Free the DAG's single active-run slot for the next test's run.
            with contextlib.suppress(ApiError, OSError):
                self.api("PATCH", f"/dags/{dag_id}/dagRuns/{_quote(run_id)}", {"state": "failed"})
            raise

    # ---- diagnostics --------------------------------------------------------------------
    def task_log_tails(self, run_id: str, lines: int = 60, dag_id: str = DAG_ID) -> str:
        out = []
        run_dir = self.airflow_home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        for log in sorted(run_dir.glob("task_id=*/attempt=*.log")):
            out.append(f"--- {log.relative_to(run_dir)} ---\n{tail(log, lines)}")
        return "\n".join(out) or f"(no task logs under {run_dir})"

    def run_report(self, run_id: str, dag_id: str = DAG_ID) -> str:
        try:
            states = {t: ti["state"] for t, ti in self.task_instances(run_id, dag_id).items()}
        except Exception as e:  # noqa: BLE001 – a report must not hide the original failure
            states = {"error": str(e)}
        return f"task states: {states}\n{self.task_log_tails(run_id, dag_id=dag_id)}\n{self.log_tails(30)}"

    def log_tails(self, lines: int = 40) -> str:
        logs = sorted(self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []
        return "\n".join(f"===== {log.name} =====\n{tail(log, lines)}" for log in logs)


def _quote(run_id: str) -> str:
    return urllib.request.quote(run_id, safe="")


@contextlib.contextmanager
def running_topology(root: Path, **kw: Any) -> Iterator[Topology]:
    with Topology(root=root, **kw) as topo:
        yield topo
