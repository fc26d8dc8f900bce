"""Warm stage processes (rlhf_tasks/pipeline/warm.py): a stage forked from the server that
imported everything gives what a cold ``python -m rlhf_tasks`` gives – its output lines, its
result, its exit code – and stays a process of its own that a signal stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlhf_tasks.pipeline import warm
from rlhf_tasks.pipeline.launch import StageFailed, run_stage

pytestmark = pytest.mark.slow  # starts a server that imports torch, DeepSpeed and MLflow


@pytest.fixture(scope="module")
def server(storage):
    sock = str(Path(tempfile.gettempdir()) / f"rlhf-warm-test-{os.getpid()}.sock")
    log = open(Path(storage) / "warm-test.log", "wb")  # noqa: SIM115 – open for the server's life
    proc = subprocess.Popen([sys.executable, "-u", "-m", "rlhf_tasks.pipeline.warm", sock], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not os.path.exists(sock):
        assert proc.poll() is None and time.time() < deadline, Path(log.name).read_text()[-2000:]
        time.sleep(0.2)
    yield {**os.environ, warm.SOCKET_ENV: sock}, proc
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def test_a_warm_stage_runs_as_the_cold_one_does(server, tmp_path, monkeypatch):
    env, proc = server
    lines: list[str] = []
    monkeypatch.setenv(warm.SOCKET_ENV, env[warm.SOCKET_ENV])
    started = time.time()
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.runtime.run_config import resolve_run_config

    resolve_run_config(tmp_path / "run", PipelineConfig.load("tiny-cpu"))
    result = run_stage("prepare", tmp_path / "run", echo=lines.append)  # the smallest stage with a result
    assert result["stage"] == "prepare" and (tmp_path / "run" / "config.yaml").is_file()
    assert any("prepare" in line for line in lines)
    assert time.time() - started < 120
    assert proc.poll() is None  # the server serves on


def test_a_warm_stage_killed_or_failing_is_reported(server, tmp_path):
    env, _ = server
    child = warm.start(["prepare", "--output", str(tmp_path / "run")], env)
    assert child is not None and child.pid != os.getpid()
    assert os.getpgid(child.pid) == child.pid  # a session of its own: the launcher signals its group
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    bad = warm.start(["sft", "--preset", "tiny-cpu", "--output", str(tmp_path / "bad"), "--set",
                      "sft.learning_rate=-1"], env)
    out = bad.stdout.read()
    assert bad.wait(timeout=120) == 2 and "sft.learning_rate" in out


def test_no_server_means_a_cold_start(tmp_path):
    assert warm.start(["prepare"], {warm.SOCKET_ENV: str(tmp_path / "none.sock")}) is None
    assert warm.start(["prepare"], {}) is None
    with pytest.raises(StageFailed):
        run_stage("sft", tmp_path / "no-config-no-data", env={"RLHF_WARM_SOCKET": str(tmp_path / "none.sock"),
                                                              "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
