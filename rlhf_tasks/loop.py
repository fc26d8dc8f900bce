"""The supervised training loop shared by SFT and the reward model.

One loop, read top to bottom: length-grouped batches padded to their own longest row,
DeepSpeed forward/backward/step, host syncs only at logging intervals, evaluation,
resumable checkpoints (DeepSpeed state + where in the data we were), and the final
``save_pretrained`` directory written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .checkpoint import Checkpointer
from .config import SupervisedConfig
from .data.collate import LengthGroupedBatchSampler
from .engine import Batching, initialize
from .models import count_parameters, gathered_state_dict, is_partitioned
from .stage import StageContext
from .storage import atomic_dir, write_json

log = logging.getLogger("rlhf_tasks")

# loss_fn(engine, batch) -> (loss, n_tokens); eval_fn() -> metrics; save_fn(dir) writes the model.
LossFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoopOutput:
    engine: Any
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]]
    global_step: int
    throughput: dict[str, float] = field(default_factory=dict)  # see Throughput.summary


class Throughput:
    """Steady-state training speed of one run: real (non-padding) tokens per second from
    the end of the first optimizer step (warm-up: allocator, kernels) to the last, without
    the time spent evaluating or checkpointing. Two extra host syncs per run, none per step."""

    def __init__(self, device: torch.device, flops_per_token: float, world_size: int):
        self.device, self.flops_per_token, self.world_size = device, flops_per_token, world_size
        self.tokens = torch.zeros((), device=device, dtype=torch.long)  # counted on device
        self.t0: float | None = None
        self.paused_s, self.steps = 0.0, 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def micro_batch(self, attention_mask: torch.Tensor) -> None:
        if self.t0 is not None:
            self.tokens += attention_mask.sum()

    def step_done(self) -> None:
        """After an optimizer step: the first one starts the clock."""
        if self.t0 is None:
            self._sync()
            self.t0 = time.perf_counter()
        else:
            self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints are not training time."""
        if self.t0 is None:
            yield
            return
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def summary(self) -> dict[str, float]:
        if self.t0 is None or self.steps == 0:
            return {}
        self._sync()
        seconds = time.perf_counter() - self.t0 - self.paused_s
        tok_s = self.tokens.item() * self.world_size / seconds
        out = {"train_tokens_per_s": tok_s, "train_tflops": tok_s * self.flops_per_token / 1e12,
               "train_timed_steps": self.steps, "train_timed_s": seconds}
        if self.device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return out


def _progress(total: int, desc: str, initial: int, enabled: bool):
    from tqdm import tqdm

    # In a task log (not a terminal) print a line every 30 s rather than redrawing.
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, file=sys.stderr)


