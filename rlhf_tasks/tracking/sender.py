"""The one path by which a tracker's metrics, params and tags reach MLflow: a bounded
in-memory queue, and one thread that sends it in order, in batches, with the plain
synchronous ``MlflowClient.log_batch``, retrying through an outage.

Why not MLflow's async logging (``log_batch(synchronous=False)``): its queue tries a batch
once and, when that fails, logs an error and forgets it; and with
``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` set, only the merged request sees the error.
Sending synchronously from our own thread gives the server's error for every batch, so
each point is counted exactly once, and training still never waits for the network.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .calls import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, is_permanent, short

log = logging.getLogger("rlhf_tasks.tracking")


class Sender:
    """Queue + sender thread for one run.

    ``open_run()`` (one attempt, returns the MLflow run) is retried with backoff until it
    succeeds when the run is not open yet (``run`` None: the server was down when the
    stage started); the queue fills meanwhile and drains once it opens, and then
    ``on_open(run)`` is called. A batch that fails with a network error goes back to the
    front of the queue and is retried with backoff (0.5 s doubling to ``MAX_BACKOFF_S``,
    plus MLflow's own HTTP retries of each attempt); once the outage is older than
    ``retry_budget_s`` what cannot be sent is dropped. ``on_reconnect()`` is called when
    the server answers again after an outage. A batch the server refuses is dropped.

    Metric points are counted: produced (accepted by :meth:`put_metrics`), sent, dropped
    (queue full: more than ``queue_size`` points pending; refused; outage past the budget;
    left at :meth:`close`), invalid (counted by the caller), pending = produced - sent -
    dropped (queued or being sent).
    """

    MAX_BACKOFF_S = 5.0  # also how late queued points can arrive once the server is back

    def __init__(self, client: Any, open_run: Callable[[], Any], run: Any | None, *, retry_budget_s: float,
                 queue_size: int, on_open: Callable[[Any], None], on_reconnect: Callable[[], None]):
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param = Metric, Param
        # Batches hold one kind of entity: log_batch's argument and how many fit in one request.
        self._kinds = {Metric: ("metrics", MAX_METRICS_PER_BATCH), Param: ("params", MAX_PARAMS_PER_BATCH),
                       RunTag: ("tags", MAX_PARAMS_PER_BATCH)}
        self._client, self._open_run = client, open_run
        self._on_open, self._on_reconnect = on_open, on_reconnect
        self.retry_budget_s, self.queue_size = retry_budget_s, queue_size
        self._cv = threading.Condition()
        # Guarded by _cv: the queue (Metric, Param, RunTag; oldest first), the batch in the
        # thread's hands, the counts, the run id and the params the run holds.
        self._queue: collections.deque[Any] = collections.deque()
        self._batch: list[Any] = []
        self._counts = {"produced": 0, "sent": 0, "dropped": 0, "invalid": 0}
        self.run_id: str | None = run.info.run_id if run is not None else None
        self._params: dict[str, str] = dict(run.data.params) if run is not None else {}
        self._outage_since: float | None = None  # sender thread only: first failed attempt
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-sender-{(self.run_id or 'deferred')[:8]}",
                                        daemon=True)
        self._thread.start()

    # -- producers (any thread; never wait for the network) --

    def put_metrics(self, points: list[Any], invalid: int = 0) -> int:
        """Queue metric points; returns how many were dropped because the queue is full."""
        with self._cv:
            room = max(0, self.queue_size - self._pending())
            over = max(0, len(points) - room)
            self._counts["invalid"] += invalid
            self._counts["produced"] += len(points)
            self._counts["dropped"] += over
            self._queue.extend(points[:room])
            self._cv.notify_all()
            return over

    def put_params(self, params: Mapping[str, str]) -> None:
        """Queue params the run does not hold yet (MLflow params are immutable: a key that
        already holds another value is skipped, with a warning)."""
        with self._cv:
            self._queue.extend(self._Param(k, v) for k, v in self._new_params(params.items()).items())
            self._cv.notify_all()

    def put_tags(self, tags: list[Any]) -> None:
        with self._cv:
            self._queue.extend(tags)
            self._cv.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {f"points_{k}": v for k, v in {**self._counts, "pending": self._pending()}.items()}

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is sent or dropped; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._batch, timeout)

    def close(self, timeout: float) -> None:
        """Flush for up to ``timeout`` s, stop the thread, count what is left as dropped."""
        if not self.flush(timeout):
            log.warning("mlflow: %d metrics not delivered within %.0f s; dropped", self.stats()["points_pending"],
                        timeout)
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._thread.join(timeout=5)
        with self._cv:  # a request still under way when it finishes is not counted again (_settle)
            self._counts["dropped"] += self._metrics_in(self._queue) + self._metrics_in(self._batch)
            self._queue.clear()
            self._batch = []
            self._cv.notify_all()

    def _pending(self) -> int:
        return self._counts["produced"] - self._counts["sent"] - self._counts["dropped"]

    def _metrics_in(self, items: Iterable[Any]) -> int:
        return sum(isinstance(x, self._Metric) for x in items)

    def _new_params(self, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
        """The params of ``pairs`` the run does not hold yet (first value of a repeated key)."""
        new: dict[str, str] = {}
        for key, value in pairs:
            old = self._params.get(key, new.get(key))
            if old is None:
                new[key] = value
            elif old != value:
                log.warning("mlflow: param %r is already %r in run %s; new value %r not logged",
                            key, old, self.run_id, value)
        return new

    # -- the sender thread --

    def _loop(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            if self.run_id is None:
                done = self._open()
            elif (batch := self._take()) is None:
                continue
            else:
                done = self._send(batch)
            if done:
                delay = 0.5
            else:  # wait before retrying, but wake at once when close() stops the thread
                self._stop.wait(delay)
                delay = min(delay * 2, self.MAX_BACKOFF_S)

    def _open(self) -> bool:
        """One attempt to open the run; True once it is open."""
        t0 = time.monotonic()
        try:
            run = self._open_run()
        except Exception as exc:
            if self._outage_since is None:
                self._outage_since = t0
                log.warning("mlflow: run not open yet, metrics kept (%s)", short(exc))
            return False
        self._outage_since = None
        with self._cv:
            self.run_id = run.info.run_id
            self._params.update(run.data.params)
            queued = self._metrics_in(self._queue)
        log.warning("mlflow: tracking server answers again: run %s open, sending %d queued metrics", self.run_id,
                    queued)
        self._callback(self._on_open, run)
        return True

    def _take(self) -> list[Any] | None:
        """The next batch: the oldest entities of one kind, as many as one request takes."""
        with self._cv:
            self._cv.wait_for(lambda: self._queue or self._stop.is_set(), timeout=1.0)
            if not self._queue or self._stop.is_set():
                return None
            kind = type(self._queue[0])
            limit = self._kinds[kind][1]
            batch = []
            while self._queue and type(self._queue[0]) is kind and len(batch) < limit:
                batch.append(self._queue.popleft())
            self._batch = batch
            return batch

    def _send(self, batch: list[Any]) -> bool:
        """Send one batch; True when done with it (sent or dropped), False to retry it."""
        t0 = time.monotonic()
        try:
            self._post(batch)
        except Exception as exc:
            what = f"{len(batch)} {self._kinds[type(batch[0])][0]}"
            if is_permanent(exc):
                log.warning("mlflow: server rejected %s, dropped: %s", what, short(exc))
                return self._settle(batch, "dropped")
            if self._outage_since is None:
                self._outage_since = t0
                log.warning("mlflow: cannot send metrics (%s); retrying for up to %.1f s", short(exc),
                            self.retry_budget_s)
            outage_s = time.monotonic() - self._outage_since
            if outage_s <= self.retry_budget_s:
                return self._settle(batch, "retry")
            log.warning("mlflow: server unreachable for %.0f s: dropped %s", outage_s, what)
            return self._settle(batch, "dropped")
        if self._outage_since is not None:
            log.warning("mlflow: server reachable again after %.0f s", time.monotonic() - self._outage_since)
            self._outage_since = None
            self._callback(self._on_reconnect)
        return self._settle(batch, "sent")

    def _post(self, batch: list[Any]) -> None:
        kind = type(batch[0])
        if kind is not self._Param:
            self._client.log_batch(self.run_id, **{self._kinds[kind][0]: batch}, synchronous=True)
            return
        with self._cv:  # a run reopened after a deferred start may already hold some
            new = self._new_params((p.key, p.value) for p in batch)
        if new:
            self._client.log_batch(self.run_id, params=[self._Param(k, v) for k, v in new.items()],
                                   synchronous=True)
        with self._cv:
            self._params.update(new)

    def _settle(self, batch: list[Any], outcome: str) -> bool:
        """The thread is done with ``batch``: "sent", "dropped", or "retry" (back to the
        front of the queue). Nothing to do if close() has already counted it."""
        with self._cv:
            if batch is self._batch:
                self._batch = []
                if outcome == "retry":
                    self._queue.extendleft(reversed(batch))
                else:
                    self._counts[outcome] += self._metrics_in(batch)
                self._cv.notify_all()
        return outcome != "retry"

    @staticmethod
    def _callback(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a callback must not stop the sender
            log.warning("mlflow: tracker callback failed: %s", short(exc))
