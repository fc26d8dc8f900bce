"""A hang becomes an error: a thread that fails the stage when a rank stops making progress.

Under ZeRO-3 every forward pass is a collective, and a collective waits for every rank: a
rank that runs one forward pass fewer than the others (an uneven evaluation shard, a rank
that stops generating early) leaves them waiting for ever, holding the GPUs until the
stage's timeout (24 hours). The process group's own timeout (gloo, NCCL) would end it, but
with an error that names neither the stage nor what the rank was doing.

So each rank of a multi-process stage runs a :class:`Watchdog`: the stage marks its phases
(``with watchdog.phase("evaluation"):``) and beats at every unit of work (a batch, a
generation call); when no beat comes for ``resources.collective_timeout_minutes``, the
watchdog prints which stage, phase and rank waited, the Python stacks of the process, and
ends the process with :data:`EXIT_HUNG`. DeepSpeed's launcher then stops the other ranks,
and the task fails (and is retried from the newest complete checkpoint).

The thread is the only way to act while the main thread is blocked inside a C++
collective, which no Python exception can interrupt. A module-level current watchdog (one
per process, like the process group) keeps the markers free of plumbing: with none
running (one process, tests) they cost nothing.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("rlhf_tasks")

EXIT_HUNG = 5  # python -m rlhf_tasks's exit status for a rank that waited past the bound


class Watchdog:
    """Fails the process when ``bound_s`` seconds pass without :meth:`beat`.

    ``on_hang(message)`` runs first (best effort: the stage closes its MLflow run as
    FAILED); ``exit`` is how the process ends (``os._exit``: the main thread is stuck, so
    no normal exit can run; tests pass their own)."""

    def __init__(self, stage: str, rank: int, world_size: int, bound_s: float,
                 on_hang: Callable[[str], None] | None = None, exit: Callable[[int], None] = os._exit):
        self.stage, self.rank, self.world_size, self.bound_s = stage, rank, world_size, bound_s
        self.on_hang, self._exit = on_hang, exit
        self.current = "start"
        self.last = time.monotonic()
        self.fired: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-{stage}", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def beat(self, phase: str | None = None) -> None:
        """Progress: the deadline moves ``bound_s`` ahead (and the phase, when given, is now
        ``phase``). A float store and a clock read: cheap enough for every batch."""
        if phase is not None:
            self.current = phase
        self.last = time.monotonic()

    def message(self, waited_s: float) -> str:
        waited = f"{waited_s:.0f} s" if waited_s < 120 else f"{waited_s / 60:.1f} min"
        return (f"{self.stage}: rank {self.rank} of {self.world_size} made no progress for {waited} "
                f"in phase '{self.current}' (bound: resources.collective_timeout_minutes="
                f"{self.bound_s / 60:g}): it is waiting for another rank in a collective (under ZeRO-3 every "
                "forward pass is one), or that rank died or hangs. Stopping the stage; a retry resumes from the "
                "newest complete checkpoint. This rank's Python stacks follow.")

    def _watch(self) -> None:
        poll = min(max(self.bound_s / 20, 0.05), 5.0)
        while not self._stop.wait(poll):
            waited = time.monotonic() - self.last
            if waited <= self.bound_s:
                continue
            self.fired = self.message(waited)
            print(f"error: {self.fired}", file=sys.stderr, flush=True)
            log.error("%s", self.fired)
            with contextlib.suppress(Exception):
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            if self.on_hang is not None:
                with contextlib.suppress(Exception):
                    self.on_hang(self.fired)
            sys.stderr.flush()
            self._exit(EXIT_HUNG)
            return


_current: Watchdog | None = None


@contextlib.contextmanager
def watching(dog: Watchdog | None) -> Iterator[Watchdog | None]:
    """Run ``dog`` (None: no watchdog) as the process's current watchdog for the block."""
    global _current
    if dog is None:
        yield None
        return
    previous, _current = _current, dog.start()
    try:
        yield dog
    finally:
        dog.stop()
        _current = previous


def beat() -> None:
    """Progress in the current phase (a no-op without a watchdog)."""
    if _current is not None:
        _current.beat()


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase of the stage (what the hang message names); the phase around it
    resumes when the block ends."""
    dog = _current
    if dog is None:
        yield
        return
    outer = dog.current
    dog.beat(name)
    try:
        yield
    finally:
        dog.beat(outer)
