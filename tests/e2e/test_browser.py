"""What a person does, in a real browser (headless Chromium), on the production topology:
sign in to the Airflow UI, open the ``rlhf_pipeline`` trigger form, change a parameter,
trigger, see the run succeed, then find the run's average-reward chart in the MLflow UI.

Screenshots go to the pytest tmp dir and to ``test-artifacts/`` in the repository.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import CONFIG_KEYS, FORM_VALUES, SHORT_RUN_OVERRIDES, UI_TIMEOUT_MS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

def test_run_triggered_from_the_ui_succeeds_with_the_changed_parameter(topology, ui_run):
    run = ui_run["run"]
    assert run["state"] == "success", topology.run_report(ui_run["run_id"])
    for values in FORM_VALUES.values():
        for name, value in values.items():
            assert run["conf"][name] == value, run["conf"]
    assert run["conf"]["overrides"][:len(SHORT_RUN_OVERRIDES)] == SHORT_RUN_OVERRIDES, run["conf"]
    assert run["conf"]["preset"] == "tiny-cpu"


def test_ui_run_used_the_gpu_queue_and_the_cpu_worker(topology, ui_run):
    tis = topology.task_instances(ui_run["run_id"])
    for task in ("sft", "rm", "ppo", "evaluate"):
        assert (tis[task]["queue"], tis[task]["hostname"]) == ("gpu", "gpu-worker"), task
    assert (tis["register"]["queue"], tis["register"]["hostname"]) == ("default", "cpu-worker")


def test_mlflow_ui_shows_the_average_reward_chart(topology, ui_run):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect

    client = MlflowClient(topology.mlflow_url)
    experiment = client.get_experiment_by_name("rlhf-tiny-cpu")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   f"tags.`rlhf.kind` = 'pipeline' and tags.`airflow.run_id` = '{ui_run['run_id']}'")
    (ppo,) = client.search_runs([experiment.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`rlhf.stage` = 'ppo'")
    # The form's values reached the training config (logged as the run's parameters).
    for values in FORM_VALUES.values():
        for name, value in values.items():
            assert ppo.data.params[CONFIG_KEYS[name]] == str(value), (name, ppo.data.params.get(CONFIG_KEYS[name]))
    for key, value in (o.split("=", 1) for o in SHORT_RUN_OVERRIDES):  # and so did the free list's
        assert ppo.data.params[key] == value, (key, ppo.data.params.get(key))

    page, shots = ui_run["page"], ui_run["shots"]
    page = page.context.browser.new_page(viewport={"width": 1440, "height": 1000})
    page.set_default_timeout(UI_TIMEOUT_MS)
    shots.page = page
    try:
        # The experiment's training runs: the parent run is listed under the DAG run's id.
        page.goto(f"{topology.mlflow_url}/#/experiments/{experiment.experiment_id}/runs")
        page.get_by_text(parent.info.run_name).first.wait_for()
        _close_assistant_panel(page)
        shots.take("mlflow-runs")
        # The PPO stage's run, its metric charts narrowed to ppo/reward (the average reward).
        # Charts are grouped by prefix: the card is titled "reward", its legend names ppo/reward.
        page.goto(f"{topology.mlflow_url}/#/experiments/{experiment.experiment_id}/runs/{ppo.info.run_id}"
                  "/model-metrics")
        # The "ppo" group's header reads "ppo (16)": the number of charts in the group.
        section = page.get_by_test_id("experiment-view-compare-runs-section-header").filter(
            has_text=re.compile(r"^ppo\W*\(\d+\)"))
        section.wait_for()
        all_charts = int(re.search(r"\((\d+)\)", section.inner_text()).group(1))
        _close_assistant_panel(page)
        search = page.get_by_placeholder("Search metric charts")
        search.fill("ppo/reward")
        expect(search).to_have_value("ppo/reward")
        expect(section).not_to_contain_text(f"({all_charts})")  # narrowed down
        expect(page.get_by_text("(ppo/reward)").first).to_be_visible()
        expect(page.get_by_text("reward", exact=True).first).to_be_visible()
        page.wait_for_timeout(1500)  # the chart animates in
        shots.take("mlflow-ppo-reward")
    finally:
        page.close()
    assert all(p.stat().st_size > 10_000 for p in shots.paths), [(p.name, p.stat().st_size) for p in shots.paths]


def _close_assistant_panel(page) -> None:
    """MLflow 3 opens an assistant side panel that hides a third of the page: close it if
    it is open."""
    from playwright.sync_api import expect

    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count() and close.first.is_visible():
        close.first.click()
        expect(close).to_have_count(0)
