"""Experiment tracking in MLflow: the only module of the project that imports mlflow.

Training must never fail, and should barely slow down, because the tracking server is
slow or briefly down. So:

- :class:`Tracker` talks to an MLflow run through ``MlflowClient`` (no global "active
  run" state): metrics go into a bounded queue that a daemon thread sends in batches,
  retrying with backoff through an outage and dropping (with a warning) what it
  could not send within ``retry_budget_s``. ``log_metrics`` never blocks on the network.
- Params, tags and artifacts are sent at once (they are rare), retried for a bounded
  time, and a failure is a warning, never an exception.
- :meth:`Tracker.start` falls back to :class:`NullTracker` (same interface, does
  nothing) when the server cannot be reached within ``start_timeout_s`` or, with
  ``defer=True`` (what the stages use), returns a tracker that keeps the metrics and
  opens the run in the background as soon as the server answers.
- Every metric point is counted: produced (accepted by ``log_metrics``), sent
  (acknowledged by the server), dropped and invalid; :meth:`Tracker.stats` reports them
  and the stages put them in their result and log.

Also here: cost helpers, the plots logged as artifacts, and :func:`register_model`
(model registry with a ``champion`` alias that moves only on improvement).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import posixpath
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

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
CHAMPION_ALIAS = "champion"


def _configure_http() -> None:
    """Cut MLflow's own HTTP retries short (the defaults retry 7 times with exponential
    backoff, minutes per call, and wait 120 s for a response): this module bounds
    retries itself. Environment variables the user already set win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _is_permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: the server refused the request itself, or the local
    input is wrong. Network failures reach us as MlflowException(INTERNAL_ERROR) or
    requests' exceptions and are retried."""
    return _error_code(exc) in _PERMANENT_ERRORS or isinstance(
        exc, (TypeError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError))


def _retry(fn: Callable[[], Any], what: str, budget_s: float, *, raise_on_failure: bool = False) -> tuple[bool, Any]:
    """Call ``fn`` until it succeeds, a permanent error occurs, or ``budget_s`` is spent
    (backoff 0.5 s doubling to 10 s). Returns (ok, result); warns on failure."""
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            return True, fn()
        except Exception as exc:
            if _is_permanent(exc) or time.monotonic() + delay > deadline:
                if raise_on_failure:
                    raise
                log.warning("mlflow: %s failed, giving up: %s", what, _short(exc))
                return False, None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


def _valid_name(name: str) -> bool:
    """MLflow's rule for metric and param names; checked here so that one bad key
    cannot make the server reject a whole batch."""
    return (0 < len(name) <= MAX_KEY_CHARS and bool(_VALID_NAME.match(name))
            and posixpath.normpath(name) == name and not name.startswith(("/", "..")))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _truncate(value: Any, limit: int) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --- trackers -----------------------------------------------------------------------------------


class NullTracker:
    """Same interface as :class:`Tracker`, does nothing: tracking off, server
    unreachable at start, and unit tests of stages."""

    run_id: str | None = None
    tracking_uri: str | None = None
    unreachable = False  # True: tracking was asked for but the server did not answer
    _produced = 0

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


