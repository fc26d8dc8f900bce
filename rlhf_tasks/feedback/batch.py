"""One labelling batch, start to end: the two callables the labelling DAG's tasks run.

``prepare``: form values -> answer pairs -> one human-in-the-loop request per (pair,
copy), saved under ``$RLHF_STORAGE/preferences/requests/<run>.json``; returns the
per-task kwargs (subject, Markdown body, assigned users) the DAG maps over.

``collect``: the tasks' answers -> rows in the preference store with provenance, the
batch's counts and agreement, and its MLflow record (a dataset input with the counts).
Bad input raises :class:`~.pairs.LabellingInputError` before any model is loaded or
any row written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, PipelineConfig
from ..storage import storage_root, write_json
from .labels import (
    Label,
    LabelRequest,
    agreement,
    batch_counts,
    label_from_response,
    preference_rows,
    render_request,
    unpaired_rows,
)
from .pairs import (
    SELF,
    LabellingInputError,
    ModelRef,
    assign,
    held_out_prompts,
    make_pairs,
    read_prompt_file,
    request_summary,
    resolve_model,
)
from .store import batch_name, write_batch

log = logging.getLogger("rlhf_tasks")
HELD_OUT = "held-out"


@dataclass
class LabellingForm:
    """The labelling DAG's trigger form, checked."""

    pairs: int = 8
    model: str = "champion"
    compare_with: str = "newest"
    prompts: str = HELD_OUT
    labellers: list[str] = field(default_factory=list)
    labels_per_pair: int = 1
    max_new_tokens: int = 48
    preset: str = "tiny-cpu"
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> LabellingForm:
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(p) - known):
            raise LabellingInputError(f"unknown labelling form field(s) {unknown}: the fields are {sorted(known)}")
        form = cls(**{k: v for k, v in p.items() if v is not None})
        if not 1 <= int(form.pairs) <= 1000:
            raise LabellingInputError(f"pairs={form.pairs}: between 1 and 1000")
        if not str(form.model).strip():
            raise LabellingInputError("model is empty: the champion alias, a version, run:<id> or a directory")
        if not str(form.prompts).strip():
            raise LabellingInputError(f"prompts is empty: {HELD_OUT!r} or the path of a prompt file")
        return form


def _requests_path(run_id: str) -> Path:
    return storage_root() / "preferences" / "requests" / f"{batch_name(run_id)}.json"


def prepare(params: Mapping[str, Any], run_id: str, tracking_uri: str | None) -> list[dict]:
    """The form -> pairs -> requests; the HITL tasks' kwargs, one dict per request."""
    form = LabellingForm.from_params(params)
    try:
        cfg = PipelineConfig.load(form.preset, list(form.overrides))
    except ConfigError as e:
        raise LabellingInputError(f"invalid configuration: {e}") from None
    # Every input is checked before a model is loaded: the prompts, the labellers, the models.
    prompts = held_out_prompts(cfg) if form.prompts == HELD_OUT else read_prompt_file(form.prompts)
    prompts = prompts[:int(form.pairs)]
    assign([], list(form.labellers), int(form.labels_per_pair))
    cache = storage_root() / "cache" / "registry"
    first = resolve_model(form.model, cfg, tracking_uri, cache)
    second = first if form.compare_with == SELF else resolve_model(form.compare_with, cfg, tracking_uri, cache)
    if second.path == first.path:
        second = ModelRef(f"{first.label} (2nd sample)", first.path, first.version)
    from ..runtime.engine import resolve_device

    pairs, identical = make_pairs(prompts, (first, second), max_new_tokens=int(form.max_new_tokens), seed=cfg.seed,
                                  run_id=run_id, device=str(resolve_device(cfg.device)))
    if not pairs:
        raise LabellingInputError(f"all {len(prompts)} pairs had identical answers: nothing to ask "
                                  "(compare two different models, or more prompts)")
    requests = assign(pairs, list(form.labellers), int(form.labels_per_pair))
    write_json(_requests_path(run_id), {"items": [r.as_dict() for r in requests], "experiment": cfg.tracking.experiment,
                                        **request_summary(requests, (first, second), identical, len(prompts))})
    return [task_kwargs(r, i, len(requests)) for i, r in enumerate(requests)]


def task_kwargs(req: LabelRequest, index: int, total: int) -> dict[str, Any]:
    subject, body = render_request(req, index, total)
    return {"subject": subject, "body": body,
            "assigned_users": [{"id": u, "name": u} for u in req.assigned_users] or None}


def load_requests(run_id: str) -> tuple[list[LabelRequest], dict[str, Any]]:
    path = _requests_path(run_id)
    if not path.is_file():
        raise FileNotFoundError(f"the requests of run {run_id} are not at {path}: did the generate task run?")
    saved = json.loads(path.read_text())
    return [LabelRequest.from_dict(r) for r in saved.pop("items")], saved


def collect(run_id: str, responses: Sequence[Mapping[str, Any] | None], tracking_uri: str | None,
            task_id: str = "label") -> dict[str, Any]:
    """The answers (by map index; None where a task has none) -> the store, counts, MLflow."""
    requests, meta = load_requests(run_id)
    if len(responses) != len(requests):
        raise ValueError(f"run {run_id}: {len(responses)} answers for {len(requests)} requests")
    experiment = meta.pop("experiment")
    labels = [label_from_response(req, resp, task_id=task_id, map_index=i)
              for i, (req, resp) in enumerate(zip(requests, responses, strict=True))]
    rows, unpaired = preference_rows(labels, run_id), unpaired_rows(labels, run_id)
    summary = {"dag_run_id": run_id, **meta, **batch_counts(labels), "unpaired_answers": len(unpaired),
               "agreement": agreement(labels)}
    path = write_batch(rows, summary, run_id, unpaired=unpaired)
    summary["path"] = str(path) if path else None
    log.info("labelling: %s", {k: v for k, v in summary.items() if k != "models"})
    if tracking_uri and path:
        from ..tracking.feedback import log_label_batch

        summary["mlflow_run_id"] = log_label_batch(tracking_uri, experiment, path, summary, labels_table(labels))
    return summary


def labels_table(labels: Sequence[Label]) -> list[dict[str, Any]]:
    """Every answer, written or not: the batch's audit table in MLflow."""
    return [{"pair_id": lab.request.pair_id, "labeller": lab.labeller or "", "choice": lab.choice,
             "shown_a": lab.request.shown[0], "shown_b": lab.request.shown[1], "labelled_at": lab.labelled_at or ""}
            for lab in labels]
