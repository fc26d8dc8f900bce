"""Register: the run report, the model version, and the ``champion`` alias.

The report mirrors the seed guide's two tables – time and cost per step, and the
quality metric of each step – as ``report.md`` and ``report.html`` in the run directory
and as artifacts of the MLflow parent run. The aligned actor becomes a version of the
registered model; the alias ``champion`` moves to it only when its evaluated average
reward beats the current champion's.
"""

from __future__ import annotations

import html
import json
import logging
from typing import Any

from .config import PipelineConfig
from .cost import cost_usd
from .stage import setup_logging
from .storage import ALIGNMENT_STAGES, EVALUATE, RM, SFT, RunDir, write_json
from .tracking import ensure_parent_run, tracking_uri

log = logging.getLogger("rlhf_tasks")

ALGORITHM_NAMES = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO"}
STEPS = ((SFT, "Step 1: SFT"), (RM, "Step 2: reward model"),
         *((s, f"Step 3: {ALGORITHM_NAMES[s]}") for s in ALIGNMENT_STAGES), (EVALUATE, "Evaluation"))
# The metric the champion is chosen by: the held-out average reward of the aligned actor.
CHAMPION_METRIC = "eval/aligned_reward"


def collect(run_dir: RunDir) -> dict[str, Any]:
    """Every finished stage's result.json, by stage."""
    out = {}
    for stage, _ in STEPS:
        r = run_dir.result(stage)
        if r is not None:
            out[stage] = r
    return out


def _gpus(cfg: PipelineConfig) -> int:
    return cfg.resources.num_gpus * cfg.resources.num_nodes


