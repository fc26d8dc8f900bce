"""Register: the run report, the model version, and the ``champion`` alias.

The report mirrors the seed guide's two tables – time and cost per step, and the
quality metric of each step – as ``report.md`` and ``report.html`` in the run directory
and as artifacts of the MLflow parent run. The SFT actor, the reward model and the aligned
actor become MLflow LoggedModels (:mod:`.models`), the aligned one in the transformers
flavor, and it becomes a version of the registered model; the alias ``champion`` moves to it
only when its evaluated average reward beats the current champion's.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import PipelineConfig
from ..runtime.stage import setup_logging
from ..storage import RunDir, write_json
from ..tracking import ensure_parent_run, tracking_uri
from . import models
from .report import champion_section, collect, render_html, render_markdown, stage_cost_usd

log = logging.getLogger("rlhf_tasks")

# The metric the champion is chosen by: the held-out average reward of the aligned actor.
CHAMPION_METRIC = "eval/aligned_reward"


def version_tags(cfg: PipelineConfig, results: dict[str, Any]) -> dict[str, str]:
    """What a person compares a candidate on, kept on its model version (the next
    candidate's approval request reads the champion's from there)."""
    ev = results["evaluate"].metrics
    tags = {f"eval/{k}": repr(float(ev[k])) for k in ("sft_reward", "kl_aligned_sft", "aligned_win_rate") if k in ev}
    return {**tags, "cost/usd": repr(float(sum(stage_cost_usd(cfg, r) for r in results.values()))),
            "rlhf.approval": "pending" if cfg.tracking.champion_approval == "human" else "auto"}


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    setup_logging()
    results = collect(run_dir)
    md = render_markdown(cfg, run_dir, results)
    pending = cfg.tracking.champion_approval == "human"
    (run_dir.path / "report.md").write_text(md)
    (run_dir.path / "report.html").write_text(render_html(md))
    log.info("register: report written to %s\n%s", run_dir.path / "report.md", md)
    out: dict[str, Any] = {"stage": "register", "report": str(run_dir.path / "report.md")}
    uri = tracking_uri(cfg)
    if uri and "evaluate" in results:
        from ..tracking import Tracker, register_model
        from ..tracking.calls import retry_for

        parent = ensure_parent_run(cfg, run_dir)
        t = Tracker.start(uri, cfg.tracking.experiment, run_name="", resume_run_id=parent)
        total_s = sum(r.wall_clock_s for r in results.values())
        summary = {"time/wall_clock_s": total_s, "cost/usd": sum(stage_cost_usd(cfg, r) for r in results.values())}
        for stage, r in results.items():
            summary.update({f"summary/{stage}/{k}": v for k, v in r.metrics.items() if isinstance(v, (int, float))})
        t.log_metrics(summary, step=0)
        ev = results["evaluate"]
        algo = cfg.algorithm
        # The SFT and RM models and the evaluation's links are the record, not the job: an
        # MLflow outage longer than the retries leaves them out (warning), the registering goes on.
        ids = retry_for(lambda: models.log_sft_and_rm(uri, cfg, run_dir, results, parent),
                        "logging the SFT and reward models", 120.0)[1] or {}
        # With human approval the alias stays where it is: the approval DAG moves it, or not.
        reg = register_model(uri, run_dir.final(algo), cfg.tracking.registered_model, CHAMPION_METRIC,
                             float(ev.metrics["aligned_reward"]),
                             run_id=models.run_of(results, algo, parent),
                             move_alias=not pending, tags={"rlhf.algorithm": algo, **version_tags(cfg, results)},
                             **models.aligned_model_spec(cfg, run_dir, ids))
        ids[algo] = reg["model_id"]
        reg["models"] = ids
        reg["eval_dataset"] = retry_for(lambda: models.log_evaluation(uri, cfg, run_dir, results, parent, ids),
                                        "logging the evaluation", 120.0)[1]
        reg["approval"] = "pending" if pending else "auto"
        t.set_tags({"rlhf.model_version": str(reg.get("version")), "rlhf.approval": reg["approval"],
                    "rlhf.promoted": str(reg.get("promoted") and not pending)})
        md += champion_section(reg)
        (run_dir.path / "report.md").write_text(md)
        (run_dir.path / "report.html").write_text(render_html(md))
        t.log_artifact(str(run_dir.path / "report.md"), "report")
        t.log_artifact(str(run_dir.path / "report.html"), "report")
        t.close("FINISHED")
        out.update(registered=reg, mlflow_parent_run_id=parent)
        log.info("register: model %s version %s (champion: version %s, promoted: %s)",
                 cfg.tracking.registered_model, reg.get("version"), reg.get("champion_version"), reg.get("promoted"))
    write_json(run_dir.path / "register.json", out)
    return out
