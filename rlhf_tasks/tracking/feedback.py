"""MLflow records of people's judgements: a labelling batch as a run with its
preference file as a dataset input (``human-preferences``), and the counts as metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .client import configure_http, retry_for, short
from .runs import airflow_tags

log = logging.getLogger("rlhf_tasks.tracking")
DATASET_CONTEXT = "human-preferences"


def batch_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The counts of a batch summary as MLflow metrics (``labels/...``); agreement only
    where some pair was judged by two people."""
    out = {f"labels/{k}": float(summary[k]) for k in ("requests", "labelled", "ties", "both_bad", "skipped",
                                                         "unanswered", "pairs", "dropped_identical") if k in summary}
    for who, n in (summary.get("per_labeller") or {}).items():
        out[f"labels/by/{who}"] = float(n)
    agree = summary.get("agreement") or {}
    if agree.get("agreement") is not None:
        out["labels/agreement"] = float(agree["agreement"])
        out["labels/pairs_judged_twice"] = float(agree["pairs_judged_twice"])
    return out


def log_label_batch(tracking_uri: str, experiment: str, path: Path, summary: Mapping[str, Any],
                    table: Sequence[Mapping[str, Any]], budget_s: float = 60.0) -> str | None:
    """One run for one labelling batch; its id, or None when MLflow could not be reached
    (warning: the rows are already in the store, the record is a convenience)."""
    configure_http()
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    client = MlflowClient(tracking_uri)

    def work() -> str:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        tags = {**airflow_tags(), "rlhf.kind": "labelling", "rlhf.preference_file": str(path)}
        run = client.create_run(exp_id, run_name=f"labels {summary.get('dag_run_id', path.stem)}", tags=tags)
        rid = run.info.run_id
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        ds = from_pandas(pd.DataFrame(rows), source=str(path), name=f"human:{path.stem}")
        client.log_inputs(rid, [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context",
                                                                                DATASET_CONTEXT)])])
        for k, v in batch_metrics(summary).items():
            client.log_metric(rid, k, v, step=0)
        client.log_param(rid, "labels/models", " vs ".join(summary.get("models") or []))
        client.log_dict(rid, dict(summary), "labels/summary.json")
        client.log_table(rid, pd.DataFrame(list(table)), "labels/answers.json")
        client.set_terminated(rid, "FINISHED")
        return rid

    try:
        return retry_for(work, f"logging labelling batch {path.name}", budget_s, raise_on_failure=True)[1]
    except Exception as exc:  # noqa: BLE001 – the batch is stored; MLflow is not in the way
        log.warning("mlflow: labelling batch %s not recorded (%s)", path, short(exc))
        return None
