"""Step 3 with ``algorithm: kto``: Kahneman-Tversky optimisation (Ethayarajh et al. 2024,
arXiv:2402.01306) of the SFT actor on unpaired answers, each desirable or undesirable: the
third phase's chosen answers (desirable) and rejected ones (undesirable), and the answers
people judged *Both bad* in the labelling DAG, which no pair can hold (rlhf_tasks/data/unpaired.py).

DPO's shape (rlhf_tasks/algorithms/dpo.py), without rollouts or critic:

1. load the SFT actor (LoRA adapters on it when ``kto.lora_dim``); with ``kto.answers:
   generated`` the training answers are instead its own, to the third phase's prompts, the
   reward model's best of ``kto.candidates`` desirable and its worst undesirable, made once
   before training as DPO's generated pairs are (the people's labelled answers stay; under
   ZeRO-3 they are made by a frozen inference engine of the SFT model, dpo.pair_policy);
2. the reference pass: once the engine exists and before any update (or resumed
   checkpoint), the engine's model's log-probs of every answer, and of every mismatched pair
   (a row's prompt with another row's answer), train and held-out, computed once and stored
   as dataset columns (DPO's pass, one answer per row): only the policy is on the device;
3. train with the shared supervised loop (rlhf_tasks/runtime/loop.py) on the loss of
   rlhf_tasks/algorithms/maths/preference.py. Its reference point z0 is the policy's mean
   log-ratio to the reference on mismatched pairs, clamped at 0 and detached, estimated once
   per optimizer step before its first backward, over the step's pairs on every rank
   (:class:`ReferencePoint`): the mismatched pairs are drawn per step from the training rows'
   (a seeded walk), not from the micro-batch, so that z0 is the same for every micro-batch of
   a step, whatever the gradient accumulation and the number of ranks.

Several ranks, any ZeRO stage: every forward pass outside training is one every rank runs
as often (under ZeRO-3 each is a collective). The reference pass and the held-out
evaluation give every rank as many batches (loop.shard_batches: a rank one short scores a
padding batch and drops it); z0 costs every rank the same ``gradient_accumulation_steps``
forward passes of ``per_device_train_batch_size`` pairs per optimizer step (the walk hands
each rank as many pairs, cycling when it runs out).

Metrics: ``kto/loss``, ``kto/desirable_reward``, ``kto/undesirable_reward``, ``kto/kl`` (z0's
estimate) on the training batches; on the held-out answers before, during and after training
``kto/reward_accuracy`` (how often the implicit reward ranks a desirable answer above an
undesirable one: the ROC AUC, 0.5 at the start), ``kto/eval_margin``, ``kto/eval_kl``,
``kto/eval_loss``; ``memory/policy_bytes``, the only model on the device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import datasets
import numpy as np
import torch

from ..config.algorithms import KTOConfig
from ..data import KTOCollator
from ..data.formats import HUMAN
from ..data.phases import kto_rows
from ..data.unpaired import from_token_pairs, mismatched
from ..runtime import loop
from ..runtime.models import load_tokenizer, unwrap_for_saving
from ..runtime.ranks import sum_across_ranks
from ..runtime.stage import StageContext, stage, stage_seed
from ..runtime.watchdog import beat, phase
from .dpo import load_policy, pair_log_probs, pair_policy, reference_log_probs
from .dpo_pairs import generated_pairs
from .maths.preference import kto_loss, mean_log_ratio, reward_auc
from .rl.models import memory_report, reads_reward_model, require_outputs

log = logging.getLogger("rlhf_tasks")


def answer_table(model, ds, collate, batch_size: int, device, rank: int = 0, world: int = 1) -> torch.Tensor:
    """(N,) float64 log-prob of every row's answer under ``model``, summed over its tokens,
    every rank holding the whole table: DPO's table with one answer per row (as many
    forward passes on every rank)."""
    return reference_log_probs(model, ds, collate, batch_size, device, False, rank, world, per_row=1)[:, 0]


def mismatched_rows(ds, seed: int, max_seq_len: int, eos_id: int) -> datasets.Dataset:
    """The mismatched pairs of ``ds``'s rows, one per row (rlhf_tasks/data/unpaired.py)."""
    ids, prompt_lens = mismatched(ds["input_ids"], ds["prompt_len"], seed, max_seq_len, eos_id)
    return datasets.Dataset.from_dict({"input_ids": ids, "prompt_len": prompt_lens, "length": [len(x) for x in ids]})


