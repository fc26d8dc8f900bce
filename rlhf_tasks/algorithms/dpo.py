"""Step 3 with ``algorithm: dpo``: direct preference optimisation of the SFT actor on the
third phase's preference pairs, without rollouts or critic (and, on the dataset's pairs, without the reward model).

1. load the SFT actor (LoRA adapters on it when ``dpo.lora_dim``); with ``dpo.pairs:
   generated`` the training pairs are instead its own answers to the third phase's prompts,
   ranked by the reward model, made once before training (rlhf_tasks/dpo_generated.py);
2. the reference pass: once the engine exists and before any update (or resumed
   checkpoint), the engine's model's log-probs of every chosen and rejected answer, train
   and held-out, are computed once and stored as dataset columns. The policy at that
   moment *is* the reference (fresh LoRA adapters add exactly 0), so no second model is
   ever loaded and only the policy sits on the device while it trains; under ZeRO-3 the
   engine gathers its shards for the pass as for training;
3. train with the shared supervised loop (rlhf_tasks/loop.py: resume mid-stage,
   checkpoints, curves) on the loss of rlhf_tasks/algorithms/maths/preference.py.

Metrics: ``dpo/loss``, ``dpo/chosen_reward``, ``dpo/rejected_reward``, ``dpo/margin`` on
the training batches; on the held-out pairs before, during and after training
``dpo/reward_accuracy`` (the implicit reward ranks chosen above rejected), ``dpo/eval_margin``,
``dpo/eval_loss``; ``memory/policy_bytes``, the bytes of the only model on the device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from ..config.algorithms import DPOConfig
from ..data import DPOCollator
from ..data.phases import dpo_pairs
from ..runtime import loop
from ..runtime.engine import inference_config, inference_engine, partitioned_loading, torch_dtype
from ..runtime.models import load_causal_lm, load_tokenizer, load_trainable, unwrap_for_saving
from ..runtime.params import eval_mode, is_partitioned
from ..runtime.stage import StageContext, stage
from ..runtime.watchdog import beat, phase
from .dpo_pairs import generated_pairs
from .lm_head import token_log_probs
from .maths.preference import answer_log_probs, chosen_nll, dpo_loss, reward_accuracy
from .rl.models import memory_report, reads_reward_model, require_outputs

log = logging.getLogger("rlhf_tasks")


def pair_log_probs(model, batch: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """(2B,) log-prob of each answer (chosen rows, then rejected) under ``model``, summed
    over its tokens (averaged with ``average``), in nats, float32."""
    ids, answer = batch["input_ids"], batch["answer_mask"][:, 1:]  # token t is predicted at t-1
    tokens = token_log_probs(model, ids, batch["attention_mask"], ids[:, 1:], where=answer)  # (2B, T-1)
    return answer_log_probs(tokens, answer, average)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def reference_log_probs(model, ds, collate, batch_size: int, device, average: bool, rank: int = 0,
                        world: int = 1, per_row: int = 2) -> torch.Tensor:
    """(N, per_row) float64 log-probs of every row's answers under ``model``: a DPO pair's
    (chosen, rejected), a KTO row's one answer (``per_row=1``, its reference pass and its
    held-out evaluation). Each rank scores every world-th batch (length order, least
    padding; as many forward passes on every rank, loop.shard_batches), then one sum across
    ranks gives every rank the whole table."""
    lengths = ds["length"] if len(ds) else []  # one column read: ds[i] would decode every row's lists
    shard = loop.shard_batches(lengths, batch_size, rank, world)
    table = torch.zeros(len(ds), per_row, dtype=torch.float64, device=device)
    loader = DataLoader(ds, batch_sampler=[b for b, _ in shard], collate_fn=collate)
    with eval_mode(model):
        for (idx, real), batch in zip(shard, loader, strict=True):
            batch = {k: v.to(device) for k, v in batch.items()}
            scored = pair_log_probs(model, batch, average).double().view(per_row, -1).T  # (B, per_row)
            beat()
            if real:
                table[idx] = scored
    return _all_reduce(table).cpu()


def with_reference(ds, table: torch.Tensor):
    """``ds`` with the reference pass's columns, which :class:`DPOCollator` batches."""
    return ds.add_column("ref_chosen_logps", table[:, 0].tolist()).add_column("ref_rejected_logps",
                                                                              table[:, 1].tolist())


