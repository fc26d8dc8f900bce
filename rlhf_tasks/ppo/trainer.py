"""Step 3: PPO on the SFT actor against the frozen reward model.

Four models, as in DeepSpeed-Chat: the actor (trained, from SFT), the reference (frozen
copy of the SFT actor), the critic (trained, from the reward model) and the reward model
(frozen). Each PPO iteration:

1. rollout   – the actor samples answers for a batch of prompts (generation.py);
2. experience – one no-grad pass of all four models gives action log-probs, reference
   log-probs, values and the RM score; rewards and GAE advantages follow
   (advantages.py), all in a typed :class:`Experience`;
3. update    – ``ppo_epochs`` passes of the clipped policy and value losses
   (losses.py) over micro-batches of the experience.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import loop
from ..checkpoint import Checkpointer
from ..config import PipelineConfig, PPOConfig
from ..data import PromptCollator, SFTCollator
from ..data.collate import LengthGroupedBatchSampler
from ..engine import Batching, initialize, loading_config, partitioned_loading
from ..iteration import Iterations, Speed
from ..models import RewardModel, apply_lora, load_tokenizer, plain_state_dict, unwrap_for_saving
from ..phases import ppo_prompts, sft_rows
from ..stage import StageContext, stage, stage_seed
from .advantages import AdaptiveKLController, FixedKLController, compute_gae, compute_rewards, whiten
from .experience import Experience
from .generation import GenerationSettings, generate
from .losses import masked_mean, policy_loss, value_loss
from .policy import (
    Reference,
    actor_log_probs,
    load_actor,
    load_reference,
    load_reward_model,
    memory_report,
    require_outputs,
    window_mean,
)
from .rewards import RewardTerms

log = logging.getLogger("rlhf_tasks")


HISTORY = ("reward", "kl", "actor_loss", "critic_loss", "answer_length")  # the curves in plots/ppo_curves.png


@dataclass
class Models:
    actor: object  # DeepSpeed engine
    critic: object  # DeepSpeed engine
    ref: Reference
    reward: torch.nn.Module

    def memory(self) -> dict[str, float]:
        return memory_report(actor=self.actor.module, critic=self.critic.module, reference=self.ref.model,
                             reward=self.reward)


@torch.no_grad()
def make_experience(m: Models, prompts: dict[str, torch.Tensor], p: PPOConfig, gen: GenerationSettings,
                    kl_coef: float, terms: RewardTerms, tok, speed: Speed) -> tuple[Experience, dict[str, float]]:
    """Rollout + the scoring pass of all four models; returns the experience and stats."""
    with speed.phase("generation"):
        ro = generate(m.actor.module, prompts["input_ids"], prompts["attention_mask"], gen, tok.eos_token_id,
                      tok.pad_token_id)
    with speed.phase("scoring"):
        seq, attn, amask = ro.sequences, ro.attention_mask, ro.action_mask.to(torch.float32)
        m.actor.eval()
        m.critic.eval()
        logp = actor_log_probs(m.actor, seq, attn).float()  # (B, T-1)
        ref_logp = m.ref.log_probs(seq, attn).float()
        values = m.critic(seq, attn)[:, :-1].float()  # value of the state before each action
        rm_scores = m.reward.score(seq, attn).float()  # (B,)
        m.actor.train()
        m.critic.train()
        scores, parts = terms.total(rm_scores, seq, amask, ro.prompt_len)
        rewards, _ = compute_rewards(scores, logp, ref_logp, amask, kl_coef, p.clip_reward_value)
        advantages, returns = compute_gae(values, rewards, amask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = whiten(advantages, amask)
    exp = Experience(sequences=seq, attention_mask=attn, action_mask=amask, action_log_probs=logp,
                     ref_log_probs=ref_logp, values=values, rewards=rewards, advantages=advantages,
                     returns=returns, scores=scores, prompt_len=ro.prompt_len)
    stats = {"reward": rm_scores.mean(), "reward_total": scores.mean(),
             "kl": ((logp - ref_logp) * amask).sum(-1).mean(),  # per answer, summed over its tokens
             "answer_length": ro.answer_lengths.float().mean(), "generation_tokens": amask.sum(),
             "empty_answers": (ro.answer_lengths <= 1).float().mean(),
             **{f"reward_{k}": v.mean() for k, v in parts.items()}}
    return exp, {k: float(v) for k, v in stats.items()}  # one sync per iteration, after all the work


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
    if speed.device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(speed.device) / 1e9
    return out


def ppo_update(m: Models, exp: Experience, p: PPOConfig, unsup_batches: Iterator | None) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped policy and value losses over micro-batches."""
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for _ in range(p.ppo_epochs):
        for mb in exp.split(p.per_device_train_batch_size):
            logp = actor_log_probs(m.actor, mb.sequences, mb.attention_mask).float()
            a_loss, a_clip, approx_kl = policy_loss(logp, mb.action_log_probs, mb.advantages, mb.action_mask,
                                                    p.cliprange)
            m.actor.backward(a_loss)
            m.actor.step()
            if unsup_batches is not None and p.unsupervised_coef > 0:
                b = next(unsup_batches)
                u_loss = m.actor(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                                 use_cache=False).loss
                m.actor.backward(p.unsupervised_coef * u_loss)
                m.actor.step()
                accumulate(sums, "unsupervised_loss", u_loss)
            values = m.critic(mb.sequences, mb.attention_mask)[:, :-1].float()
            c_loss, c_clip = value_loss(values, mb.values, mb.returns, mb.action_mask, p.cliprange_value)
            m.critic.backward(c_loss)
            m.critic.step()
            for k, v in (("actor_loss", a_loss), ("critic_loss", c_loss), ("actor_clip_fraction", a_clip),
                         ("critic_clip_fraction", c_clip), ("approx_kl", approx_kl),
                         ("entropy_proxy", -masked_mean(logp, mb.action_mask))):
                accumulate(sums, k, v)
            n += 1
    return {k: float(v) / n for k, v in sums.items()}


