"""Experiment tracking in MLflow: the only package of the project that imports mlflow.

Training must never fail, and should barely slow down, because the tracking server is
slow or briefly down. The modules:

- :mod:`.client`: :class:`Tracker` (one MLflow run, never raising, never blocking),
  :mod:`.interface`: :class:`TrackerLike` and :class:`NullTracker` (does nothing).
- :mod:`.sender`: the one sending path: a bounded queue, one thread, counted points.
- :mod:`.calls`: single MLflow requests: limits, retries, opening a run and its experiment.
- :mod:`.runs`: the pipeline's parent run, each stage's child run, the tracking URI.
- :mod:`.registry`: :func:`register_model` and the ``champion`` alias.
- :mod:`.plots`: the figures logged as artifacts.

Importing this package is cheap: mlflow is imported when a tracker starts or a model is
registered, matplotlib when a plot is made.
"""

from __future__ import annotations

from ..config import flatten
from .calls import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MAX_KEY_CHARS,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE_CHARS,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE_CHARS,
)
from .client import Tracker
from .interface import NullTracker, TrackerLike
from .plots import plot_curves, plot_score_histogram
from .registry import CHAMPION_ALIAS, register_model
from .runs import airflow_tags, ensure_parent_run, git_commit, open_stage_tracker, tracking_uri

__all__ = ["CHAMPION_ALIAS", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "MAX_KEY_CHARS", "MAX_METRICS_PER_BATCH",
           "MAX_PARAMS_PER_BATCH", "MAX_PARAM_VALUE_CHARS", "MAX_TAG_VALUE_CHARS", "NullTracker", "Tracker",
           "TrackerLike", "airflow_tags", "ensure_parent_run", "flatten", "git_commit",
           "open_stage_tracker", "plot_curves", "plot_score_histogram", "register_model", "tracking_uri"]
