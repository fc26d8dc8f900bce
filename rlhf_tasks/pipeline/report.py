"""The run report: the seed guide's two tables, time and cost per step and the quality
metric of each step, the memory plan beside the measured peaks, and how the champion was
decided; as ``report.md`` and ``report.html`` in the run directory (register writes them,
the approval DAG rewrites the champion section)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

from ..config import ALGORITHMS, PipelineConfig
from ..runtime.cost import stage_cost
from ..storage import RunDir

STEPS = (("sft", "Step 1: SFT"), ("rm", "Step 2: reward model"),
         *((a.name, f"Step 3: {a.title}") for a in ALGORITHMS.values()), ("evaluate", "Evaluation"))
SECTION = "## Champion"


def collect(run_dir: RunDir) -> dict[str, Any]:
    """Every finished stage's result.json, by stage."""
    out = {}
    for stage, _ in STEPS:
        r = run_dir.result(stage)
        if r is not None:
            out[stage] = r
    return out


def stage_cost_usd(cfg: PipelineConfig, r) -> float:
    """The stage's own figure (0 on CPU: no GPU was paid for), else hours x price x GPUs."""
    return stage_cost(r.metrics, r.wall_clock_s, cfg.resources.gpu_hourly_usd, cfg.resources.world_size)[0]


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
        cost = stage_cost_usd(cfg, r)
        total_usd += cost
        time_rows.append([label, _duration(r.wall_clock_s), _fmt(float(cost), 2)])
    time_rows.append(["Total", _duration(total_s), _fmt(total_usd, 2)])
    algo = cfg.step3.title
    sft, rm, ev = (results[s].metrics if s in results else {} for s in ("sft", "rm", "evaluate"))
    aligned = results[cfg.algorithm].metrics if cfg.algorithm in results else {}
    step3 = ([f"Step 3: {algo}", "average reward (training rollouts)", _fmt(aligned.get("reward_first")),
              _fmt(aligned.get("reward_last"))] if cfg.step3.rollouts else
             [f"Step 3: {algo}", "held-out reward accuracy (implicit reward)", _fmt(aligned.get("reward_accuracy_before")),
              _fmt(aligned.get("reward_accuracy"))])
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
        *accuracy_rows(ev, algo),
    ]
    if not cfg.needs_reward_model():
        quality = [r for r in quality if r[0] != "Step 2: reward model"]
    return time_rows, quality


def accuracy_rows(ev: Mapping[str, Any], algo: str) -> list[list[str]]:
    """The verifier's ground truth beside the reward: accuracy SFT -> aligned, overall (with
    the gain's standard error) and per category, on the held-out checkable prompts."""
    if "aligned_accuracy" not in ev:
        return []
    gain = f" (gain {ev['accuracy_gain']:+.3f} ± {ev['accuracy_gain_se']:.3f}, {ev['checkable_prompts']} prompts)"
    rows = [["Evaluation", f"verifier accuracy SFT → {algo}{gain}", _fmt(ev["sft_accuracy"]),
             _fmt(ev["aligned_accuracy"])]]
    cats = sorted(k.removeprefix("aligned_accuracy_") for k in ev if k.startswith("aligned_accuracy_"))
    return rows + [["Evaluation", f"accuracy: {c} ({ev.get(f'prompts_{c}')} prompts)", _fmt(ev.get(f"sft_accuracy_{c}")),
                    _fmt(ev[f"aligned_accuracy_{c}"])] for c in cats]


def sample_lines(run_dir: RunDir, algo: str, n: int = 6) -> list[str]:
    """A few held-out answers before (SFT) and after (the aligned actor), from evaluate."""
    path = run_dir.path / "evaluate" / "samples.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())[:n]

    def cell(text: Any) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")[:160]

    lines = ["", "## Samples (held-out prompts)", "", f"| question | SFT | {algo} |", "|---|---|---|"]
    for r in rows:
        mark = {1.0: " ✓", 0.0: " ✗"}
        lines.append(f"| {cell(r.get('question', r['prompt']))} | "
                     f"{cell(r['sft_answer'])}{mark.get(r.get('sft_correct'), '')} | "
                     f"{cell(r.get(f'{algo}_answer'))}{mark.get(r.get(f'{algo}_correct'), '')} |")
    return lines


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
    price = f"${cfg.resources.gpu_hourly_usd:.2f}/GPU-hour x {cfg.resources.world_size} GPU(s)"
    lines = [f"# RLHF run report: {run_dir.path.name}", "",
             f"Preset `{cfg.name}`; alignment `{cfg.algorithm}`; actor `{cfg.model.actor}`, reward model `{cfg.model.rm}`; "
             f"datasets {', '.join(f'`{d}`' for d in cfg.data.datasets)}; split {cfg.data.data_split}.", "",
             f"## Time and cost per step ({price})", "", "| step | wall-clock | cost (USD) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in time_rows]
    lines += ["", "## Quality per step", "", "| step | metric | before | after |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in quality]
    lines += sample_lines(run_dir, cfg.algorithm)
    lines += budget_lines(cfg, run_dir, results)
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


def budget_lines(cfg: PipelineConfig, run_dir: RunDir, results: dict[str, Any]) -> list[str]:
    """The budget (resources.budget_usd / budget_gpu_hours) against what the run spent, and
    why it stopped if a stage stopped it (budget.json)."""
    from ..runtime.budget import BUDGET_FILE, has_budget, spent_by_others

    stopped = run_dir.path / BUDGET_FILE
    if not has_budget(cfg) and not stopped.is_file():
        return []
    res, spent = cfg.resources, spent_by_others(cfg, run_dir, "")
    limits = [f"{res.budget_usd:g} USD" if res.budget_usd is not None else "",
              f"{res.budget_gpu_hours:g} GPU-hours" if res.budget_gpu_hours is not None else ""]
    out = ["", "## Budget", "", f"Budget {' and '.join(x for x in limits if x)}; spent by the finished steps "
           f"{spent.usd:.2f} USD, {spent.gpu_hours:.3f} GPU-hours."]
    if stopped.is_file():
        why = json.loads(stopped.read_text())
        out += ["", f"**Stopped in {why['stage']}**: {why['reason']}."]
    return out


def write_report(cfg: PipelineConfig, run_dir: RunDir) -> str:
    """report.md and report.html of what the run has done so far; the markdown."""
    md = render_markdown(cfg, run_dir, collect(run_dir))
    (run_dir.path / "report.md").write_text(md)
    (run_dir.path / "report.html").write_text(render_html(md))
    return md


def champion_section(reg: Mapping[str, Any]) -> str:
    """The report's last section: how the champion was (or will be) decided."""
    approval = reg.get("approval", "auto")
    version, champ = reg.get("version"), reg.get("champion_version")
    if approval == "auto":
        what = (f"version {version} became champion (better held-out average reward)" if reg.get("promoted")
                else f"version {version} registered; champion stays version {champ}")
    elif approval == "pending":
        what = (f"version {version} awaits a person's decision (DAG `rlhf_champion_approval`); champion stays "
                f"{'version ' + str(champ) if champ not in (None, 'None') else 'unset'} until then")
    else:
        who = reg.get("decided_by") or "nobody (timed out)"
        what = (f"version {version}: **{approval}** by {who} at {reg.get('decided_at')}; champion: version "
                f"{reg.get('champion_version')}")
    return f"\n{SECTION}\n\nApproval `{approval}`: {what}.\n"
