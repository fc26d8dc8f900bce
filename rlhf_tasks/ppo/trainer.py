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
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import loop
from ..checkpoint import Checkpointer
from ..config import PipelineConfig, PPOConfig
from ..data import PromptCollator, SFTCollator
from ..data.collate import LengthGroupedBatchSampler
from ..engine import (
    Batching,
    inference_config,
    inference_engine,
    initialize,
    loading_config,
    partitioned_loading,
    torch_dtype,
)
from ..models import (
    RewardModel,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    plain_state_dict,
    positions_from_mask,
    unwrap_for_saving,
)
from ..phases import ppo_prompts, sft_rows
from ..stage import StageContext, stage
from .advantages import AdaptiveKLController, FixedKLController, compute_gae, compute_rewards, whiten
from .experience import Experience
from .generation import GenerationSettings, generate
from .losses import log_probs_from_logits, masked_mean, policy_loss, value_loss

log = logging.getLogger("rlhf_tasks")


@dataclass
class Models:
    actor: object  # DeepSpeed engine
    critic: object  # DeepSpeed engine
    ref: torch.nn.Module
    reward: torch.nn.Module


def actor_log_probs(model, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T-1) log-prob of each next token under ``model``."""
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=positions_from_mask(attention_mask), use_cache=False).logits
    return log_probs_from_logits(logits[:, :-1], sequences[:, 1:])


@torch.no_grad()
def make_experience(m: Models, prompts: dict[str, torch.Tensor], p: PPOConfig, gen: GenerationSettings,
                    kl_coef: float, eos_id: int, pad_id: int) -> tuple[Experience, dict[str, float]]:
    """Rollout + the scoring pass of all four models; returns the experience and stats."""
    t0 = time.perf_counter()
    ro = generate(m.actor.module, prompts["input_ids"], prompts["attention_mask"], gen, eos_id, pad_id)
    _sync(ro.sequences.device)  # once per iteration, so that generation and scoring time split honestly
    t_gen = time.perf_counter() - t0
    seq, attn, amask = ro.sequences, ro.attention_mask, ro.action_mask.to(torch.float32)
    m.actor.eval()
    m.critic.eval()
    logp = actor_log_probs(m.actor, seq, attn).float()  # (B, T-1)
    ref_logp = actor_log_probs(m.ref, seq, attn).float()
    values = m.critic(seq, attn)[:, :-1].float()  # value of the state before each action
    raw_scores = m.reward.score(seq, attn).float()  # (B,)
    m.actor.train()
    m.critic.train()
    scores = raw_scores.clamp(-p.clip_reward_value, p.clip_reward_value)
    rewards, kl = compute_rewards(scores, logp, ref_logp, amask, kl_coef, p.clip_reward_value)
    advantages, returns = compute_gae(values, rewards, amask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = whiten(advantages, amask)
    exp = Experience(sequences=seq, attention_mask=attn, action_mask=amask, action_log_probs=logp,
                     ref_log_probs=ref_logp, values=values, rewards=rewards, advantages=advantages,
                     returns=returns, scores=scores, prompt_len=ro.prompt_len)
    n_new = amask.sum()
    stats = {"reward": raw_scores.mean(), "reward_clipped": scores.mean(),
             "kl": ((logp - ref_logp) * amask).sum(-1).mean(),  # per answer, summed over its tokens
             "answer_length": ro.answer_lengths.float().mean(), "generation_tokens": n_new,
             "empty_answers": (ro.answer_lengths <= 1).float().mean()}
    stats = {k: float(v) for k, v in stats.items()}  # one sync per iteration, after all the GPU work
    stats["generation_s"] = t_gen
    stats["scoring_s"] = time.perf_counter() - t0 - t_gen
    stats["generation_tokens_per_s"] = stats["generation_tokens"] / max(t_gen, 1e-9)
    del kl
    return exp, stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_summary(iterations: list[dict[str, float]], prompts_per_iteration: int,
                  device: torch.device) -> dict[str, float]:
    """Steady-state PPO speed from per-iteration stats: mean seconds per iteration spent
    generating, scoring (the no-grad pass of the four models) and training, and prompts/s.
    The first iteration of a process (allocator, CUDA graph capture) is left out when
    there are others."""
    timed = iterations[1:] if len(iterations) > 1 else iterations
    if not timed:
        return {}
    gen, score, train = (sum(x[k] for x in timed) / len(timed) for k in ("generation_s", "scoring_s", "training_s"))
    out = {"generation_s": gen, "scoring_s": score, "training_s": train,
           "prompts_per_s": prompts_per_iteration / (gen + score + train),
           "generation_tokens_per_s": sum(x["generation_tokens"] for x in timed) / max(gen * len(timed), 1e-9),
           "timed_iterations": len(timed)}
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
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
                _acc(sums, "unsupervised_loss", u_loss)
            values = m.critic(mb.sequences, mb.attention_mask)[:, :-1].float()
            c_loss, c_clip = value_loss(values, mb.values, mb.returns, mb.action_mask, p.cliprange_value)
            m.critic.backward(c_loss)
            m.critic.step()
            for k, v in (("actor_loss", a_loss), ("critic_loss", c_loss), ("actor_clip_fraction", a_clip),
                         ("critic_clip_fraction", c_clip), ("approx_kl", approx_kl),
                         ("entropy_proxy", -masked_mean(logp, mb.action_mask))):
                _acc(sums, k, v)
            n += 1
    return {k: float(v) / n for k, v in sums.items()}


def _acc(sums: dict[str, torch.Tensor], k: str, v: torch.Tensor) -> None:
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
    p = cfg.ppo
    sft = ctx.run.final("sft")
    rm = ctx.run.final("rm")
    for name, path in (("sft", sft), ("rm", rm)):
        if not path.is_dir():
            raise FileNotFoundError(f"ppo needs the {name} stage's output {path}: run `{name}` first")
    trust, attn = cfg.model.trust_remote_code, cfg.model.attn_implementation
    a, c = p.actor, p.critic
    with partitioned_loading(loading_config(a, p.dtype, ctx.world_size)):
        actor = load_causal_lm(str(sft), dropout=a.dropout, trust_remote_code=trust, attn_implementation=attn,
                               gradient_checkpointing=a.gradient_checkpointing)
    if a.lora_dim:
        actor = apply_lora(actor, a.lora_dim, a.lora_module_name, alpha=a.lora_alpha,
                           only_optimize_lora=a.only_optimize_lora)
    with partitioned_loading(loading_config(c, p.dtype, ctx.world_size)):
        critic = RewardModel.from_pretrained(str(rm), dropout=c.dropout, trust_remote_code=trust,
                                             attn_implementation=attn)
    if c.gradient_checkpointing:
        critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.lora_dim:
        critic.backbone = apply_lora(critic.backbone, c.lora_dim, c.lora_module_name, alpha=c.lora_alpha,
                                     only_optimize_lora=c.only_optimize_lora)
    batching = Batching(p.per_device_train_batch_size, p.gradient_accumulation_steps, p.dtype, total_updates)
    actor_e = initialize(actor, a, batching, ctx.device, ctx.world_size)
    critic_e = initialize(critic, c, batching, ctx.device, ctx.world_size)
    # The frozen models are partitioned like the model they sit beside (or offloaded).
    dtype = torch_dtype(p.dtype)
    ref_zero3, offload = p.offload_reference_model or a.zero_stage == 3, p.offload_reference_model
    with partitioned_loading(inference_config(p.dtype, offload, ctx.world_size)) if ref_zero3 else nullcontext():
        ref = load_causal_lm(str(sft), dtype=dtype, trust_remote_code=trust, attn_implementation=attn)
    ref.requires_grad_(False)
    ref = inference_engine(ref, p.dtype, offload, ctx.world_size) if ref_zero3 else ref.to(ctx.device).eval()
    with partitioned_loading(inference_config(p.dtype, False, ctx.world_size)) if c.zero_stage == 3 else nullcontext():
        reward = RewardModel.from_pretrained(str(rm), dtype=dtype, trust_remote_code=trust, attn_implementation=attn)
    reward.requires_grad_(False)
    reward = (inference_engine(reward, p.dtype, False, ctx.world_size) if c.zero_stage == 3
              else reward.to(ctx.device).eval())
    return Models(actor=actor_e, critic=critic_e, ref=ref, reward=reward)


@stage("ppo")
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    cfg, run_dir = ctx.cfg, ctx.run
    p = cfg.ppo
    tok = load_tokenizer(str(run_dir.final("sft")) if run_dir.final("sft").is_dir() else cfg.model.actor,
                         cfg.model.trust_remote_code)
    prompts, reports = ppo_prompts(cfg, tok, "train")
    loop.log_data_reports(ctx, reports)
    if len(prompts) == 0:
        raise ValueError(f"ppo: no prompts after the data split {cfg.data.data_split!r}")
    B = p.per_device_generation_batch_size
    sampler = LengthGroupedBatchSampler(prompts["length"], B, seed=cfg.seed, drop_last=True, rank=ctx.rank,
                                        world_size=ctx.world_size)
    per_epoch = len(sampler)
    total_iters = p.epochs * per_epoch
    if p.max_steps:
        total_iters = min(total_iters, p.max_steps)
    if total_iters == 0:
        raise ValueError(f"ppo: {len(prompts)} prompts are fewer than one generation batch ({B})")
    updates_per_iter = p.ppo_epochs * -(-B // p.per_device_train_batch_size) // p.gradient_accumulation_steps
    m = build_models(ctx, cfg, total_iters * max(updates_per_iter, 1))
    gen = GenerationSettings.from_config(cfg)
    kl_ctl = _kl_controller(p)
    ema = EMA(m.actor.module, p.ema_decay) if p.enable_ema else None
    unsup = _unsupervised_batches(cfg, tok, ctx) if p.unsupervised_coef > 0 else None

    ckpt = Checkpointer(ctx, {"actor": m.actor, "critic": m.critic}, p.checkpoint_every_steps,
                        p.keep_checkpoints, step_key="iteration", unit="iteration")
    it, history = 0, {}
    if (state := ckpt.resume()) is not None:
        it, history, kl_ctl.value = state["iteration"], state["history"], state["kl_coef"]
        if ema is not None and state.get("ema"):
            ema.shadow = state["ema"]

    collate = PromptCollator(tok.pad_token_id)
    bar = loop._progress(total_iters, "ppo", it, ctx.is_main)
    timings: list[dict[str, float]] = []
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    while it < total_iters:
        epoch, offset = divmod(it, per_epoch)
        sampler.set_epoch(epoch)
        batches = list(sampler)[offset:]
        prompt_batches = iter(DataLoader(prompts, batch_sampler=batches, collate_fn=collate))
        ckpt.restore_rng()  # now the generators are where the uninterrupted run had them
        for batch in prompt_batches:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            exp, stats = make_experience(m, batch, p, gen, kl_ctl.value, tok.eos_token_id, tok.pad_token_id)
            t0 = time.perf_counter()
            stats.update(ppo_update(m, exp, p, unsup))
            stats["training_s"] = time.perf_counter() - t0
            timings.append({k: stats[k] for k in ("generation_s", "scoring_s", "training_s", "generation_tokens")})
            if ema is not None:
                ema.update(m.actor.module)
            kl_ctl.update(stats["kl"], B)
            stats["kl_coef"] = kl_ctl.value
            it += 1
            bar.update(1)
            for k in ("reward", "kl", "actor_loss", "critic_loss", "answer_length"):
                history.setdefault(k, []).append((it, stats[k]))
            if it % p.log_every_steps == 0:
                ctx.log_metrics(stats, it)
                if ctx.is_main:
                    log.info("ppo: step %d/%d reward %.4f kl %.4f actor_loss %.4f critic_loss %.4f", it,
                             total_iters, stats["reward"], stats["kl"], stats["actor_loss"], stats["critic_loss"])
                bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
            if ckpt.due(it) and it < total_iters:
                ckpt.save(it, {"history": history, "kl_coef": kl_ctl.value,
                               "ema": ema.shadow if ema is not None else None})
            if it >= total_iters:
                break
    bar.close()
    first, last = _window_mean(history["reward"], first=True), _window_mean(history["reward"], first=False)
    metrics = {"reward_first": first, "reward_last": last, "kl_last": _window_mean(history["kl"], first=False),
               "iterations": it, **speed_summary(timings, B * ctx.world_size, ctx.device)}
    log.info("ppo: training reward %.3f -> %.3f over %d iterations", first, last, it)
    actor = unwrap_for_saving(m.actor.module)
    final = loop.save_final(ctx, actor, tok, metrics, also=None if ema is None else (
        lambda path: actor.save_pretrained(path / "ema", state_dict=ema.shadow)))
    ctx.log_history(history)
    return final, metrics


def _window_mean(series: list[tuple[int, float]], first: bool, frac: float = 0.2) -> float:
    """Mean of the first or last 20% of a noisy per-iteration series."""
    k = max(1, int(len(series) * frac))
    window = series[:k] if first else series[-k:]
    return sum(v for _, v in window) / len(window)


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

