"""Step 3 for every RL algorithm of the table (ppo, grpo, rloo): one loop, read top to bottom.

Each iteration takes a batch of the third phase's prompts and

1. rollout + score  the actor answers, the answers are scored, advantages estimated by the
                    section's estimator (rollout.py: a typed :class:`Experience`);
2. update           ``ppo_epochs`` passes of the section's policy loss over micro-batches,
                    and the critic's value loss when there is a critic (update.py);
3. bookkeeping      the KL controller and EMA (PPO's), logging, a checkpoint when due.

What differs between the algorithms is settings of their sections, not code: the answers
per prompt, the advantage estimator and the policy loss (by name), where the KL goes,
whether a critic is trained.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch

from ...data import PromptCollator
from ...data.collate import LengthGroupedBatchSampler
from ...data.phases import ppo_prompts
from ...runtime import loop as supervised
from ...runtime.checkpoint import Checkpointer
from ...runtime.iteration import Iterations, Speed
from ...runtime.models import load_tokenizer, unwrap_for_saving
from ...runtime.ranks import mean_across_ranks
from ...runtime.stage import StageContext, own_streams, stage, stage_seed
from ..maths.advantages import AdaptiveKLController, FixedKLController
from .generation import GenerationSettings
from .models import load_models, require_outputs
from .ppo import EMA, unsupervised_batches
from .rewards import RewardTerms
from .rollout import Scorer, dynamic_sample
from .update import update

log = logging.getLogger("rlhf_tasks")

HISTORY = ("reward", "kl", "actor_loss", "critic_loss", "answer_length", "reward_std")  # plots/<stage>_curves.png


def rl_prompts(ctx: StageContext):
    """The tokenizer and the training prompts of the third data phase."""
    cfg, sft = ctx.cfg, ctx.run.final("sft")
    tok = load_tokenizer(str(sft) if sft.is_dir() else cfg.model.actor, cfg.model.trust_remote_code)
    prompts, reports = ppo_prompts(cfg, tok, "train")
    supervised.log_data_reports(ctx, reports)
    if len(prompts) == 0:
        raise ValueError(f"{ctx.name}: no prompts after the data split {cfg.data.data_split!r}")
    return tok, prompts


def prompt_sampler(ctx: StageContext, prompts, batch: int, epochs: int, max_steps: int):
    """The walk over the third phase's prompts, ``batch`` per iteration: the sampler and
    the number of iterations."""
    sampler = LengthGroupedBatchSampler(prompts["length"], batch, seed=stage_seed(ctx.name, ctx.cfg), drop_last=True,
                                        rank=ctx.rank, world_size=ctx.world_size)
    total = epochs * len(sampler)
    if max_steps:
        total = min(total, max_steps)
    if total == 0:
        raise ValueError(f"{ctx.name}: {len(prompts)} prompts are fewer than one generation batch ({batch})")
    return sampler, total


def window_mean(series: list[tuple[int, float]], first: bool, frac: float = 0.2) -> float:
    """Mean of the first or last 20% of a noisy per-iteration series (reward, KL)."""
    k = max(1, int(len(series) * frac))
    window = series[:k] if first else series[-k:]
    return sum(v for _, v in window) / len(window)


def rl_speed(speed: Speed, prompts_per_iteration: int) -> dict[str, float]:
    """An RL stage's steady-state speed from :class:`Speed` (the first iteration left out):
    mean seconds per iteration generating, scoring (the no-grad pass of the models) and
    training, prompts/s, and generated tokens per second of generation."""
    n = speed.steps
    if n == 0:
        return {}
    out = {f"{k}_s": v / n for k, v in speed.phases.items()}
    out["prompts_per_s"] = prompts_per_iteration / max(sum(speed.phases.values()) / n, 1e-9)
    out["generation_tokens_per_s"] = speed.tokens.item() / max(speed.phases.get("generation", 0.0), 1e-9)
    out["timed_iterations"] = n
    # CPU seconds per iteration of this process (what another process on the machine does not move)
    out["cpu_s_per_iteration"] = (time.process_time() - speed.cpu0 - speed.paused_cpu_s) / n
    if speed.device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(speed.device) / 1e9
    return out


@stage()
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    """Train the actor with the run's RL algorithm (``ctx.name``): its ``final/`` and metrics."""
    cfg, sec = ctx.cfg, getattr(ctx.cfg, ctx.name)
    require_outputs(ctx, "sft", *(("rm",) if sec.trains_with_reward_model() else ()))
    tok, prompts = rl_prompts(ctx)
    P = sec.per_device_generation_batch_size
    sampler, total = prompt_sampler(ctx, prompts, P, sec.epochs, sec.max_steps)
    answers = P * sec.answers_per_prompt
    updates_per_iter = sec.ppo_epochs * -(-answers // sec.per_device_train_batch_size) // sec.gradient_accumulation_steps
    models = load_models(ctx, sec, total * max(updates_per_iter, 1))
    own_streams(ctx)
    ckpt = Checkpointer(ctx, models.engines, sec.checkpoint_every_steps, sec.keep_checkpoints,
                        step_key="iteration", unit="iteration")
    speed = Speed(ctx.device, world_size=ctx.world_size)
    it = Iterations(ctx, prompts, PromptCollator(tok.pad_token_id), sampler, total, ckpt, speed=speed,
                    checkpoint_last=False)
    gen = GenerationSettings.from_section(sec, cfg.data)
    scorer = Scorer(models, sec, gen, RewardTerms(cfg.reward, gen.max_new_tokens, tok), cfg.reward.clip_reward_value,
                    tok, speed)
    kl_ctl = (AdaptiveKLController(sec.kl_coef, sec.kl_target, sec.kl_horizon) if getattr(sec, "adaptive_kl", False)
              else FixedKLController(sec.kl_coef))
    ema = EMA(models.actor.module, sec.ema_decay) if getattr(sec, "enable_ema", False) else None
    unsup = unsupervised_batches(cfg, tok, ctx) if getattr(sec, "unsupervised_coef", 0) > 0 else None
    if it.resume():
        kl_ctl.value = it.state.get("kl_coef", kl_ctl.value)
        if ema is not None and it.state.get("ema"):
            ema.shadow = it.state["ema"]
    memory = models.memory()
    ctx.log_metrics(memory, 0)
    log.info("%s: %d prompts x %d answers per iteration, %d iterations, loss %s, advantage %s; models on the device: "
             "%s", ctx.name, P, sec.answers_per_prompt, total, sec.loss, sec.advantage,
             {k: f"{v / 1e6:.1f} MB" for k, v in memory.items()})

    batches = it.batches(sec.epochs)
    for batch in batches:
        first = scorer(batch, kl_ctl.value)
        exp, stats = first
        if getattr(sec, "dynamic_sampling", False):
            exp, sampled = dynamic_sample(lambda b: scorer(b, kl_ctl.value), first, batches, sec, ctx.device)
            stats = {**stats, **sampled}
        # Over every rank's rollouts; one collective and sync per iteration, after the rollout's work.
        stats = mean_across_ranks(stats, ctx.device)
        with speed.phase("training"):
            if exp is not None:
                stats.update(update(models, exp, sec, kl_ctl.value, gen.max_new_tokens, unsup))
        speed.count(int(stats["generation_tokens"]))
        if ema is not None:
            ema.update(models.actor.module)
        kl_ctl.update(stats["kl"], P)
        stats["kl_coef"] = kl_ctl.value
        it.advance(reward=stats["reward"], kl=stats["kl"])
        it.keep(stats, [k for k in HISTORY if k in stats])
        if it.step % sec.log_every_steps == 0:
            ctx.log_metrics(stats, it.step)
            if ctx.is_main:
                log.info("%s: step %d/%d reward %.4f kl %.4f actor_loss %.4f%s", ctx.name, it.step, it.total,
                         stats["reward"], stats["kl"], stats.get("actor_loss", float("nan")),
                         f" critic_loss {stats['critic_loss']:.4f}" if "critic_loss" in stats else "")
        it.checkpoint_if_due(lambda: {"kl_coef": kl_ctl.value, "ema": ema.shadow if ema is not None else None})
    return finish(ctx, it, tok, models.actor, memory, speed, P, ema)


def finish(ctx: StageContext, it: Iterations, tok, actor_engine, memory: dict[str, float], speed: Speed,
           prompts_per_iteration: int, ema: EMA | None = None) -> tuple[Path, dict[str, float]]:
    """An RL stage's result: reward and KL at the start and end, speed, memory; ``final/``."""
    h = it.history
    first, last = window_mean(h["reward"], first=True), window_mean(h["reward"], first=False)
    metrics = {"reward_first": first, "reward_last": last, "kl_first": window_mean(h["kl"], first=True),
               "kl_last": window_mean(h["kl"], first=False),
               "iterations": it.step, **rl_speed(speed, prompts_per_iteration * ctx.world_size), **memory}
    log.info("%s: training reward %.3f -> %.3f over %d iterations", ctx.name, first, last, it.step)
    actor = unwrap_for_saving(actor_engine.module)
    final = supervised.save_final(ctx, actor, tok, metrics, also=None if ema is None else partial(_save_ema, actor, ema))
    ctx.log_history(h)
    return final, metrics


def _save_ema(actor, ema: EMA, path: Path) -> None:
    actor.save_pretrained(path / "ema", state_dict=ema.shadow)
