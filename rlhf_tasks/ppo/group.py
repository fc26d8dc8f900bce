"""GRPO and RLOO: RL on the SFT actor without a critic.

Each iteration samples ``group_size`` (G) answers to each of P prompts in one batch (the
prompts repeated, each prompt's answers adjacent: rows ``p*G .. p*G+G-1``), scores them
with the frozen reward model (plus the reward terms), and takes each answer's advantage
against the other answers to its prompt:

- GRPO: ``(r - mean_group) / std_group`` (``scale_rewards=false``: mean-centred only, Dr.
  GRPO); the KL to the reference either as a loss term (k3 estimator x ``kl_coef``) or
  subtracted from the reward (``kl_penalty``);
- RLOO: ``r - mean of the other G - 1 rewards``, the KL (summed over the answer's tokens)
  subtracted from the reward.

The answer's advantage applies to each of its tokens; the update is PPO's clipped
surrogate (``ppo_epochs`` passes over micro-batches), on the actor alone. Models held:
the actor, its reference (none under LoRA-only training: the actor with adapters off)
and the reward model; nothing else is loaded, trained or checkpointed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import Checkpointer
from ..config import GroupConfig, GRPOConfig
from ..data import PromptCollator
from ..iteration import Iterations, Speed
from ..stage import StageContext, stage
from .advantages import group_advantages, leave_one_out_advantages, sequence_kl
from .generation import GenerationSettings, generate
from .losses import aggregate, kl_k3, masked_mean, policy_loss
from .policy import (
    actor_log_probs,
    load_actor,
    load_reference,
    load_reward_model,
    memory_report,
    require_outputs,
)
from .rewards import RewardTerms
from .trainer import accumulate, finish_rl, prompt_sampler, rl_prompts

log = logging.getLogger("rlhf_tasks")
HISTORY = ("reward", "kl", "actor_loss", "answer_length", "reward_std")


def kl_in_loss(g: GroupConfig) -> bool:
    return isinstance(g, GRPOConfig) and g.kl_penalty == "loss"


def advantages_of(rewards: torch.Tensor, g: GroupConfig) -> torch.Tensor:
    """(B,) rewards -> (B,) advantages by the stage's baseline."""
    if isinstance(g, GRPOConfig):
        return group_advantages(rewards, g.group_size, scale=g.scale_rewards)
    return leave_one_out_advantages(rewards, g.group_size)


@torch.no_grad()
def group_rollout(actor, ref, reward, batch: dict[str, torch.Tensor], g: GroupConfig, gen: GenerationSettings,
                  terms: RewardTerms, tok, speed: Speed) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """G answers per prompt, scored; the update's inputs and the iteration's stats."""
    G = g.group_size
    with speed.phase("generation"):
        ro = generate(actor.module, batch["input_ids"].repeat_interleave(G, 0),
                      batch["attention_mask"].repeat_interleave(G, 0), gen, tok.eos_token_id, tok.pad_token_id)
    with speed.phase("scoring"):
        seq, attn, amask = ro.sequences, ro.attention_mask, ro.action_mask.to(torch.float32)  # (P*G, T), (P*G, T-1)
        actor.eval()
        logp = actor_log_probs(actor, seq, attn).float()
        ref_logp = ref.log_probs(seq, attn).float()
        actor.train()
        rm_scores = reward.score(seq, attn).float()  # (P*G,)
        scores, parts = terms.total(rm_scores, seq, amask, ro.prompt_len)
        scores = scores.clamp(-g.clip_reward_value, g.clip_reward_value)
        kl = sequence_kl(logp, ref_logp, amask)  # (P*G,) nats per answer
        rewards = scores if kl_in_loss(g) else scores - g.kl_coef * kl
        adv = advantages_of(rewards, g)
    data = {"sequences": seq, "attention_mask": attn, "action_mask": amask, "action_log_probs": logp,
            "ref_log_probs": ref_logp, "advantages": adv.unsqueeze(1).expand_as(logp).contiguous()}
    stats = {"reward": rm_scores.mean(), "reward_total": rewards.mean(), "kl": kl.mean(),
             "reward_std": rewards.view(-1, G).std(dim=1).mean(),  # spread within a group: 0 = nothing to learn
             "answer_length": ro.answer_lengths.float().mean(), "generation_tokens": amask.sum(),
             **{f"reward_{k}": v.mean() for k, v in parts.items()}}
    return data, stats