class ReferencePoint:
    """KTO's KL estimate for each optimizer step: the policy's mean log-ratio to the reference
    on ``per_step`` mismatched pairs per rank, drawn from a seeded walk over ``kl_ds`` (step s,
    rank r: the walk's rows from (s x world + r) x per_step on, cycling), computed without
    gradients at the step's first micro-batch and averaged over every rank (one collective).
    Every rank scores ``per_step`` pairs in batches of ``micro``: as many forward passes,
    whatever the rank and the step."""

    def __init__(self, ctx: StageContext, kl_ds, collate, per_step: int, micro: int):
        self.ctx, self.ds, self.collate, self.per_step, self.micro = ctx, kl_ds, collate, per_step, micro
        self.walk = np.random.default_rng(stage_seed(ctx.name, ctx.cfg) + 1).permutation(len(kl_ds)).tolist()
        self.step, self.kl = -1, torch.zeros((), device=ctx.device)

    def __call__(self, engine) -> torch.Tensor:
        if engine.global_steps != self.step:  # the step's first micro-batch (also after a resume)
            self.step = engine.global_steps
            self.kl = self.estimate(engine.module, self.step)
        return self.kl

    @torch.no_grad()
    def estimate(self, model, step: int) -> torch.Tensor:
        n, start = len(self.walk), (step * self.ctx.world_size + self.ctx.rank) * self.per_step
        rows = [self.walk[(start + k) % n] for k in range(self.per_step)]
        policy, ref = [], []
        with phase("reference point z0"):
            for i in range(0, len(rows), self.micro):
                batch = self.collate([self.ds[j] for j in rows[i:i + self.micro]])
                batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
                policy.append(pair_log_probs(model, batch, average=False))
                ref.append(batch["ref_log_probs"])
                beat()
            return mean_log_ratio(torch.cat(policy), torch.cat(ref), sum_across_ranks).to(self.ctx.device)


@torch.no_grad()
def evaluate(model, eval_ds, eval_kl_ds, collate, k: KTOConfig, ctx: StageContext) -> dict[str, float]:
    """Held-out answers: how often the implicit reward ranks a desirable answer above an
    undesirable one, the mean rewards of each kind and their margin, the KL estimate on the
    held-out mismatched pairs, the mean loss at that reference point."""
    policy, policy_kl = (answer_table(model, ds, collate, k.per_device_eval_batch_size, ctx.device, ctx.rank,
                                      ctx.world_size) for ds in (eval_ds, eval_kl_ds))
    ref, ref_kl = (torch.tensor(ds["ref_logps"], dtype=torch.float64) for ds in (eval_ds, eval_kl_ds))
    desirable = torch.tensor(eval_ds["desirable"]).bool()
    kl = mean_log_ratio(policy_kl, ref_kl)  # every rank holds the whole tables
    loss, m = kto_loss(policy, ref, desirable, kl, k.beta, k.desirable_weight, k.undesirable_weight)
    r = m["rewards"]
    good, bad = (r[rows].mean() if rows.any() else r.new_zeros(()) for rows in (desirable, ~desirable))
    return {"reward_accuracy": float(reward_auc(r, desirable)), "eval_desirable_reward": float(good),
            "eval_undesirable_reward": float(bad), "eval_margin": float(good - bad), "eval_kl": float(kl),
            "eval_loss": float(loss)}


