"""The whole DAG through Airflow on tiny-cpu, against a real MLflow server on loopback.

The run is the session's (tests/conftest.py: ``pipeline_run``); tests/test_training.py
reads its run directory as the trained tiny-cpu run. It does double duty: while SFT
trains, its process is killed right after its first complete checkpoint; Airflow retries
the task, which must resume from that checkpoint and continue the same MLflow run. Then
everything is read back through the MLflow client: parent and child runs, metrics,
artifacts, the registered model.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STAGE_TAGS = {"sft", "rm", "ppo", "evaluate"}


@pytest.fixture(scope="module")
def client(pipeline_run):
    from mlflow.tracking import MlflowClient

    return MlflowClient(pipeline_run.mlflow_url)


def test_all_stages_succeed(pipeline_run):
    run_dir = pipeline_run.run_dir
    tail = pipeline_run.proc.stdout[-3000:] + pipeline_run.proc.stderr[-3000:]
    assert run_dir is not None, tail
    for stage in ("sft", "rm", "ppo", "evaluate"):
        assert (run_dir / stage / "result.json").is_file(), f"{stage} did not finish; see {pipeline_run.log}"
    assert (run_dir / "report.md").is_file() and (run_dir / "register.json").is_file()
    report = (run_dir / "report.md").read_text()
    assert "perplexity" in report and "average reward" in report
    print(f"pipeline through Airflow: {pipeline_run.elapsed:.0f} s")


def test_metrics_move_the_right_way(pipeline_run):
    run_dir = pipeline_run.run_dir
    r = {s: json.loads((run_dir / s / "result.json").read_text())["metrics"] for s in ("sft", "rm", "evaluate")}
    assert r["sft"]["perplexity"] < 0.5 * r["sft"]["perplexity_before"]
    assert r["rm"]["accuracy"] >= 0.85
    assert r["evaluate"]["aligned_reward"] > r["evaluate"]["sft_reward"]


def test_killed_stage_resumed_from_checkpoint_in_the_same_mlflow_run(pipeline_run, client):
    killed = pipeline_run.killed
    assert "pid" in killed, "the SFT stage finished before its first checkpoint: nothing was killed"
    run_dir = pipeline_run.run_dir
    resume = json.loads((run_dir / "sft" / "resume.json").read_text())
    assert resume["resumed_from_step"] >= killed["step"] > 0
    total = json.loads((run_dir / "sft" / "result.json").read_text())["metrics"]["global_step"]
    redone = total - resume["resumed_from_step"]
    assert redone < total  # fewer steps than a fresh run
    exp = client.get_experiment_by_name("rlhf-tiny-cpu")
    sft_runs = client.search_runs([exp.experiment_id], "tags.`rlhf.stage` = 'sft'")
    assert len(sft_runs) == 1
    assert sft_runs[0].data.tags.get("airflow.try_number") == "2"
    assert sft_runs[0].info.status == "FINISHED"


def test_mlflow_holds_runs_metrics_artifacts_and_model(client):
    exp = client.get_experiment_by_name("rlhf-tiny-cpu")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("rlhf.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["rlhf.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert STAGE_TAGS <= set(children)
    expect = {
        "sft": ["sft/loss", "sft/perplexity", "sft/tokens_per_s"],
        "rm": ["rm/loss", "rm/accuracy", "rm/chosen_score", "rm/rejected_score"],
        "ppo": ["ppo/reward", "ppo/kl", "ppo/actor_loss", "ppo/critic_loss"],
        "evaluate": ["eval/sft_reward", "eval/aligned_reward", "eval/kl_aligned_sft"],
    }
    for stage, names in expect.items():
        metrics = children[stage].data.metrics
        for n in [*names, "time/wall_clock_s", "cost/usd"]:
            assert n in metrics, f"{stage} lacks {n}: {sorted(metrics)}"
        assert children[stage].data.tags.get("airflow.dag_id") == "rlhf_pipeline"
        assert children[stage].data.params.get("sft.learning_rate")  # the whole config as params
    assert len(client.get_metric_history(children["ppo"].info.run_id, "ppo/reward")) > 5

    def artifacts(run, path=""):
        return [a.path for a in client.list_artifacts(run.info.run_id, path)]

    assert "plots/sft_curves.png" in artifacts(children["sft"], "plots")
    assert "plots/rm_score_histogram.png" in artifacts(children["rm"], "plots")
    assert any("samples" in a for a in artifacts(children["evaluate"]))
    parent_art = artifacts(parent, "report") + artifacts(parent, "environment")
    assert "report/report.md" in parent_art and "environment/environment.json" in parent_art

    from rlhf_tasks.config import PipelineConfig

    name = PipelineConfig.load("tiny-cpu").tracking.registered_model
    version = client.get_model_version_by_alias(name, "champion")
    assert version.version == "1"


def test_models_are_logged_models_mlflow_loads(pipeline_run, client, monkeypatch):
    """The SFT actor, the reward model and the aligned actor are LoggedModels of their stage's
    run, with their metrics linked; the evaluation compares SFT and PPO under the same names on
    the held-out prompts' dataset; the champion is the PPO LoggedModel, weights stored once in
    the artifacts, and mlflow.transformers.load_model("models:/<name>@champion") generates; the
    reward model loads as a pyfunc that scores answers."""
    import mlflow

    from rlhf_tasks.config import PipelineConfig

    exp = client.get_experiment_by_name("rlhf-tiny-cpu")
    models = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    assert {"sft-actor", "reward-model", "ppo-actor"} <= set(models), sorted(models)
    sft, rm, ppo = models["sft-actor"], models["reward-model"], models["ppo-actor"]
    assert ppo.tags["rlhf.sft_model_id"] == sft.model_id and ppo.tags["rlhf.rm_model_id"] == rm.model_id
    assert int(ppo.params["generation.max_new_tokens"]) > 0
    linked = {m.model_id: {x.key: x for x in m.metrics or []} for m in (sft, rm, ppo)}
    assert "rm/accuracy" in linked[rm.model_id] and "sft/perplexity" in linked[sft.model_id]
    for m in (sft, ppo):  # the same names on the same dataset: the UI compares them
        assert linked[m.model_id]["eval/reward"].dataset_name == "tiny-cpu-heldout-prompts"
    assert linked[ppo.model_id]["eval/reward"].value > linked[sft.model_id]["eval/reward"].value
    name = PipelineConfig.load("tiny-cpu").tracking.registered_model
    assert client.get_model_version_by_alias(name, "champion").source == f"models:/{ppo.model_id}"
    weights = list((pipeline_run.log.parent / "mlflow" / "artifacts").rglob("*.safetensors"))
    # one copy each, in the LoggedModels' artifacts: the chat model's, the scoring reward model's
    owners = [[m for m in (sft, rm, ppo) if m.model_id in str(w)] for w in weights if w.name == "model.safetensors"]
    assert sorted(o[0].name for o in owners) == ["ppo-actor", "reward-model"], weights
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline_run.mlflow_url)
    pipe = mlflow.transformers.load_model(f"models:/{name}@champion")
    assert isinstance(pipe("\n\nHuman: Hello\n\nAssistant:", max_new_tokens=4)[0]["generated_text"], str)
    import pandas as pd

    scorer = mlflow.pyfunc.load_model(f"models:/{rm.model_id}")  # the reward model scores answers
    scores = scorer.predict(pd.DataFrame({"prompt": ["\n\nHuman: What colour is a lemon?\n\nAssistant:"] * 2,
                                          "answer": [" A lemon is yellow.", " purple purple purple"]}))
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