def group_update(actor, data: dict[str, torch.Tensor], g: GroupConfig) -> dict[str, float]:
    """``ppo_epochs`` passes of the clipped surrogate (+ k3 KL for GRPO's loss form)."""
    sums: dict[str, torch.Tensor] = {}
    n = 0
    rows = data["sequences"].shape[0]
    for _ in range(g.ppo_epochs):
        for i in range(0, rows, g.per_device_train_batch_size):
            mb = {k: v[i:i + g.per_device_train_batch_size] for k, v in data.items()}
            logp = actor_log_probs(actor, mb["sequences"], mb["attention_mask"]).float()
            loss, clip, approx_kl = policy_loss(logp, mb["action_log_probs"], mb["advantages"], mb["action_mask"],
                                                g.cliprange, g.loss_aggregation)
            accumulate(sums, "policy_loss", loss)
            if kl_in_loss(g):
                kl_loss = aggregate(kl_k3(logp, mb["ref_log_probs"], mb["action_mask"]), mb["action_mask"],
                                    g.loss_aggregation)
                loss = loss + g.kl_coef * kl_loss
                accumulate(sums, "kl_loss", kl_loss)
            actor.backward(loss)
            actor.step()
            for k, v in (("actor_loss", loss), ("actor_clip_fraction", clip), ("approx_kl", approx_kl),
                         ("entropy_proxy", -masked_mean(logp, mb["action_mask"]))):
                accumulate(sums, k, v)
            n += 1
    return {k: float(v) / n for k, v in sums.items()}


def train_group(ctx: StageContext, g: GroupConfig) -> tuple[Path, dict[str, float]]:
    cfg = ctx.cfg
    require_outputs(ctx, "sft", "rm")
    tok, prompts = rl_prompts(ctx)
    P, G = g.per_device_generation_batch_size, g.group_size
    sampler, total = prompt_sampler(ctx, prompts, P, g.epochs, g.max_steps)
    updates_per_iter = g.ppo_epochs * -(-P * G // g.per_device_train_batch_size) // g.gradient_accumulation_steps
    actor = load_actor(ctx, cfg, g.actor, g.dtype, total * max(updates_per_iter, 1), g.per_device_train_batch_size,
                       g.gradient_accumulation_steps)
    ref = load_reference(ctx, cfg, g.actor, g.dtype, actor, g.offload_reference_model)
    reward = load_reward_model(ctx, cfg, g.dtype, zero3=g.actor.zero_stage == 3)
    ckpt = Checkpointer(ctx, {"actor": actor}, g.checkpoint_every_steps, g.keep_checkpoints,
                        step_key="iteration", unit="iteration")
    speed = Speed(ctx.device, world_size=ctx.world_size)
    it = Iterations(ctx, prompts, PromptCollator(tok.pad_token_id), sampler, total, ckpt, speed=speed,
                    checkpoint_last=False)
    gen = GenerationSettings.from_section(g, cfg.data)
    terms = RewardTerms(cfg.reward_terms, gen.max_new_tokens, tok)
    it.resume()
    memory = memory_report(actor=actor.module, reference=ref.model, reward=reward)
    ctx.log_metrics(memory, 0)
    log.info("%s: %d prompts x %d answers per iteration, %d iterations; models on the device: %s", ctx.name, P, G,
             total, {k: f"{v / 1e6:.1f} MB" for k, v in memory.items()})

    for batch in it.batches(g.epochs):
        data, stats = group_rollout(actor, ref, reward, batch, g, gen, terms, tok, speed)
        with speed.phase("training"):
            update = group_update(actor, data, g)
        stats = {**{k: float(v) for k, v in stats.items()}, **update}
        speed.count(int(stats["generation_tokens"]))
        it.advance(reward=stats["reward"], kl=stats["kl"])
        it.keep(stats, HISTORY)
        if it.step % g.log_every_steps == 0:
            ctx.log_metrics(stats, it.step)
            if ctx.is_main:
                log.info("%s: step %d/%d reward %.4f (group std %.3f) kl %.4f loss %.4f", ctx.name, it.step, it.total,
                         stats["reward"], stats["reward_std"], stats["kl"], stats["actor_loss"])
        it.checkpoint_if_due()
    return finish_rl(ctx, it, tok, actor, memory, speed, P)


@stage("grpo")
def run_grpo(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    return train_group(ctx, ctx.cfg.grpo)


@stage("rloo")
def run_rloo(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    return train_group(ctx, ctx.cfg.rloo)