class TrainRewards:
    """Implicit rewards of the training batches by kind, and the KL estimate, summed on the
    device and logged at the optimizer steps the loop logs at: one host sync per log line."""

    def __init__(self, ctx: StageContext, every: int):
        self.ctx, self.every = ctx, every
        # desirable rewards, their count, undesirable rewards, their count, KL estimates, micro-batches
        self.sums = torch.zeros(6, device=ctx.device, dtype=torch.float64)
        self.history: dict[str, list[tuple[int, float]]] = {}

    def add(self, engine, rewards: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor) -> None:
        d, r = desirable.double(), rewards.double()
        self.sums += torch.stack([(r * d).sum(), d.sum(), (r * (1 - d)).sum(), (1 - d).sum(), kl.double(),
                                  torch.ones((), device=r.device, dtype=torch.float64)])
        if engine.is_gradient_accumulation_boundary() and (engine.global_steps + 1) % self.every == 0:
            self.flush(engine.global_steps + 1)

    def flush(self, step: int) -> None:
        # every rank's answers (every rank flushes at this step); z0 is already every rank's
        good, n_good, bad, n_bad, kl, micro = sum_across_ranks(self.sums).tolist()
        if micro == 0:
            return
        m = {"desirable_reward": good / max(n_good, 1), "undesirable_reward": bad / max(n_bad, 1), "kl": kl / micro}
        for key, value in m.items():
            self.history.setdefault(key, []).append((step, value))
        self.ctx.log_metrics(m, step)
        self.sums.zero_()


