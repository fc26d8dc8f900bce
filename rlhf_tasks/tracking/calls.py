"""Single MLflow requests: MLflow's limits, its HTTP settings, which errors a retry can fix,
a wall-clock retry budget, and opening (or reopening) a run in the project's experiment."""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

log = logging.getLogger("rlhf_tasks.tracking")

# MLflow's limits (mlflow.utils.validation): longer values are rejected by the server.
MAX_KEY_CHARS = 250
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAMS_PER_BATCH = 100  # params and tags together
MAX_METRICS_PER_BATCH = 1000
# Metric/param names MLflow accepts (POSIX): alphanumerics, _ - . space : and /.
_VALID_NAME = re.compile(r"^[/\w.\- :]+$")
# Error codes that a retry cannot fix (the request itself is wrong).
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                     "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "FEATURE_DISABLED"}
# MLflow's HTTP settings while a tracker runs, unless the environment sets them: a request
# rides out a blip of a few seconds (retries after 0 s and ~2 s; MLflow's defaults retry 7
# times, minutes per call, and wait 120 s for a response); longer outages are the trackers'
# budgets (start_timeout_s, op_budget_s, retry_budget_s).
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 2, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1,
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": 60}
# The experiment tag the MLflow UI (3.x) reads to choose its view; without it the UI guesses
# and opens the GenAI view. "custom_model_development" is its "Machine learning" choice (the
# value the UI itself writes when a user picks that type: mlflow/server/js, ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def configure_http() -> None:
    """Set :data:`MLFLOW_DEFAULTS` through MLflow's environment-variable API (MLflow reads
    them at every request); values already in the environment win. Called when a tracker
    starts or a model is registered, never at import."""
    from mlflow import environment_variables as env

    for name, value in MLFLOW_DEFAULTS.items():
        var = getattr(env, name)
        if not var.defined:
            var.set(value)


def error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: the server refused the request itself, or the local
    input is wrong. Network failures reach us as MlflowException(INTERNAL_ERROR) or
    requests' exceptions and are retried."""
    return error_code(exc) in _PERMANENT_ERRORS or isinstance(
        exc, (TypeError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError))


def retry_for(fn: Callable[[], Any], what: str, budget_s: float, *, raise_on_failure: bool = False) -> tuple[bool, Any]:
    """Call ``fn`` (whose requests MLflow already retries) again until it succeeds, a
    permanent error occurs, or ``budget_s`` is spent (pauses 0.5 s doubling to 10 s):
    the wall-clock budget MLflow's count of retries cannot express. Returns (ok, result);
    warns on failure."""
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            return True, fn()
        except Exception as exc:
            if is_permanent(exc) or time.monotonic() + delay > deadline:
                if raise_on_failure:
                    raise
                log.warning("mlflow: %s failed, giving up: %s", what, short(exc))
                return False, None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


def valid_name(name: str) -> bool:
    """MLflow's rule for metric and param names; checked here so that one bad key
    cannot make the server reject a whole batch."""
    return (0 < len(name) <= MAX_KEY_CHARS and bool(_VALID_NAME.match(name))
            and posixpath.normpath(name) == name and not name.startswith(("/", "..")))


def truncate(value: Any, limit: int) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created (or restored) if needed and marked as a
    model-training experiment for the UI; a kind someone chose by hand is kept."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception as exc:  # another stage created it in the meantime
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the project set the tag, or by someone else
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def open_run(client: Any, experiment: str, run_name: str | None, parent_run_id: str | None,
             resume_run_id: str | None, tags: Mapping[str, str]) -> Any:
    """Reopen ``resume_run_id`` (status back to RUNNING, ``tags`` overwrite) or create a
    run nested under ``parent_run_id``; one attempt (:func:`retry_for` repeats it). An
    unknown ``resume_run_id`` starts a new run (warning). Returns the run."""
    from mlflow.entities import RunTag

    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except Exception as exc:
            if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("mlflow: run %s to resume does not exist; starting a new run", resume_run_id)
        else:
            if run.info.status != "RUNNING":
                client.update_run(resume_run_id, status="RUNNING")
            if tags:
                client.log_batch(resume_run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
            return client.get_run(resume_run_id)
    run_tags = {**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    return client.create_run(experiment_id(client, experiment), run_name=run_name or None, tags=run_tags)


def mlflow_client(uri: str):
    """An MlflowClient of ``uri``, MLflow's HTTP settings configured first."""
    configure_http()
    from mlflow import MlflowClient

    return MlflowClient(uri)


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``models:/`` URIs, ``log_model``) on ``uri`` for the block. MLflow's
    own context manager puts its earlier global back, and, where that was unset, deletes
    ``MLFLOW_TRACKING_URI`` from this process's environment: the caller's variable is restored."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
