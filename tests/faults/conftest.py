"""Fixtures of the fault suite: uninterrupted reference runs to compare resumed ones with."""

from __future__ import annotations

import threading

import pytest

from rlhf_tasks.storage import RunDir
from tests.faults.helpers import ALIGNMENT, FAST, StageProc


class Reference:
    """One uninterrupted tiny-cpu run (FAST settings), made in the background as soon as the
    fixture is first asked for: SFT and RM side by side, then each alignment stage in turn
    (each in its own stage directory of the same run: they read the same SFT and RM)."""

    def __init__(self, run: RunDir):
        self.run = run
        self.results: dict[str, dict] = {}
        self.errors: dict[str, BaseException] = {}
        self._done = {s: threading.Event() for s in ("sft", "rm", *ALIGNMENT)}
        threading.Thread(target=self._make, daemon=True).start()

    def _make(self) -> None:
        args = ["--preset", "tiny-cpu", "--set", *FAST]
        procs = {s: StageProc(s, self.run.path, *args) for s in ("sft", "rm")}
        for s, p in procs.items():
            self._collect(s, p)
        for s in ALIGNMENT:
            if self.errors:
                self._done[s].set()
                continue
            self._collect(s, StageProc(s, self.run.path))

    def _collect(self, stage: str, proc: StageProc) -> None:
        try:
            with proc:
                self.results[stage] = proc.result()
        except BaseException as e:  # reported by result()
            self.errors[stage] = e
        finally:
            self._done[stage].set()

    def result(self, stage: str) -> dict:
        self._done[stage].wait()
        if stage not in self.results:
            raise RuntimeError(f"the reference {stage} run failed: {self.errors}")
        return self.results[stage]


@pytest.fixture(scope="session")
def fault_reference(storage, tiny_model_dir, tmp_path_factory) -> Reference:
    return Reference(RunDir(tmp_path_factory.mktemp("fault-reference")))
