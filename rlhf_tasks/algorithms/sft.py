"""Step 1: supervised fine-tuning of the actor on prompt + chosen answer.

Metric: held-out perplexity (exp of the token-mean negative log-likelihood over the
answer tokens), before training, after each epoch and at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import SFTCollator
from ..data.phases import sft_rows
from ..runtime import loop
from ..runtime.models import load_tokenizer, load_trainable, unwrap_for_saving
from ..runtime.params import eval_mode
from ..runtime.stage import StageContext, stage
from .lm_head import lm_loss, token_log_probs

log = logging.getLogger("rlhf_tasks")


@torch.no_grad()
def evaluate(model, eval_ds, collate, batch_size: int, device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Token-weighted mean NLL and perplexity on the held-out share."""
    nll_sum, n_tok = 0.0, 0.0
    with eval_mode(model):
        nll_t = torch.zeros((), device=device, dtype=torch.float64)
        tok_t = torch.zeros((), device=device, dtype=torch.float64)
        for batch, real in loop.eval_batches(eval_ds, batch_size, collate, rank, world):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted at t-1
            logp = token_log_probs(model, batch["input_ids"], batch["attention_mask"], labels, where=labels != -100)
            if not real:  # a rank's padding pass (every rank runs as many forward passes)
                continue
            nll_t -= logp.sum()
            tok_t += (labels != -100).sum()
        nll_sum, n_tok = loop.all_reduce_sum([nll_t.item(), tok_t.item()], device)
    mean = nll_sum / max(n_tok, 1.0)
    return {"eval_loss": mean, "perplexity": loop.perplexity(mean)}


@stage("sft")
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    """Train the actor: its ``final/`` directory and metrics."""
    cfg = ctx.cfg
    t = cfg.sft
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.actor, cfg.model.trust_remote_code)
    train_ds, eval_ds = loop.train_eval_data(ctx, sft_rows, tok, "rows", "SFT")

    model = load_trainable(cfg.model.actor, t, t.dtype, ctx.world_size, trust_remote_code=cfg.model.trust_remote_code,
                           attn_implementation=cfg.model.attn_implementation)
    flops = loop.flops_per_token(model, int(sum(train_ds["length"]) / len(train_ds)))
    collate = SFTCollator(tok.pad_token_id)

    def loss_fn(engine, batch):
        # transformers' labels= loss, through the LM head in chunks and only at the labelled
        # positions (algorithms/lm_head.py): never the whole (B, T, V) logits
        loss, _ = lm_loss(engine, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return loss, batch["attention_mask"].sum()  # real tokens processed: what the FLOPs are spent on

    def eval_fn(engine):
        return evaluate(engine.module, eval_ds, collate, t.per_device_eval_batch_size, ctx.device,
                        ctx.rank, ctx.world_size)

    out = loop.train(ctx, t, model, train_ds, collate, loss_fn, eval_fn, flops)
    first = out.history["perplexity"][0][1]
    metrics = {"perplexity": out.metrics["perplexity"], "eval_loss": out.metrics["eval_loss"],
               "perplexity_before": first, "train_rows": len(train_ds), "eval_rows": len(eval_ds),
               "global_step": out.global_step, **out.throughput}
    log.info("sft: perplexity %.3f -> %.3f", first, metrics["perplexity"])
    final = loop.save_final(ctx, unwrap_for_saving(out.engine.module), tok, metrics)
    ctx.log_history(out.history)
    return final, metrics
