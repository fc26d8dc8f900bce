"""Fixtures of the production-topology tests: one native topology (PostgreSQL, Redis,
Celery workers, api-server, MLflow) shared by every test of tests/e2e that asks for it, and
up only while they run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.topology import DAG_ID, REPO, Topology

# One pipeline run through the topology, bounded: tiny-cpu takes 3-5 minutes on 2 cores.
RUN_TIMEOUT_S = float(os.environ.get("RLHF_E2E_RUN_TIMEOUT_S", "900"))
# The topology's runs (REST- and browser-triggered) check queues, pools, workers, the UIs and
# MLflow, not learning (tests/e2e/test_pipeline.py and tests/test_training.py check that, on
# the session's full tiny-cpu run): a few steps of each stage, small evaluation sets. PPO
# keeps the 12 iterations the MLflow UI test was shown to chart.
SHORT_RUN = {"sft.epochs": 1, "rm.epochs": 1, "ppo.max_steps": 12}
SHORT_RUN_OVERRIDES = ["sft.max_steps=20", "rm.max_steps=20", "data.max_eval_samples=32", "evaluate.prompts=32"]


def e2e_overrides() -> list[str]:
    """Extra ``key=value`` config overrides from RLHF_E2E_OVERRIDES (a JSON list), e.g.
    to shrink the tiny-cpu preset further on a slow machine."""
    raw = os.environ.get("RLHF_E2E_OVERRIDES", "").strip()
    if not raw:
        return []
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ValueError(f'RLHF_E2E_OVERRIDES must be a JSON list of "key=value" strings, got {raw!r}')
    return value


def e2e_conf(**params: Any) -> dict[str, Any]:
    """The trigger conf of a test run: the tiny-cpu preset, plus form fields and overrides."""
    return {"preset": "tiny-cpu", "overrides": e2e_overrides(), **params}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the topology run last in tests/e2e, one after another: the topology is
    started for the first of them and stopped after the last (package scope), so that its
    idle scheduler, dag-processor and workers take no CPU from the other tests."""
    here = Path(__file__).parent
    mine = [i for i, item in enumerate(items) if here in Path(item.path).parents]
    if not mine or mine != list(range(mine[0], mine[-1] + 1)):  # not one block: leave the order as given
        return
    block = items[mine[0]:mine[-1] + 1]
    items[mine[0]:mine[-1] + 1] = sorted(block, key=lambda item: "topology" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="package")
def topology(tmp_path_factory) -> Iterator[Topology]:
    for tool in ("airflow", "mlflow", "celery"):
        if not (Path(sys.executable).with_name(tool)).exists():
            pytest.skip(f"{tool} is not installed next to {sys.executable}")
    # SIGTERM (a CI time limit, `kill`) ends pytest without teardown: turn it into the
    # KeyboardInterrupt pytest tears down on, so that the topology is still stopped.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Topology(root=tmp_path_factory.mktemp("topology")) as topo:
            topo.unpause()
            yield topo
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``test-artifacts/`` in the repository: screenshots a person can look at afterwards."""
    d = REPO / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d


def keep_artifact(path: Path, artifacts_dir: Path) -> Path:
    """Copy a file made under the pytest tmp dir to ``test-artifacts/``."""
    target = artifacts_dir / path.name
    shutil.copy2(path, target)
    return target


# --- the browser, and the topology's one pipeline run, triggered in it ---------------------------

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


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def ui_run(topology: Topology, browser, tmp_path_factory, artifacts_dir) -> Iterator[dict]:
    """The topology's one pipeline run: triggered from the Airflow UI's trigger form (the
    short recipe), waited for; test_browser.py checks what the person saw, and
    test_production_topology.py where its tasks ran and what MLflow holds."""
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
