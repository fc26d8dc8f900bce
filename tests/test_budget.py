"""The run's budget (``resources.budget_usd`` / ``budget_gpu_hours``, rlhf_tasks/runtime/budget.py):
a stage of a run that has already spent more stops at its start with its own exit code, the
reason in its log and in the report; at 80% it warns; no budget, nothing checked.

The run is made up (tests/test_register.py's finished stages: 7.5 + 1.43 + 29.0 USD at
$2.50/GPU-hour x 2 GPUs), so no model is trained or loaded.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from rlhf_tasks.config import PipelineConfig
from rlhf_tasks.runtime import budget
from rlhf_tasks.storage import RunDir
from tests.test_register import make_run

SPENT_USD = (5400 + 1028 + 20880) / 3600 * 5  # sft, rm, ppo: 37.93 USD; 15.17 GPU-hours


def priced_run(tmp_path, *limits: str) -> tuple[PipelineConfig, RunDir]:
    run = make_run(tmp_path / "run", stages=("sft", "rm", "ppo"))
    cfg = PipelineConfig.load("tiny-cpu", ["resources.gpu_hourly_usd=2.5", "resources.num_gpus=2", *limits])
    cfg.save(run.config_path)
    return cfg, run


def test_spent_counts_the_finished_stages_as_the_report_does(tmp_path):
    cfg, run = priced_run(tmp_path, "resources.budget_usd=100")
    spent = budget.spent_by_others(cfg, run, "evaluate")
    assert spent.usd == pytest.approx(SPENT_USD) and spent.gpu_hours == pytest.approx(SPENT_USD / 2.5)
    assert budget.spent_by_others(cfg, run, "ppo").usd == pytest.approx(SPENT_USD - 29.0)


def test_warns_at_80_percent_and_stops_at_the_limit(tmp_path, caplog):
    cfg, run = priced_run(tmp_path, "resources.budget_gpu_hours=18")  # 15.17 of 18: 84%
    with caplog.at_level(logging.WARNING, logger="rlhf_tasks"):
        budget.check(cfg, run, "evaluate")
    assert "budget warning" in caplog.text and "84%" in caplog.text
    assert not (run.path / budget.BUDGET_FILE).exists()
    with pytest.raises(budget.BudgetExceeded, match="GPU-hours"):
        budget.check(cfg, run, "evaluate", budget.Spent(gpu_hours=3))  # the running stage's share
    assert json.loads((run.path / budget.BUDGET_FILE).read_text())["stage"] == "evaluate"
    none = PipelineConfig.load("tiny-cpu", ["resources.gpu_hourly_usd=2.5"])
    budget.check(none, run, "evaluate", budget.Spent(1e9, 1e9))  # no budget: never stops


def test_a_run_over_its_budget_stops_with_the_reason(tmp_path):
    """The evaluate stage of a run that has spent 37.93 USD of a 10 USD budget exits with
    EXIT_OVER_BUDGET before loading anything; the reason is in its log and the report."""
    _, run = priced_run(tmp_path, "resources.budget_usd=10")
    proc = subprocess.run([sys.executable, "-m", "rlhf_tasks", "evaluate", "--output", str(run.path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == budget.EXIT_OVER_BUDGET, proc.stderr[-3000:]
    assert "budget exceeded: the run has spent 37.93 USD of its budget of 10 USD" in proc.stderr
    assert not (run.path / "evaluate" / "result.json").exists()
    report = (run.path / "report.md").read_text()
    assert "## Budget" in report and "**Stopped in evaluate**: budget exceeded" in report


def test_a_running_stage_stops_at_the_limit(tmp_path, monkeypatch):
    """While the stage runs, its cost so far is checked every CHECK_EVERY_S: at the limit the
    main thread gets BudgetExceeded in the middle of its work, and the reason is recorded."""
    import time

    cfg, run = priced_run(tmp_path, "resources.budget_usd=40")  # sft and rm spent 8.93 (ppo is the one running)
    monkeypatch.setattr(budget, "CHECK_EVERY_S", 0.05)
    t0 = time.monotonic()
    running = lambda: budget.Spent(usd=(time.monotonic() - t0) * 10)  # noqa: E731 - $10 a second
    with pytest.raises(budget.BudgetExceeded, match="of its budget of 40 USD; ppo stopped"):
        with budget.enforced(cfg, run, "ppo", running):
            while time.monotonic() - t0 < 30:
                time.sleep(0.01)  # training
    assert 0.2 < time.monotonic() - t0 < 5
    assert json.loads((run.path / budget.BUDGET_FILE).read_text())["stage"] == "ppo"
