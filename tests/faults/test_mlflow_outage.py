"""A real SFT process against a real MLflow server on loopback that is SIGKILLed mid-stage
and restarted, that is absent when the stage starts and comes up later, and that never
comes up. Training always finishes; every metric point the stage produced is counted
(``tracking/points_*`` in its result, one log line at its end) and compared with what the
server holds: none is lost once the server is back."""

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


def points(result: dict) -> dict[str, int]:
    return {k.removeprefix("tracking/points_"): int(v) for k, v in result["metrics"].items()
            if k.startswith("tracking/points_")}


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "mlflow")
    yield s
    s.stop()


def test_server_killed_mid_stage_and_restarted(storage, tiny_model_dir, server, tmp_path):
    server.start()
    run = RunDir(tmp_path / "run")
    with StageProc("sft", run.path, *ARGS, env={"MLFLOW_TRACKING_URI": server.url}) as p:
        assert p.wait_step(3), p.tail()
        hard_kill(server)
        down_at, t_down = p.last_step, time.monotonic()
        p.wait_step(down_at + 6)  # trains on without the server (or finishes meanwhile)
        server.start()
        up_at, outage_s = p.last_step, time.monotonic() - t_down
        result = p.result()
    n = points(result)
    got = received(server.url, result["mlflow_run_id"])
    print("FAULT-REPORT", json.dumps({"case": "killed mid-stage, restarted", "down_at_step": down_at,
                                     "up_at_step": up_at, "outage_s": round(outage_s, 1), **n, "received": got}))
    assert "cannot send metrics" in p.text()  # the outage was seen
    assert n["produced"] > 0 and n["sent"] == n["produced"] and n["dropped"] == 0 and n["pending"] == 0, n
    assert got == n["produced"], (got, n)


def test_server_absent_at_start_comes_up_later(storage, tiny_model_dir, tmp_path):
    server = MlflowServer(tmp_path / "mlflow", port=free_port())
    run = RunDir(tmp_path / "run")
    try:
        with StageProc("sft", run.path, *ARGS, env={"MLFLOW_TRACKING_URI": server.url}) as p:
            assert p.wait_step(3), p.tail()
            assert not (run.stage("sft") / "mlflow_run_id").exists()  # no run yet: nothing to log into
            up_at = p.last_step
            server.start()
            result = p.result()
        n = points(result)
        run_id = result["mlflow_run_id"]
        assert run_id and (run.stage("sft") / "mlflow_run_id").read_text() == run_id
        got = received(server.url, run_id)
        from mlflow import MlflowClient

        mlrun = MlflowClient(server.url).get_run(run_id)
        print("FAULT-REPORT", json.dumps({"case": "absent at start, up later", "up_at_step": up_at, **n,
                                         "received": got}))
        assert n["sent"] == n["produced"] > 0 and n["dropped"] == 0, n
        assert got == n["produced"], (got, n)
        # The deferred run is a full one: nested under the pipeline's parent, config as params.
        assert mlrun.data.tags.get("mlflow.parentRunId") == (run.path / "mlflow_parent_run_id").read_text()
        assert mlrun.data.params["sft.max_steps"] == "24" and mlrun.info.status == "FINISHED"
    finally:
        server.stop()


def test_server_never_up_training_finishes(storage, tiny_model_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    run = RunDir(tmp_path / "run")
    t0 = time.monotonic()
    with StageProc("sft", run.path, *ARGS, env={"MLFLOW_TRACKING_URI": url, "RLHF_MLFLOW_FLUSH_TIMEOUT_S": "3"}) as p:
        result = p.result()
    n = points(result)
    print("FAULT-REPORT", json.dumps({"case": "never up", **n, "received": 0,
                                     "stage_s": round(time.monotonic() - t0, 1)}))
    assert result["metrics"]["global_step"] == 24 and result["mlflow_run_id"] is None
    assert n["produced"] > 0 and n["sent"] == 0 and n["pending"] == n["produced"], n
    assert f"dropped {n['produced']}" in p.text()  # reported at the end of the stage