@torch.no_grad()
def evaluate(model, eval_ds, collate, d: DPOConfig, device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Held-out pairs: reward accuracy, mean implicit rewards and margin, mean loss."""
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # pairs, wins, chosen, rejected, loss x pairs
    with eval_mode(model):
        for batch, real in loop.eval_batches(eval_ds, d.per_device_eval_batch_size, collate, rank, world):
            batch = {k: v.to(device) for k, v in batch.items()}
            pc, pr = pair_log_probs(model, batch, d.loss_type == "ipo").chunk(2)
            if not real:  # a rank's padding pass (every rank runs as many forward passes)
                continue
            rc, rr = batch["ref_log_probs"].chunk(2)
            loss, c, r = dpo_loss(pc, pr, rc, rr, d.beta, d.loss_type, d.label_smoothing)
            n = len(c)
            sums += torch.stack([torch.tensor(float(n), device=device), reward_accuracy(c, r) * n, c.sum(), r.sum(),
                                 loss * n]).double()
    n, wins, c_sum, r_sum, loss_sum = _all_reduce(sums).tolist()
    n = max(n, 1.0)
    return {"reward_accuracy": wins / n, "eval_chosen_reward": c_sum / n, "eval_rejected_reward": r_sum / n,
            "eval_margin": (c_sum - r_sum) / n, "eval_loss": loss_sum / n}


class TrainRewards:
    """Implicit rewards of the training batches, summed on the device and logged at the
    optimizer steps the loop logs at (``log_every_steps``), so one host sync per log line.
    The engine counts the optimizer steps, restored on resume."""

    def __init__(self, ctx: StageContext, every: int):
        self.ctx, self.every = ctx, every
        self.sums = torch.zeros(3, device=ctx.device)  # chosen, rejected, pairs
        self.history: dict[str, list[tuple[int, float]]] = {}

    def add(self, engine, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.sums += torch.stack([chosen.sum(), rejected.sum(), torch.tensor(float(len(chosen)), device=chosen.device)])
        if engine.is_gradient_accumulation_boundary() and (engine.global_steps + 1) % self.every == 0:
            self.flush(engine.global_steps + 1)

    def flush(self, step: int) -> None:
        c, r, n = _all_reduce(self.sums.clone()).tolist()  # every rank's pairs (every rank flushes at this step)
        if n == 0:
            return
        m = {"chosen_reward": c / n, "rejected_reward": r / n, "margin": (c - r) / n}
        for k, v in m.items():
            self.history.setdefault(k, []).append((step, v))
        self.ctx.log_metrics(m, step)
        self.sums.zero_()


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The engine's cast, done early so the reference pass sees the weights training
    starts from: DeepSpeed's bf16/fp16 casts the parameters (not the buffers), and its
    fp32 master weights are made from the cast ones."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def load_policy(ctx: StageContext) -> torch.nn.Module:
    """The SFT actor, trainable as the running offline stage's section (dpo, kto) says."""
    cfg, d = ctx.cfg, getattr(ctx.cfg, ctx.name)
    # LoRA adapters start at exactly 0 (peft's B = 0): the model is still the SFT one.
    model = load_trainable(str(ctx.run.final("sft")), d, d.dtype, ctx.world_size,
                           trust_remote_code=cfg.model.trust_remote_code,
                           attn_implementation=cfg.model.attn_implementation)
    if is_partitioned(model):  # ZeRO-3: loaded as shards, cast by zero.Init, placed by the engine
        return model
    _cast_parameters(model, torch_dtype(d.dtype))
    return model.to(ctx.device)


def pair_policy(ctx: StageContext, model: torch.nn.Module):
    """The policy that answers for ``dpo.pairs=generated`` (``kto.answers=generated``: the
    running stage's section): the loaded one, or under ZeRO-3 (whose shards run only inside
    an engine, which cannot exist before the pairs, since its LR schedule counts them) the
    SFT model as a frozen ZeRO-3 inference engine, dropped before training. Answer with
    ``.module`` of what it returns."""
    if not is_partitioned(model):
        return SimpleNamespace(module=model)
    d = getattr(ctx.cfg, ctx.name)
    with partitioned_loading(inference_config(d.dtype, d.offload, ctx.world_size)):
        sft = load_causal_lm(str(ctx.run.final("sft")), dtype=torch_dtype(d.dtype),
                             trust_remote_code=ctx.cfg.model.trust_remote_code,
                             attn_implementation=ctx.cfg.model.attn_implementation)
    sft.requires_grad_(False)
    return inference_engine(sft, d.dtype, d.offload, ctx.world_size)


@stage("dpo")
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    cfg, d = ctx.cfg, ctx.cfg.dpo
    require_outputs(ctx, "sft", *(("rm",) if reads_reward_model(ctx) else ()))  # before any data or model loads
    tok = load_tokenizer(str(ctx.run.final("sft")), cfg.model.trust_remote_code)
    train_ds, eval_ds = loop.train_eval_data(ctx, dpo_pairs, tok, "pairs", "DPO (third)")
    model = load_policy(ctx)
    generated: dict[str, float] = {}
    if d.pairs == "generated":  # held-out pairs stay the labelled ones: reward_accuracy is the people's
        with phase("pair generation"):
            policy = pair_policy(ctx, model)
            train_ds, generated = generated_pairs(ctx, policy.module, tok)
            del policy
        ctx.log_metrics(generated, 0)
    flops = loop.flops_per_token(model, int(sum(train_ds["length"]) / len(train_ds)))
    collate, average = DPOCollator(tok.pad_token_id), d.loss_type == "ipo"
    reference_s = 0.0

    def reference_pass(engine):
        """The reference log-probs, on the engine's model before any step (before a resumed
        checkpoint loads): the weights training starts from, gathered under ZeRO-3."""
        nonlocal eval_ds, reference_s
        t0 = time.perf_counter()
        with phase("reference pass"):
            train, held_out = (with_reference(ds, reference_log_probs(engine.module, ds, collate,
                                                                      d.per_device_eval_batch_size, ctx.device,
                                                                      average, ctx.rank, ctx.world_size))
                               for ds in (train_ds, eval_ds))
        eval_ds, reference_s = held_out, time.perf_counter() - t0
        log.info("dpo: reference log-probs of %d + %d pairs in %.1f s", len(train), len(eval_ds), reference_s)
        return train

    rewards = TrainRewards(ctx, d.log_every_steps)

    def loss_fn(engine, batch):
        pc, pr = pair_log_probs(engine, batch, average).chunk(2)
        rc, rr = batch["ref_log_probs"].chunk(2)
        loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, d.beta, d.loss_type, d.label_smoothing)
        if d.sft_coef:
            n_chosen = batch["answer_mask"][:, 1:].chunk(2)[0].sum(-1)  # (B,) chosen answer tokens
            loss = loss + d.sft_coef * chosen_nll(pc * n_chosen if average else pc, n_chosen)
        rewards.add(engine, chosen, rejected)
        return loss, batch["attention_mask"].sum()

    def eval_fn(engine):
        return evaluate(engine.module, eval_ds, collate, d, ctx.device, ctx.rank, ctx.world_size)

    out = loop.train(ctx, d, model, train_ds, collate, loss_fn, eval_fn, flops, with_engine=reference_pass)
    rewards.flush(out.global_step)
    memory = memory_report(policy=out.engine.module)  # the reference is a table of numbers, not a model
    ctx.log_metrics(memory, 0)
    metrics = {**out.metrics, **{f"{k}_before": out.history[k][0][1] for k in ("reward_accuracy", "eval_margin")},
               "train_pairs": len(train_ds), "eval_pairs": len(eval_ds), "global_step": out.global_step,
               "reference_s": reference_s, **generated, **out.throughput, **_pair_speed(out.throughput, d, ctx.world_size),
               **memory}
    log.info("dpo: held-out reward accuracy %.3f -> %.3f, margin %.3f -> %.3f", metrics["reward_accuracy_before"],
             metrics["reward_accuracy"], metrics["eval_margin_before"], metrics["eval_margin"])
    final = loop.save_final(ctx, unwrap_for_saving(out.engine.module), tok, metrics)
    ctx.log_history({**out.history, **rewards.history})
    return final, metrics


def _pair_speed(throughput: dict[str, float], d: DPOConfig, world_size: int) -> dict[str, float]:
    """Steady-state training seconds per pair (the loop's timed steps; the one-time
    reference pass is ``reference_s``)."""
    steps, seconds = throughput.get("train_timed_steps", 0), throughput.get("train_timed_s", 0.0)
    if not steps:
        return {}
    pairs = steps * d.per_device_train_batch_size * d.gradient_accumulation_steps * world_size
    return {"train_s_per_pair": seconds / pairs, "train_pairs_per_s": pairs / seconds}
