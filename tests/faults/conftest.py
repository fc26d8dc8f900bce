"""Fixtures of the fault suite: uninterrupted reference runs to compare resumed ones with."""

from __future__ import annotations

import pytest

from rlhf_tasks.storage import RunDir
from tests.faults.helpers import FAST, run_stage

NEEDS = {"sft": (), "reward": (), "ppo": ("sft", "reward")}


class Reference:
    """One uninterrupted tiny-cpu run (FAST settings); stages run on first request."""

    def __init__(self, run: RunDir):
        self.run = run
        self.results: dict[str, dict] = {}

    def result(self, stage: str) -> dict:
        for s in (*NEEDS[stage], stage):
            if s not in self.results:
                args = [] if self.run.config_path.is_file() else ["--preset", "tiny-cpu", "--set", *FAST]
                self.results[s] = run_stage(s, self.run.path, *args)
        return self.results[stage]


@pytest.fixture(scope="session")
def fault_reference(storage, tiny_model_dir, tmp_path_factory) -> Reference:
    return Reference(RunDir(tmp_path_factory.mktemp("fault-reference")))
