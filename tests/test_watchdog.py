"""The watchdog that turns a hang of a multi-process stage into an error naming the stage,
the phase and the rank (rlhf_tasks/runtime/watchdog.py). The real hang, two ranks under
ZeRO-3 with uneven evaluation shards, is tests/faults/test_ranks_faults.py's."""

from __future__ import annotations

import threading
import time

from rlhf_tasks.runtime import watchdog
from rlhf_tasks.runtime.watchdog import EXIT_HUNG, Watchdog, phase, watching


def _dog(bound_s: float, **kw) -> tuple[Watchdog, threading.Event, list]:
    exited, codes = threading.Event(), []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    return Watchdog("sft", 1, 2, bound_s, exit=fake_exit, **kw), exited, codes


def test_no_progress_past_the_bound_ends_the_process_naming_stage_phase_and_rank(capfd):
    seen: list[str] = []
    dog, exited, codes = _dog(0.3, on_hang=seen.append)
    with watching(dog):
        with phase("evaluation"):
            assert exited.wait(5), "the watchdog never fired"
    assert codes == [EXIT_HUNG]
    err = capfd.readouterr().err
    assert "error: sft: rank 1 of 2 made no progress for" in err and "in phase 'evaluation'" in err, err
    assert "resources.collective_timeout_minutes=0.005" in err
    assert "Thread" in err  # the Python stacks, for whoever reads the task log
    assert seen == [dog.fired]  # the stage closes its MLflow run as FAILED first


def test_beats_keep_it_quiet_and_phases_nest():
    dog, exited, _ = _dog(0.4)
    with watching(dog):
        with phase("training"):
            for _ in range(8):  # 1.2 s of work in beats 0.15 s apart
                time.sleep(0.15)
                watchdog.beat()
            with phase("checkpoint"):
                assert dog.current == "checkpoint"
            assert dog.current == "training"
        assert dog.current == "start"
    assert not exited.is_set() and dog.fired is None
    assert not dog._thread.is_alive()  # stopped with the block


def test_markers_cost_nothing_without_a_watchdog():
    assert watchdog._current is None
    with phase("evaluation"):
        watchdog.beat()
    with watching(None) as dog:
        assert dog is None
