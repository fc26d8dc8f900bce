"""Full storage and two runs on one run directory.

Disk full: a real SFT process writes its run directory on a small tmpfs mount that this
test makes (root only; elsewhere the process case is skipped and the simulated ENOSPC cases
below still run): the checkpoint that does not fit fails with a clear "storage full"
error (exit 4), the previous checkpoint stays complete and loadable, nothing half-written
is left, and once the volume is bigger the stage resumes from that checkpoint.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_tasks.storage import (
    RunDir,
    RunDirBusy,
    StorageFullError,
    atomic_dir,
    checkpoint_dir,
    complete_checkpoints,
    latest_checkpoint,
    stage_lock,
)
from tests.faults.helpers import FAST, StageProc, complete_steps, partial_dirs


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_volume(tmp_path):
    """A tmpfs mount of a given size (root only), unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, size: str) -> Path:
        path = tmp_path / name
        if not _mount_tmpfs(path, size):
            pytest.skip("cannot mount a tmpfs here (needs root): the simulated ENOSPC cases cover the logic")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- the lock ---------------------------------------------------------------------------------------

def test_stage_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    with stage_lock(run, "sft"):
        with pytest.raises(RunDirBusy) as e, stage_lock(run, "sft"):
            pass
        msg = str(e.value)
        assert str(run) in msg and f"pid {os.getpid()}" in msg and "already running" in msg
        with stage_lock(run, "rm"):  # another stage of the same run: allowed (SFT and RM side by side)
            pass
    # A holder killed with SIGKILL never blocks the next attempt: the kernel drops its lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from rlhf_tasks.storage import stage_lock\n"
        "with stage_lock(Path(sys.argv[1]), 'sft'):\n    print('locked', flush=True); time.sleep(60)\n"), str(run)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"), stage_lock(run, "sft"):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with stage_lock(run, "sft"):
        pass


# --- ENOSPC, simulated (any machine) ------------------------------------------------------------------

def test_checkpoint_enospc_keeps_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    with checkpoint_dir(root, 8, {"global_step": 8}) as d:
        d.mkdir()
        (d / "state.pt").write_bytes(b"8" * 100)
    with pytest.raises(StorageFullError) as e, checkpoint_dir(root, 16, {"global_step": 16}) as d:
        d.mkdir()
        (d / "state.pt").write_bytes(b"1" * 50)  # half written when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(e.value)
    assert f"storage full at {root}" in msg and "bytes free" in msg and "checkpoint step-16" in msg
    assert f"the previous checkpoint {root / 'step-8'} is intact" in msg
    assert [s for s, _ in complete_checkpoints(root)] == [8] and latest_checkpoint(root)[0] == 8
    assert (root / "step-8" / "state.pt").read_bytes() == b"8" * 100
    assert sorted(p.name for p in root.iterdir()) == ["step-8"]  # no partial directory left


def test_other_errors_are_not_called_storage_full(tmp_path):
    root = tmp_path / "checkpoints"
    with pytest.raises(ValueError, match="a bug"), checkpoint_dir(root, 4, {}) as d:
        d.mkdir()
        raise ValueError("a bug")
    assert list(root.iterdir()) == []


# --- ENOSPC, real (a small tmpfs) ---------------------------------------------------------------------

def test_torch_save_and_final_dir_on_a_full_volume(small_volume):
    vol = small_volume("tiny", "1m")
    with atomic_dir(vol / "final") as tmp:
        (tmp / "metrics.json").write_text("{}")
    with pytest.raises(StorageFullError, match=f"storage full at {vol / 'final'}"), atomic_dir(vol / "final") as tmp:
        torch.save({"w": torch.zeros(1 << 19)}, tmp / "model.pt")  # 2 MiB: torch reports a RuntimeError
    assert (vol / "final" / "metrics.json").read_text() == "{}" and sorted(p.name for p in vol.iterdir()) == ["final"]
    with pytest.raises(StorageFullError, match="checkpoint step-3"), checkpoint_dir(vol / "ck", 3, {}) as d:
        d.mkdir()
        torch.save({"w": torch.zeros(1 << 19)}, d / "state.pt")
    assert list((vol / "ck").iterdir()) == []


@pytest.mark.slow
def test_disk_full_in_a_real_stage_then_resume(storage, tiny_model_dir, small_volume):
    """A tiny-cpu SFT checkpoint is ~12 MB: a 20 MB volume holds step-8, not step-16."""
    vol = small_volume("runs", "20m")
    run = RunDir(vol / "run")
    t0 = time.monotonic()
    with StageProc("sft", run.path, "--preset", "tiny-cpu", "--set", *FAST) as p:
        code = p.finish()
    text = p.text()
    assert code == 4, p.tail()
    assert f"storage full at {run.checkpoints('sft')}" in text and "while writing checkpoint step-16" in text, p.tail()
    assert f"the previous checkpoint {run.checkpoints('sft') / 'step-8'} is intact" in text
    assert complete_steps(run, "sft") == [8] and not partial_dirs(run, "sft")
    state = torch.load(run.checkpoints("sft") / "step-8" / "mp_rank_00_model_states.pt", weights_only=False,
                       map_location="cpu")
    assert state["global_step"] == 8 and state["module"]  # whole and loadable
    # Make room; the retry resumes from step 8 and finishes.
    subprocess.run(["mount", "-o", "remount,size=80m", str(vol)], check=True)
    with StageProc("sft", run.path) as again:
        result = again.result()
    assert again.resumed_from() == 8 and result["metrics"]["global_step"] == 24
    print("FAULT-REPORT", {"case": "disk full", "exit_code": code, "stage_s": round(time.monotonic() - t0, 1)})
