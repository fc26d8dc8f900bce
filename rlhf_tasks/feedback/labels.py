"""Labelling logic without Airflow or torch: what a person sees, what their answer becomes.

A :class:`LabelRequest` holds one prompt and two answers in *canonical* order (answer 0
from ``models[0]``, answer 1 from ``models[1]``) and the order they are *shown* in:
``order[0]`` is the canonical index shown as "A". The order is drawn per pair from a
seeded RNG, so position bias cannot favour one model, and it is kept with every label.

A labeller's choice becomes a prompt/chosen/rejected row with its provenance; "both bad"
makes each answer an undesirable unpaired row (KTO's, rlhf_tasks/data/unpaired.py: no pair can
hold it); ties, skips and unanswered requests (a response timeout) are counted, never written.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

PREFER_A, PREFER_B, TIE, BOTH_BAD, SKIP = "A better", "B better", "Tie", "Both bad", "Skip"
OPTIONS = [PREFER_A, PREFER_B, TIE, BOTH_BAD, SKIP]
UNANSWERED = "unanswered"  # no person answered before the response timeout (Airflow applied the default)
MAX_SUBJECT_CHARS = 80


@dataclass(frozen=True)
class LabelRequest:
    """One pair put to one labeller (one human-in-the-loop task)."""

    pair_id: str
    prompt: str
    answers: tuple[str, str]
    models: tuple[str, str]
    order: tuple[int, int]
    assigned_users: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelRequest:
        return cls(str(d["pair_id"]), str(d["prompt"]), tuple(d["answers"]), tuple(d["models"]),  # type: ignore[arg-type]
                   tuple(int(i) for i in d["order"]), tuple(d.get("assigned_users") or ()))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def shown(self) -> tuple[str, str]:
        """The models shown as A and as B."""
        return self.models[self.order[0]], self.models[self.order[1]]


@dataclass(frozen=True)
class Label:
    """A labeller's answer to one request, as Airflow returned it."""

    request: LabelRequest
    choice: str  # one of OPTIONS, or UNANSWERED
    labeller: str | None
    labelled_at: str | None
    task_id: str = "label"
    map_index: int = -1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str | None:
        """The judgement independent of the order shown: ``model:<index>`` preferred, ``tie``,
        ``both_bad``; None for a skip or no answer (they carry no judgement)."""
        if self.choice in (PREFER_A, PREFER_B):
            return f"model:{self.request.order[0 if self.choice == PREFER_A else 1]}"
        return {TIE: "tie", BOTH_BAD: "both_bad"}.get(self.choice)


def shown_order(pair_id: str, seed: int) -> tuple[int, int]:
    """(0, 1) or (1, 0), drawn from ``seed`` and the pair's id: reproducible, and
    independent of how many pairs came before."""
    digest = hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()
    return (0, 1) if random.Random(digest).random() < 0.5 else (1, 0)