class Tracker(NullTracker):
    """One MLflow run, logged to without ever raising. Build it with :meth:`start`.

    Metrics: ``log_metrics`` validates and enqueues (bounded queue of ``queue_size``
    metrics); a daemon thread sends batches of up to 1000 with ``log_batch``. During an
    outage it retries the oldest batch with backoff; once the outage is older than
    ``retry_budget_s`` it drops batches it cannot send (warning with the count), and
    it recovers by itself when the server answers again.

    ``close(status)`` flushes, stops the threads and ends the run; ``close("RUNNING")``
    flushes but leaves the run open (a parent run that later tasks log into).

    Deferred (``run_id`` None, ``opener`` given): the server was down when the stage
    started. Metrics queue up as usual, params and tags are kept in memory, and the
    worker calls ``opener`` with backoff until it returns the run; then ``on_open(run_id)``
    runs, params and tags are sent, and the queue drains. Artifacts logged before that
    are skipped (warning).
    """

    def __init__(self, client: Any, run_id: str | None, tracking_uri: str, *, retry_budget_s: float = 120.0,
                 op_budget_s: float = 30.0, queue_size: int = 100_000, existing_params: Mapping[str, str] | None = None,
                 opener: Callable[[], Any] | None = None, on_open: Callable[[str], None] | None = None,
                 system_metrics_interval_s: float | None = None):
        from mlflow.entities import Metric, Param, RunTag

        if run_id is None and opener is None:
            raise ValueError("a Tracker needs a run_id or an opener")

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.retry_budget_s = retry_budget_s
        self.op_budget_s = op_budget_s
        # Longest wait between two attempts to send metrics during an outage: also how
        # late metrics can arrive once the server is back.
        self.max_backoff_s = 5.0
        self._params: dict[str, str] = dict(existing_params or {})
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._pending = 0  # metrics enqueued and neither sent nor dropped yet
        self._cv = threading.Condition()
        self._stop = threading.Event()  # worker: exit once the queue is empty
        self._abandon = threading.Event()  # worker: exit now, drop what is left
        self._closed = False
        self._warned: set[str] = set()
        self._dropped = 0
        self._produced = 0
        self._sent = 0
        self._invalid = 0
        self._outage_since: float | None = None
        self._sampler: _SystemMetricsSampler | None = None
        self._opener, self._on_open = opener, on_open
        self._system_metrics_interval_s = system_metrics_interval_s
        self._stash_params: dict[str, Any] = {}
        self._stash_tags: dict[str, Any] = {}
        self._open_failures = 0
        self._thread = threading.Thread(target=self._worker, name=f"mlflow-metrics-{(run_id or 'deferred')[:8]}",
                                        daemon=True)
        self._thread.start()
        # A stage that forgets close() (or exits on an exception) still delivers its metrics.
        atexit.register(self._atexit)

    # -- construction --

    @classmethod
    def start(cls, tracking_uri: str | None, experiment: str, run_name: str | None = None, *,
              parent_run_id: str | None = None, resume_run_id: str | None = None,
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
          ``system/...`` through this tracker's resilient queue. Setting
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
        _configure_http()
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        tags = {k: _truncate(v, MAX_TAG_VALUE_CHARS) for k, v in (tags or {}).items()}

        def opener():
            parent = parent_run_id() if callable(parent_run_id) else parent_run_id
            if callable(parent_run_id) and parent is None:
                raise ConnectionError("the parent run cannot be opened yet")
            return _open_run(client, experiment, run_name, parent, resume_run_id, tags)

        want_system = system_metrics and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() not in (
            "false", "0")
        try:
            _, run = _retry(opener, f"opening a run in experiment {experiment!r} at {tracking_uri}", start_timeout_s,
                            raise_on_failure=True)
        except Exception as exc:
            if defer and not _is_permanent(exc):
                log.warning("mlflow: tracking server %s unavailable (%s); training goes on, metrics are kept and "
                            "sent once it answers", tracking_uri, _short(exc))
                return cls(client, None, tracking_uri, retry_budget_s=retry_budget_s, opener=opener, on_open=on_open,
                           system_metrics_interval_s=system_metrics_interval_s if want_system else None)
            (log.warning if start_timeout_s > 0 else log.debug)(
                "mlflow: tracking server %s unavailable (%s); tracking is OFF for this process", tracking_uri,
                _short(exc))
            null = NullTracker()
            null.unreachable = True
            return null
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
        first_step = 1 + max((m.step for m in getattr(run.data, "_metric_objs", []) if m.key.startswith("system/")),
                             default=-1)
        self._sampler = _SystemMetricsSampler.start(self, interval_s, first_step)

    def _try_open(self) -> bool:
        """Deferred tracker: one attempt to open the run (worker thread)."""
        try:
            run = self._opener()
        except Exception as exc:
            if self._open_failures == 0:
                log.warning("mlflow: run not open yet, metrics kept (%s)", _short(exc))
            self._open_failures += 1
            return False
        with self._cv:
            self._params.update(run.data.params)
            self.run_id = run.info.run_id
            params, tags = self._stash_params, self._stash_tags
            self._stash_params, self._stash_tags = {}, {}
        log.warning("mlflow: tracking server answers again: run %s open, sending %d queued metrics", self.run_id,
                    self._queue.qsize())
        if tags:
            self.set_tags(tags)
        if params:
            self.log_params(params)
        if self._on_open is not None:
            try:
                self._on_open(self.run_id)
            except Exception as exc:  # a callback must not kill the sender
                log.warning("mlflow: on_open callback failed: %s", _short(exc))
        if self._system_metrics_interval_s and not self._closed:
            self._start_sampler(run, self._system_metrics_interval_s)
        return True

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"points_produced": self._produced, "points_sent": self._sent, "points_dropped": self._dropped,
                    "points_invalid": self._invalid, "points_pending": self._pending}

    # -- metrics --

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Enqueue and return at once. Non-finite values and invalid names are dropped
        with a warning (once per key); ``step`` is the x axis in the UI."""
        if self._closed:
            self._warn_once("closed", "mlflow: log_metrics after close() is ignored")
            return
        timestamp_ms = int(time.time() * 1000)
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
            if not _valid_name(key):
                self._invalid += 1
                self._warn_once(f"name:{key}", "mlflow: %r is not a valid metric name; dropped", key)
                continue
            with self._cv:
                self._pending += 1
                self._produced += 1
            try:
                self._queue.put_nowait(self._Metric(key, v, timestamp_ms, int(step)))
            except queue.Full:
                with self._cv:
                    self._pending -= 1
                    self._dropped += 1
                    self._cv.notify_all()
                self._warn_once("full", "mlflow: metric queue full (server down for long?); dropping new metrics")

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every metric logged so far is sent or dropped; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending == 0, timeout)

    def _worker(self) -> None:
        batch: list[Any] = []
        delay = 0.5
        while not self._abandon.is_set():
            if self.run_id is None:
                if self._stop.is_set() and self._queue.empty():
                    return
                if not self._try_open():
                    self._abandon.wait(delay)
                    delay = min(delay * 2, self.max_backoff_s)
                    continue
                delay = 0.5
            if not batch:
                try:
                    batch.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                while len(batch) < MAX_METRICS_PER_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            if self._send(batch):
                self._done(batch)
                batch, delay = [], 0.5
            else:
                # Wait before retrying, but wake up at once if close() abandons the queue.
                self._abandon.wait(delay)
                delay = min(delay * 2, self.max_backoff_s)
        self._done(batch, dropped=True)
        while True:
            try:
                self._done([self._queue.get_nowait()], dropped=True)
            except queue.Empty:
                return

    def _send(self, batch: list[Any]) -> bool:
        """True when the batch is finished with (sent, or dropped); False to retry it."""
        try:
            self._client.log_batch(self.run_id, metrics=batch, synchronous=True)
        except Exception as exc:
            now = time.monotonic()
            if _is_permanent(exc):
                with self._cv:
                    self._dropped += len(batch)
                log.warning("mlflow: server rejected %d metrics, dropped: %s", len(batch), _short(exc))
                return True
            if self._outage_since is None:
                self._outage_since = now
                log.warning("mlflow: cannot send metrics (%s); retrying for up to %.1f s", _short(exc),
                            self.retry_budget_s)
            if now - self._outage_since > self.retry_budget_s:
                with self._cv:
                    self._dropped += len(batch)
                log.warning("mlflow: server unreachable for %.0f s: dropped %d metrics (%d so far)",
                            now - self._outage_since, len(batch), self._dropped)
                return True
            return False
        with self._cv:
            self._sent += len(batch)
        if self._outage_since is not None:
            log.warning("mlflow: server reachable again after %.0f s", time.monotonic() - self._outage_since)
            self._outage_since = None
        return True

    def _done(self, batch: list[Any], dropped: bool = False) -> None:
        with self._cv:
            self._pending -= len(batch)
            if dropped:
                self._dropped += len(batch)
            self._cv.notify_all()

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
            v = _truncate(value, MAX_PARAM_VALUE_CHARS)
            if not _valid_name(key):
                log.warning("mlflow: %r is not a valid param name; skipped", key)
            elif key not in self._params:
                todo[key] = v
            elif self._params[key] != v:
                log.warning("mlflow: param %r is already %r in run %s; new value %r not logged",
                            key, self._params[key], self.run_id, v)
        items = list(todo.items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i: i + MAX_PARAMS_PER_BATCH]
            ok, _ = _retry(lambda c=chunk: self._client.log_batch(self.run_id, params=[self._Param(k, v) for k, v in c],
                                                                    synchronous=True),
                           f"logging {len(chunk)} params", self.op_budget_s)
            if ok:
                self._params.update(chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id is None:  # deferred: sent once the run is open
            with self._cv:
                if self.run_id is None:
                    self._stash_tags.update(tags)
                    return
        run_tags = [self._RunTag(k, _truncate(v, MAX_TAG_VALUE_CHARS)) for k, v in tags.items()]
        _retry(lambda: self._client.log_batch(self.run_id, tags=run_tags, synchronous=True), "setting tags",
               self.op_budget_s)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        if self._not_open(str(path)):
            return False
        if not Path(path).is_file():
            log.warning("mlflow: artifact %s does not exist; not logged", path)
            return False
        return _retry(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path),
                      f"logging artifact {path}", self.op_budget_s)[0]

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> bool:
        if self._not_open(str(local_dir)):
            return False
        if not Path(local_dir).is_dir():
            log.warning("mlflow: artifact directory %s does not exist; not logged", local_dir)
            return False
        return _retry(lambda: self._client.log_artifacts(self.run_id, str(local_dir), artifact_path),
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
        return _retry(fn, f"logging artifact {name}", self.op_budget_s)[0]

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
        self._stop.set()
        self._abandon.set()
        self._thread.join(timeout=5)
        if self._sampler is not None:  # started by a deferred open during the flush
            self._sampler.stop()
        atexit.unregister(self._atexit)
        if self.run_id is None:
            log.warning("mlflow: the tracking server never answered; this run was not recorded")
        elif status != "RUNNING":
            _retry(lambda: self._client.set_terminated(self.run_id, status), f"ending run {self.run_id}",
                   self.op_budget_s)

    def _atexit(self) -> None:
        if not self._closed:
            self.flush(timeout=10)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)


def _open_run(client: Any, experiment: str, run_name: str | None, parent_run_id: str | None,
              resume_run_id: str | None, tags: dict[str, str]) -> Any:
    """Reopen ``resume_run_id`` or create a run; one attempt (``_retry`` repeats it)."""
    from mlflow.entities import RunTag

    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except Exception as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
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
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
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
    the tracker's queue, so an outage of the server delays them instead of stopping
    them (MLflow's own monitor thread exits on the first failed request)."""

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
                        _short(exc))
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
                log.warning("mlflow: system metrics sampling stopped: %s", _short(exc))
                return
            self._tracker.log_metrics({f"system/{k}": v for k, v in metrics.items()}, self._step)
            self._step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- cost ---------------------------------------------------------------------------------------


