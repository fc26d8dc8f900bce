"""The pipeline through the production topology, natively: triggered in the Airflow UI
(tests/e2e/conftest.py: ``ui_run``, the topology's one pipeline run; the REST API triggers
the human-feedback DAGs' runs in test_human_feedback.py and an ingest run in
test_make_ui.py), scheduled by the CeleryExecutor onto a "GPU" worker (queue ``gpu``) and a
CPU worker (queue ``default``) over Redis, metadata in PostgreSQL, tracked by an MLflow
server on PostgreSQL. Checked through the same APIs a person or a client would use."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GPU_TASKS = ("install", "sft", "rm", "ppo", "evaluate")
CPU_TASKS = ("register",)
STAGE_METRICS = {
    "sft": ["sft/perplexity"],
    "rm": ["rm/accuracy"],
    "ppo": ["ppo/reward", "ppo/kl"],
}
EVERY_STAGE = ["time/wall_clock_s", "cost/usd"]


def test_gpu_stages_ran_on_the_gpu_worker_and_register_on_the_cpu_worker(topology, ui_run):
    tis = topology.task_instances(ui_run["run_id"])
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


def test_mlflow_holds_the_parent_run_and_a_child_run_per_stage(topology, ui_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(topology.mlflow_url)
    experiment = client.get_experiment_by_name("rlhf-tiny-cpu")
    assert experiment is not None, [e.name for e in client.search_experiments()]
    run_id = ui_run["run_id"]
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
