"""The Tracker: one MLflow run, logged to without ever raising or blocking training.

What MLflow does here, and what this module adds:

- Metrics go through MLflow's own asynchronous logging (``MlflowClient.log_batch(...,
  synchronous=False)``: its queue and worker pool, one ``RunOperations`` per call), and
  every request through MLflow's HTTP retries (``MLFLOW_HTTP_REQUEST_*``, given short
  defaults by :func:`configure_http` when a tracker starts).
- MLflow's async queue tries a batch once and, when it fails, logs an error and forgets
  it (``RunOperations.wait()`` raises). So a thin *outage buffer* sits in front of it: the
  points of a failed batch, and every point logged while the buffer is not empty, are held
  here (bounded by ``queue_size``) and resent in order by one thread, with backoff, until
  the server answers (then logging goes back to MLflow's queue) or the outage is older
  than ``retry_budget_s`` (then what cannot be sent is dropped, with a warning).
- Every metric point is counted (produced, sent, dropped, invalid, pending), which MLflow
  does not do: :meth:`Tracker.stats`, used by the stages' results and the fault tests.
- Params, tags and artifacts are sent at once (they are rare), repeated for up to
  ``op_budget_s``; a failure is a warning, never an exception.
- :meth:`Tracker.start` falls back to :class:`NullTracker` (same interface, does nothing)
  when the server does not answer within ``start_timeout_s`` or, with ``defer=True``
  (what the stages use), returns a tracker that holds the metrics and opens its run in
  the background as soon as the server answers.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..config import flatten

log = logging.getLogger("rlhf_tasks.tracking")

# MLflow's limits (mlflow.utils.validation): longer values are rejected by the server.
MAX_KEY_CHARS = 250
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# Metric/param names MLflow accepts (POSIX): alphanumerics, _ - . space : and /.
_VALID_NAME = re.compile(r"^[/\w.\- :]+$")
# Error codes that a retry cannot fix (the request itself is wrong).
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                     "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "FEATURE_DISABLED"}
# MLflow's HTTP settings while a tracker runs, unless the environment sets them: a request
# rides out a blip of a few seconds (retries after 0 s and ~2 s; MLflow's defaults retry 7
# times, minutes per call, and wait 120 s for a response); longer outages are this module's
# budgets (start_timeout_s, op_budget_s, retry_budget_s).
# Not set: MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS. It merges queued batches into one request,
# but when that request fails only the merged batch gets the exception: the RunOperations
# of the batches merged into it report success (MLflow 3.17, RunBatch.complete), and their
# points would be counted as sent and lost. Where the environment sets it, a Tracker sends
# every batch itself (synchronously, from its sender thread) instead.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 2, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1,
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": 60}


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


# --- the interface stage code is typed against --------------------------------------------------


class TrackerLike(Protocol):
    """What a stage may call on its tracker: :class:`Tracker` or :class:`NullTracker`."""

    run_id: str | None
    tracking_uri: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool: ...
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> bool: ...
    def log_dict(self, dictionary: Any, name: str) -> bool: ...
    def log_text(self, text: str, name: str) -> bool: ...
    def log_figure(self, fig: Any, name: str) -> bool: ...
    def log_table(self, rows: list[dict[str, Any]], name: str) -> bool: ...
    def flush(self, timeout: float = 30.0) -> bool: ...
    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None: ...


class NullTracker:
    """Same interface as :class:`Tracker`, does nothing: tracking off, server
    unreachable at start, and unit tests of stages."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def __init__(self, unreachable: bool = False):
        self.unreachable = unreachable  # tracking was asked for but the server did not answer
        self._produced = 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._produced += len(metrics)

    def stats(self) -> dict[str, int]:
        """Metric points: produced, sent to the server, dropped, invalid, still pending."""
        lost = self._produced if self.unreachable else 0
        return {"points_produced": self._produced, "points_sent": 0, "points_dropped": lost,
                "points_invalid": 0, "points_pending": 0}

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        return False

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> bool:
        return False

    def log_dict(self, dictionary: Any, name: str) -> bool:
        return False

    def log_text(self, text: str, name: str) -> bool:
        return False

    def log_figure(self, fig: Any, name: str) -> bool:
        return False

    def log_table(self, rows: list[dict[str, Any]], name: str) -> bool:
        return False

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


