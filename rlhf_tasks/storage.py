"""Shared-storage layout, atomic writes and resume markers.

::

    $RLHF_STORAGE/
      models/<name>/                          built-in models (tiny default), made once
      cache/tokenized/<hash>/                 tokenised phase datasets
      runs/<run_id>/config.yaml               resolved config of the run
      runs/<run_id>/<stage>/checkpoints/step-N/   DeepSpeed state; COMPLETE written last
      runs/<run_id>/<stage>/final/            save_pretrained + tokenizer + metrics.json
      runs/<run_id>/<stage>/result.json       the StageResult the DAG reads

A stage is a transaction: ``final/`` appears by an atomic rename of a finished temporary
directory, so a reader never sees half a model, and a re-run of a finished stage is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
STAGES = ("sft", "reward", "ppo", "evaluate")


def storage_root() -> Path:
    """``$RLHF_STORAGE``, or ``.rlhf`` in the current directory."""
    return Path(os.environ.get("RLHF_STORAGE") or Path.cwd() / ".rlhf").resolve()


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class StageResult:
    """What a stage hands on: paths and ids, never tensors."""

    stage: str
    final_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    wall_clock_s: float = 0.0
    skipped: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> StageResult:
        return cls(**json.loads(path.read_text()))


class RunDir:
    """Paths of one pipeline run on shared storage."""

    def __init__(self, path: Path | str):
        self.path = Path(path).resolve()

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def stage(self, name: str) -> Path:
        return self.path / name

    def checkpoints(self, stage: str) -> Path:
        return self.path / stage / "checkpoints"

    def final(self, stage: str) -> Path:
        return self.path / stage / "final"

    def result_path(self, stage: str) -> Path:
        return self.path / stage / "result.json"

    def result(self, stage: str) -> StageResult | None:
        """The stage's result, if it finished and the model it points at is still there."""
        p = self.result_path(stage)
        if not p.is_file():
            return None
        r = StageResult.load(p)
        return r if Path(r.final_dir).is_dir() else None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``target`` on success.

    An existing ``target`` is replaced only after the new one is complete, so a crash
    at any point leaves either the old or the new directory, never a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:6]}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


_STEP_RE = re.compile(r"^step-(\d+)$")


def mark_complete(ckpt_dir: Path, info: dict[str, Any]) -> None:
    """Written last: a checkpoint without the marker is ignored on resume."""
    write_json(ckpt_dir / MARKER, info)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint that has its marker, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and incomplete ones
    older than the newest complete one (left by a crash)."""
    ckpts = complete_checkpoints(root)
    for _, p in ckpts[:-keep] if keep > 0 else ckpts:
        shutil.rmtree(p, ignore_errors=True)
    if ckpts:
        newest = ckpts[-1][0]
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and int(m.group(1)) < newest and not (p / MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)
