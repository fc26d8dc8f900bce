"""``python tests/faults/paused_stage.py <stage> ...``: ``python -m rlhf_tasks <stage> ...``
whose checkpoint ``step-N`` write stops for S seconds after its files are written and
before its COMPLETE marker (``RLHF_TEST_PAUSE_IN_CHECKPOINT="S@N"``), with a ``.paused``
file in the partial directory meanwhile, so that a test can SIGKILL the process there.
The hook wraps :func:`rlhf_tasks.storage.mark_complete` from outside the package."""

from __future__ import annotations

import os
import runpy
import time
from pathlib import Path
from typing import Any

from rlhf_tasks import storage

PAUSE_ENV = "RLHF_TEST_PAUSE_IN_CHECKPOINT"
_mark_complete = storage.mark_complete


def mark_complete_after_a_pause(ckpt_dir: Path, info: dict[str, Any]) -> None:
    seconds, _, step = os.environ[PAUSE_ENV].partition("@")
    if ckpt_dir.name == f".step-{step}.partial":
        (ckpt_dir / ".paused").touch()  # the test kills the process now
        time.sleep(float(seconds))
        (ckpt_dir / ".paused").unlink(missing_ok=True)
    _mark_complete(ckpt_dir, info)


if __name__ == "__main__":
    storage.mark_complete = mark_complete_after_a_pause  # checkpoint_dir looks it up at each call
    runpy.run_module("rlhf_tasks", run_name="__main__", alter_sys=True)
