"""Shared-storage layout, atomic writes and resume markers.

::

    $RLHF_STORAGE/
      models/<name>/                          built-in models (tiny default), made once
      cache/tokenized/<hash>/                 tokenised phase datasets
      runs/<run_id>/config.yaml               resolved config of the run
      runs/<run_id>/<stage>/checkpoints/step-N/   DeepSpeed state; COMPLETE written last
      runs/<run_id>/<stage>/checkpoints/.step-N.partial/   a checkpoint being written
      runs/<run_id>/.locks/<stage>.lock       held (flock) by the process running that stage
      runs/<run_id>/<stage>/final/            save_pretrained + tokenizer + metrics.json
      runs/<run_id>/<stage>/result.json       the StageResult the DAG reads

A stage is a transaction: ``final/`` appears by an atomic rename of a finished temporary
directory, so a reader never sees half a model, and a re-run of a finished stage is a no-op.
Checkpoints are written the same way (``.step-N.partial`` -> fsync -> COMPLETE -> rename to
``step-N``), so a process killed at any moment leaves only whole checkpoints behind. A disk
that fills up mid-write raises :class:`StorageFullError` and leaves the previous checkpoint
as it was. One process at a time runs a stage of a run directory (:func:`stage_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The line a stage process prints last, before its result as JSON (the launcher reads it).
RESULT_PREFIX = "RLHF_RESULT "
MARKER = "COMPLETE"


def storage_root() -> Path:
    """``$RLHF_STORAGE``, or ``.rlhf`` in the current directory."""
    return Path(os.environ.get("RLHF_STORAGE") or Path.cwd() / ".rlhf").resolve()


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_RUN_NAME = 200


def run_dir_for(run_id: str, root: Path | None = None) -> Path:
    """``<storage>/runs/<name>`` for an orchestrator's run id (Airflow's contain ``:`` and
    ``+``; a hostile one may contain ``/`` or ``..``): every character outside
    ``[A-Za-z0-9_.-]`` becomes ``_``, leading dots are dropped, and the result is checked
    to be a direct child of ``runs/``, so no run id can point outside storage."""
    runs = (root or storage_root()) / "runs"
    name = _UNSAFE_NAME.sub("_", str(run_id)).lstrip(".")[:MAX_RUN_NAME]
    if not name.strip("._-"):
        raise ValueError(f"run id {run_id!r} has no character usable in a directory name")
    path = runs / name
    if path.resolve().parent != runs.resolve():
        raise ValueError(f"run id {run_id!r} would put the run directory outside {runs}")
    return path


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
        return self.path / CONFIG_FILE

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


class StorageFullError(OSError):
    """The storage filled up (or hit a quota) while writing; what was half written is gone."""


class RunDirBusy(RuntimeError):
    """Another process is running the same stage in the same run directory."""


# Below this many free bytes a failed write is taken to be a full disk: torch.save reports
# ENOSPC as a RuntimeError from its zip writer ("unexpected pos ..."), without an errno.
FULL_FREE_BYTES = 1 << 20
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXT = ("no space left", "os error 28", "disk quota", "file too large")


def free_bytes(path: Path) -> int | None:
    for p in (Path(path), *Path(path).parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


def storage_full_error(exc: BaseException, path: Path, what: str, keep_note: str = "") -> StorageFullError | None:
    """A :class:`StorageFullError` naming ``path`` and the free space if ``exc`` (or its
    cause) is a full disk, else None."""
    free = free_bytes(path)
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(isinstance(e, OSError) and e.errno in _FULL_ERRNOS for e in chain) or any(
        t in str(e).lower() for e in chain for t in _FULL_TEXT)
    if not full and isinstance(exc, (OSError, RuntimeError)) and free is not None and free < FULL_FREE_BYTES:
        full = True
    if not full or isinstance(exc, StorageFullError):
        return None
    return StorageFullError(errno.ENOSPC, f"storage full at {path}: {free if free is not None else '?'} bytes free "
                                          f"while writing {what} ({type(exc).__name__}: {str(exc)[:200]}); "
                                          f"nothing half-written was kept{keep_note}. Free space or enlarge the "
                                          f"volume, then run the stage again")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write; renamed to ``path`` when the block ends, so
    a reader sees the old file or the whole new one. On an error it is removed, and a full
    disk raises :class:`StorageFullError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        if (full := storage_full_error(exc, path, str(path))) is not None:
            raise full from exc
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``target`` on success.

    An existing ``target`` is replaced only after the new one is complete, so a crash
    at any point leaves either the old or the new directory, never a mix. A full disk
    raises :class:`StorageFullError` (the temporary directory removed, ``target`` kept).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException as exc:
        full = storage_full_error(exc, target, str(target))
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from exc
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:6]}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


_STEP_RE = re.compile(r"^step-(\d+)$")
_PARTIAL_RE = re.compile(r"^\.step-(\d+)\.(partial|deleting)$")
def _fsync_tree(root: Path) -> None:
    """Flush a directory's files and the directory entries to the device, so that a
    rename that publishes them cannot survive a power loss without their contents."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_dir(path: Path) -> None:
    """Rename out of the ``step-N`` namespace first, then delete: a process killed while
    deleting leaves a ``.step-N.deleting`` directory, never a half-deleted ``step-N``
    that still has its marker."""
    m = _STEP_RE.match(path.name)
    if m:
        doomed = path.with_name(f".step-{m.group(1)}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        try:
            path.rename(doomed)
        except OSError:
            doomed = path
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def checkpoint_dir(root: Path, step: int, info: dict[str, Any], *, is_main: bool = True) -> Iterator[Path]:
    """Write checkpoint ``step-<step>`` of ``root`` as a transaction.

    Yields ``root/.step-<step>.partial`` for every rank to write into (DeepSpeed's
    ``save_checkpoint(str(path.parent), tag=path.name)``, or into it directly). On success
    the main rank flushes it to the device, writes the COMPLETE marker and renames it to
    ``step-<step>``. On any error the partial directory is removed; a full disk raises
    :class:`StorageFullError` that names the checkpoint kept from before.
    """
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".step-{step}.partial"
    final = root / f"step-{step}"
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed attempt
    try:
        yield partial
        if is_main:
            partial.mkdir(exist_ok=True)
            _fsync_tree(partial)
            mark_complete(partial, info)
            if final.exists():  # an incomplete step-N of an older layout, or a re-done step
                _remove_dir(final)
            partial.rename(final)
            _fsync_dir(root)
    except BaseException as exc:
        if is_main:
            prev = latest_checkpoint(root)
            keep = f"; the previous checkpoint {prev[1]} is intact" if prev else "; there is no earlier checkpoint"
            full = storage_full_error(exc, root, f"checkpoint step-{step}", keep)
            shutil.rmtree(partial, ignore_errors=True)
            if full is not None:
                raise full from exc
        raise


def remove_partial_checkpoints(root: Path) -> list[str]:
    """Delete what killed attempts left half-written or half-deleted; their names."""
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if _PARTIAL_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return sorted(gone)


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
        _remove_dir(p)
    if ckpts:
        newest = ckpts[-1][0]
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and int(m.group(1)) < newest and not (p / MARKER).is_file():
                _remove_dir(p)
            elif (m := _PARTIAL_RE.match(p.name)) and int(m.group(1)) < newest:
                shutil.rmtree(p, ignore_errors=True)


# --- one process per stage and run directory ----------------------------------------------------


@contextlib.contextmanager
def stage_lock(run_path: Path, stage: str) -> Iterator[None]:
    """Hold ``<run>/.locks/<stage>.lock`` (``flock``, exclusive, non-blocking) for the
    stage's life: a second process for the same stage and run directory fails at once
    with :class:`RunDirBusy` naming the holder. The kernel drops the lock when its holder
    dies, even by SIGKILL, so a retry after a crash is never blocked. Under the DeepSpeed
    launcher only global rank 0 takes it (the other ranks are the same run)."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        yield
        return
    lock_dir = Path(run_path) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    f = open(lock_dir / f"{stage}.lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(20):  # the holder writes its id right after locking
                f.seek(0)
                if holder := f.read().strip():
                    break
                time.sleep(0.05)
            holder = holder or "a process that has not written its id yet"
            raise RunDirBusy(f"run directory {run_path} is in use: its {stage} stage is already running "
                             f"({holder}). Two runs cannot share an output directory at once: wait for that "
                             "one to finish or stop it, or give this run another --output") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


# -- the run directory's config.yaml ------------------------------------------------------------

CONFIG_FILE = "config.yaml"  # the run's resolved config, in runs/<run_id>/, checkpoints and final/
