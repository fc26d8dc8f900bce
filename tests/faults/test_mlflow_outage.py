"""Real SFT processes against a real MLflow server on loopback that goes away.

Three stage processes run side by side (one test, to keep CI short):

- ``killed``: the server is SIGKILLed at its step 3 and restarted later;
- ``absent``: started while the server is down; it trains without a run, and opens its run
  (and the pipeline's parent run) once the server is back;
- ``never``: its tracking URI points at a port where nothing ever answers.

Training always finishes. Every metric point a stage produces is counted (``tracking/points_*``
in its result, one log line at its end) and compared with what the server holds: none is lost
once the server is back; without a server they are reported as dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest

from rlhf_tasks.storage import RunDir
from tests.faults.helpers import FAST, StageProc
from tests.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow

ARGS = ["--preset", "tiny-cpu", "--set", *FAST, "tracking.experiment=faults"]


def hard_kill(server: MlflowServer) -> None:
    """SIGKILL the server's whole process group (no graceful shutdown)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    server.proc = None


def received(url: str, run_id: str) -> int:
    """Metric points the server holds for the run (every step of every key)."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    keys = client.get_run(run_id).data.metrics
    return sum(len(client.get_metric_history(run_id, k)) for k in keys)


def server_run(url: str, run_id: str):
    from mlflow import MlflowClient

    return MlflowClient(url).get_run(run_id)


def points(result: dict) -> dict[str, int]:
    return {k.removeprefix("tracking/points_"): int(v) for k, v in result["metrics"].items()
            if k.startswith("tracking/points_")}


def test_server_killed_absent_or_never_up_training_finishes_and_no_point_is_lost(storage, tiny_model_dir, tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    runs = {name: RunDir(tmp_path / name) for name in ("killed", "absent", "never")}
    wait_for_server = {"RLHF_MLFLOW_FLUSH_TIMEOUT_S": "600"}  # a finished stage waits for the restart
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        killed = stack.enter_context(StageProc("sft", runs["killed"].path, *ARGS,
                                               env={"MLFLOW_TRACKING_URI": server.url, **wait_for_server}))
        never = stack.enter_context(StageProc("sft", runs["never"].path, *ARGS, env={
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "RLHF_MLFLOW_FLUSH_TIMEOUT_S": "3"}))
        assert killed.wait_step(3), killed.tail()
        phases["killed at step 3"] = time.monotonic() - t0
        hard_kill(server)
        down_at, t_down = killed.last_step, time.monotonic()
        absent = stack.enter_context(StageProc("sft", runs["absent"].path, *ARGS,
                                               env={"MLFLOW_TRACKING_URI": server.url, **wait_for_server}))
        assert absent.wait_for(lambda: "training goes on" in absent.text()), absent.tail()  # no server to start with
        phases["absent deferred its run"] = time.monotonic() - t0
        assert not (runs["absent"].stage("sft") / "mlflow_run_id").exists()  # no run to log into yet
        server.start()
        phases["server back"] = time.monotonic() - t0
        up_at, outage_s = killed.last_step, time.monotonic() - t_down
        results = {"never": never.result()}
        phases["never done"] = time.monotonic() - t0
        results["killed"] = killed.result()
        phases["killed done"] = time.monotonic() - t0
        results["absent"] = absent.result()
        phases["absent done"] = time.monotonic() - t0

        report = {}
        for name, result in results.items():
            n = points(result)
            assert result["metrics"]["global_step"] == 24, (name, result)  # training finished
            got = received(server.url, result["mlflow_run_id"]) if name != "never" else 0
            report[name] = {**n, "received": got}
        report["killed"].update(down_at_step=down_at, up_at_step=up_at, outage_s=round(outage_s, 1))
        report["seconds"] = {k: round(v, 1) for k, v in phases.items()}
        print("FAULT-REPORT", json.dumps(report))
        late = server_run(server.url, results["absent"]["mlflow_run_id"])

    assert "cannot send metrics" in killed.text()  # the outage was seen
    for name in ("killed", "absent"):
        n = report[name]
        assert n["produced"] > 0 and n["sent"] == n["produced"] == n["received"], (name, n)
        assert n["dropped"] == n["pending"] == 0, (name, n)
    n = report["never"]
    assert n["produced"] > 0 and n["sent"] == 0 and n["pending"] == n["produced"], n
    assert f"dropped {n['produced']}" in never.text()  # reported at the end of the stage
    assert results["never"]["mlflow_run_id"] is None

    # The deferred run is a full one: nested under the pipeline's parent, config as params.
    assert (runs["absent"].stage("sft") / "mlflow_run_id").read_text() == results["absent"]["mlflow_run_id"]
    assert late.data.tags.get("mlflow.parentRunId") == (runs["absent"].path / "mlflow_parent_run_id").read_text()
    assert late.data.params["sft.max_steps"] == "24" and late.info.status == "FINISHED"
