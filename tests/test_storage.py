from __future__ import annotations

import pytest

from rlhf_tasks.storage import (
    MARKER,
    RunDir,
    StageResult,
    atomic_dir,
    atomic_file,
    complete_checkpoints,
    latest_checkpoint,
    mark_complete,
    prune_checkpoints,
    write_json,
)


def test_atomic_dir_publishes_only_on_success(tmp_path):
    target = tmp_path / "final"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("crash mid-save")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    assert (target / "model.safetensors").read_text() == "v1"
    # Replacing keeps the old one until the new one is complete.
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        raise RuntimeError
    assert (target / "model.safetensors").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("v2")
    assert (target / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "cache" / "sft.pt"
    with atomic_file(target) as tmp:
        tmp.write_text("v1")
    assert target.read_text() == "v1"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-save")
    assert target.read_text() == "v1" and [p.name for p in target.parent.iterdir()] == ["sft.pt"]


def test_only_marked_checkpoints_count_and_pruning(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        (root / f"step-{step}").mkdir(parents=True)
        mark_complete(root / f"step-{step}", {"global_step": step})
    (root / "step-25").mkdir()  # a crash before the marker: incomplete
    (root / "step-40").mkdir()  # being written right now: newer than the newest complete one
    assert [s for s, _ in complete_checkpoints(root)] == [10, 20, 30]
    assert latest_checkpoint(root)[0] == 30
    prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-20", "step-30", "step-40"]
    assert (root / "step-30" / MARKER).is_file()
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_stage_result_needs_final_dir(tmp_path):
    run = RunDir(tmp_path)
    r = StageResult(stage="sft", final_dir=str(run.final("sft")), metrics={"perplexity": 3.2}, wall_clock_s=1.5)
    write_json(run.result_path("sft"), r.__dict__)
    assert run.result("sft") is None  # result without the model it points at does not count
    run.final("sft").mkdir(parents=True)
    assert run.result("sft").metrics == {"perplexity": 3.2}
