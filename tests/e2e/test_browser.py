"""What a person does, in a real browser (headless Chromium), on the production topology:
sign in to the Airflow UI, open the ``rlhf_pipeline`` trigger form, change a parameter,
trigger, see the run succeed, then find the run's average-reward chart in the MLflow UI.

Screenshots go to the pytest tmp dir and to ``test-artifacts/`` in the repository.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import RUN_TIMEOUT_S, SHORT_RUN, SHORT_RUN_OVERRIDES, e2e_overrides, keep_artifact
from tests.e2e.topology import DAG_ID, Topology

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("RLHF_E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Trigger-form fields changed in the browser, by form section: the short recipe's epochs and
# PPO iterations (tests/e2e/conftest.py: SHORT_RUN) in place of tiny-cpu's 3, 3 and 40; its
# step limits and evaluation sizes go in the form's free list of overrides (Advanced).
# Each field is labelled with its config path (dags/rlhf_pipeline.py: FORM).
FORM_VALUES = {
    "Step 1: SFT": {"sft.epochs": SHORT_RUN["sft.epochs"]},
    "Step 2: reward model": {"rm.epochs": SHORT_RUN["rm.epochs"]},
    "Step 3: PPO": {"ppo.max_steps": SHORT_RUN["ppo.max_steps"]},
}
CONFIG_KEYS = {k: k for values in FORM_VALUES.values() for k in values}
UI_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (pip: playwright) is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Shots:
    """Numbered screenshots, in the test's tmp dir and copied to test-artifacts/."""

    def __init__(self, page, tmp_dir: Path, artifacts_dir: Path):
        self.page, self.tmp_dir, self.artifacts_dir, self.n = page, tmp_dir, artifacts_dir, 0
        self.paths: list[Path] = []
        for old in artifacts_dir.glob("browser-*.png"):  # keep only this run's pictures
            old.unlink()

    def take(self, name: str, full_page: bool = False) -> Path:
        self.n += 1
        path = self.tmp_dir / f"browser-{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        self.paths.append(keep_artifact(path, self.artifacts_dir))
        return path


@pytest.fixture(scope="module")
def ui_run(topology: Topology, browser, tmp_path_factory, artifacts_dir) -> Iterator[dict]:
    """Trigger the pipeline from the Airflow UI's trigger form and wait for the run."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    shots = Shots(page, tmp_path_factory.mktemp("screenshots"), artifacts_dir)
    run_id = f"e2e_browser_{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        # Sign in: SimpleAuthManager's login page, reached through the redirect of a DAG URL.
        page.goto(f"{topology.api_url}/dags/{DAG_ID}")
        page.wait_for_url("**/auth/login**")
        page.get_by_label("Username").fill(topology.admin_user)
        page.get_by_label("Password").fill(topology.admin_password)
        shots.take("airflow-login")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"**/dags/{DAG_ID}**")

        # The trigger form: the params in sections, one open at a time. Change fields in three
        # of them, leave the PPO section open for the screenshot.
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        # The form's free list: the short recipe's overrides, then RLHF_E2E_OVERRIDES except
        # keys the form fields set here.
        overrides = [*SHORT_RUN_OVERRIDES, *(o for o in e2e_overrides() if o.split("=", 1)[0] not in CONFIG_KEYS)]
        dialog.get_by_text("Advanced", exact=True).click()
        dialog.locator("#element_overrides").fill("\n".join(overrides))
        for section, values in FORM_VALUES.items():
            dialog.get_by_text(section, exact=True).click()
            for name, value in values.items():
                field = dialog.get_by_label(name, exact=True)
                field.fill(str(value))
                field.press("Tab")
        shots.take("trigger-form")
        # The run's id, and the conf the form built from the fields.
        dialog.get_by_text("Advanced Options", exact=True).click()
        dialog.get_by_label("Run ID").fill(run_id)
        dialog.get_by_text("Configuration JSON").scroll_into_view_if_needed()
        shots.take("trigger-conf")
        t0 = time.monotonic()
        dialog.get_by_role("button", name="Trigger").click()
        page.get_by_role("dialog").wait_for(state="hidden")

        run = topology.wait_for_run(run_id, RUN_TIMEOUT_S)
        elapsed = time.monotonic() - t0
        print(f"\nbrowser-triggered pipeline run {run_id}: {run['state']} in {elapsed:.0f} s")
        page.goto(f"{topology.api_url}/dags/{DAG_ID}/runs/{run_id}")
        page.get_by_text(run_id).first.wait_for()
        page.wait_for_load_state("networkidle")
        shots.take("airflow-run")
        yield {"run_id": run_id, "run": run, "page": page, "shots": shots, "elapsed": elapsed}
    except Exception:
        with contextlib.suppress(Exception):  # the page may be gone: keep the original error
            print(f"screenshot of the failure: {shots.take('failure', full_page=True)}")
        raise
    finally:
        context.close()


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
