"""From a batch of prompts to an :class:`Experience`: the actor answers (``answers_per_prompt``
times each, a prompt's answers adjacent), one no-grad pass scores the answers (the actor's
and the reference's log-probs, the critic's values, the reward model's score plus the
reward terms), and the section's estimator turns rewards into advantages.

With ``dynamic_sampling`` (DAPO) the groups whose answers all got the same reward carry no
signal: they are dropped and the batch is refilled from the next prompts, for at most
``max_sampling_rounds`` rollouts, every rank the same number of rounds and keeping the
same number of groups (ZeRO-3's generation and the update's collectives stay in step), as
many as fill whole optimizer steps. The advantages of the kept batch are estimated again
from its rewards: a batch-level estimator (reinforce_pp_baseline) normalises over the
batch it trains on, not over the rollouts the dropped groups were part of.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ...runtime.iteration import Speed
from ...runtime.ranks import min_across_ranks, sum_across_ranks
from ..maths.advantages import ADVANTAGES, AdvantageInputs, compute_rewards, sequence_kl, whiten
from .experience import Experience
from .generation import GenerationSettings, generate
from .models import Models, actor_log_probs
from .rewards import RewardTerms


@dataclass
class Scorer:
    """What turns prompts into an experience, fixed for the stage."""

    models: Models
    sec: object  # the algorithm's config section (an RLConfig)
    gen: GenerationSettings
    terms: RewardTerms
    clip_reward_value: float
    tok: object
    speed: Speed

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], kl_coef: float) -> tuple[Experience, dict[str, torch.Tensor]]:
        """One rollout and its scoring: the experience and the iteration's stats (tensors)."""
        m, n = self.models, self.sec.answers_per_prompt
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if n > 1:
            ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)  # (P*G, P_len)
        with self.speed.phase("generation"):
            ro = generate(m.actor.module, ids, mask, self.gen, self.tok.eos_token_id, self.tok.pad_token_id)
        with self.speed.phase("scoring"):
            seq, attn, amask = ro.sequences, ro.attention_mask, ro.action_mask.to(torch.float32)  # (B, T), (B, T-1)
            m.train(False)
            logp = actor_log_probs(m.actor, seq, attn, amask)  # (B, T-1), 0 off the answers
            ref_logp = m.ref.log_probs(seq, attn, amask)
            values = m.critic(seq, attn)[:, :-1].float() if m.critic is not None else None  # V before each action
            rm_scores = m.reward.score(seq, attn).float()  # (B,)
            m.train(True)
            total, parts = self.terms.total(rm_scores, seq, amask, ro.prompt_len)
            scores = total.clamp(-self.clip_reward_value, self.clip_reward_value)
            kl = sequence_kl(logp, ref_logp, amask)  # (B,) nats per answer
            exp = self._advantages(seq, attn, amask, logp, ref_logp, values, scores, kl, kl_coef, ro.prompt_len)
        stats = {"reward": rm_scores.mean(), "reward_total": scores.mean(), "kl": kl.mean(),
                 "answer_length": ro.answer_lengths.float().mean(), "generation_tokens": amask.sum(),
                 "empty_answers": (ro.answer_lengths <= 1).float().mean(),
                 **{f"reward_{k}": v.mean() for k, v in parts.items()}}
        if n > 1:  # spread within a group: 0 = nothing to learn from the prompt
            stats["reward_std"] = group_rewards(exp, n).std(dim=1).mean()
        return exp, stats

    def _advantages(self, seq, attn, amask, logp, ref_logp, values, scores, kl, kl_coef, prompt_len) -> Experience:
        sec = self.sec
        inputs = AdvantageInputs(scores=scores - kl_coef * kl if sec.kl_penalty == "reward" else scores,
                                 action_mask=amask, group_size=sec.answers_per_prompt, values=values,
                                 sum_across_ranks=sum_across_ranks)
        if sec.advantage == "gae":  # the KL paid per token, the score on the last one
            token_rewards, _ = compute_rewards(scores, logp, ref_logp, amask, kl_coef, self.clip_reward_value)
            inputs = AdvantageInputs(scores=scores, action_mask=amask, token_rewards=token_rewards, values=values,
                                     gamma=sec.gamma, lam=sec.lam)
        adv, returns = ADVANTAGES[sec.advantage](inputs)
        if getattr(sec, "whiten_advantages", False):
            adv = whiten(adv, amask)
        # The reward each answer is judged by: what the group estimators compare (with the KL
        # when it is paid in the reward).
        return Experience(sequences=seq, attention_mask=attn, action_mask=amask, action_log_probs=logp,
                          ref_log_probs=ref_logp, advantages=adv, scores=inputs.scores, prompt_len=prompt_len,
                          values=values, returns=returns)


