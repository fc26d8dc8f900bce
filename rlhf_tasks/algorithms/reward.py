"""Step 2: the reward model, trained on (prompt, chosen, rejected) pairs with the
pairwise loss ``-log sigmoid(r_chosen - r_rejected)``.

Metrics on the held-out pairs: accuracy (share of pairs where the chosen answer scores
higher) and the mean chosen / rejected scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import PairCollator
from ..data.phases import rm_pairs
from ..runtime import loop
from ..runtime.models import load_tokenizer, load_trainable, read_score, unwrap_for_saving
from ..runtime.params import eval_mode, is_partitioned
from ..runtime.stage import StageContext, stage
from .maths.preference import pairwise_loss

log = logging.getLogger("rlhf_tasks")


@torch.no_grad()
def score_pairs(model, eval_ds, collate, batch_size: int, device, rank: int = 0, world: int = 1):
    """(chosen, rejected) scores of every held-out pair on this rank, as CPU tensors."""
    chosen, rejected = [], []
    with eval_mode(model):
        for batch, real in loop.eval_batches(eval_ds, batch_size, collate, rank, world):
            scores = model.score(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
            if not real:  # a rank's padding pass (every rank runs as many forward passes)
                continue
            c, r = scores.chunk(2)  # PairCollator stacks chosen rows, then rejected rows
            chosen.append(c.cpu())
            rejected.append(r.cpu())
    if not chosen:  # a rank whose whole share was padding
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def evaluate(model, eval_ds, collate, batch_size: int, device, rank: int = 0, world: int = 1) -> dict[str, float]:
    c, r = score_pairs(model, eval_ds, collate, batch_size, device, rank, world)
    # A tie counts half: an untrained head (all scores 0) is at chance, 0.5, not 0.
    wins = (c > r).float().sum() + 0.5 * (c == r).float().sum()
    n, correct, cs, rs = loop.all_reduce_sum([float(len(c)), float(wins), float(c.sum()), float(r.sum())], device)
    return {"accuracy": correct / n, "chosen_score": cs / n, "rejected_score": rs / n,
            "score_margin": (cs - rs) / n}


@stage("rm")
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    cfg = ctx.cfg
    t = cfg.rm
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.actor, cfg.model.trust_remote_code)
    train_ds, eval_ds = loop.train_eval_data(ctx, rm_pairs, tok, "pairs", "RM")

    model = load_trainable(cfg.model.rm, t, t.dtype, ctx.world_size, kind="reward",
                           trust_remote_code=cfg.model.trust_remote_code,
                           attn_implementation=cfg.model.attn_implementation)
    # Each pair is two sequences: FLOPs per pair-token count both.
    flops = loop.flops_per_token(model.backbone, int(sum(train_ds["length"]) / len(train_ds)))
    collate = PairCollator(tok.pad_token_id)

    def loss_fn(engine, batch):
        values = engine(batch["input_ids"], batch["attention_mask"])  # (2B, T)
        scores = read_score(values, batch["attention_mask"])
        chosen, rejected = scores.chunk(2)
        return pairwise_loss(chosen, rejected), batch["attention_mask"].sum()

    def eval_fn(engine):
        return evaluate(engine.module, eval_ds, collate, t.per_device_eval_batch_size, ctx.device,
                        ctx.rank, ctx.world_size)

    out = loop.train(ctx, t, model, train_ds, collate, loss_fn, eval_fn, flops)
    metrics = {**out.metrics, "accuracy_before": out.history["accuracy"][0][1], "train_pairs": len(train_ds),
               "eval_pairs": len(eval_ds), "global_step": out.global_step, **out.throughput}
    log.info("%s: accuracy %.3f -> %.3f (chosen %.3f, rejected %.3f)", ctx.name, metrics["accuracy_before"],
             metrics["accuracy"], metrics["chosen_score"], metrics["rejected_score"])
    model = unwrap_for_saving(out.engine.module)
    final = loop.save_final(ctx, model, tok, metrics)
    plot, partitioned = bool(ctx.is_main and ctx.tracker.run_id), is_partitioned(model)
    if partitioned:  # under ZeRO-3 every rank takes part in every forward pass
        plot = loop.all_reduce_sum([float(plot)], ctx.device)[0] > 0
    if plot and (ctx.is_main or partitioned):
        from ..tracking import plot_score_histogram

        c, r = score_pairs(model, eval_ds, collate, t.per_device_eval_batch_size, ctx.device)
        if ctx.is_main:
            ctx.tracker.log_figure(plot_score_histogram(c.tolist(), r.tolist()), "plots/rm_score_histogram.png")
    ctx.log_history(out.history)
    return final, metrics
