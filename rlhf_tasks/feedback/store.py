"""The preference store: people's labels as prompt/chosen/rejected JSON-lines files.

```
$RLHF_STORAGE/preferences/human/<dag run id>.jsonl            one labelling batch: a row per answered pair
$RLHF_STORAGE/preferences/human/unpaired/<dag run id>.jsonl   its answers judged both bad: a row per answer
$RLHF_STORAGE/preferences/batches/<dag run id>.json           its summary: counts, agreement, models
```

The dataset spec ``human:`` (or ``human:<dir>``) reads every batch of the store as one
source (rlhf_tasks/data/loading.py: the pairs, ``*.jsonl`` of the directory itself, for every
algorithm; KTO also reads ``unpaired/``, rlhf_tasks/data/unpaired.py). A batch file is
written to a temporary name and renamed, so a training run never reads half a batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.loading import HUMAN_STORE, human_store_dir, with_human_store  # noqa: F401 - the store's API
from ..data.unpaired import UNPAIRED_DIR
from ..storage import run_dir_for, write_json


def batch_name(dag_run_id: str) -> str:
    """The file stem of a run's batch: the run id made safe as one path component (the
    same rule as a pipeline run's directory)."""
    return run_dir_for(dag_run_id, Path("/")).name


def write_batch(rows: Sequence[dict[str, Any]], summary: dict[str, Any], dag_run_id: str,
                store: Path | None = None, unpaired: Sequence[dict[str, Any]] = ()) -> Path | None:
    """Write a batch's rows (if any), its unpaired rows (if any, under ``unpaired/``, where
    the pairs' reader does not look) and its summary; the rows file path, or None when there
    was no pair to write (then no pairs file appears: a training run sees no new pair)."""
    store = store or human_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    stem = batch_name(dag_run_id)
    # Summaries live beside the store, not in it: the store holds only rows to train on.
    write_json(summary_path(store, stem), summary)
    if unpaired:
        (store / UNPAIRED_DIR).mkdir(exist_ok=True)
        _write_jsonl(store / UNPAIRED_DIR / f"{stem}.jsonl", unpaired)
    if not rows:
        return None
    return _write_jsonl(store / f"{stem}.jsonl", rows)


def _write_jsonl(target: Path, rows: Sequence[dict[str, Any]]) -> Path:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def summary_path(store: Path, stem: str) -> Path:
    return store.parent / "batches" / f"{stem}.json"


def read_batch(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