# --- the MLflow tracker -------------------------------------------------------------------------


class Tracker:
    """One MLflow run, logged to without ever raising. Build it with :meth:`start`.

    Metrics: ``log_metrics`` validates and hands the points to MLflow's async queue
    (``log_batch(synchronous=False)``); the sender thread waits on each returned
    ``RunOperations`` to count the points sent. A failed batch starts an outage: its
    points, and all points logged until the outage ends, are held in a buffer of at most
    ``queue_size`` points (pending ones included; past it new points are dropped) that the
    sender resends in batches of up to 1000 with ``log_batch(synchronous=True)`` (which
    gives the real error), backing off up to ``max_backoff_s``. Once the outage is older
    than ``retry_budget_s`` the batches it cannot send are dropped (warning with the
    count); it recovers by itself when the server answers again.

    ``close(status)`` flushes, stops the threads and ends the run; ``close("RUNNING")``
    flushes but leaves the run open (a parent run that later tasks log into).

    Deferred (``run_id`` None, ``opener`` given): the server was down when the stage
    started. Metrics are held as in an outage, params and tags are kept in memory, and
    the sender calls ``opener`` with backoff until it returns the run; then
    ``on_open(run_id)`` runs, params and tags are sent, and the buffer drains. Artifacts
    logged before that are skipped (warning).
    """

    def __init__(self, client: Any, run_id: str | None, tracking_uri: str, *, retry_budget_s: float = 120.0,
                 op_budget_s: float = 30.0, queue_size: int = 100_000, existing_params: Mapping[str, str] | None = None,
                 opener: Callable[[], Any] | None = None, on_open: Callable[[str], None] | None = None,
                 system_metrics_interval_s: float | None = None):
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.environment_variables import MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS

        if run_id is None and opener is None:
            raise ValueError("a Tracker needs a run_id or an opener")

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.retry_budget_s = retry_budget_s
        self.op_budget_s = op_budget_s
        self.queue_size = queue_size
        # MLflow's async queue, unless its buffering would hide failed batches (MLFLOW_DEFAULTS).
        self._use_async = not MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS.get()
        # Longest wait between two attempts to send held metrics during an outage (plus
        # MLflow's own retries of the attempt): also how late metrics can arrive once the
        # server is back.
        self.max_backoff_s = 5.0
        self._params: dict[str, str] = dict(existing_params or {})
        self._cv = threading.Condition()
        # Guarded by _cv: batches in MLflow's async queue (RunOperations, points), oldest
        # first; the outage buffer; the batch the sender is resending; the counters.
        self._inflight: collections.deque[tuple[Any, list[Any]]] = collections.deque()
        self._held: collections.deque[Any] = collections.deque()
        self._sending: list[Any] = []  # the points in the sender's hands (awaited, or being resent)
        self._resending = False  # _sending came from the buffer: new points are held behind it
        self._pending = 0  # points in flight, held or being sent: neither sent nor dropped yet
        self._dropped = 0
        self._produced = 0
        self._sent = 0
        self._invalid = 0
        self._abandon = threading.Event()  # sender: exit now; close() drops what is left
        self._closed = False
        self._warned: set[str] = set()
        self._outage_since: float | None = None
        self._sampler: _SystemMetricsSampler | None = None
        self._opener, self._on_open = opener, on_open
        self._system_metrics_interval_s = system_metrics_interval_s
        self._stash_params: dict[str, Any] = {}
        self._stash_tags: dict[str, Any] = {}
        self._open_failures = 0
        self._thread = threading.Thread(target=self._sender, name=f"mlflow-metrics-{(run_id or 'deferred')[:8]}",
                                        daemon=True)
        self._thread.start()
        # A stage that forgets close() (or exits on an exception) still delivers its metrics.
        atexit.register(self._atexit)

    # -- construction --

    @classmethod
    def start(cls, tracking_uri: str | None, experiment: str, run_name: str | None = None, *,
              parent_run_id: str | Callable[[], str | None] | None = None, resume_run_id: str | None = None,
              tags: Mapping[str, Any] | None = None, system_metrics: bool = False,
              system_metrics_interval_s: float = 10.0, start_timeout_s: float = 60.0,
              retry_budget_s: float = 120.0, defer: bool = False,
              on_open: Callable[[str], None] | None = None) -> Tracker | NullTracker:
        """Open a run, or a :class:`NullTracker` if tracking is off or unreachable.

        - ``resume_run_id``: reopen that run (a retried task continues the same run);
          its status goes back to RUNNING and ``tags`` overwrite the old values.
          An unknown id starts a new run instead (warning).
        - ``parent_run_id``: nest the new run under it (``mlflow.parentRunId`` tag).
        - ``system_metrics``: sample CPU, memory, disk, network and, with
          nvidia-ml-py installed, GPU utilisation and memory every
          ``system_metrics_interval_s`` with MLflow's own collectors, logged as
          ``system/...`` through this tracker. Setting
          ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns it off.
        - The server is retried for ``start_timeout_s``, then tracking is off for this
          process (warning), rather than failing the stage; with ``defer=True`` a
          deferred tracker (class docstring) is returned instead.
        - ``parent_run_id`` may be a callable returning the id (None: not available
          yet), so that a deferred run can create its parent first.
        - ``on_open(run_id)`` is called once the run is open (at once, or later).
        """
        if not tracking_uri:
            return NullTracker()
        configure_http()
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        tags = {k: truncate(v, MAX_TAG_VALUE_CHARS) for k, v in (tags or {}).items()}

        def opener():
            parent = parent_run_id() if callable(parent_run_id) else parent_run_id
            if callable(parent_run_id) and parent is None:
                raise ConnectionError("the parent run cannot be opened yet")
            return _open_run(client, experiment, run_name, parent, resume_run_id, tags)

        want_system = system_metrics and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() not in (
            "false", "0")
        try:
            _, run = retry_for(opener, f"opening a run in experiment {experiment!r} at {tracking_uri}",
                               start_timeout_s, raise_on_failure=True)
        except Exception as exc:
            if defer and not is_permanent(exc):
                log.warning("mlflow: tracking server %s unavailable (%s); training goes on, metrics are kept and "
                            "sent once it answers", tracking_uri, short(exc))
                return cls(client, None, tracking_uri, retry_budget_s=retry_budget_s, opener=opener, on_open=on_open,
                           system_metrics_interval_s=system_metrics_interval_s if want_system else None)
            (log.warning if start_timeout_s > 0 else log.debug)(
                "mlflow: tracking server %s unavailable (%s); tracking is OFF for this process", tracking_uri,
                short(exc))
            return NullTracker(unreachable=True)
        tracker = cls(client, run.info.run_id, tracking_uri, retry_budget_s=retry_budget_s,
                      existing_params=run.data.params)
        log.info("mlflow: run %s (%s) in experiment %r at %s", run.info.run_id,
                 "resumed" if run.info.run_id == resume_run_id else "new", experiment, tracking_uri)
        if on_open is not None:
            on_open(run.info.run_id)
        if want_system:
            tracker._start_sampler(run, system_metrics_interval_s)
        return tracker

    def _start_sampler(self, run: Any, interval_s: float) -> None:
        self._sampler = _SystemMetricsSampler.start(self, interval_s, self._next_system_step(run))

    def _next_system_step(self, run: Any) -> int:
        """A resumed run continues its system metrics after the last step it holds."""
        keys = sorted(k for k in run.data.metrics if k.startswith("system/"))
        if not keys:
            return 0
        try:
            history = self._client.get_metric_history(run.info.run_id, keys[0])
        except Exception as exc:
            log.warning("mlflow: cannot read the run's system metrics (%s); they restart at step 0", short(exc))
            return 0
        return 1 + max((m.step for m in history), default=-1)

    def _try_open(self) -> bool:
        """Deferred tracker: one attempt to open the run (sender thread)."""
        try:
            run = self._opener()
        except Exception as exc:
            if self._open_failures == 0:
                log.warning("mlflow: run not open yet, metrics kept (%s)", short(exc))
            self._open_failures += 1
            return False
        with self._cv:
            self._params.update(run.data.params)
            self.run_id = run.info.run_id
            params, tags = self._stash_params, self._stash_tags
            self._stash_params, self._stash_tags = {}, {}
            held = len(self._held)
        log.warning("mlflow: tracking server answers again: run %s open, sending %d queued metrics", self.run_id, held)
        if tags:
            self.set_tags(tags)
        if params:
            self.log_params(params)
        if self._on_open is not None:
            try:
                self._on_open(self.run_id)
            except Exception as exc:  # a callback must not kill the sender
                log.warning("mlflow: on_open callback failed: %s", short(exc))
        if self._system_metrics_interval_s and not self._closed:
            self._start_sampler(run, self._system_metrics_interval_s)
        return True

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"points_produced": self._produced, "points_sent": self._sent, "points_dropped": self._dropped,
                    "points_invalid": self._invalid, "points_pending": self._pending}

    # -- metrics --

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Hand to MLflow's async queue (or the outage buffer) and return at once.
        Non-finite values and invalid names are dropped with a warning (once per key);
        ``step`` is the x axis in the UI."""
        if self._closed:
            self._warn_once("closed", "mlflow: log_metrics after close() is ignored")
            return
        timestamp_ms = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                self._invalid += 1
                self._warn_once(f"type:{key}", "mlflow: metric %r is not a number (%r); dropped", key, value)
                continue
            if not math.isfinite(v):
                self._invalid += 1
                self._warn_once(f"finite:{key}", "mlflow: metric %r is %s at step %s; dropped (warned once)",
                                key, v, step)
                continue
            if not valid_name(key):
                self._invalid += 1
                self._warn_once(f"name:{key}", "mlflow: %r is not a valid metric name; dropped", key)
                continue
            points.append(self._Metric(key, v, timestamp_ms, int(step)))
        if not points:
            return
        with self._cv:
            self._produced += len(points)
            room = max(0, self.queue_size - self._pending)
            if len(points) > room:
                self._dropped += len(points) - room
                points = points[:room]
                self._warn_once("full", "mlflow: metric queue full (server down for long?); dropping new metrics")
            if not points:
                return
            self._pending += len(points)
            if self._use_async and self.run_id is not None and not self._held and not self._resending:
                try:
                    ops = self._client.log_batch(self.run_id, metrics=points, synchronous=False)
                except Exception as exc:  # MLflow's queue is shut down (interpreter exit): resend ourselves
                    self._warn_once("async", "mlflow: async logging unavailable (%s); sending directly", short(exc))
                    self._held.extend(points)
                else:
                    self._inflight.append((ops, points))
            else:  # outage, or run not open yet: the sender resends them in order
                self._held.extend(points)
            self._cv.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every metric logged so far is sent or dropped; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending == 0, timeout)

    def _sender(self) -> None:
        """The one thread that waits on MLflow's async batches, resends held points and
        opens a deferred run."""
        delay = 0.5
        while not self._abandon.is_set():
            with self._cv:
                self._cv.wait_for(lambda: self._inflight or self._held or self.run_id is None
                                  or self._abandon.is_set(), timeout=1.0)
                if self._abandon.is_set():
                    return
                ops, points = None, []
                if self._inflight:
                    ops, points = self._inflight.popleft()
                elif self.run_id is not None and self._held:
                    points = [self._held.popleft() for _ in range(min(len(self._held), MAX_METRICS_PER_BATCH))]
                    self._resending = True
                self._sending = points
            if ops is not None:
                self._await(ops, points)
            elif self.run_id is None:
                if self._try_open():
                    delay = 0.5
                else:
                    self._abandon.wait(delay)
                    delay = min(delay * 2, self.max_backoff_s)
            elif points:
                if self._resend(points):
                    delay = 0.5
                else:  # wait before retrying, but wake up at once if close() abandons the buffer
                    self._abandon.wait(delay)
                    delay = min(delay * 2, self.max_backoff_s)

    def _await(self, ops: Any, points: list[Any]) -> None:
        """Wait for one batch in MLflow's async queue: sent, or held for resending."""
        try:
            ops.wait()
        except Exception as exc:  # MLflow tried once (with its HTTP retries), logged an error, forgot the batch
            self._outage_started(exc)
            self._settle(points, "held")
        else:
            self._outage_ended()
            self._settle(points, "sent")

    def _resend(self, points: list[Any]) -> bool:
        """Send points taken from the buffer synchronously (which, unlike RunOperations,
        gives the server's error code). True when they are finished with (sent, or
        dropped); False to retry them (back to the buffer's front)."""
        try:
            self._client.log_batch(self.run_id, metrics=points, synchronous=True)
        except Exception as exc:
            if is_permanent(exc):
                log.warning("mlflow: server rejected %d metrics, dropped: %s", len(points), short(exc))
                self._settle(points, "dropped")
                return True
            self._outage_started(exc)
            outage_s = time.monotonic() - self._outage_since
            if outage_s > self.retry_budget_s:
                self._settle(points, "dropped")
                log.warning("mlflow: server unreachable for %.0f s: dropped %d metrics (%d so far)",
                            outage_s, len(points), self.stats()["points_dropped"])
                return True
            self._settle(points, "held")
            return False
        self._outage_ended()
        self._settle(points, "sent")
        return True

    def _settle(self, points: list[Any], outcome: str) -> None:
        """The sender is done with the points in hand: "sent", "dropped", or "held" again
        (at the buffer's front). Nothing to do if close() has already counted them."""
        with self._cv:
            if points is not self._sending:
                return
            self._sending, self._resending = [], False
            if outcome == "held":
                self._held.extendleft(reversed(points))
            else:
                self._pending -= len(points)
                if outcome == "sent":
                    self._sent += len(points)
                else:
                    self._dropped += len(points)
            self._cv.notify_all()

    def _outage_started(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("mlflow: cannot send metrics (%s); retrying for up to %.1f s", short(exc), self.retry_budget_s)

    def _outage_ended(self) -> None:
        if self._outage_since is not None:
            log.warning("mlflow: server reachable again after %.0f s", time.monotonic() - self._outage_since)
            self._outage_since = None

    # -- params, tags, artifacts --

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dict -> dotted keys, values as strings cut to MLflow's 6000 chars.
        Keys already logged with the same value are skipped (a resumed run re-logs its
        config); a different value cannot be logged (MLflow params are immutable), so
        it is skipped with a warning."""
        if self.run_id is None:  # deferred: sent once the run is open
            with self._cv:
                if self.run_id is None:
                    self._stash_params.update(flatten(params))
                    return
        todo: dict[str, str] = {}
        for key, value in flatten(params).items():
            v = truncate(value, MAX_PARAM_VALUE_CHARS)
            if not valid_name(key):
                log.warning("mlflow: %r is not a valid param name; skipped", key)
            elif key not in self._params:
                todo[key] = v
            elif self._params[key] != v:
                log.warning("mlflow: param %r is already %r in run %s; new value %r not logged",
                            key, self._params[key], self.run_id, v)
        items = list(todo.items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i: i + MAX_PARAMS_PER_BATCH]
            ok, _ = retry_for(lambda c=chunk: self._client.log_batch(
                self.run_id, params=[self._Param(k, v) for k, v in c], synchronous=True),
                f"logging {len(chunk)} params", self.op_budget_s)
            if ok:
                self._params.update(chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id is None:  # deferred: sent once the run is open
            with self._cv:
                if self.run_id is None:
                    self._stash_tags.update(tags)
                    return
        run_tags = [self._RunTag(k, truncate(v, MAX_TAG_VALUE_CHARS)) for k, v in tags.items()]
        retry_for(lambda: self._client.log_batch(self.run_id, tags=run_tags, synchronous=True), "setting tags",
                  self.op_budget_s)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        if self._not_open(str(path)):
            return False
        if not Path(path).is_file():
            log.warning("mlflow: artifact %s does not exist; not logged", path)
            return False
        return retry_for(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path),
                         f"logging artifact {path}", self.op_budget_s)[0]

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> bool:
        if self._not_open(str(local_dir)):
            return False
        if not Path(local_dir).is_dir():
            log.warning("mlflow: artifact directory %s does not exist; not logged", local_dir)
            return False
        return retry_for(lambda: self._client.log_artifacts(self.run_id, str(local_dir), artifact_path),
                         f"logging artifacts {local_dir}", self.op_budget_s)[0]

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
        columns: dict[str, list[Any]] = {}
        for row in rows:
            for key in row:
                columns.setdefault(key, [])
        for row in rows:
            for key, col in columns.items():
                col.append(row.get(key))
        return self._artifact_call(lambda: self._client.log_table(self.run_id, data=columns, artifact_file=name), name)

    def _artifact_call(self, fn: Callable[[], Any], name: str) -> bool:
        if self._not_open(name):
            return False
        return retry_for(fn, f"logging artifact {name}", self.op_budget_s)[0]

    def _not_open(self, what: str) -> bool:
        if self.run_id is None:
            log.warning("mlflow: run not open yet (server unreachable); artifact %s not logged", what)
            return True
        return False

    # -- end --

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Flush (up to ``timeout`` s), stop the threads, and end the run with ``status``
        (FINISHED, FAILED, KILLED), or leave it open with RUNNING. Idempotent."""
        if self._closed:
            return
        if self._sampler is not None:
            self._sampler.stop()
        if not self.flush(timeout):
            with self._cv:
                left = self._pending
            log.warning("mlflow: %d metrics not delivered within %.0f s; dropped", left, timeout)
        self._closed = True
        self._abandon.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout=5)
        with self._cv:  # what is still held, in flight or in the sender's hands is dropped, counted once
            left = len(self._held) + len(self._sending) + sum(len(p) for _, p in self._inflight)
            self._held.clear()
            self._inflight.clear()
            self._sending, self._resending = [], False
            self._dropped += left
            self._pending -= left
            self._cv.notify_all()
        if self._sampler is not None:  # started by a deferred open during the flush
            self._sampler.stop()
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