def train(ctx: StageContext, t: SupervisedConfig, model: torch.nn.Module, train_ds, collate, loss_fn: LossFn,
          eval_fn: Callable[[Any], dict[str, float]], flops_per_token: float) -> LoopOutput:
    """Train ``model`` on ``train_ds`` with DeepSpeed; resume from the newest complete
    checkpoint of this stage when there is one."""
    sampler = LengthGroupedBatchSampler(train_ds["length"], t.per_device_train_batch_size, seed=ctx.cfg.seed,
                                        rank=ctx.rank, world_size=ctx.world_size)
    micro_per_epoch = len(sampler)
    steps_per_epoch = max(micro_per_epoch // t.gradient_accumulation_steps, 1)
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    total, trainable = count_parameters(model)
    log.info("%s: %d rows, %d micro-batches/epoch, %d optimizer steps, %.2fM params (%.2fM trainable)",
             ctx.name, len(train_ds), micro_per_epoch, total_steps, total / 1e6, trainable / 1e6)
    batching = Batching(t.per_device_train_batch_size, t.gradient_accumulation_steps, t.dtype, total_steps)
    engine = initialize(model, t, batching, ctx.device, ctx.world_size)

    ckpt = Checkpointer(ctx, {"": engine}, t.checkpoint_every_steps, t.keep_checkpoints)
    history: dict[str, list[tuple[int, float]]] = {}
    global_step, epoch, micro_done = 0, 0, 0
    if (state := ckpt.resume()) is not None:
        global_step, epoch, micro_done, history = (state[k] for k in ("global_step", "epoch", "micro_done", "history"))
        log.info("%s: at epoch %d, %d micro-batches into it", ctx.name, epoch, micro_done)
    else:
        before = eval_fn(engine)
        _record(ctx, history, before, 0)
        log.info("%s: before training: %s", ctx.name, _fmt(before))

    bar = _progress(total_steps, ctx.name, global_step, ctx.is_main)
    loss_sum = torch.zeros((), device=ctx.device)  # summed on device: no host sync per step
    tokens = torch.zeros((), device=ctx.device, dtype=torch.long)
    n_micro, t_window = 0, time.perf_counter()
    speed = Throughput(ctx.device, flops_per_token, ctx.world_size)
    done = global_step >= total_steps
    last_eval: tuple[int, dict[str, float]] | None = None
    while not done and epoch < t.epochs:
        sampler.set_epoch(epoch)
        batches = list(sampler)[micro_done:]
        loader = iter(DataLoader(train_ds, batch_sampler=batches, collate_fn=collate, num_workers=0,
                                 pin_memory=ctx.device.type == "cuda"))
        ckpt.restore_rng()  # now the generators are where the uninterrupted run had them
        epoch_loss, epoch_n = torch.zeros((), device=ctx.device), 0
        for batch in loader:
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            loss, n_tok = loss_fn(engine, batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            micro_done += 1
            loss_sum += loss.detach().float()
            epoch_loss += loss.detach().float()
            epoch_n += 1
            tokens += n_tok
            n_micro += 1
            speed.micro_batch(batch["attention_mask"])
            if not boundary:
                continue
            global_step += 1
            speed.step_done()
            bar.update(1)
            if global_step % t.log_every_steps == 0 or global_step == total_steps:
                dt = time.perf_counter() - t_window
                tok_s = tokens.item() * ctx.world_size / dt
                m = {"loss": loss_sum.item() / n_micro, "lr": engine.get_lr()[0], "tokens_per_s": tok_s,
                     "tflops": tok_s * flops_per_token / 1e12, "epoch": epoch + micro_done / micro_per_epoch}
                history.setdefault("loss", []).append((global_step, m["loss"]))  # logged once, with m
                ctx.log_metrics(m, global_step)
                if ctx.is_main:
                    log.info("%s: step %d/%d loss %.4f lr %.3g tokens/s %.0f", ctx.name, global_step, total_steps,
                             m["loss"], m["lr"], tok_s)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                loss_sum.zero_(), tokens.zero_()
                n_micro, t_window = 0, time.perf_counter()
            if t.eval_every_steps and global_step % t.eval_every_steps == 0:
                with speed.paused():
                    _record(ctx, history, eval_fn(engine), global_step)
            if ckpt.due(global_step):
                with speed.paused():
                    ckpt.save(global_step, {"epoch": epoch, "micro_done": micro_done, "history": history,
                                            "config": ctx.cfg.to_dict()})
            if global_step >= total_steps:
                done = True
                break
        if not done or micro_done >= micro_per_epoch:
            with speed.paused():
                metrics = eval_fn(engine)
            _record(ctx, history, metrics, global_step)
            last_eval = (global_step, metrics)
            mean = epoch_loss.item() / max(epoch_n, 1)
            log.info("%s: epoch %d/%d step %d train_loss %.4f %s", ctx.name, epoch + 1, t.epochs, global_step,
                     mean, _fmt(metrics))
            epoch, micro_done = epoch + 1, 0
    bar.close()
    throughput = speed.summary()
    if last_eval is not None and last_eval[0] == global_step:
        final = last_eval[1]
    else:
        final = eval_fn(engine)
        _record(ctx, history, final, global_step)
    return LoopOutput(engine=engine, metrics=final, history=history, global_step=global_step, throughput=throughput)


def _record(ctx: StageContext, history: dict[str, list[tuple[int, float]]], metrics: dict[str, float], step: int) -> None:
    for k, v in metrics.items():
        history.setdefault(k, []).append((step, float(v)))
    ctx.log_metrics(metrics, step)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def save_final(ctx: StageContext, model: torch.nn.Module, tokenizer, metrics: dict[str, float],
               also: Callable[[Path], None] | None = None) -> Path:
    """Write ``final/`` atomically: ``model`` (the engine's model, LoRA merged) with
    ``save_pretrained`` (safetensors; a causal LM's generation config gets the pad token),
    whatever ``also(dir)`` adds, the tokenizer, config.yaml and metrics.json.

    Under ZeRO-3 each rank holds a shard: every rank takes part in gathering the weights,
    one parameter at a time, and rank 0 writes them. (DeepSpeed's ``save_16bit_model``
    gathers the engine's module – the LoRA-wrapped model, not the merged one – and writes
    a ``pytorch_model.bin`` that ``save_pretrained`` would not.)"""
    state_dict = gathered_state_dict(model, ctx.is_main) if is_partitioned(model) else None
    target = ctx.run.final(ctx.name)
    if ctx.is_main:
        with atomic_dir(target) as tmp:
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(tmp, state_dict=state_dict)
            if also is not None:
                also(tmp)
            tokenizer.save_pretrained(tmp)
            ctx.cfg.save(tmp / "config.yaml")
            write_json(tmp / "metrics.json", metrics)
    return target


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention (12 * L * H * T)."""
    n, _ = count_parameters(model)  # also under ZeRO-3, where num_parameters() counts 0
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    return 6 * n + 12 * layers * hidden * seq_len


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 50.0))


def eval_loader(ds, batch_size: int, collate, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Held-out rows in length order (least padding), each rank taking every
    world_size-th batch; no shuffling, so numbers are comparable across evaluations."""
    order = sorted(range(len(ds)), key=lambda i: ds[i]["length"]) if len(ds) < 50_000 else list(range(len(ds)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][rank::world_size]
    return DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=0)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum per-rank partial sums across the process group (one collective, one sync)."""
    import torch.distributed as dist

    t = torch.tensor(values, device=device, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def cap_eval(ds, max_rows: int, seed: int):
    """A fixed random subset of the held-out rows, so evaluation costs the same every time."""
    if max_rows and len(ds) > max_rows:
        return ds.shuffle(seed=seed).select(range(max_rows))
    return ds


def train_eval_data(ctx: StageContext, loader, tok, what: str, phase: str):
    """A phase's tokenised train and held-out shares, reports logged, held-out capped;
    an empty share is an error that names the phase."""
    cfg = ctx.cfg
    train_ds, reports = loader(cfg, tok, "train")
    eval_ds, eval_reports = loader(cfg, tok, "eval")
    log_data_reports(ctx, reports + eval_reports)
    eval_ds = cap_eval(eval_ds, cfg.data.max_eval_samples, cfg.seed)
    if len(train_ds) == 0 or len(eval_ds) == 0:
        raise ValueError(f"{ctx.name}: no {'training' if len(train_ds) == 0 else 'held-out'} {what} after the data "
                         f"split {cfg.data.data_split!r}: give the {phase} phase a share")
    return train_ds, eval_ds


def log_data_reports(ctx: StageContext, reports) -> None:
    for r in reports:
        log.info("%s: data %s", ctx.name, r)
    if ctx.is_main and reports:
        ctx.tracker.log_dict({"reports": [getattr(r, "as_dict", lambda r=r: str(r))() for r in reports]},
                             f"data/{ctx.name}_validation.json")