def group_rewards(exp: Experience, group_size: int) -> torch.Tensor:
    """(P, G): each prompt's answers' rewards."""
    return exp.scores.view(-1, group_size)


def informative_groups(exp: Experience, group_size: int) -> torch.Tensor:
    """(P,) bool: the prompts whose answers did not all get the same reward."""
    g = group_rewards(exp, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) > 1e-6


def keep_groups(exp: Experience, groups: torch.Tensor, group_size: int) -> Experience:
    """The rollouts of the prompts ``groups`` (indices into the P prompts)."""
    rows = (groups.unsqueeze(1) * group_size + torch.arange(group_size, device=groups.device)).reshape(-1)
    return exp.select(rows)


def dynamic_sample(score: Callable[[dict], tuple[Experience, dict]], first: tuple[Experience, dict],
                   more: Iterator[dict], sec, device: torch.device) -> tuple[Experience | None, dict[str, float]]:
    """DAPO's dynamic sampling: keep the informative groups of ``first``, roll out further
    prompt batches from ``more`` while fewer than a batch's worth are kept (at most
    ``max_sampling_rounds`` rollouts in all), then keep the same number of groups on every
    rank. None when no rank kept a group (the iteration has no update)."""
    G, target = sec.group_size, sec.per_device_generation_batch_size
    parts, rounds, seen = [], 0, 0
    exp, _ = first
    while True:
        rounds += 1
        mask = informative_groups(exp, G)
        seen += mask.numel()
        parts.append(keep_groups(exp, mask.nonzero().squeeze(1), G))
        kept = sum(len(p) for p in parts) // G
        if rounds >= sec.max_sampling_rounds or min_across_ranks(kept, device) >= target:
            break
        batch = next(more, None)
        done = min_across_ranks(0 if batch is None else 1, device) == 0  # the data ends on some rank: stop everywhere
        if done:
            break
        exp, _ = score(batch)
    keep = whole_steps(min(min_across_ranks(kept, device), target), G, sec.per_device_train_batch_size,
                       sec.gradient_accumulation_steps)
    stats = {"sampling_rounds": float(rounds), "kept_groups": float(keep), "informative_share": kept / max(seen, 1)}
    if keep == 0:
        return None, stats
    exp = keep_groups(Experience.concat(parts), torch.arange(keep, device=device), G)
    return regroup(exp, sec), stats


def whole_steps(groups: int, group_size: int, micro_batch: int, accumulation: int) -> int:
    """The most groups, at most ``groups``, whose answers split into micro-batches that make
    whole optimizer steps: DeepSpeed steps after every ``accumulation`` micro-batches, so a
    remainder would be stepped together with the next iteration's first micro-batches,
    under normalisers counted for another step (one micro-batch is always a whole step)."""
    while groups > 0 and -(-groups * group_size // micro_batch) % accumulation:
        groups -= 1
    return groups


def regroup(exp: Experience, sec) -> Experience:
    """``exp`` with its advantages estimated again from its rewards (``scores``): a group
    estimator reads only a group's own rewards, so this changes nothing for group_norm,
    group_mean or rloo; reinforce_pp_baseline's batch statistics become the kept batch's
    (over every rank: every rank calls this, keep being the same on all)."""
    inputs = AdvantageInputs(scores=exp.scores, action_mask=exp.action_mask, group_size=sec.group_size,
                             sum_across_ranks=sum_across_ranks)
    return dataclasses.replace(exp, advantages=ADVANTAGES[sec.advantage](inputs).advantages)
