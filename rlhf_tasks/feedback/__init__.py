"""People in the loop: answer pairs that people label, and the preference store they fill.

- :mod:`.labels`: pure logic: the order a pair is shown in, its Markdown, a labeller's
  answer -> a preference row with provenance, the batch's counts and inter-labeller agreement
- :mod:`.store`:  the preference store under ``$RLHF_STORAGE/preferences/human/``
- :mod:`.pairs`:  prompts (held-out or a user's file), models (registry alias, version,
  run or directory) and the two answers per prompt (imports torch; used on a worker)
- :mod:`.approval`: the champion-approval request (candidate vs champion vs SFT) and
  what a decision does to the registry and the run report

Nothing here imports Airflow: the DAGs (``dags/rlhf_label_preferences.py``,
``dags/rlhf_champion_approval.py``) wire these functions to human-in-the-loop tasks.
"""

from __future__ import annotations

from .labels import (
    BOTH_BAD,
    OPTIONS,
    PREFER_A,
    PREFER_B,
    SKIP,
    TIE,
    LabelRequest,
    agreement,
    batch_counts,
    preference_rows,
    render_request,
    shown_order,
)
from .store import HUMAN_STORE, human_store_dir, write_batch

__all__ = ["BOTH_BAD", "HUMAN_STORE", "OPTIONS", "PREFER_A", "PREFER_B", "SKIP", "TIE", "LabelRequest", "agreement",
           "batch_counts", "human_store_dir", "preference_rows", "render_request", "shown_order", "write_batch"]