def gpu_hours(wall_clock_s: float, num_gpus: int) -> float:
    """GPU-hours billed: wall-clock hours x GPUs (idle GPUs are paid for too)."""
    return wall_clock_s / 3600.0 * num_gpus


def cost_usd(wall_clock_s: float, gpu_hourly_usd: float, num_gpus: int) -> float:
    """``cost/usd`` = wall-clock hours x hourly price per GPU x GPUs."""
    return gpu_hours(wall_clock_s, num_gpus) * gpu_hourly_usd


# --- plots --------------------------------------------------------------------------------------


def _figure(width_in: float, height_in: float):
    """A figure not registered with pyplot: no global state, no GUI backend, safe off
    the main thread, garbage-collected once logged."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), layout="constrained")


def plot_curves(history: Mapping[str, Iterable[tuple[int, float]]], title: str):
    """One subplot per metric, (step, value) pairs, up to 3 subplots a row."""
    names = [k for k, v in history.items() if list(v)]
    if not names:
        fig = _figure(4, 3)
        fig.suptitle(title)
        fig.add_subplot().text(0.5, 0.5, "no data", ha="center", va="center")
        return fig
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows)
    fig.suptitle(title)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps, values = zip(*history[name], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    return fig


def plot_score_histogram(chosen_scores: Iterable[float], rejected_scores: Iterable[float]):
    """Reward-model scores of chosen vs rejected answers on shared bins, with the
    means and, for paired lists, the pairwise accuracy in the title."""
    chosen, rejected = [float(x) for x in chosen_scores], [float(x) for x in rejected_scores]
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    both = chosen + rejected
    if both:
        lo, hi = min(both), max(both)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        for scores, label, color in ((chosen, "chosen", "tab:green"), (rejected, "rejected", "tab:red")):
            if scores:
                mean = sum(scores) / len(scores)
                ax.hist(scores, bins=bins, alpha=0.5, color=color, label=f"{label} (mean {mean:.3f})")
                ax.axvline(mean, color=color, linestyle="--", linewidth=1)
    title = "reward model scores"
    if chosen and len(chosen) == len(rejected):
        acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
        title += f", accuracy {acc:.3f} on {len(chosen)} pairs"
    ax.set_title(title)
    ax.set_xlabel("score")
    ax.set_ylabel("count")
    ax.legend()
    return fig


# --- model registry -----------------------------------------------------------------------------


def register_model(tracking_uri: str, model_dir: str | Path, name: str, metric_name: str, metric_value: float,
                   run_id: str, higher_is_better: bool = True, *, artifact_path: str = "model",
                   alias: str = CHAMPION_ALIAS, budget_s: float = 120.0) -> dict[str, Any]:
    """Register ``model_dir`` (a plain save_pretrained directory) as a new version of
    ``name``, and move ``alias`` to it only if it beats the current holder.

    The directory is logged as artifacts of ``run_id`` under ``artifact_path``, and the
    version's source is that artifact location (no MLmodel file needed). The version is
    tagged ``<metric_name>=<metric_value>``; the alias moves when there is no champion
    yet, or when the value is strictly better than the champion's tag. A champion
    without that tag is kept (warning): it cannot be compared. Idempotent: a retried
    call for the same run and source reuses the version it made.

    Unlike the Tracker, this raises on failure: registering is the task's whole job,
    and the orchestrator should retry it.

    Returns {version, champion_version, promoted, previous_champion_metric}.
    """
    _configure_http()
    from mlflow import MlflowClient

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    client = MlflowClient(tracking_uri)

    def call(fn: Callable[[], Any], what: str) -> Any:
        return _retry(fn, what, budget_s, raise_on_failure=True)[1]

    call(lambda: client.log_artifacts(run_id, str(model_dir), artifact_path),
         f"uploading {model_dir} to run {run_id}")
    source = f"{call(lambda: client.get_run(run_id), 'reading the run').info.artifact_uri}/{artifact_path}"
    try:
        call(lambda: client.get_registered_model(name), f"reading registered model {name}")
    except Exception as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="RLHF actor (PPO); alias 'champion' = best so far")
        except Exception as exc2:  # a concurrent register created it
            if _error_code(exc2) != "RESOURCE_ALREADY_EXISTS":
                raise
    existing = call(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"),
                    "searching model versions")
    mine = [mv for mv in existing if mv.source == source]
    tags = {metric_name: repr(float(metric_value)), "rlhf.metric_name": metric_name,
            "rlhf.higher_is_better": str(higher_is_better).lower()}
    if mine:
        mv = max(mine, key=lambda m: int(m.version))
        log.info("mlflow: run %s already registered as %s version %s", run_id, name, mv.version)
    else:
        mv = call(lambda: client.create_model_version(name, source, run_id=run_id, tags=tags, await_creation_for=60),
                  f"creating a version of {name}")

    aliases = call(lambda: client.get_registered_model(name), f"reading registered model {name}").aliases
    champion = aliases.get(alias)
    previous: float | None = None
    if champion is None:
        promoted = True
    elif str(champion) == str(mv.version):
        promoted, previous = False, float(metric_value)
    else:
        champ = call(lambda: client.get_model_version(name, str(champion)), f"reading {name} version {champion}")
        try:
            previous = float(champ.tags[metric_name])
        except (KeyError, ValueError):
            log.warning("mlflow: champion %s version %s has no %r tag; it cannot be compared and stays champion",
                        name, champion, metric_name)
        promoted = previous is not None and _better(float(metric_value), previous, higher_is_better)
    if promoted:
        call(lambda: client.set_registered_model_alias(name, alias, str(mv.version)), f"moving alias {alias}")
        champion = mv.version
    log.info("mlflow: %s version %s %s=%.4g (champion %s: %s)", name, mv.version, metric_name, metric_value,
             champion, "promoted" if promoted else f"kept, {metric_name}={previous}")
    return {"version": str(mv.version), "champion_version": str(champion), "promoted": promoted,
            "previous_champion_metric": previous, "source": source}


def _better(new: float, old: float, higher_is_better: bool) -> bool:
    if math.isnan(new):
        return False
    return new > old if higher_is_better else new < old
