"""Resumable checkpoints of a training stage: one helper for the SFT/RM loop and PPO.

A checkpoint is ``<stage>/checkpoints/step-N/``, written as a transaction by
:func:`~rlhf_tasks.storage.checkpoint_dir` (``.step-N.partial`` -> COMPLETE marker ->
rename), holding each DeepSpeed engine's state, the stage's own state (the step, history,
elapsed wall-clock, RNG state of every generator, ...) inside the first engine's files,
and the run's ``config.yaml``; with several ranks, each rank's RNG state in ``rng/``,
written before the main rank marks the checkpoint complete (a checkpoint is complete only
when every rank has written its part). An engine named ``""`` is saved in ``step-N/`` itself, any
other in ``step-N/<name>/`` (PPO: ``actor/``, ``critic/``).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..storage import (
    CONFIG_FILE,
    checkpoint_dir,
    latest_checkpoint,
    prune_checkpoints,
    remove_partial_checkpoints,
    write_json,
)
from .ranks import barrier
from .stage import StageContext
from .watchdog import phase

log = logging.getLogger("rlhf_tasks")
RNG_DIR = "rng"  # step-N/rng/rank-<r>.pt: every rank's random generators (several ranks)


def get_rng_state() -> dict[str, Any]:
    """Every random generator a stage draws from, saved in its checkpoints: a resumed
    run samples (PPO rollouts, dropout) exactly as the uninterrupted run would have."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    """Restore :func:`get_rng_state` (a checkpoint from before it existed has none)."""
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

class Checkpointer:
    """Save every ``every`` steps (0: never), keep the newest ``keep``, resume from the newest.

    ``step_key`` names the step in the saved state and the marker (``global_step`` for the
    supervised loop, ``iteration`` for PPO), ``unit`` in the log line the fault tests read
    (``<stage>: resumed from <dir> (<unit> <N>``).
    """

    def __init__(self, ctx: StageContext, engines: dict[str, Any], every: int, keep: int, *,
                 step_key: str = "global_step", unit: str = "step"):
        self.ctx, self.engines, self.every, self.keep = ctx, engines, every, keep
        self.step_key, self.unit = step_key, unit
        self.root = ctx.run.checkpoints(ctx.name)
        self._rng: dict[str, Any] | None = None

    def _dir(self, ckpt: Path, name: str) -> Path:
        return ckpt / name if name else ckpt

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def resume(self) -> dict[str, Any] | None:
        """Remove what a killed attempt half wrote, load the newest complete checkpoint into
        the engines and return its state (``history`` as lists of tuples), or None: start
        afresh. The stage's earlier wall-clock is restored; the RNG state waits for
        :meth:`restore_rng`."""
        ctx = self.ctx
        if ctx.is_main and (gone := remove_partial_checkpoints(self.root)):
            log.info("%s: removed %s left by an interrupted attempt", ctx.name, gone)
        if (found := latest_checkpoint(self.root)) is None:
            return None
        _, path = found
        state = None
        with phase("checkpoint"):
            for name, engine in self.engines.items():
                d = self._dir(path, name)
                _, client = engine.load_checkpoint(str(d.parent), tag=d.name)
                state = client if state is None else state
        if "history" in state:
            state["history"] = {k: [tuple(x) for x in v] for k, v in state["history"].items()}
        ctx.previous_elapsed_s = state["elapsed_s"]
        own = path / RNG_DIR / f"rank-{ctx.rank}.pt"
        self._rng = torch.load(own, weights_only=False) if own.is_file() else state.get("rng")
        step = state[self.step_key]
        if ctx.is_main:
            write_json(ctx.stage_dir / "resume.json", {"resumed_from_step": step, "checkpoint": str(path)})
            ctx.tracker.set_tags({"rlhf.resumed_from_step": str(step)})
        log.info("%s: resumed from %s (%s %d)", ctx.name, path, self.unit, step)
        return state

    def restore_rng(self) -> None:
        """Put the random generators where the checkpointed run had them. Called once the
        data iterator exists (making one draws a seed); a no-op after the first call."""
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write ``step-<step>``: the engines, ``state`` plus the step, elapsed wall-clock and
        RNG state, the config; then prune to the newest ``keep``. A full disk raises
        :class:`~rlhf_tasks.storage.StorageFullError` and leaves the previous one intact."""
        ctx = self.ctx
        rng = get_rng_state()
        state = {**state, self.step_key: step, "elapsed_s": ctx.elapsed_s, "rng": rng}
        info = {self.step_key: step, "time": time.time(), "world_size": ctx.world_size}
        with phase("checkpoint"), checkpoint_dir(self.root, step, info, is_main=ctx.is_main) as partial:
            for i, (name, engine) in enumerate(self.engines.items()):
                d = self._dir(partial, name)
                engine.save_checkpoint(str(d.parent), tag=d.name, client_state=state if i == 0 else {},
                                       save_latest=False)
            if ctx.world_size > 1:
                # Each rank's own generators (a rank's dropout and sampling draw from its own
                # stream). Written after DeepSpeed's files, whose first barrier follows the
                # main rank's cleaning of the partial directory; the barrier after them puts
                # every rank's file on storage before the main rank marks the checkpoint.
                (partial / RNG_DIR).mkdir(parents=True, exist_ok=True)
                torch.save(rng, partial / RNG_DIR / f"rank-{ctx.rank}.pt")
                barrier()
            if ctx.is_main:
                ctx.cfg.save(partial / CONFIG_FILE)
        if ctx.is_main:
            prune_checkpoints(self.root, self.keep)