def fence(text: str) -> str:
    """``text`` in a fenced Markdown block whose fence is longer than any run of backticks
    inside it, so an answer cannot close its block early or inject Markdown."""
    longest = max((len(run) for run in _backtick_runs(text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text.strip() or '(empty answer)'}\n{ticks}"


def _backtick_runs(text: str) -> Iterable[str]:
    return (m for m in "".join(c if c == "`" else " " for c in text).split() if m)


def render_request(req: LabelRequest, index: int | None = None, total: int | None = None) -> tuple[str, str]:
    """The task's (subject, Markdown body): the prompt, then both answers, each in a block."""
    head = " ".join(req.prompt.replace("Human:", " ").replace("Assistant:", " ").split())
    position = f" ({index + 1}/{total})" if index is not None and total else ""
    subject = f"Which answer is better?{position} {head[:MAX_SUBJECT_CHARS]}".rstrip()
    a, b = req.answers[req.order[0]], req.answers[req.order[1]]
    body = "\n\n".join([
        "Read the prompt and both answers, then choose: **A better**, **B better**, **Tie** (equally good), "
        "**Both bad**, or **Skip** (cannot judge).",
        "### Prompt", fence(req.prompt),
        "### Answer A", fence(a),
        "### Answer B", fence(b),
        f"<sub>pair `{req.pair_id}`</sub>",
    ])
    return subject, body


def label_from_response(req: LabelRequest, response: Mapping[str, Any] | None, *, task_id: str = "label",
                        map_index: int = -1) -> Label:
    """A HITL task's return value (``chosen_options``, ``responded_by_user``,
    ``responded_at``) -> :class:`Label`. No return value (the task failed) or no
    respondent (Airflow applied the timeout default) is UNANSWERED."""
    if not response or not response.get("chosen_options"):
        return Label(req, UNANSWERED, None, None, task_id, map_index)
    user = response.get("responded_by_user")
    if not user:
        return Label(req, UNANSWERED, None, _iso(response.get("responded_at")), task_id, map_index)
    (choice,) = response["chosen_options"]
    if choice not in OPTIONS:
        raise ValueError(f"pair {req.pair_id}: answer {choice!r} is not one of {OPTIONS}")
    return Label(req, choice, str(user.get("id") or user.get("name")), _iso(response.get("responded_at")),
                 task_id, map_index)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, datetime) else str(value)


def preference_rows(labels: Sequence[Label], dag_run_id: str) -> list[dict[str, Any]]:
    """One prompt/chosen/rejected row per "A better"/"B better" label, with provenance.

    Answers follow the data convention (one leading space) so that the rows read exactly
    like a local dataset file. Two labellers of one pair give two rows: agreement is
    reported, not enforced.
    """
    rows = []
    for lab in labels:
        if lab.choice not in (PREFER_A, PREFER_B):
            continue
        req = lab.request
        win = req.order[0 if lab.choice == PREFER_A else 1]
        rows.append({
            "prompt": req.prompt, "chosen": " " + req.answers[win].lstrip(),
            "rejected": " " + req.answers[1 - win].lstrip(),
            "chosen_model": req.models[win], "rejected_model": req.models[1 - win],
            "shown_a": req.shown[0], "shown_b": req.shown[1], "choice": lab.choice,
            "labeller": lab.labeller or "", "labelled_at": lab.labelled_at or "",
            "pair_id": req.pair_id, "dag_run_id": dag_run_id, "task_id": lab.task_id, "map_index": lab.map_index,
        })
    return rows


def unpaired_rows(labels: Sequence[Label], dag_run_id: str) -> list[dict[str, Any]]:
    """Both answers of every "Both bad" label as undesirable prompt/completion rows with
    provenance: KTO learns from them, where a preference pair (DPO, the reward model) has none."""
    rows = []
    for lab in labels:
        if lab.choice != BOTH_BAD:
            continue
        req = lab.request
        for i in (0, 1):
            rows.append({
                "prompt": req.prompt, "completion": " " + req.answers[i].lstrip(), "desirable": False,
                "model": req.models[i], "shown_a": req.shown[0], "shown_b": req.shown[1], "choice": lab.choice,
                "labeller": lab.labeller or "", "labelled_at": lab.labelled_at or "", "pair_id": req.pair_id,
                "dag_run_id": dag_run_id, "task_id": lab.task_id, "map_index": lab.map_index,
            })
    return rows


def batch_counts(labels: Sequence[Label]) -> dict[str, Any]:
    """What a batch produced: requests, pairs written, ties, both bad, skipped,
    unanswered, and answers per labeller."""
    by_choice = Counter(lab.choice for lab in labels)
    return {
        "requests": len(labels),
        "labelled": by_choice[PREFER_A] + by_choice[PREFER_B],
        "ties": by_choice[TIE], "both_bad": by_choice[BOTH_BAD], "skipped": by_choice[SKIP],
        "unanswered": by_choice[UNANSWERED],
        "per_labeller": dict(sorted(Counter(lab.labeller for lab in labels if lab.labeller).items())),
    }


def agreement(labels: Sequence[Label]) -> dict[str, Any]:
    """Raw inter-labeller agreement: over every pair that two or more people judged (a
    skip is no judgement), the share of labeller pairs who gave the same verdict
    (order-independent: "A better" with A = model 1 equals "B better" with B = model 1).
    ``agreement`` is None when no pair was judged twice."""
    verdicts: dict[str, dict[str, str]] = {}
    for lab in labels:
        if lab.verdict is not None and lab.labeller:
            verdicts.setdefault(lab.request.pair_id, {})[lab.labeller] = lab.verdict
    shared = {pid: v for pid, v in verdicts.items() if len(v) >= 2}
    comparisons = agree = 0
    for v in shared.values():
        for x, y in itertools.combinations(sorted(v), 2):
            comparisons += 1
            agree += v[x] == v[y]
    return {"pairs_judged_twice": len(shared), "comparisons": comparisons,
            "agreement": agree / comparisons if comparisons else None}
