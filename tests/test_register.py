"""The register stage's report (``rlhf_tasks.pipeline.register``) without MLflow.

A fake run directory holds the ``result.json`` of each stage (and the ``final/`` dir
that makes it count as finished); ``register.run`` must turn them into the seed guide's
two tables, time and cost per step and quality per step, as report.md and report.html.
"""

from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rlhf_tasks.config import PipelineConfig
from rlhf_tasks.pipeline import register
from rlhf_tasks.storage import RunDir, StageResult

PRICE, GPUS = 2.5, 2
# Wall-clock seconds per stage, and the expected cells worked out by hand:
# cost = hours x $2.50 x 2 GPUs = seconds / 3600 * 5.
WALL = {"sft": 5400.0, "rm": 1028.0, "ppo": 20880.0, "evaluate": 180.0}
EXPECTED_TIME_ROWS = [
    ("Step 1: SFT", "1h 30m 00s", "7.50"),  # 1.5 h x 5
    ("Step 2: reward model", "17m 08s", "1.43"),  # 0.28556 h x 5 = 1.4278
    ("Step 3: PPO", "5h 48m 00s", "29.00"),  # 5.8 h x 5
    ("Evaluation", "3m 00s", "0.25"),  # 0.05 h x 5
    ("Total", "7h 38m 08s", "38.18"),  # 27488 s = 7.6356 h x 5 = 38.178
]
METRICS = {
    "sft": {"perplexity_before": 12.5, "perplexity": 3.25, "loss": 1.18},
    "rm": {"accuracy_before": 0.5, "accuracy": 0.8137, "chosen_score": 1.5, "rejected_score": -0.75},
    "ppo": {"reward_first": 0.125, "reward_last": 0.875, "kl": 0.03},
    "evaluate": {"sft_reward": 0.25, "aligned_reward": 1.125, "aligned_win_rate": 0.6875, "kl_aligned_sft": 0.0637},
}
EXPECTED_QUALITY_ROWS = [
    ("Step 1: SFT", "perplexity (held-out)", "12.500", "3.250"),
    ("Step 2: reward model", "accuracy (held-out pairs)", "0.500", "0.814"),
    ("Step 2: reward model", "mean score chosen / rejected", "", "1.500 / -0.750"),
    ("Step 3: PPO", "average reward (training rollouts)", "0.125", "0.875"),
    ("Evaluation", "average reward SFT → PPO (held-out prompts)", "0.250", "1.125"),
    ("Evaluation", "win rate of PPO over SFT (held-out prompts)", "", "0.688"),
    ("Evaluation", "KL(PPO ‖ SFT) per answer", "", "0.064"),
]


def make_run(path: Path, stages=tuple(WALL), with_final=True) -> RunDir:
    """A run directory as the stages leave it: config.yaml, and per finished stage a
    ``final/`` dir and a ``result.json`` holding a StageResult."""
    run = RunDir(path)
    PipelineConfig.load("tiny-cpu").save(run.config_path)
    for stage in stages:
        final = run.final(stage)
        if with_final:
            final.mkdir(parents=True)
            (final / "metrics.json").write_text(json.dumps(METRICS[stage]))
        result = StageResult(stage=stage, final_dir=str(final), metrics=METRICS[stage],
                             mlflow_run_id=None, wall_clock_s=WALL[stage], skipped=False)
        run.result_path(stage).parent.mkdir(parents=True, exist_ok=True)
        run.result_path(stage).write_text(json.dumps(dataclasses.asdict(result)))
    return run


def priced_config() -> PipelineConfig:
    return PipelineConfig.load("tiny-cpu", [f"resources.gpu_hourly_usd={PRICE}", f"resources.num_gpus={GPUS}"])


def md_table(md: str, heading: str) -> list[tuple[str, ...]]:
    """The body rows of the markdown table under ``## heading...`` (no header, no separator)."""
    lines = md.split("## " + heading, 1)[1].splitlines()[1:]
    rows: list[str] = []
    for line in lines:
        if line.startswith("|"):
            rows.append(line)
        elif rows:  # the table has ended
            break
    cells = [tuple(c.strip() for c in line.strip().strip("|").split("|")) for line in rows]
    return cells[2:]


