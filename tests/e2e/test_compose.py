"""The production topology's files, checked without a container engine.

``docker-compose.yml`` goes through a real Compose implementation (``docker compose
config`` where the plugin works, else Debian's ``docker-compose``), which interpolates
``.env`` and validates the file, and the rendered model is checked; the Dockerfiles and
the entry point are checked as text and, for the GPU claim, by running the script.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILES = [REPO / "docker" / "airflow.Dockerfile", REPO / "docker" / "worker-gpu.Dockerfile"]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"

SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_FERNET_KEY",
           "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD")
AIRFLOW_SERVICES = ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker", "airflow-worker-gpu")
LONG_RUNNING = ("postgres", "redis", "mlflow", "airflow-apiserver", "airflow-scheduler",
                "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu")
SHARED_MOUNT = ("rlhf-storage", "/shared")
DAY_S = 24 * 3600


@cache
def compose_cmd() -> tuple[str, ...] | None:
    """The Compose CLI that works here: the docker plugin, else the standalone binary."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    return None


def run_config(env_file: Path) -> subprocess.CompletedProcess:
    cmd = compose_cmd()
    if cmd is None:
        pytest.skip("no Compose implementation: install Debian's docker-compose or the docker compose plugin")
    # A clean environment: a secret exported in the caller's shell must not mask a missing one.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([*cmd, "--project-directory", str(REPO), "--env-file", str(env_file),
                           "-f", str(COMPOSE_FILE), "config"],
                          capture_output=True, text=True, env=env, timeout=120)


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def dummy_secrets() -> dict[str, str]:
    return {name: f"dummy-{name.lower().replace('_', '-')}" for name in SECRETS}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict[str, Any]:
    env_file = write_env(tmp_path_factory.mktemp("compose") / "test.env", dummy_secrets())
    out = run_config(env_file)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def service(config: dict, name: str) -> dict:
    assert name in config["services"], f"service {name} missing: {sorted(config['services'])}"
    return config["services"][name]


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def command_of(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def volume_mounts(svc: dict) -> set[tuple[str, str]]:
    """(source, target) pairs, from either the short or the long volume syntax."""
    mounts = set()
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source", ""), v["target"]
        mounts.add((source, target))
    return mounts


def published_ports(svc: dict) -> list[tuple[str, str]]:
    """(host_ip, published port) pairs, from either port syntax."""
    ports = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            ports.append((str(p.get("host_ip", "")), str(p.get("published", ""))))
        else:
            parts = str(p).split("/")[0].split(":")
            ports.append((parts[0], parts[1]) if len(parts) == 3 else ("", parts[0]))
    return ports


def queues(svc: dict) -> list[str]:
    cmd = command_of(svc)
    assert cmd[:3] == ["airflow", "celery", "worker"], cmd
    return cmd[cmd.index("--queues") + 1].split(",")


# ---- docker-compose.yml -------------------------------------------------------------------

def test_all_services_present(config):
    expected = {"postgres", "redis", "mlflow", *AIRFLOW_SERVICES}
    assert expected <= set(config["services"])


def test_gpu_worker_reserves_nvidia_gpus_and_takes_the_gpu_queue(config):
    gpu = service(config, "airflow-worker-gpu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert queues(gpu) == ["gpu"]
    assert "gpu-worker@%h" in command_of(gpu)
    # Scalable with --scale: no fixed name, no host port.
    assert "container_name" not in gpu and not gpu.get("ports")
    shm = str(gpu.get("shm_size", ""))
    shm_bytes = int(shm) if shm.isdigit() else int(re.match(r"(\d+)g", shm.lower()).group(1)) * 2**30
    assert shm_bytes >= 8 * 2**30, f"shm_size {shm} is too small for NCCL/DeepSpeed"


def test_cpu_worker_takes_the_default_queue_only(config):
    cpu = service(config, "airflow-worker")
    assert queues(cpu) == ["default"]
    assert "deploy" not in cpu or "devices" not in str(cpu["deploy"])
    assert "container_name" not in cpu and not cpu.get("ports")


def test_shared_volume_at_the_same_path_everywhere_it_is_needed(config):
    for name in ("airflow-worker", "airflow-worker-gpu", "airflow-scheduler", "mlflow"):
        assert SHARED_MOUNT in volume_mounts(service(config, name)), f"{name}: {volume_mounts(service(config, name))}"
    assert "rlhf-storage" in config["volumes"]
    for name in ("airflow-worker", "airflow-worker-gpu", "airflow-scheduler"):
        env = env_of(service(config, name))
        assert env["RLHF_STORAGE"].startswith("/shared/")
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_mlflow_on_postgres_with_artifacts_on_the_shared_volume(config):
    cmd = command_of(service(config, "mlflow"))
    assert cmd[:2] == ["mlflow", "server"]
    args = {flag: value for flag, value in zip(cmd, cmd[1:], strict=False) if flag.startswith("--")}
    assert args["--backend-store-uri"].startswith("postgresql")
    assert args["--artifacts-destination"].startswith("/shared/")
    assert "--serve-artifacts" in cmd
    hosts = args["--allowed-hosts"].split(",")
    assert "mlflow:5000" in hosts and any(h.startswith("localhost") for h in hosts)


def test_uis_bound_to_loopback_by_default(config):
    for name in ("airflow-apiserver", "mlflow"):
        ports = published_ports(service(config, name))
        assert ports, f"{name} publishes no port"
        assert all(ip == "127.0.0.1" for ip, _ in ports), f"{name}: {ports}"
    for name in set(config["services"]) - {"airflow-apiserver", "mlflow"}:
        assert not service(config, name).get("ports"), f"{name} should publish nothing"


def test_long_tasks_are_not_killed_by_broker_or_token_expiry(config):
    for name in ("airflow-scheduler", "airflow-worker", "airflow-worker-gpu", "airflow-apiserver"):
        env = env_of(service(config, name))
        assert int(env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"]) > DAY_S
        assert int(env["AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME"]) > DAY_S
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    text = COMPOSE_FILE.read_text()
    # The reason is written next to the settings.
    assert re.search(r"visibility.*\n(.*\n){0,12}.*jwt_expiration_time", text, re.IGNORECASE)


def test_every_long_running_service_has_a_healthcheck_and_waits_for_its_dependencies(config):
    for name in LONG_RUNNING:
        hc = service(config, name).get("healthcheck") or {}
        assert hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
    for name in AIRFLOW_SERVICES:
        deps = service(config, name).get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        if name != "airflow-init":
            assert deps["airflow-init"]["condition"] == "service_completed_successfully"


def test_init_migrates_and_creates_the_gpu_pool(config):
    assert command_of(service(config, "airflow-init")) == ["init"]
    script = ENTRYPOINT.read_text()
    assert "airflow db migrate" in script and re.search(r"airflow pools set gpu \"\$\{GPU_POOL_SLOTS", script)
    assert env_of(service(config, "airflow-init"))["GPU_POOL_SLOTS"] == "1"


def test_secrets_come_from_env_and_nowhere_else(config):
    rendered = yaml.safe_dump(config)
    for name, value in dummy_secrets().items():
        assert value in rendered, f"{name} from .env is not used"
    text = COMPOSE_FILE.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is never read"
        assert all(u.startswith(":?") for u in uses), f"{name} must be ${{{name}:?...}} everywhere, got {uses}"


@pytest.mark.parametrize("missing", SECRETS)
def test_config_without_a_secret_fails_and_names_it(tmp_path, missing):
    values = {k: v for k, v in dummy_secrets().items() if k != missing}
    out = run_config(write_env(tmp_path / "partial.env", values))
    assert out.returncode != 0, f"compose accepted a config without {missing}"
    assert missing in out.stderr + out.stdout


def test_env_example_lists_every_variable_the_compose_file_reads():
    code = "\n".join(line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", code))  # $${X} is the container's, not .env's
    example = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()
               if re.match(r"^[A-Z_][A-Z0-9_]*=", line)}
    assert used <= example, f"missing from .env.example: {sorted(used - example)}"


def test_env_example_is_itself_a_valid_env_file(tmp_path):
    out = run_config(REPO / ".env.example")
    assert out.returncode == 0, out.stderr


# ---- Dockerfiles --------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.MULTILINE)]


def base_images(path: Path) -> list[str]:
    """FROM images with global ARG defaults substituted; build-stage aliases skipped."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    images = []
    for inst, rest in dockerfile_instructions(path):
        if inst == "ARG" and not images and "=" in rest:
            key, value = rest.split("=", 1)
            args[key.strip()] = value.strip().strip('"')
        elif inst == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image not in stages:
                images.append(image)
    return images


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    images = base_images(path)
    assert images
    for image in images:
        assert "$" not in image, f"unresolved base image {image}"
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image} is not pinned to a version"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_with_a_healthcheck(path):
    insts = dockerfile_instructions(path)
    users = [rest for inst, rest in insts if inst == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"last USER is {users[-1:]}"
    healthchecks = [rest for inst, rest in insts if inst == "HEALTHCHECK"]
    assert healthchecks and "NONE" not in healthchecks[-1].upper().split()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_the_project_from_the_pinned_requirements(path):
    text = path.read_text()
    assert "requirements.txt" in text and "requirements-lock.txt" in text
    assert re.search(r"pip install[^\n]*/src\b", text), "the project itself is not installed"
    assert "COPY --chown=airflow:0 dags" in text


def test_gpu_image_has_cuda_torch_and_buildable_deepspeed_ops():
    text = (REPO / "docker" / "worker-gpu.Dockerfile").read_text()
    assert re.search(r"nvidia/cuda:[\d.]+-[\w-]*devel", text), "needs a CUDA devel base (nvcc) for DeepSpeed ops"
    assert re.search(r'TORCH_CUDA_ARCH_LIST="?[\d.;]+"?', text)
    assert "9.0a" not in re.findall(r'ARG TORCH_CUDA_ARCH_LIST="?([^"\n]*)', text)[0]
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert re.search(r"--queues.*gpu", text)


def test_airflow_image_has_no_cuda():
    text = (REPO / "docker" / "airflow.Dockerfile").read_text()
    assert "whl/cpu" in text and "nvidia/cuda" not in text


# ---- docker/entrypoint.sh ---------------------------------------------------------------------

@pytest.fixture
def fake_gpus(tmp_path) -> dict[str, str]:
    """A host with two GPUs, as far as the entry point can tell (a stub nvidia-smi), and the
    image's PATH: its virtualenv first, whose ``python`` the entry point runs (a plain shell
    may have only ``python3``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "0, GPU-11111111-aaaa"
        echo "1, GPU-22222222-bbbb"
        """))
    smi.chmod(0o755)
    return {"PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
            "RLHF_GPU_LOCK_DIR": str(tmp_path / "locks"),
            "AIRFLOW_HOME": str(tmp_path / "airflow")}


def test_scaled_gpu_workers_claim_distinct_gpus(fake_gpus):
    env = {**fake_gpus, "RLHF_GPUS_PER_WORKER": "1"}
    hold = "echo $CUDA_VISIBLE_DEVICES; sleep 5"
    first, second = (subprocess.Popen(["bash", str(ENTRYPOINT), "bash", "-c", hold], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2))
    try:
        claimed = {first.stdout.readline().strip(), second.stdout.readline().strip()}
        assert claimed == {"0", "1"}
        third = subprocess.run(["bash", str(ENTRYPOINT), "true"], env=env, capture_output=True, text=True, timeout=30)
        assert third.returncode != 0 and "more replicas than GPUs" in third.stderr
    finally:
        for p in (first, second):
            p.kill()
            p.wait(timeout=10)
    # Locks die with their holders: a restarted replica gets a GPU again.
    again = subprocess.run(["bash", str(ENTRYPOINT), "bash", "-c", "echo $CUDA_VISIBLE_DEVICES"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == "0"


def test_admin_password_file_comes_from_the_environment(fake_gpus, tmp_path):
    env = {**fake_gpus, "AIRFLOW_ADMIN_PASSWORD": 's3cret"pw', "AIRFLOW_ADMIN_USER": "ops",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "ops:admin"}
    out = subprocess.run(["bash", str(ENTRYPOINT), "bash", "-c", "cat \"$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE\""],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == {"ops": 's3cret"pw'}
    password_file = Path(fake_gpus["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json"
    assert password_file.stat().st_mode & 0o077 == 0, "the password file must be private"