def accumulate(sums: dict[str, torch.Tensor], k: str, v: torch.Tensor) -> None:
    v = v.detach().float()
    sums[k] = sums[k] + v if k in sums else v


class EMA:
    """Exponential moving average of the actor's weights (DeepSpeed-Chat's --enable_ema),
    kept as the plain model's weights (:func:`plain_state_dict`: with LoRA, each adapted
    layer's effective weight), so that ``final/ema/`` loads as the model it is. One fp32
    copy of the actor per rank: the config refuses it under ZeRO-3."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        copies: dict[int, torch.Tensor] = {}  # tied weights (lm_head, embeddings) stay one tensor
        self.shadow = {k: copies.setdefault(v.data_ptr(), v.detach().float().clone())
                       for k, v in plain_state_dict(model).items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        done: set[int] = set()
        for k, v in plain_state_dict(model).items():
            if (t := self.shadow.get(k)) is not None and id(t) not in done:
                done.add(id(t))
                t.lerp_(v.float(), 1 - self.decay)


def _kl_controller(p: PPOConfig):
    return AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl else FixedKLController(p.kl_coef)


def build_models(ctx: StageContext, cfg: PipelineConfig, total_updates: int) -> Models:
    p, c = cfg.ppo, cfg.ppo.critic
    require_outputs(ctx, "sft", "rm")
    actor = load_actor(ctx, cfg, p.actor, p.dtype, total_updates, p.per_device_train_batch_size,
                       p.gradient_accumulation_steps)
    with partitioned_loading(loading_config(c, p.dtype, ctx.world_size)):
        critic = RewardModel.from_pretrained(str(ctx.run.final("rm")), dropout=c.dropout,
                                             trust_remote_code=cfg.model.trust_remote_code,
                                             attn_implementation=cfg.model.attn_implementation)
    if c.gradient_checkpointing:
        critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.lora_dim:
        critic.backbone = apply_lora(critic.backbone, c.lora_dim, c.lora_module_name, alpha=c.lora_alpha,
                                     only_optimize_lora=c.only_optimize_lora)
    batching = Batching(p.per_device_train_batch_size, p.gradient_accumulation_steps, p.dtype, total_updates)
    critic_e = initialize(critic, c, batching, ctx.device, ctx.world_size)
    ref = load_reference(ctx, cfg, p.actor, p.dtype, actor, p.offload_reference_model)
    reward = load_reward_model(ctx, cfg, p.dtype, zero3=c.zero_stage == 3)
    return Models(actor=actor, critic=critic_e, ref=ref, reward=reward)


def prompt_sampler(ctx: StageContext, prompts, batch: int, epochs: int, max_steps: int):
    """The RL stages' walk over the third phase's prompts, ``batch`` per iteration: the
    sampler and the number of iterations."""
    sampler = LengthGroupedBatchSampler(prompts["length"], batch, seed=stage_seed(ctx.name, ctx.cfg), drop_last=True,
                                        rank=ctx.rank, world_size=ctx.world_size)
    total = epochs * len(sampler)
    if max_steps:
        total = min(total, max_steps)
    if total == 0:
        raise ValueError(f"{ctx.name}: {len(prompts)} prompts are fewer than one generation batch ({batch})")
    return sampler, total


def rl_prompts(ctx: StageContext):
    """The tokenizer and the training prompts of the third data phase."""
    cfg, sft = ctx.cfg, ctx.run.final("sft")
    tok = load_tokenizer(str(sft) if sft.is_dir() else cfg.model.actor, cfg.model.trust_remote_code)
    prompts, reports = ppo_prompts(cfg, tok, "train")
    loop.log_data_reports(ctx, reports)
    if len(prompts) == 0:
        raise ValueError(f"{ctx.name}: no prompts after the data split {cfg.data.data_split!r}")
    return tok, prompts


@stage("ppo")
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    cfg = ctx.cfg
    p = cfg.ppo
    tok, prompts = rl_prompts(ctx)
    B = p.per_device_generation_batch_size
    sampler, total = prompt_sampler(ctx, prompts, B, p.epochs, p.max_steps)
    updates_per_iter = p.ppo_epochs * -(-B // p.per_device_train_batch_size) // p.gradient_accumulation_steps
    m = build_models(ctx, cfg, total * max(updates_per_iter, 1))
    ckpt = Checkpointer(ctx, {"actor": m.actor, "critic": m.critic}, p.checkpoint_every_steps,
                        p.keep_checkpoints, step_key="iteration", unit="iteration")
    speed = Speed(ctx.device, world_size=ctx.world_size)
    it = Iterations(ctx, prompts, PromptCollator(tok.pad_token_id), sampler, total, ckpt, speed=speed,
                    checkpoint_last=False)
    gen = GenerationSettings.from_config(cfg)
    terms = RewardTerms(cfg.reward_terms, gen.max_new_tokens, tok)
    kl_ctl = _kl_controller(p)
    ema = EMA(m.actor.module, p.ema_decay) if p.enable_ema else None
    unsup = _unsupervised_batches(cfg, tok, ctx) if p.unsupervised_coef > 0 else None
    if it.resume():
        kl_ctl.value = it.state["kl_coef"]
        if ema is not None and it.state.get("ema"):
            ema.shadow = it.state["ema"]
    memory = m.memory()
    ctx.log_metrics(memory, 0)

    for batch in it.batches(p.epochs):
        exp, stats = make_experience(m, batch, p, gen, kl_ctl.value, terms, tok, speed)
        with speed.phase("training"):
            stats.update(ppo_update(m, exp, p, unsup))
        speed.count(int(stats["generation_tokens"]))
        if ema is not None:
            ema.update(m.actor.module)
        kl_ctl.update(stats["kl"], B)
        stats["kl_coef"] = kl_ctl.value
        it.advance(reward=stats["reward"], kl=stats["kl"])
        it.keep(stats, HISTORY)
        if it.step % p.log_every_steps == 0:
            ctx.log_metrics(stats, it.step)
            if ctx.is_main:
                log.info("ppo: step %d/%d reward %.4f kl %.4f actor_loss %.4f critic_loss %.4f", it.step, it.total,
                         stats["reward"], stats["kl"], stats["actor_loss"], stats["critic_loss"])
        it.checkpoint_if_due(lambda: {"kl_coef": kl_ctl.value, "ema": ema.shadow if ema is not None else None})
    return finish_rl(ctx, it, tok, m.actor, memory, speed, B, ema)


def finish_rl(ctx: StageContext, it: Iterations, tok, actor_engine, memory: dict[str, float], speed: Speed,
              prompts_per_iteration: int, ema: EMA | None = None) -> tuple[Path, dict[str, float]]:
    """An RL stage's result: reward and KL at the start and end, speed, memory; ``final/``."""
    h = it.history
    first, last = window_mean(h["reward"], first=True), window_mean(h["reward"], first=False)
    metrics = {"reward_first": first, "reward_last": last, "kl_first": window_mean(h["kl"], first=True),
               "kl_last": window_mean(h["kl"], first=False),
               "iterations": it.step, **rl_speed(speed, prompts_per_iteration * ctx.world_size), **memory}
    log.info("%s: training reward %.3f -> %.3f over %d iterations", ctx.name, first, last, it.step)
    actor = unwrap_for_saving(actor_engine.module)
    final = loop.save_final(ctx, actor, tok, metrics, also=None if ema is None else (
        lambda path: actor.save_pretrained(path / "ema", state_dict=ema.shadow)))
    ctx.log_history(h)
    return final, metrics


def _unsupervised_batches(cfg: PipelineConfig, tok, ctx: StageContext) -> Iterator[dict[str, torch.Tensor]]:
    """Endless SFT batches for the mixed-in language-modelling loss (ppo.unsupervised_coef)."""
    ds, _ = sft_rows(cfg, tok, "train")
    collate = SFTCollator(tok.pad_token_id)
    epoch = 0
    while True:
        s = LengthGroupedBatchSampler(ds["length"], cfg.ppo.per_device_train_batch_size, seed=cfg.seed + 1,
                                      rank=ctx.rank, world_size=ctx.world_size)
        s.set_epoch(epoch)
        for b in DataLoader(ds, batch_sampler=list(s), collate_fn=collate):
            yield {k: v.to(ctx.device) for k, v in b.items()}
        epoch += 1