def _open_run(client: Any, experiment: str, run_name: str | None, parent_run_id: str | None,
              resume_run_id: str | None, tags: dict[str, str]) -> Any:
    """Reopen ``resume_run_id`` or create a run; one attempt (``retry_for`` repeats it)."""
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
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            experiment_id = client.create_experiment(experiment)
        except Exception as exc:  # another stage created it in the meantime
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        experiment_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    run_tags = dict(tags)
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id, run_name=run_name or None, tags=run_tags)


class _SystemMetricsSampler:
    """Samples MLflow's built-in system-metric collectors (CPU, memory, disk, network,
    GPU through pynvml) on a daemon thread and logs them as ``system/<name>`` through
    the tracker, so an outage of the server delays them instead of stopping them
    (MLflow's own monitor thread exits on the first failed request)."""

    def __init__(self, tracker: Tracker, monitor: Any, interval_s: float, first_step: int):
        self._tracker, self._monitor, self._interval_s, self._step = tracker, monitor, interval_s, first_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-system-metrics", daemon=True)

    @classmethod
    def start(cls, tracker: Tracker, interval_s: float, first_step: int) -> _SystemMetricsSampler | None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=interval_s,
                                           tracking_uri=tracker.tracking_uri)
        except Exception as exc:  # psutil missing, or MLflow's internals moved
            log.warning("mlflow: system metrics unavailable (%s); install psutil (and nvidia-ml-py for GPUs)",
                        short(exc))
            return None
        sampler = cls(tracker, monitor, interval_s, first_step)
        sampler._thread.start()
        return sampler

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._monitor.collect_metrics()
                metrics = self._monitor.aggregate_metrics()
                for m in self._monitor.monitors:
                    m.clear_metrics()
            except Exception as exc:
                log.warning("mlflow: system metrics sampling stopped: %s", short(exc))
                return
            self._tracker.log_metrics({f"system/{k}": v for k, v in metrics.items()}, self._step)
            self._step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