class Tables(HTMLParser):
    """Collects the cell texts of every <table>, and checks that tags nest."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.stack: list[str] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("meta", "br"):
            return
        self.stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell or []).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


@pytest.fixture
def no_mlflow(monkeypatch):
    """Tracking off: neither the environment nor the config names a server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_report_time_and_cost_table(tmp_path, no_mlflow):
    """One row per finished step plus a Total, with wall-clock as h/m/s and cost =
    hours x GPU hourly price x GPUs (the seed guide's first table)."""
    run = make_run(tmp_path / "run")
    out = register.run(priced_config(), run)
    md = (run.path / "report.md").read_text()
    assert out["report"] == str(run.path / "report.md")
    assert "$2.50/GPU-hour x 2 GPU(s)" in md
    assert md_table(md, "Time and cost") == EXPECTED_TIME_ROWS


def test_report_quality_table(tmp_path, no_mlflow):
    """The quality of each step: perplexity before/after SFT, RM accuracy and scores,
    PPO reward, and the evaluation's average reward SFT → PPO and KL."""
    run = make_run(tmp_path / "run")
    register.run(priced_config(), run)
    md = (run.path / "report.md").read_text()
    assert md_table(md, "Quality per step") == EXPECTED_QUALITY_ROWS


def test_html_report_has_the_same_tables(tmp_path, no_mlflow):
    """report.html parses with properly nested tags and holds both tables with the
    same cells as the markdown (a header row first)."""
    run = make_run(tmp_path / "run")
    register.run(priced_config(), run)
    page = (run.path / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "charset='utf-8'" in page
    parser = Tables()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed tags: {parser.stack}"
    time_table, quality_table = parser.tables
    assert time_table[0] == ["step", "wall-clock", "cost (USD)"]
    assert [tuple(r) for r in time_table[1:]] == EXPECTED_TIME_ROWS
    assert quality_table[0] == ["step", "metric", "before", "after"]
    assert [tuple(r) for r in quality_table[1:]] == EXPECTED_QUALITY_ROWS
    assert "<h1>RLHF run report: run</h1>" in page


def test_report_names_the_run_config(tmp_path, no_mlflow):
    """The header says what was trained: preset, models, datasets and split."""
    run = make_run(tmp_path / "run")
    register.run(priced_config(), run)
    md = (run.path / "report.md").read_text()
    assert md.startswith("# RLHF run report: run\n")
    assert "Preset `tiny-cpu`" in md and "`builtin:tiny-opt`" in md
    assert "`sample:Dahoas/rm-static`" in md and "split 2,4,4" in md


def test_free_run_costs_zero(tmp_path, no_mlflow):
    """The tiny-cpu preset prices GPU time at $0: every cost cell reads 0.00."""
    run = make_run(tmp_path / "run")
    register.run(PipelineConfig.load("tiny-cpu"), run)
    rows = md_table((run.path / "report.md").read_text(), "Time and cost")
    assert [r[2] for r in rows] == ["0.00"] * 5


def test_unfinished_stages_are_left_out(tmp_path, no_mlflow):
    """Only stages that finished (result.json *and* final/) count: a report written
    after SFT alone has one step row, a Total equal to it, and dashes for the rest;
    a result.json without final/ (a crash between the two) is ignored."""
    run = make_run(tmp_path / "run", stages=("sft",))
    make_run(tmp_path / "run", stages=("rm",), with_final=False)  # result.json only
    out = register.run(priced_config(), run)
    md = (run.path / "report.md").read_text()
    assert md_table(md, "Time and cost") == [EXPECTED_TIME_ROWS[0], ("Total", "1h 30m 00s", "7.50")]
    quality = md_table(md, "Quality per step")
    assert quality[0] == EXPECTED_QUALITY_ROWS[0]
    assert quality[1][2:] == ("–", "–") and quality[4][2:] == ("–", "–")
    assert out["report"] == str(run.path / "report.md")


def test_without_mlflow_nothing_is_registered(tmp_path, no_mlflow):
    """With tracking off the stage still succeeds: it writes the report and a
    register.json that says where the report is, and touches no MLflow store."""
    run = make_run(tmp_path / "run")
    out = register.run(priced_config(), run)
    assert out == {"stage": "register", "report": str(run.path / "report.md")}
    assert json.loads((run.path / "register.json").read_text()) == out
    assert not (run.path / "mlflow_parent_run_id").exists()
    assert not list(tmp_path.rglob("mlruns")) and not list(tmp_path.rglob("*.db"))


def test_html_escapes_text(tmp_path, no_mlflow):
    """Text from the config lands in the HTML escaped (a dataset path may hold <, &)."""
    run = make_run(tmp_path / "run")
    cfg = priced_config()
    cfg.data.datasets = ["/data/a&b<c>.jsonl"]
    register.run(cfg, run)
    page = (run.path / "report.html").read_text()
    assert "a&amp;b&lt;c&gt;" in page and "a&b<c>" not in page
    assert re.search(r"<p>[^<]*a&amp;b", page)
