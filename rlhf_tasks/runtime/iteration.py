"""The iteration every trainer shares: SFT, RM and DPO steps, PPO, GRPO and RLOO iterations.

:class:`Iterations` walks a dataset in length-grouped batches from wherever the stage
stands (a fresh start or the newest complete checkpoint), restores the random generators
once the data iterator exists, and after every step updates the progress bar, keeps the
history of the metrics and writes a checkpoint when one is due. :class:`Speed` is the
one way a trainer's speed is measured: wall-clock per step, split into named phases
(generation, scoring, training), tokens counted on the device, evaluation and
checkpoints left out.

A trainer reads top to bottom around it::

    it = Iterations(ctx, data, collate, sampler, total, ckpt)
    it.resume()
    for batch in it.batches(epochs):
        ...forward, backward, step...
        it.advance()
        it.record(metrics)                       # at logging intervals
        it.checkpoint_if_due(lambda: {...})      # the trainer's own resumable state
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import watchdog
from .checkpoint import Checkpointer
from .stage import StageContext
from .watchdog import beat, phase

log = logging.getLogger("rlhf_tasks")
History = dict[str, list[tuple[int, float]]]


def progress_bar(total: int, desc: str, initial: int, enabled: bool):
    from tqdm import tqdm

    # In a task log (not a terminal) print a line every 30 s rather than redrawing.
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, file=sys.stderr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Speed:
    """Steady-state speed of one stage process, measured one way for every trainer.

    The clock starts when the first step ends (warm-up: allocator, kernels, CUDA graph
    capture) and stops at :meth:`summary`; time inside :meth:`paused` (evaluation,
    checkpoints) is left out. Tokens are summed on the device (:meth:`count`), so a step
    costs no host sync; :meth:`phase` times a named part of a step (one sync at each end,
    for RL iterations whose phases are seconds long). :meth:`window` gives the rate since
    the previous window, for the log line at a logging interval.
    """

    def __init__(self, device: torch.device, flops_per_token: float = 0.0, world_size: int = 1):
        self.device, self.flops_per_token, self.world_size = device, flops_per_token, world_size
        self.tokens = torch.zeros((), device=device, dtype=torch.long)  # since the clock started
        self.window_tokens = torch.zeros((), device=device, dtype=torch.long)
        self.t0: float | None = None
        self.cpu0 = 0.0  # process CPU seconds when the clock started: on a shared machine, tokens per
        self.paused_cpu_s = 0.0  # CPU second is the rate that other processes do not move
        self.window_t = time.perf_counter()
        self.paused_s, self.steps = 0.0, 0
        self.phases: dict[str, float] = defaultdict(float)  # seconds per phase over the timed steps
        self.last: dict[str, float] = {}  # seconds per phase of the latest step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def count(self, n_tokens: torch.Tensor | int) -> None:
        self.window_tokens += n_tokens
        if self.t0 is not None:
            self.tokens += n_tokens

    @contextlib.contextmanager
    def phase(self, name: str):
        _sync(self.device)
        t = time.perf_counter()
        try:
            with watchdog.phase(name):  # what a hang in it is reported as
                yield
        finally:
            _sync(self.device)
            self.last[name] = time.perf_counter() - t

    def step_done(self) -> None:
        if self.t0 is None:
            _sync(self.device)
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        else:
            self.steps += 1
            for k, v in self.last.items():
                self.phases[k] += v
        self.last = {}

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints are not training time."""
        _sync(self.device)
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.paused_s += dt if self.t0 is not None else 0.0
            self.paused_cpu_s += time.process_time() - c if self.t0 is not None else 0.0
            self.window_t += dt

    def window(self) -> dict[str, float]:
        """tokens/s and TFLOPS since the previous window (one host sync)."""
        now = time.perf_counter()
        tok_s = self.window_tokens.item() * self.world_size / max(now - self.window_t, 1e-9)
        self.window_tokens.zero_()
        self.window_t = now
        return {"tokens_per_s": tok_s, "tflops": tok_s * self.flops_per_token / 1e12}

    def summary(self, prefix: str = "train_") -> dict[str, float]:
        """``<prefix>tokens_per_s``, ``<prefix>tflops``, the timed steps and seconds, mean
        seconds per step of each phase (``<phase>_s``) and the CUDA peak memory."""
        if self.t0 is None or self.steps == 0:
            return {}
        _sync(self.device)
        seconds = time.perf_counter() - self.t0 - self.paused_s
        tokens = self.tokens.item()
        tok_s = tokens * self.world_size / seconds
        cpu_s = time.process_time() - self.cpu0 - self.paused_cpu_s
        out = {f"{prefix}tokens_per_s": tok_s, f"{prefix}tflops": tok_s * self.flops_per_token / 1e12,
               f"{prefix}tokens_per_cpu_s": tokens / max(cpu_s, 1e-9),
               f"{prefix}timed_steps": self.steps, f"{prefix}timed_s": seconds,
               **{f"{k}_s": v / self.steps for k, v in self.phases.items()}}
        if self.device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return out


