"""Fixtures of the production-topology tests: one native topology (PostgreSQL, Redis,
Celery workers, api-server, MLflow) shared by every test of tests/e2e that asks for it, and
up only while they run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.topology import REPO, Topology

# One pipeline run through the topology, bounded: tiny-cpu takes 3-5 minutes on 2 cores.
RUN_TIMEOUT_S = float(os.environ.get("RLHF_E2E_RUN_TIMEOUT_S", "900"))
# The topology's runs (REST- and browser-triggered) check queues, pools, workers, the UIs and
# MLflow, not learning (tests/e2e/test_pipeline.py and tests/test_training.py check that, on
# the session's full tiny-cpu run): a few steps of each stage, small evaluation sets. PPO
# keeps the 12 iterations the MLflow UI test was shown to chart.
SHORT_RUN = {"sft.epochs": 1, "rm.epochs": 1, "ppo.max_steps": 12}
SHORT_RUN_OVERRIDES = ["sft.max_steps=20", "rm.max_steps=20", "data.max_eval_samples=32", "ppo.eval_prompts=32"]


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
