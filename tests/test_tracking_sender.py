"""rlhf_tasks.tracking.sender: the one sending path, against an in-memory MLflow client that can
be taken down, refuse requests, or not exist yet (test_tracking.py and the fault suite run
the same code against a real server)."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from rlhf_tasks.tracking.sender import Sender


class FakeClient:
    """Holds what log_batch received; ``down`` makes every request fail as a refused
    connection does (MLflow's INTERNAL_ERROR), ``refuse`` as a bad request does."""

    def __init__(self):
        self.down = False
        self.refuse: set[str] = set()  # metric keys the server rejects
        self.batches: list[tuple[str, list]] = []
        self.lock = threading.Lock()

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        assert synchronous is True and run_id == "run-1"
        if self.down:
            raise MlflowException("API request failed: connection refused")
        if any(m.key in self.refuse for m in metrics):
            raise MlflowException("bad metric", error_code=INVALID_PARAMETER_VALUE)
        with self.lock:
            for kind, items in (("metrics", metrics), ("params", params), ("tags", tags)):
                if items:
                    self.batches.append((kind, list(items)))

    def received(self, kind: str = "metrics") -> list:
        with self.lock:
            return [x for k, items in self.batches if k == kind for x in items]


def run(params: dict[str, str] | None = None):
    return SimpleNamespace(info=SimpleNamespace(run_id="run-1"), data=SimpleNamespace(params=params or {}))


def points(n: int, key: str = "sft/loss", first_step: int = 0) -> list[Metric]:
    return [Metric(key, float(s), 0, s) for s in range(first_step, first_step + n)]


def sender(client, opened=True, open_run=None, **kw) -> Sender:
    events = kw.pop("events", [])
    return Sender(client, open_run or (lambda: run()), run() if opened else None,
                  retry_budget_s=kw.pop("retry_budget_s", 60.0), queue_size=kw.pop("queue_size", 100_000),
                  on_open=lambda r: events.append(("open", r.info.run_id)),
                  on_reconnect=lambda: events.append(("reconnect",)))


def test_points_arrive_in_order_in_batches_of_at_most_1000_and_are_counted():
    client = FakeClient()
    s = sender(client)
    s.put_metrics(points(2500), invalid=2)
    s.put_tags([RunTag("a", "1")])
    s.put_metrics(points(3, first_step=2500))
    assert s.flush(10)
    got = client.received()
    assert [m.step for m in got] == list(range(2503))
    assert max(len(items) for k, items in client.batches if k == "metrics") == 1000
    assert [k for k, _ in client.batches][-2:] == ["tags", "metrics"]  # the tag between the two puts
    assert s.stats() == {"points_produced": 2503, "points_sent": 2503, "points_dropped": 0, "points_invalid": 2,
                         "points_pending": 0}
    s.close(1)


def test_an_outage_holds_the_points_and_sends_each_once_when_the_server_is_back():
    client, events = FakeClient(), []
    s = sender(client, events=events)
    s.put_metrics(points(5))
    assert s.flush(10)
    client.down = True
    s.put_metrics(points(5, first_step=5))
    assert not s.flush(1.0)  # retrying
    assert s.stats()["points_pending"] == 5
    client.down = False
    assert s.flush(10)
    assert [m.step for m in client.received()] == list(range(10))  # no gap, no duplicate
    assert events == [("reconnect",)]
    assert s.stats()["points_sent"] == 10 and s.stats()["points_dropped"] == 0
    s.close(1)


def test_past_the_budget_a_refused_or_unsendable_batch_is_dropped_and_counted(caplog):
    client = FakeClient()
    s = sender(client, retry_budget_s=0.0)
    client.down = True
    with caplog.at_level(logging.WARNING, logger="rlhf_tasks.tracking"):
        s.put_metrics(points(4))
        assert s.flush(10)
    assert "cannot send metrics" in caplog.text and "dropped 4 metrics" in caplog.text
    client.down = False
    client.refuse = {"bad"}
    with caplog.at_level(logging.WARNING, logger="rlhf_tasks.tracking"):
        s.put_metrics(points(2, key="bad"))
        assert s.flush(10)
    assert "server rejected 2 metrics" in caplog.text
    s.put_metrics(points(3, key="good"))
    assert s.flush(10)
    assert [m.key for m in client.received()] == ["good"] * 3  # the refused batch does not block the next
    assert s.stats() == {"points_produced": 9, "points_sent": 3, "points_dropped": 6, "points_invalid": 0,
                         "points_pending": 0}
    s.close(1)


def test_a_deferred_run_keeps_metrics_up_to_the_queue_size_and_opens_when_it_can():
    client, events = FakeClient(), []
    ready = threading.Event()

    def open_run():
        if not ready.is_set():
            raise ConnectionError("no server yet")
        return run({"seed": "1"})

    s = sender(client, opened=False, open_run=open_run, queue_size=4, events=events)
    s.put_params({"seed": "2", "lr": "0.1"})  # queued before the run (which holds seed=1) is known
    assert s.put_metrics(points(6)) == 2  # two over the queue's size
    assert not s.flush(0.5) and s.run_id is None
    assert s.stats() == {"points_produced": 6, "points_sent": 0, "points_dropped": 2, "points_invalid": 0,
                         "points_pending": 4}
    ready.set()
    assert s.flush(10)
    assert s.run_id == "run-1" and events == [("open", "run-1")]
    assert [m.step for m in client.received()] == [0, 1, 2, 3]
    assert [(p.key, p.value) for p in client.received("params")] == [("lr", "0.1")]  # seed is immutable
    s.put_params({"lr": "0.1", "seed": "1"})  # both already held: nothing to send
    assert s.flush(10) and len(client.received("params")) == 1
    s.close(1)


def test_close_counts_what_it_could_not_send_as_dropped():
    client = FakeClient()
    s = sender(client, opened=False, open_run=lambda: (_ for _ in ()).throw(ConnectionError("never")))
    s.put_metrics(points(7))
    s.close(0.2)
    assert s.stats() == {"points_produced": 7, "points_sent": 0, "points_dropped": 7, "points_invalid": 0,
                         "points_pending": 0}
    assert not client.batches


def test_producers_never_wait_for_a_slow_server():
    client = FakeClient()
    slow = threading.Event()
    original = client.log_batch

    def log_batch(*a, **k):
        slow.wait(5)  # a request that hangs
        return original(*a, **k)

    client.log_batch = log_batch
    s = sender(client)
    t0 = time.monotonic()
    for step in range(2000):
        s.put_metrics(points(1, first_step=step))
    assert time.monotonic() - t0 < 1.0  # 2000 calls while the sender is stuck in one request
    slow.set()
    assert s.flush(10) and len(client.received()) == 2000
    s.close(1)