class Iterations:
    """Where a trainer stands in its data, and what it does after each step.

    ``sampler`` yields lists of row indices (one list = one batch; for the supervised
    loop a micro-batch, for RL a rollout batch); ``total`` steps end the stage, a step
    being ``batches_per_step`` batches (gradient accumulation). Resumable state:
    ``step``, ``epoch``, ``offset`` (batches of the epoch already consumed) and
    ``history``, saved in every checkpoint with whatever ``extra_state`` adds. A due
    checkpoint at the last step is written unless ``checkpoint_last`` is False (the stage
    saves ``final/`` right after).
    """

    def __init__(self, ctx: StageContext, data, collate, sampler, total: int, ckpt: Checkpointer, *,
                 batches_per_step: int = 1, speed: Speed | None = None, checkpoint_last: bool = True):
        self.ctx, self.data, self.collate, self.sampler, self.ckpt = ctx, data, collate, sampler, ckpt
        self.total, self.batches_per_step, self.checkpoint_last = total, batches_per_step, checkpoint_last
        self.per_epoch = len(sampler)
        self.step, self.epoch, self.offset = 0, 0, 0
        self.history: History = {}
        self.state: dict[str, Any] = {}  # the resumed checkpoint's own state (PPO: kl_coef, ema)
        self.speed = speed or Speed(ctx.device, world_size=ctx.world_size)
        self._bar = None

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any: True when resumed."""
        state = self.ckpt.resume()
        if state is None:
            return False
        self.step = state[self.ckpt.step_key]
        self.epoch = state.get("epoch", self.step * self.batches_per_step // max(self.per_epoch, 1))
        self.offset = state.get("micro_done", self.step * self.batches_per_step - self.epoch * self.per_epoch)
        self.history, self.state = state["history"], state
        log.info("%s: at epoch %d, %d batches into it", self.ctx.name, self.epoch, self.offset)
        return True

    def batches(self, epochs: int, on_epoch_end: Callable[[int], None] | None = None) -> Iterator[dict]:
        """Batches on the device from the current position until ``total`` steps or
        ``epochs`` epochs; ``on_epoch_end(epoch)`` after each epoch read to its end."""
        ctx = self.ctx
        self._bar = progress_bar(self.total, ctx.name, self.step, ctx.is_main)
        try:
            with phase("training"):
                yield from self._walk(epochs, on_epoch_end)
        finally:
            self._bar.close()

    def _walk(self, epochs: int, on_epoch_end: Callable[[int], None] | None) -> Iterator[dict]:
        ctx = self.ctx
        while not self.done and self.epoch < epochs:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)[self.offset:]
            loader = iter(DataLoader(self.data, batch_sampler=order, collate_fn=self.collate, num_workers=0,
                                     pin_memory=ctx.device.type == "cuda"))
            self.ckpt.restore_rng()  # now the generators are where the uninterrupted run had them
            for batch in loader:
                self.offset += 1
                beat()
                yield {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
                if self.done:
                    break
            if self.done and self.offset < self.per_epoch:
                break
            if on_epoch_end is not None:
                on_epoch_end(self.epoch)
            self.epoch, self.offset = self.epoch + 1, 0

    def record(self, metrics: dict[str, float], step: int | None = None, keys=None) -> None:
        """Log ``metrics`` to MLflow and keep ``keys`` of them (all by default) in the history."""
        step = self.step if step is None else step
        for k, v in metrics.items():
            if keys is None or k in keys:
                self.history.setdefault(k, []).append((step, float(v)))
        self.ctx.log_metrics(metrics, step)

    def keep(self, metrics: dict[str, float], keys) -> None:
        """Keep ``keys`` of ``metrics`` in the history at the current step (not logged)."""
        for k in keys:
            self.history.setdefault(k, []).append((self.step, float(metrics[k])))

    def advance(self, **postfix: float) -> None:
        """One optimizer step (or RL iteration) done: the step count, speed and progress bar."""
        self.step += 1
        self.speed.step_done()
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()})

    def checkpoint_if_due(self, extra_state: Callable[[], dict[str, Any]] | None = None) -> None:
        """After the step's logging and evaluation (so that the checkpoint's history has them)."""
        if self.ckpt.due(self.step) and (self.checkpoint_last or not self.done):
            with self.speed.paused():
                state = {"epoch": self.epoch, "micro_done": self.offset, "history": self.history,
                         "config": self.ctx.cfg.to_dict(), **(extra_state() if extra_state else {})}
                self.ckpt.save(self.step, state)

    def logging_due(self, every: int) -> bool:
        return self.step % every == 0 or self.done