def kl_pool(rows: int, k: KTOConfig, world: int) -> int:
    """How many mismatched pairs training can draw: one per training row, at most what the
    stage's optimizer steps take (per step and rank ``micro x accumulation``; the supervised
    loop's step count), so that a short run makes no reference pass over pairs it never uses."""
    micro_per_epoch = -(-rows // (k.per_device_train_batch_size * world))
    steps = k.epochs * max(micro_per_epoch // k.gradient_accumulation_steps, 1)
    steps = min(steps, k.max_steps) if k.max_steps else steps
    return min(rows, steps * k.per_device_train_batch_size * k.gradient_accumulation_steps * world)


def mismatched_sets(ctx: StageContext, tok, train_ds, eval_ds) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The mismatched pairs of the training answers (a seeded sample of :func:`kl_pool`
    rows) and of the held-out ones (one per row): the same on every rank (seeded)."""
    cfg, seed = ctx.cfg, stage_seed(ctx.name, ctx.cfg)
    pool = np.random.default_rng(seed).permutation(len(train_ds))[:kl_pool(len(train_ds), cfg.kto, ctx.world_size)]
    train_kl, eval_kl = (mismatched_rows(source, seed, cfg.data.max_seq_len, tok.eos_token_id)
                         for source in (train_ds.select(np.sort(pool)), eval_ds))
    return train_kl, eval_kl


def with_references(ctx: StageContext, model, collate, sets) -> list[datasets.Dataset]:
    """Each of ``sets`` (answers or mismatched pairs) with its reference log-probs under
    ``model`` (the engine's, before any step: the SFT policy) as the column ``ref_logps``,
    which :class:`KTOCollator` batches."""
    size = ctx.cfg.kto.per_device_eval_batch_size
    return [ds.add_column("ref_logps", answer_table(model, ds, collate, size, ctx.device, ctx.rank,
                                                    ctx.world_size).tolist()) for ds in sets]


def people_and_generated(ctx: StageContext, model, tok, train_ds) -> tuple[datasets.Dataset, dict[str, float]]:
    """``kto.answers: generated``: the SFT actor's answers ranked by the reward model, each
    prompt's best desirable and its worst undesirable (rlhf_tasks/algorithms/dpo_pairs.py,
    made once), plus the training answers people labelled (``human`` specs: their pairs and
    the answers they judged both bad), which no generated answer replaces."""
    pairs, generated = generated_pairs(ctx, model, tok)
    human = train_ds.filter(lambda s: s == HUMAN or s.startswith(f"{HUMAN}:"), input_columns="source")
    answers = datasets.concatenate_datasets([from_token_pairs(pairs), human.remove_columns("source")])
    return answers, {**generated, "human_answers": len(human)}


@stage("kto")
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    cfg, k = ctx.cfg, ctx.cfg.kto
    require_outputs(ctx, "sft", *(("rm",) if reads_reward_model(ctx) else ()))  # before data or models load
    tok = load_tokenizer(str(ctx.run.final("sft")), cfg.model.trust_remote_code)
    train_ds, eval_ds = loop.train_eval_data(ctx, kto_rows, tok, "answers", "KTO (third)")  # bad data fails early
    model = load_policy(ctx)
    generated: dict[str, float] = {}
    if k.answers == "generated":  # held-out answers stay the labelled ones: reward_accuracy is the people's
        with phase("answer generation"):
            policy = pair_policy(ctx, model)  # under ZeRO-3 a frozen inference engine of the SFT model
            train_ds, generated = people_and_generated(ctx, policy.module, tok, train_ds)
            del policy
        ctx.log_metrics(generated, 0)
    collate = KTOCollator(tok.pad_token_id)
    train_kl, eval_kl = mismatched_sets(ctx, tok, train_ds, eval_ds)
    desirable = sum(train_ds["desirable"])
    flops = loop.flops_per_token(model, int(sum(train_ds["length"]) / len(train_ds)))
    point: ReferencePoint | None = None
    reference_s = 0.0

    def reference_pass(engine):
        """The reference log-probs, on the engine's model before any step (before a resumed
        checkpoint loads): the weights training starts from, gathered under ZeRO-3."""
        nonlocal eval_ds, eval_kl, point, reference_s
        t0 = time.perf_counter()
        with phase("reference pass"):
            train, scored_kl, eval_ds, eval_kl = with_references(ctx, engine.module, collate,
                                                                 (train_ds, train_kl, eval_ds, eval_kl))
        reference_s = time.perf_counter() - t0
        point = ReferencePoint(ctx, scored_kl, collate, k.per_device_train_batch_size * k.gradient_accumulation_steps,
                               k.per_device_train_batch_size)
        log.info("kto: %d answers (%d desirable, %d undesirable) + %d held-out, their mismatched pairs' and their "
                 "reference log-probs in %.1f s", len(train), desirable, len(train) - desirable, len(eval_ds),
                 reference_s)
        return train

    rewards = TrainRewards(ctx, k.log_every_steps)

    def loss_fn(engine, batch):
        kl = point(engine)  # before the step's first backward: the same z0 for all its micro-batches
        policy = pair_log_probs(engine, batch, average=False)  # (B,) nats
        loss, m = kto_loss(policy, batch["ref_log_probs"], batch["desirable"], kl, k.beta, k.desirable_weight,
                           k.undesirable_weight)
        rewards.add(engine, m["rewards"], batch["desirable"], kl)
        return loss, batch["attention_mask"].sum()

    def eval_fn(engine):
        return evaluate(engine.module, eval_ds, eval_kl, collate, k, ctx)

    out = loop.train(ctx, k, model, train_ds, collate, loss_fn, eval_fn, flops, with_engine=reference_pass)
    rewards.flush(out.global_step)
    memory = memory_report(policy=out.engine.module)  # the reference is a table of numbers, not a model
    ctx.log_metrics(memory, 0)
    before = {f"{key}_before": out.history[key][0][1] for key in ("reward_accuracy", "eval_margin", "eval_kl")}
    metrics = {**out.metrics, **before, "train_answers": len(train_ds), "train_desirable": desirable,
               "eval_answers": len(eval_ds), "global_step": out.global_step, "reference_s": reference_s,
               **generated, **out.throughput, **memory}
    log.info("kto: held-out reward accuracy %.3f -> %.3f, margin %.3f -> %.3f, KL %.3f",
             metrics["reward_accuracy_before"], metrics["reward_accuracy"], metrics["eval_margin_before"],
             metrics["eval_margin"], metrics["eval_kl"])
    final = loop.save_final(ctx, unwrap_for_saving(out.engine.module), tok, metrics)
    ctx.log_history({**out.history, **rewards.history})
    return final, metrics
