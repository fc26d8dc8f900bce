"""A person approves the champion: the request they read, and what their decision does.

With ``tracking.champion_approval: human`` the register stage registers the candidate
without moving the ``champion`` alias (its version is tagged ``rlhf.approval=pending``)
and the pipeline triggers the ``rlhf_champion_approval`` DAG, which shows
:func:`request` (candidate vs current champion vs SFT: held-out average reward, KL,
win rate, cost, and answers side by side) and hands the answer to :func:`apply`:

- *Promote*: the alias moves to the candidate;
- *Reject*, or no answer within ``tracking.approval_timeout_minutes``: the current
  champion stays.

The decision, who made it and when go into the version's tags (``rlhf.approval``,
``rlhf.approval.by``, ``rlhf.approval.at``) and the run's report (section "Champion").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..config import PipelineConfig
from ..feedback.labels import fence
from ..storage import RunDir, write_json
from .report import SECTION, champion_section, collect, render_html, stage_cost_usd

log = logging.getLogger("rlhf_tasks")

PROMOTE, REJECT = "Promote", "Reject"
OPTIONS = [PROMOTE, REJECT]
SAMPLES_SHOWN = 3


def _num(tags: Mapping[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:,.3f}"


def comparison_rows(candidate: Mapping[str, float | None], champion: Mapping[str, float | None] | None
                    ) -> list[tuple[str, str, str, str]]:
    """(metric, candidate, champion, SFT) rows; the SFT column is the candidate's own SFT
    actor on the same held-out prompts."""
    champ = champion or {}
    return [
        ("average reward (held-out)", _fmt(candidate.get("aligned_reward")), _fmt(champ.get("aligned_reward")),
         _fmt(candidate.get("sft_reward"))),
        ("KL to SFT per answer (nats)", _fmt(candidate.get("kl_aligned_sft")), _fmt(champ.get("kl_aligned_sft")),
         "0.000"),
        ("win rate against SFT", _fmt(candidate.get("aligned_win_rate")), _fmt(champ.get("aligned_win_rate")),
         "0.500"),
        ("cost (USD)", _fmt(candidate.get("cost_usd")), _fmt(champ.get("cost_usd")), "–"),
    ]


def champion_metrics(tags: Mapping[str, str]) -> dict[str, float | None]:
    return {"aligned_reward": _num(tags, "eval/aligned_reward"), "kl_aligned_sft": _num(tags, "eval/kl_aligned_sft"),
            "aligned_win_rate": _num(tags, "eval/aligned_win_rate"), "cost_usd": _num(tags, "cost/usd")}


def render(version: str, name: str, candidate: Mapping[str, float | None], champion: Mapping[str, Any] | None,
           samples: list[Mapping[str, Any]], timeout_minutes: float, algorithm: str = "ppo") -> tuple[str, str]:
    """The approval request's (subject, Markdown body)."""
    champ_v = champion["version"] if champion else None
    subject = f"Promote {name} version {version} to champion?" + (f" (now: version {champ_v})" if champ_v else "")
    rows = comparison_rows(candidate, champion_metrics(champion["tags"]) if champion else None)
    lines = [f"Candidate **{name} v{version}** against the current champion "
             f"({'v' + str(champ_v) if champ_v else 'none yet'}) and its own SFT actor. **Promote** moves the "
             f"`champion` alias; **Reject** keeps it; no answer within {timeout_minutes:g} minutes keeps it too.",
             "", f"| metric | candidate v{version} | champion {'v' + str(champ_v) if champ_v else '–'} | SFT |",
             "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    for i, s in enumerate(samples[:SAMPLES_SHOWN], 1):
        lines += ["", f"### Sample {i}", "", "Prompt:", "", fence(str(s.get("prompt", ""))), "",
                  f"Candidate (reward {s.get(f'{algorithm}_reward')}):", "",
                  fence(str(s.get(f"{algorithm}_answer", ""))), "",
                  f"SFT (reward {s.get('sft_reward')}):", "", fence(str(s.get("sft_answer", "")))]
    return subject, "\n".join(lines)


def request(run: RunDir, tracking_uri: str | None) -> dict[str, Any]:
    """Everything the approval task needs, from the run directory and the registry."""
    from ..tracking.registry import champion_version

    cfg = PipelineConfig.load(run.config_path)
    reg = _registered(run)
    results = collect(run)
    if "evaluate" not in results:
        raise FileNotFoundError(f"{run.path} has no evaluate result: nothing to compare")
    candidate: dict[str, float | None] = {k: results["evaluate"].metrics.get(k)
                                          for k in ("aligned_reward", "sft_reward", "kl_aligned_sft", "aligned_win_rate")}
    candidate["cost_usd"] = float(sum(stage_cost_usd(cfg, r) for r in results.values()))
    champion = champion_version(tracking_uri, cfg.tracking.registered_model) if tracking_uri else None
    samples_path = run.path / "evaluate" / "samples.json"
    samples = json.loads(samples_path.read_text()) if samples_path.is_file() else []
    subject, body = render(reg["version"], cfg.tracking.registered_model, candidate, champion, samples,
                           cfg.tracking.approval_timeout_minutes, cfg.algorithm)
    return {"subject": subject, "body": body, "version": reg["version"], "run_dir": str(run.path),
            "timeout_minutes": cfg.tracking.approval_timeout_minutes,
            "champion_before": champion["version"] if champion else None}


def _registered(run: RunDir) -> dict[str, Any]:
    path = run.path / "register.json"
    reg = json.loads(path.read_text()).get("registered") if path.is_file() else None
    if not reg or reg.get("approval") is None:
        raise FileNotFoundError(f"{path} has no registered model version awaiting approval")
    return reg


def decision_of(response: Mapping[str, Any] | None) -> tuple[str, str | None, str | None]:
    """A HITL answer -> (promoted | rejected | timed_out, who, when). Airflow answers a
    timed-out request with its default (Reject) and no respondent."""
    if not response or not response.get("chosen_options"):
        return "timed_out", None, None
    at = response.get("responded_at")
    at = at.isoformat() if isinstance(at, datetime) else (str(at) if at else None)
    user = response.get("responded_by_user")
    if not user:
        return "timed_out", None, at
    who = str(user.get("id") or user.get("name"))
    return ("promoted" if response["chosen_options"] == [PROMOTE] else "rejected"), who, at


def apply(run: RunDir, response: Mapping[str, Any] | None, tracking_uri: str) -> dict[str, Any]:
    """Carry out a decision: the alias (on Promote), the version's tags, register.json and the report."""
    from ..tracking.registry import champion_version, set_champion, set_version_tags

    cfg = PipelineConfig.load(run.config_path)
    name = cfg.tracking.registered_model
    reg = _registered(run)
    decision, who, at = decision_of(response)
    if decision == "promoted":
        set_champion(tracking_uri, name, reg["version"])
    champ = champion_version(tracking_uri, name)
    set_version_tags(tracking_uri, name, reg["version"], {"rlhf.approval": decision, "rlhf.approval.by": who or "",
                                                          "rlhf.approval.at": at or ""})
    reg.update(approval=decision, decided_by=who, decided_at=at, champion_version=champ["version"] if champ else None)
    saved = json.loads((run.path / "register.json").read_text())
    saved["registered"] = reg
    write_json(run.path / "register.json", saved)
    report = run.path / "report.md"
    md = report.read_text() if report.is_file() else ""
    md = md.split(f"\n{SECTION}\n")[0].rstrip("\n") + "\n" + champion_section(reg)
    report.write_text(md)
    (run.path / "report.html").write_text(render_html(md))
    _log_to_parent(cfg, run, tracking_uri, reg)
    log.info("approval: %s version %s %s by %s at %s; champion: version %s", name, reg["version"], decision,
             who or "nobody", at, reg["champion_version"])
    return reg


def _log_to_parent(cfg: PipelineConfig, run: RunDir, tracking_uri: str, reg: Mapping[str, Any]) -> None:
    from ..tracking import Tracker

    parent = json.loads((run.path / "register.json").read_text()).get("mlflow_parent_run_id")
    if not parent:
        return
    t = Tracker.start(tracking_uri, cfg.tracking.experiment, run_name="", resume_run_id=parent)
    t.set_tags({"rlhf.approval": reg["approval"], "rlhf.approval.by": reg.get("decided_by") or "",
                "rlhf.approval.at": reg.get("decided_at") or "", "rlhf.promoted": str(reg["approval"] == "promoted")})
    t.log_artifact(str(run.path / "report.md"), "report")
    t.log_artifact(str(run.path / "report.html"), "report")
    t.close("FINISHED")