def _cost_usd(cfg: PipelineConfig, r) -> float:
    """The stage's own figure (0 on CPU: no GPU was paid for), else hours x price x GPUs."""
    return r.metrics.get("cost_usd", cost_usd(r.wall_clock_s, cfg.resources.gpu_hourly_usd, _gpus(cfg)))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _duration(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def report_tables(cfg: PipelineConfig, results: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    time_rows, total_s, total_usd = [], 0.0, 0.0
    for stage, label in STEPS:
        r = results.get(stage)
        if r is None:
            continue
        total_s += r.wall_clock_s
        cost = _cost_usd(cfg, r)
        total_usd += cost
        time_rows.append([label, _duration(r.wall_clock_s), _fmt(float(cost), 2)])
    time_rows.append(["Total", _duration(total_s), _fmt(total_usd, 2)])
    algo = ALGORITHM_NAMES[cfg.algorithm]
    sft, rm, ev = (results[s].metrics if s in results else {} for s in (SFT, RM, EVALUATE))
    aligned = results[cfg.algorithm].metrics if cfg.algorithm in results else {}
    step3 = (["Step 3: DPO", "held-out reward accuracy (implicit reward)", _fmt(aligned.get("reward_accuracy_before")),
              _fmt(aligned.get("reward_accuracy"))] if cfg.algorithm == "dpo" else
             [f"Step 3: {algo}", "average reward (training rollouts)", _fmt(aligned.get("reward_first")),
              _fmt(aligned.get("reward_last"))])
    quality = [
        ["Step 1: SFT", "perplexity (held-out)", _fmt(sft.get("perplexity_before")), _fmt(sft.get("perplexity"))],
        ["Step 2: reward model", "accuracy (held-out pairs)", _fmt(rm.get("accuracy_before")), _fmt(rm.get("accuracy"))],
        ["Step 2: reward model", "mean score chosen / rejected", "",
         f"{_fmt(rm.get('chosen_score'))} / {_fmt(rm.get('rejected_score'))}"],
        step3,
        ["Evaluation", f"average reward SFT → {algo} (held-out prompts)", _fmt(ev.get("sft_reward")),
         _fmt(ev.get("aligned_reward"))],
        ["Evaluation", f"win rate of {algo} over SFT (held-out prompts)", "", _fmt(ev.get("aligned_win_rate"))],
        ["Evaluation", f"KL({algo} ‖ SFT) per answer", "", _fmt(ev.get("kl_aligned_sft"))],
    ]
    return time_rows, quality


def memory_rows(run_dir: RunDir, results: dict[str, Any]) -> list[list[str]]:
    """The install task's memory plan (plan.json) beside each stage's measured peak
    (``peak_memory_gb``, recorded on CUDA only): [stage, planned phase, planned GB, measured GB]."""
    path = run_dir.path / "plan.json"
    if not path.is_file():
        return []
    stages = json.loads(path.read_text()).get("stages", {})
    measured = {s: r.metrics.get("peak_memory_gb") for s, r in results.items()}
    return [[s, p.get("peak_phase", ""), _fmt(p.get("peak_gb"), 2), _fmt(measured.get(s), 2)] for s, p in stages.items()]


def render_markdown(cfg: PipelineConfig, run_dir: RunDir, results: dict[str, Any]) -> str:
    time_rows, quality = report_tables(cfg, results)
    price = f"${cfg.resources.gpu_hourly_usd:.2f}/GPU-hour x {_gpus(cfg)} GPU(s)"
    lines = [f"# RLHF run report: {run_dir.path.name}", "",
             f"Preset `{cfg.name}`; alignment `{cfg.algorithm}`; actor `{cfg.model.actor}`, reward model `{cfg.model.rm}`; "
             f"datasets {', '.join(f'`{d}`' for d in cfg.data.datasets)}; split {cfg.data.data_split}.", "",
             f"## Time and cost per step ({price})", "", "| step | wall-clock | cost (USD) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in time_rows]
    lines += ["", "## Quality per step", "", "| step | metric | before | after |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in quality]
    if memory := memory_rows(run_dir, results):
        lines += ["", "## Memory plan (GB per GPU)", "", "| stage | planned peak phase | planned peak | measured peak |",
                  "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in memory]
    return "\n".join(lines) + "\n"


def render_html(markdown: str) -> str:
    """A dependency-free rendering of the report's headings and tables."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(body)}</body></html>"


def version_tags(cfg: PipelineConfig, results: dict[str, Any]) -> dict[str, str]:
    """What a person compares a candidate on, kept on its model version (the next
    candidate's approval request reads the champion's from there)."""
    ev = results[EVALUATE].metrics
    tags = {f"eval/{k}": repr(float(ev[k])) for k in ("sft_reward", "kl_aligned_sft", "aligned_win_rate") if k in ev}
    return {**tags, "cost/usd": repr(float(sum(_cost_usd(cfg, r) for r in results.values()))),
            "rlhf.approval": "pending" if cfg.tracking.champion_approval == "human" else "auto"}


def run(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, Any]:
    from .approval import champion_section

    setup_logging()
    results = collect(run_dir)
    md = render_markdown(cfg, run_dir, results)
    pending = cfg.tracking.champion_approval == "human"
    (run_dir.path / "report.md").write_text(md)
    (run_dir.path / "report.html").write_text(render_html(md))
    log.info("register: report written to %s\n%s", run_dir.path / "report.md", md)
    out: dict[str, Any] = {"stage": "register", "report": str(run_dir.path / "report.md")}
    uri = tracking_uri(cfg)
    if uri and EVALUATE in results:
        from .tracking import Tracker, register_model

        parent = ensure_parent_run(cfg, run_dir)
        t = Tracker.start(uri, cfg.tracking.experiment, run_name="", resume_run_id=parent)
        total_s = sum(r.wall_clock_s for r in results.values())
        summary = {"time/wall_clock_s": total_s, "cost/usd": sum(_cost_usd(cfg, r) for r in results.values())}
        for stage, r in results.items():
            summary.update({f"summary/{stage}/{k}": v for k, v in r.metrics.items() if isinstance(v, (int, float))})
        t.log_metrics(summary, step=0)
        ev = results[EVALUATE]
        algo = cfg.algorithm
        # With human approval the alias stays where it is: the approval DAG moves it, or not.
        reg = register_model(uri, run_dir.final(algo), cfg.tracking.registered_model, CHAMPION_METRIC,
                             float(ev.metrics["aligned_reward"]),
                             run_id=(results[algo].mlflow_run_id if algo in results else None) or parent,
                             move_alias=not pending, tags={"rlhf.algorithm": algo, **version_tags(cfg, results)})
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
