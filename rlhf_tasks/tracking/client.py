"""The Tracker: one MLflow run, logged to without ever raising or making training wait.

- Metrics, params and tags go through one :class:`~.sender.Sender`: a bounded queue and
  one thread that sends batches with ``MlflowClient.log_batch`` and retries through an
  outage of up to ``retry_budget_s``. Every metric point is counted (produced, sent,
  dropped, invalid, pending), which MLflow does not do: :meth:`Tracker.stats`, used by
  the stages' results and the fault tests.
- Artifacts (files, rare) are uploaded at once, retried for up to ``op_budget_s``; a
  failure is a warning, never an exception.
- :meth:`Tracker.open` falls back to :class:`NullTracker` when the server does not answer
  within ``start_timeout_s`` or, with ``defer=True`` (what the stages use), returns a
  tracker whose queue fills while its run is opened in the background once the server
  answers.
- System metrics are MLflow's own ``SystemMetricsMonitor``, started and finished as
  ``mlflow.start_run(log_system_metrics=True)`` does, against this tracker's run.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config import flatten
from .calls import (
    MAX_PARAM_VALUE_CHARS,
    MAX_TAG_VALUE_CHARS,
    configure_http,
    is_permanent,
    open_run,
    retry_for,
    short,
    truncate,
    valid_name,
)
from .interface import NullTracker
from .sender import Sender

log = logging.getLogger("rlhf_tasks.tracking")


class Tracker:
    """One MLflow run. Build it with :meth:`start` (a run by experiment and name) or
    :meth:`open` (a run opened by a given function).

    ``close(status)`` flushes, stops the threads and ends the run; ``close("RUNNING")``
    flushes but leaves the run open (a parent run that later tasks log into). Artifacts
    logged while a deferred run is not open yet are skipped (warning).
    """

    def __init__(self, client: Any, tracking_uri: str, open_fn: Callable[[], Any], run: Any | None, *,
                 retry_budget_s: float, queue_size: int, system_metrics_interval_s: float | None):
        self._client = client
        self.tracking_uri = tracking_uri
        self.op_budget_s = 30.0
        self._system_interval_s = system_metrics_interval_s
        self._system: Any = None  # MLflow's SystemMetricsMonitor, while it runs
        self._warned: set[str] = set()
        self._closed = False
        self._sender = Sender(client, open_fn, run, retry_budget_s=retry_budget_s, queue_size=queue_size,
                              on_open=lambda _run: self._start_system_metrics(), on_reconnect=self._restart_system_metrics)
        if run is not None:
            self._start_system_metrics()
        # A stage that forgets close() (or exits on an exception) still delivers its metrics.
        atexit.register(self._atexit)

    @property
    def run_id(self) -> str | None:
        return self._sender.run_id

    # -- construction --

    @classmethod
    def start(cls, tracking_uri: str | None, experiment: str, run_name: str | None = None, *,
              parent_run_id: str | None = None, resume_run_id: str | None = None,
              tags: Mapping[str, Any] | None = None, system_metrics: bool = False,
              system_metrics_interval_s: float = 10.0, start_timeout_s: float = 60.0,
              retry_budget_s: float = 120.0, defer: bool = False) -> Tracker | NullTracker:
        """Open a run in ``experiment``, or a :class:`NullTracker` if tracking is off
        (no ``tracking_uri``) or unreachable. ``resume_run_id`` reopens that run (a
        retried task continues it; ``tags`` overwrite the old values); otherwise a run
        is created, nested under ``parent_run_id``. The rest as in :meth:`open`."""
        if not tracking_uri:
            return NullTracker()
        run_tags = {k: truncate(v, MAX_TAG_VALUE_CHARS) for k, v in (tags or {}).items()}
        return cls.open(tracking_uri, lambda client: open_run(client, experiment, run_name, parent_run_id,
                                                              resume_run_id, run_tags),
                        system_metrics=system_metrics, system_metrics_interval_s=system_metrics_interval_s,
                        start_timeout_s=start_timeout_s, retry_budget_s=retry_budget_s, defer=defer)

    @classmethod
    def open(cls, tracking_uri: str, open_fn: Callable[[Any], Any], *, system_metrics: bool = False,
             system_metrics_interval_s: float = 10.0, start_timeout_s: float = 60.0, retry_budget_s: float = 120.0,
             defer: bool = False, queue_size: int = 100_000) -> Tracker | NullTracker:
        """``open_fn(client)`` opens the run (one attempt, returns it); it is retried for
        ``start_timeout_s``. If the server has not answered by then: a
        :class:`NullTracker` (tracking off for this process, warning), or with ``defer``
        a tracker that keeps its metrics, params and tags and opens the run once the
        server answers. A permanent error (the request is wrong) is never deferred.

        ``system_metrics``: MLflow's collectors (CPU, memory, disk, network and, with
        nvidia-ml-py, GPU) every ``system_metrics_interval_s`` as ``system/...``;
        ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns them off."""
        configure_http()
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        try:
            _, run = retry_for(lambda: open_fn(client), f"opening a run at {tracking_uri}", start_timeout_s,
                               raise_on_failure=True)
        except Exception as exc:
            if not defer or is_permanent(exc):
                (log.warning if start_timeout_s > 0 else log.debug)(
                    "mlflow: tracking server %s unavailable (%s); tracking is OFF for this process", tracking_uri,
                    short(exc))
                return NullTracker(unreachable=True)
            log.warning("mlflow: tracking server %s unavailable (%s); training goes on, metrics are kept and sent "
                        "once it answers", tracking_uri, short(exc))
            run = None
        else:
            log.info("mlflow: run %s (experiment %s) at %s", run.info.run_id, run.info.experiment_id, tracking_uri)
        enabled = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() not in ("false", "0")
        return cls(client, tracking_uri, lambda: open_fn(client), run, retry_budget_s=retry_budget_s,
                   queue_size=queue_size,
                   system_metrics_interval_s=system_metrics_interval_s if system_metrics and enabled else None)

    # -- system metrics: MLflow's monitor, as mlflow.start_run(log_system_metrics=True) runs it --

    def _start_system_metrics(self) -> None:
        if self._system_interval_s is None or self._closed:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a resumed (or restarted) monitor continues after the run's last step.
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self._system_interval_s,
                                           resume_logging=True, tracking_uri=self.tracking_uri)
        except Exception as exc:  # psutil missing
            log.warning("mlflow: system metrics unavailable (%s); install psutil (and nvidia-ml-py for GPUs)",
                        short(exc))
            self._system_interval_s = None
            return
        monitor.start()
        self._system = monitor

    def _stop_system_metrics(self) -> None:
        monitor, self._system = self._system, None
        if monitor is not None:
            monitor.finish()

    def _restart_system_metrics(self) -> None:
        """MLflow's monitor ends at its first failed request: start a new one after an outage."""
        if self._system is not None:
            self._stop_system_metrics()
            self._start_system_metrics()

    # -- metrics, params, tags: queued, sent by the sender thread --

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue the points and return at once. Non-finite values, non-numbers and
        invalid names are dropped with a warning (once per key); ``step`` is the x axis
        in the UI."""
        from mlflow.entities import Metric

        if self._closed:
            self._warn_once("closed", "mlflow: log_metrics after close() is ignored")
            return
        timestamp_ms = int(time.time() * 1000)
        points, invalid = [], 0
        for key, value in metrics.items():
            problem = metric_problem(key, value)
            if problem is None:
                points.append(Metric(key, float(value), timestamp_ms, int(step)))
            else:
                invalid += 1
                self._warn_once(f"metric:{key}", "mlflow: metric %r %s at step %s; dropped (warned once)",
                                key, problem, step)
        if self._sender.put_metrics(points, invalid):
            self._warn_once("full", "mlflow: metric queue full (server down for long?); dropping new metrics")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dict -> dotted keys, values as strings cut to MLflow's 6000 chars.
        Keys already logged with the same value are skipped (a resumed run re-logs its
        config); a different value cannot be logged (MLflow params are immutable), so
        it is skipped with a warning."""
        todo: dict[str, str] = {}
        for key, value in flatten(params).items():
            if valid_name(key):
                todo[key] = truncate(value, MAX_PARAM_VALUE_CHARS)
            else:
                log.warning("mlflow: %r is not a valid param name; skipped", key)
        self._sender.put_params(todo)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._sender.put_tags([RunTag(k, truncate(v, MAX_TAG_VALUE_CHARS)) for k, v in tags.items()])

    def stats(self) -> dict[str, int]:
        """Metric points: produced, sent to the server, dropped, invalid, still pending."""
        return self._sender.stats()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything logged so far is sent or dropped; False on timeout."""
        return self._sender.flush(timeout)

    # -- artifacts: uploaded at once --

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        if not Path(path).is_file():
            log.warning("mlflow: artifact %s does not exist; not logged", path)
            return False
        return self._artifact_call(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path), str(path))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> bool:
        if not Path(local_dir).is_dir():
            log.warning("mlflow: artifact directory %s does not exist; not logged", local_dir)
            return False
        return self._artifact_call(lambda: self._client.log_artifacts(self.run_id, str(local_dir), artifact_path),
                                   str(local_dir))

    def log_dict(self, dictionary: Any, name: str) -> bool:
        """JSON (or YAML if ``name`` ends in .yaml/.yml) artifact at ``name``."""
        return self._artifact_call(lambda: self._client.log_dict(self.run_id, dictionary, name), name)

    def log_text(self, text: str, name: str) -> bool:
        return self._artifact_call(lambda: self._client.log_text(self.run_id, text, name), name)

    def log_figure(self, fig: Any, name: str) -> bool:
        """A matplotlib figure as an image artifact at ``name`` (e.g. plots/loss.png)."""
        return self._artifact_call(lambda: self._client.log_figure(self.run_id, fig, name), name)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> bool:
        """Rows of a table (e.g. sample generations) as an MLflow table artifact, which
        the UI's artifact view and evaluation tab render as a table. ``name`` must end
        in .json (added if missing); columns are the union of the rows' keys."""
        if not name.endswith(".json"):
            name += ".json"
        columns: dict[str, list[Any]] = {key: [] for row in rows for key in row}
        for row in rows:
            for key, col in columns.items():
                col.append(row.get(key))
        return self._artifact_call(lambda: self._client.log_table(self.run_id, data=columns, artifact_file=name), name)

    def _artifact_call(self, fn: Callable[[], Any], name: str) -> bool:
        if self.run_id is None:
            log.warning("mlflow: run not open yet (server unreachable); artifact %s not logged", name)
            return False
        return retry_for(fn, f"logging artifact {name}", self.op_budget_s)[0]

    # -- end --

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Flush (up to ``timeout`` s; what is left is dropped, counted), stop the
        threads, and end the run with ``status`` (FINISHED, FAILED, KILLED), or leave it
        open with RUNNING. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sender.close(timeout)
        self._stop_system_metrics()
        atexit.unregister(self._atexit)
        if self.run_id is None:
            log.warning("mlflow: the tracking server never answered; this run was not recorded")
        elif status != "RUNNING":
            retry_for(lambda: self._client.set_terminated(self.run_id, status), f"ending run {self.run_id}",
                      self.op_budget_s)

    def _atexit(self) -> None:
        if not self._closed:
            self.flush(timeout=10)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


def metric_problem(key: str, value: Any) -> str | None:
    """Why MLflow would refuse the point (as words for a warning), or None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return f"is not a number ({value!r})"
    if not math.isfinite(v):
        return f"is {v}"
    return None if valid_name(key) else "has an invalid name"
