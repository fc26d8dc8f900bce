"""rlhf_tasks.tracking against a real `mlflow server` on loopback, read back through MlflowClient."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from rlhf_tasks.runtime.cost import cost_usd, gpu_hours
from rlhf_tasks.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NullTracker,
    Tracker,
    flatten,
    plot_curves,
    plot_score_histogram,
    register_model,
)
from tests.mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.url)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --- no server needed ---------------------------------------------------------------------------


def test_cost_helpers_and_flatten():
    assert cost_usd(7200, 1.13, 8) == pytest.approx(2 * 1.13 * 8)  # 2 h x $1.13 x 8 GPUs
    assert gpu_hours(1800, 4) == pytest.approx(2.0)
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": None, "e": [1, 2]}


def test_plots_and_null_tracker():
    fig = plot_curves({"loss": [(1, 2.0), (2, 1.0)], "acc": [(1, 0.5)], "empty": []}, "t")
    assert sum(ax.get_visible() for ax in fig.axes) == 2
    assert plot_curves({}, "nothing").axes
    hist = plot_score_histogram([1.0, 2.0, 3.0], [0.0, 2.5, 1.0])
    assert "accuracy 0.667" in hist.axes[0].get_title()
    null = NullTracker()
    null.log_params({"a": 1})
    null.log_metrics({"x": 1.0}, step=0)
    assert null.run_id is None and null.flush() and not null.log_table([{"a": 1}], "t.json")
    null.close("FAILED")
    assert type(Tracker.start(None, "e", "r")) is NullTracker  # tracking off


def test_the_ui_knows_the_experiment_kind():
    """The tag and value are the ones the installed MLflow UI reads (its JS bundle), and the UI
    maps that value to its machine-learning view, so a MLflow upgrade that renames them fails here."""
    import mlflow

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    text = "".join(p.read_text(errors="ignore") for p in bundle.glob("main.*.js"))
    assert f'"{EXPERIMENT_KIND_TAG}"' in text
    assert f'CUSTOM_MODEL_DEVELOPMENT="{EXPERIMENT_KIND}"' in text
    # switch (kind) { ... case CUSTOM_MODEL_DEVELOPMENT: case ...: return <workflow>.MACHINE_LEARNING }
    assert re.search(r"case [\w.$]+\.CUSTOM_MODEL_DEVELOPMENT:(?:case [\w.$]+:)*return [\w.$]+\.MACHINE_LEARNING", text)


# --- against the server -------------------------------------------------------------------------


def test_nested_runs_params_and_metric_history(server, client, caplog):
    parent = Tracker.start(server.url, "nested", "pipeline", tags={"rlhf.kind": "pipeline"})
    assert type(parent) is Tracker
    parent.log_params({"sft": {"learning_rate": 1e-3, "epochs": 2}, "prompt": "x" * 7000, "layers": [1, 2],
                       "bad name!": 1})
    child = Tracker.start(server.url, "nested", "sft", parent_run_id=parent.run_id, tags={"rlhf.stage": "sft"})
    with caplog.at_level(logging.WARNING, logger="rlhf_tasks.tracking"):
        for step in range(5):
            child.log_metrics({"sft/loss": 1.0 / (step + 1), "sft/nan": float("nan")}, step=step)
        child.log_metrics({"sft/inf": float("inf")}, step=5)
    assert "sft/nan" in caplog.text and "sft/inf" in caplog.text
    child.close("FINISHED")
    parent.close("RUNNING")

    c = client.get_run(child.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent.run_id and c.data.tags["rlhf.stage"] == "sft"
    assert c.info.status == "FINISHED" and c.info.run_name == "sft"
    assert history(client, child.run_id, "sft/loss") == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    assert "sft/nan" not in c.data.metrics and "sft/inf" not in c.data.metrics
    p = client.get_run(parent.run_id)
    assert p.info.status == "RUNNING"  # close("RUNNING") leaves the parent open for later tasks
    assert p.data.params["sft.learning_rate"] == "0.001" and p.data.params["sft.epochs"] == "2"
    assert p.data.params["layers"] == "[1, 2]"
    assert len(p.data.params["prompt"]) == 6000
    assert "bad name!" not in p.data.params


def test_artifacts_figure_table_dict(server, client, tmp_path):
    t = Tracker.start(server.url, "artifacts", "evaluate")
    (tmp_path / "report.md").write_text("# report\n")
    assert t.log_artifact(tmp_path / "report.md", "report")
    assert not t.log_artifact(tmp_path / "missing.md")  # warns, never raises
    assert t.log_figure(plot_curves({"loss": [(1, 2.0), (2, 1.0)]}, "sft"), "plots/sft_curves.png")
    assert t.log_table([{"prompt": "hi", "answer": "hello", "reward": 1.5}, {"prompt": "bye", "reward": -0.5}],
                       "samples/sft_vs_ppo.json")
    assert t.log_dict({"a": [1, 2]}, "data/report.json") and t.log_text("text", "notes/n.txt")
    t.close()
    arts = {a.path for d in ("report", "plots", "samples", "data", "notes") for a in client.list_artifacts(t.run_id, d)}
    assert {"report/report.md", "plots/sft_curves.png", "samples/sft_vs_ppo.json", "data/report.json",
            "notes/n.txt"} <= arts
    # log_table registers the file as a table artifact, which is what the UI renders as one.
    assert '"type": "table"' in client.get_run(t.run_id).data.tags["mlflow.loggedArtifacts"]
    table = client.download_artifacts(t.run_id, "samples/sft_vs_ppo.json", str(tmp_path))
    data = json.loads(Path(table).read_text())
    assert data["columns"] == ["prompt", "answer", "reward"]
    assert data["data"] == [["hi", "hello", 1.5], ["bye", None, -0.5]]  # a missing cell is null


def test_resume_continues_the_same_run(server, client, caplog):
    cfg = {"sft": {"learning_rate": 1e-3}, "seed": 1}
    first = Tracker.start(server.url, "resume", "sft", tags={"airflow.try_number": "1"})
    first.log_params(cfg)
    for step in range(3):
        first.log_metrics({"sft/loss": float(step)}, step=step)
    first.close("FAILED")  # the attempt dies

    again = Tracker.start(server.url, "resume", "sft", resume_run_id=first.run_id, tags={"airflow.try_number": "2"})
    assert again.run_id == first.run_id
    again.log_params(cfg)  # same values: skipped, no error from MLflow
    with caplog.at_level(logging.WARNING, logger="rlhf_tasks.tracking"):
        again.log_params({"seed": 2})  # changed: MLflow params are immutable, warned and skipped
    assert "already" in caplog.text
    for step in range(3, 6):
        again.log_metrics({"sft/loss": float(step)}, step=step)
    again.close("FINISHED")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["airflow.try_number"] == "2"
    assert run.data.params["seed"] == "1"
    assert [s for s, _ in history(client, first.run_id, "sft/loss")] == list(range(6))
    gone = Tracker.start(server.url, "resume", "sft", resume_run_id="0" * 32)  # unknown id: a new run
    assert type(gone) is Tracker and gone.run_id != "0" * 32
    gone.close()


def test_register_model_alias_moves_only_on_improvement(server, client, tmp_path, monkeypatch, tiny_model_dir):
    import mlflow.artifacts

    model = tiny_model_dir  # logged as a LoggedModel in the transformers flavor: a real model

    def run_id() -> str:
        t = Tracker.start(server.url, "registry", "ppo")
        t.close()
        return t.run_id

    first = register_model(server.url, model, "actor", "eval/ppo_reward", 1.0, run_id())
    assert first == {"version": "1", "champion_version": "1", "promoted": True, "previous_champion_metric": None,
                     "source": first["source"], "model_id": first["model_id"]}
    worse = register_model(server.url, model, "actor", "eval/ppo_reward", 0.5, run_id())
    assert (worse["version"], worse["champion_version"], worse["promoted"]) == ("2", "1", False)
    assert worse["previous_champion_metric"] == 1.0
    better_run = run_id()
    better = register_model(server.url, model, "actor", "eval/ppo_reward", 2.0, better_run)
    assert (better["version"], better["champion_version"], better["promoted"]) == ("3", "3", True)
    again = register_model(server.url, model, "actor", "eval/ppo_reward", 2.0, better_run)  # a retried task
    assert again["version"] == "3" and not again["promoted"]
    assert client.get_model_version_by_alias("actor", "champion").version == "3"
    assert client.get_model_version("actor", "2").tags["eval/ppo_reward"] == "0.5"
    lower = register_model(server.url, model, "loss-model", "eval/loss", 1.0, run_id(), higher_is_better=False)
    lower2 = register_model(server.url, model, "loss-model", "eval/loss", 0.7, run_id(), higher_is_better=False)
    assert lower["promoted"] and lower2["promoted"] and lower2["champion_version"] == "2"
    # models:/ URIs resolve against the *registry* URI, which download_artifacts(tracking_uri=...)
    # does not set (it would open a local ./mlflow.db): set it the way a deployment does.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.chdir(tmp_path)
    got = Path(mlflow.artifacts.download_artifacts("models:/actor@champion", dst_path=str(tmp_path / "dl")))
    assert "transformers" in (got / "MLmodel").read_text()
    assert (got / "model" / "config.json").read_text() == (model / "config.json").read_text()
    assert better["source"] == f"models:/{better['model_id']}" and again["model_id"] == better["model_id"]
    with pytest.raises(FileNotFoundError):
        register_model(server.url, tmp_path / "nope", "actor", "eval/ppo_reward", 3.0, better_run)


def test_system_metrics(server, client, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    t = Tracker.start(server.url, "system", "sft", system_metrics=True, system_metrics_interval_s=0.2)
    time.sleep(1.0)
    t.close()
    assert "system/cpu_utilization_percentage" in client.get_run(t.run_id).data.metrics


def test_experiments_open_in_the_model_training_view(server, client):
    """The MLflow UI picks its view from the experiment's ``mlflow.experimentKind`` tag; the
    project's experiments are model training ("custom_model_development"), not GenAI."""
    Tracker.start(server.url, "kind-new", "sft").close()
    assert client.get_experiment_by_name("kind-new").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment("kind-old")  # made before the project set the tag
    Tracker.start(server.url, "kind-old", "sft").close()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("kind-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker.start(server.url, "kind-chosen", "sft").close()
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a person's choice stays


def test_dead_server_at_start_falls_back_to_null_tracker():
    t0 = time.monotonic()
    t = Tracker.start(f"http://127.0.0.1:{free_port()}", "dead", "sft", start_timeout_s=2)
    assert type(t) is NullTracker and t.run_id is None
    assert time.monotonic() - t0 < 15
    t.log_metrics({"x": 1.0}, step=0)
    t.close("FAILED")


def test_outage_neither_raises_nor_blocks_and_metrics_arrive(server, client):
    """Last test of the module: it stops the shared server and brings it back."""
    keep = Tracker.start(server.url, "outage", "ppo", retry_budget_s=120)
    drop = Tracker.start(server.url, "outage", "ppo-short-budget", retry_budget_s=0.5)
    keep.log_metrics({"ppo/reward": 0.0}, step=0)
    assert keep.flush(timeout=10)
    server.stop()
    try:
        t0 = time.monotonic()
        for step in range(1, 4):
            keep.log_metrics({"ppo/reward": float(step)}, step=step)
        drop.log_metrics({"ppo/reward": 1.0}, step=1)
        assert time.monotonic() - t0 < 0.5  # enqueued, not sent: training does not wait
        keep.op_budget_s = drop.op_budget_s = 1.0
        keep.set_tags({"during": "outage"})  # warns after its budget, does not raise
        assert not keep.log_text("x", "during/outage.txt")
        assert drop.flush(timeout=20)  # past its 0.5 s budget the batch is dropped
        assert drop.stats()["points_dropped"] == 1
        assert not keep.flush(timeout=0.5)  # still retrying
    finally:
        server.start()
    assert keep.flush(timeout=30)
    keep.close()
    drop.close()
    assert history(client, keep.run_id, "ppo/reward") == [(s, float(s)) for s in range(4)]
    assert client.get_run(keep.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("before", [None, "http://127.0.0.1:1"])
def test_using_another_tracking_uri_gives_the_environment_back(monkeypatch, tmp_path, before):
    """MLflow's own context manager deletes MLFLOW_TRACKING_URI on the way out when its global
    was unset: the register stage took the variable from the process that called it."""
    import mlflow

    from rlhf_tasks.tracking.calls import using_tracking_uri

    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    inside = f"sqlite:///{tmp_path / 'x.db'}"
    with using_tracking_uri(inside):
        assert mlflow.get_tracking_uri() == inside
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
