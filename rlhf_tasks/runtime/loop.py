"""The supervised training loop shared by SFT and the reward model.

One loop, read top to bottom: length-grouped batches padded to their own longest row,
DeepSpeed forward/backward/step, host syncs only at logging intervals, evaluation,
resumable checkpoints (DeepSpeed state + where in the data we were), and the final
``save_pretrained`` directory written atomically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..config.train import SupervisedConfig
from ..data.collate import LengthGroupedBatchSampler
from ..storage import CONFIG_FILE, atomic_dir, write_json
from .checkpoint import Checkpointer
from .engine import Batching, initialize
from .iteration import Iterations, Speed
from .params import count_parameters, gathered_state_dict, is_partitioned
from .stage import StageContext, own_streams, stage_seed
from .watchdog import beat, phase

log = logging.getLogger("rlhf_tasks")

# loss_fn(engine, batch) -> (loss, n_tokens); eval_fn() -> metrics; save_fn(dir) writes the model.
LossFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoopOutput:
    engine: Any
    metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]]
    global_step: int
    throughput: dict[str, float] = field(default_factory=dict)  # see iteration.Speed.summary


def train(ctx: StageContext, t: SupervisedConfig, model: torch.nn.Module, train_ds, collate, loss_fn: LossFn,
          eval_fn: Callable[[Any], dict[str, float]], flops_per_token: float,
          with_engine: Callable[[Any], Any] | None = None) -> LoopOutput:
    """Train ``model`` on ``train_ds`` with DeepSpeed; resume from the newest complete
    checkpoint of this stage when there is one.

    ``with_engine(engine) -> train_ds``: runs once the engine exists, before the checkpoint
    is resumed (so on the weights training starts from), and returns the rows to train on
    (the same rows, e.g. with columns added: DPO's reference pass, which under ZeRO-3 needs
    the engine to gather the partitioned weights)."""
    sampler, micro_per_epoch, total_steps = schedule(ctx, t, model, train_ds)
    batching = Batching(t.per_device_train_batch_size, t.gradient_accumulation_steps, t.dtype, total_steps)
    beat()  # the model is loaded (under ZeRO-3: partitioned, a collective per parameter)
    engine = initialize(model, t, batching, ctx.device, ctx.world_size)
    own_streams(ctx)
    beat()
    if with_engine is not None:
        train_ds = with_engine(engine)

    ckpt = Checkpointer(ctx, {"": engine}, t.checkpoint_every_steps, t.keep_checkpoints)
    speed = Speed(ctx.device, flops_per_token, ctx.world_size)
    it = Iterations(ctx, train_ds, collate, sampler, total_steps, ckpt,
                    batches_per_step=t.gradient_accumulation_steps, speed=speed)

    def evaluate() -> dict[str, float]:
        with speed.paused(), phase("evaluation"):
            return eval_fn(engine)

    if not it.resume():
        before = evaluate()
        it.record(before, 0)
        log.info("%s: before training: %s", ctx.name, _fmt(before))

    loss_sum = torch.zeros((), device=ctx.device)  # summed on device: no host sync per step
    epoch_loss = torch.zeros((), device=ctx.device)
    n_micro, epoch_n = 0, 0
    last_eval: tuple[int, dict[str, float]] | None = None

    def epoch_end(epoch: int) -> None:
        nonlocal last_eval, epoch_n
        metrics = evaluate()
        it.record(metrics)
        last_eval = (it.step, metrics)
        train_loss = rank_mean(epoch_loss, epoch_n, ctx)
        log.info("%s: epoch %d/%d step %d train_loss %.4f %s", ctx.name, epoch + 1, t.epochs, it.step,
                 train_loss, _fmt(metrics))
        epoch_loss.zero_()
        epoch_n = 0

    for batch in it.batches(t.epochs, on_epoch_end=epoch_end):
        loss, n_tok = loss_fn(engine, batch)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        loss_sum += loss.detach().float()
        epoch_loss += loss.detach().float()
        n_micro, epoch_n = n_micro + 1, epoch_n + 1
        speed.count(n_tok)
        if not boundary:
            continue
        it.advance()
        if it.logging_due(t.log_every_steps):
            m = {"loss": rank_mean(loss_sum, n_micro, ctx), "lr": engine.get_lr()[0], **speed.window(),
                 "epoch": it.epoch + it.offset / micro_per_epoch}
            it.record(m, keys=("loss",))
            if ctx.is_main:
                log.info("%s: step %d/%d loss %.4f lr %.3g tokens/s %.0f", ctx.name, it.step, total_steps,
                         m["loss"], m["lr"], m["tokens_per_s"])
            loss_sum.zero_()
            n_micro = 0
        if t.eval_every_steps and it.step % t.eval_every_steps == 0:
            it.record(evaluate())
        it.checkpoint_if_due()
    throughput = speed.summary()
    if last_eval is not None and last_eval[0] == it.step:
        final = last_eval[1]
    else:
        final = evaluate()
        it.record(final)
    return LoopOutput(engine=engine, metrics=final, history=it.history, global_step=it.step, throughput=throughput)


def schedule(ctx: StageContext, t: SupervisedConfig, model: torch.nn.Module, train_ds):
    """This rank's walk over the training rows (length-grouped micro-batches, every rank
    as many), its micro-batches per epoch and the stage's optimizer steps."""
    sampler = LengthGroupedBatchSampler(train_ds["length"], t.per_device_train_batch_size,
                                        seed=stage_seed(ctx.name, ctx.cfg), rank=ctx.rank, world_size=ctx.world_size)
    micro_per_epoch = len(sampler)
    total_steps = t.epochs * max(micro_per_epoch // t.gradient_accumulation_steps, 1)
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    total, trainable = count_parameters(model)
    log.info("%s: %d rows, %d micro-batches/epoch, %d optimizer steps, %.2fM params (%.2fM trainable)",
             ctx.name, len(train_ds), micro_per_epoch, total_steps, total / 1e6, trainable / 1e6)
    return sampler, micro_per_epoch, total_steps


def rank_mean(total: torch.Tensor, count: int, ctx: StageContext) -> float:
    """The mean over every rank's micro-batches of a per-rank sum of ``count`` micro-batch
    values (each rank runs as many): the loss MLflow gets is the whole step's, not rank 0's
    share (one collective and sync, at logging intervals)."""
    summed, n = all_reduce_sum([float(total), float(count)], ctx.device)
    return summed / max(n, 1.0)


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
    with phase("saving final/"):
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
            ctx.cfg.save(tmp / CONFIG_FILE)
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


def shard_batches(lengths, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[list[int], bool]]:
    """This rank's held-out batches as (row indices, real): rows in length order (least
    padding), rank r taking batches r, r + world_size, ...; no shuffling, so numbers are
    comparable across evaluations.

    Every rank gets the same number of batches: a rank whose share is one short runs its
    last forward pass on a repeat of the first batch, marked not real (its result is
    discarded). Under ZeRO-3 every forward pass is a collective, and a rank that ran one
    fewer would leave the others waiting in it for ever."""
    order = sorted(range(len(lengths)), key=list(lengths).__getitem__)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = [(b, True) for b in batches[rank::world_size]]
    rounds = -(-len(batches) // world_size)
    return mine + [(batches[0], False)] * (rounds - len(mine)) if batches else []


def eval_batches(ds, batch_size: int, collate, rank: int = 0, world_size: int = 1) -> Iterator[tuple[dict, bool]]:
    """(batch, real) for this rank's :func:`shard_batches` of ``ds``: use a batch's result
    only when ``real``. Each batch is a beat of the stage's watchdog."""
    shard = shard_batches(ds["length"] if len(ds) else [], batch_size, rank, world_size)
    loader = DataLoader(ds, batch_sampler=[b for b, _ in shard], collate_fn=collate, num_workers=0)
    for (_, real), batch in zip(shard, loader, strict=True):
        beat()
        yield batch, real


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
    beat()
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
