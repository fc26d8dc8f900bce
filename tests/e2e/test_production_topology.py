"""The pipeline through the production topology, natively: triggered through Airflow's
REST API, scheduled by the CeleryExecutor onto a "GPU" worker (queue ``gpu``) and a CPU
worker (queue ``default``) over Redis, metadata in PostgreSQL, tracked by an MLflow server
on PostgreSQL. Checked through the same APIs a person or a client would use."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import RUN_TIMEOUT_S, SHORT_RUN, SHORT_RUN_OVERRIDES, e2e_conf
from tests.e2e.topology import Topology

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GPU_TASKS = ("install", "sft", "rm", "ppo", "evaluate")
CPU_TASKS = ("register",)
STAGE_METRICS = {
    "sft": ["sft/perplexity"],
    "rm": ["rm/accuracy"],
    "ppo": ["ppo/reward", "ppo/kl"],
}
EVERY_STAGE = ["time/wall_clock_s", "cost/usd"]


@pytest.fixture(scope="module")
def rest_run(topology: Topology) -> dict:
    t0 = time.monotonic()
    # This run checks the topology (queues, pools, workers, PostgreSQL, MLflow), not learning:
    # the short recipe, as the browser's run has.
    conf = e2e_conf(**SHORT_RUN)
    conf["overrides"] = [*SHORT_RUN_OVERRIDES, *conf["overrides"]]
    run_id = topology.trigger(conf, run_id=f"e2e_rest_{time.strftime('%Y%m%dT%H%M%S')}")
    run = topology.wait_for_run(run_id, RUN_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    print(f"\nREST-triggered pipeline run {run_id}: {run['state']} in {elapsed:.0f} s")
    return {"run_id": run_id, "run": run, "elapsed": elapsed}


def test_pipeline_run_triggered_through_the_rest_api_succeeds(topology, rest_run):
    assert rest_run["run"]["state"] == "success", topology.run_report(rest_run["run_id"])
    assert rest_run["run"]["conf"]["preset"] == "tiny-cpu"


def test_gpu_stages_ran_on_the_gpu_worker_and_register_on_the_cpu_worker(topology, rest_run):
    tis = topology.task_instances(rest_run["run_id"])
    for task in GPU_TASKS:
        ti = tis[task]
        assert ti["state"] == "success", (task, ti["state"])
        assert ti["queue"] == "gpu" and ti["hostname"] == "gpu-worker", (task, ti["queue"], ti["hostname"])
    for task in ("sft", "rm", "ppo", "evaluate"):
        assert tis[task]["pool"] == "gpu", (task, tis[task]["pool"])
    for task in CPU_TASKS:
        ti = tis[task]
        assert ti["state"] == "success", (task, ti["state"])
        assert ti["queue"] == "default" and ti["hostname"] == "cpu-worker", (task, ti["queue"], ti["hostname"])


def test_mlflow_holds_the_parent_run_and_a_child_run_per_stage(topology, rest_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(topology.mlflow_url)
    experiment = client.get_experiment_by_name("rlhf-tiny-cpu")
    assert experiment is not None, [e.name for e in client.search_experiments()]
    run_id = rest_run["run_id"]
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`rlhf.kind` = 'pipeline' and tags.`airflow.run_id` = '{run_id}'")
    assert len(parents) == 1, f"expected one parent run tagged with {run_id}, got {len(parents)}"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {c.data.tags.get("rlhf.stage"): c for c in children}
    for stage, names in STAGE_METRICS.items():
        assert stage in by_stage, f"no child run for {stage}: {sorted(by_stage)}"
        metrics = by_stage[stage].data.metrics
        for name in [*names, *EVERY_STAGE]:
            assert name in metrics, f"{stage} lacks {name}: {sorted(metrics)}"
        assert by_stage[stage].data.tags.get("airflow.run_id") == run_id
    # Metrics logged over training, not once: the average reward has a curve.
    assert len(client.get_metric_history(by_stage["ppo"].info.run_id, "ppo/reward")) > 1
