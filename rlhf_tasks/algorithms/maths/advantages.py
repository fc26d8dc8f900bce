"""Advantage estimators, registered by name (the config's ``<algo>.advantage``), and the
reward shaping they start from.

One contract::

    estimator(inputs: AdvantageInputs) -> Advantages(advantages (B, N), returns (B, N) | None)

- ``gae``: generalised advantage estimation from the critic's values over per-token rewards
  (the KL penalty on every token, the score on the last; PPO, Schulman et al. 2016);
- ``group_norm``: ``(r - group mean) / (group std + eps)`` (GRPO, Shao et al. 2024);
- ``group_mean``: ``r - group mean`` (Dr. GRPO, Liu et al. 2025: no std scaling);
- ``rloo``: ``r - mean of the other G - 1 rewards`` (RLOO, Ahmadian et al. 2024);
- ``reinforce_pp_baseline``: ``r - group mean``, then normalised to mean 0 and std 1 over
  every answer token of the batch (REINFORCE++-baseline, Hu et al. 2025, arXiv:2501.03262).

The group estimators take one scalar reward per answer, B = P * G rows with prompt p's G
answers adjacent (rows p*G .. p*G+G-1), and give every token of an answer its answer's
advantage. Pure functions of tensors: no model, no optimiser, no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .tokens import masked, masked_mean


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. ``scores``: (B,) each answer's reward (for the group
    estimators, minus the KL when it is paid in the reward); ``action_mask`` (B, N);
    ``group_size`` G; for ``gae``: ``token_rewards`` and ``values`` (B, N), ``gamma``, ``lam``.
    ``sum_across_ranks`` (a sum over the process group, identity for one process) lets a
    batch-level statistic cover every rank's share of the batch."""

    scores: torch.Tensor
    action_mask: torch.Tensor
    group_size: int = 1
    token_rewards: torch.Tensor | None = None
    values: torch.Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (B, N), 0 where masked
    returns: torch.Tensor | None  # (B, N) the critic's targets (gae), else None


ADVANTAGES: dict[str, Callable[[AdvantageInputs], Advantages]] = {}


def register_advantage(name: str):
    def wrap(fn: Callable[[AdvantageInputs], Advantages]) -> Callable[[AdvantageInputs], Advantages]:
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGES[name] = fn
        return fn
    return wrap


# -- PPO: per-token rewards and GAE -------------------------------------------------------------------

def compute_rewards(scores: torch.Tensor, action_log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                    action_mask: torch.Tensor, kl_coef: float,
                    clip_reward_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) scores and (B, N) log-probs -> (B, N) rewards and (B, N) per-token KL.

    Each answer token is penalised by ``kl_coef * (logp - logp_ref)``, the sampled
    estimate of its contribution to KL(pi || pi_ref), which keeps the policy near the
    SFT model. The RM scores the whole answer, so its score, clipped to
    +-clip_reward_value against reward-model outliers, is paid once, on the last
    answer token of each row. A row with an empty answer (mask all 0) gets nothing.
    """
    mask = action_mask.to(action_log_probs.dtype)
    kl = (action_log_probs - ref_log_probs) * mask  # (B, N), 0 off the answer
    rewards = -kl_coef * kl
    # Index of the last 1 in each row: the largest (position + 1) where masked, minus 1;
    # -1 for an empty row.
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # (N,)
    last = (mask.bool() * positions).amax(dim=-1) - 1  # (B,)
    has_answer = (last >= 0).to(rewards.dtype)
    score = scores.to(rewards.dtype).clamp(-clip_reward_value, clip_reward_value) * has_answer  # (B,)
    rewards = rewards.scatter_add(1, last.clamp_min(0).unsqueeze(1), score.unsqueeze(1))
    return rewards, kl


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over answer tokens, (B, N) -> (B, N), (B, N).

    Backwards over positions, for answer tokens only:
        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
    where V_next and A_next belong to the next *answer* token (0 after the last one:
    the episode ends at EOS). Masked positions are skipped entirely: they get A = 0 and
    pass V_next and A_next through unchanged, so padding anywhere changes nothing.
    returns = A + V is the critic's target (0 where masked).
    """
    mask = action_mask.to(values.dtype)
    B, N = values.shape
    next_value = values.new_zeros(B)
    next_adv = values.new_zeros(B)
    advantages = torch.zeros_like(values)
    for t in reversed(range(N)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # Where masked keep the carried values: the position is invisible to the recursion.
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_adv = torch.where(m.bool(), adv, next_adv)
    returns = (advantages + values) * mask
    return advantages, returns


@register_advantage("gae")
def gae(inputs: AdvantageInputs) -> Advantages:
    if inputs.values is None or inputs.token_rewards is None:
        raise ValueError("gae needs the critic's values and the per-token rewards")
    adv, returns = compute_gae(inputs.values, inputs.token_rewards, inputs.action_mask, inputs.gamma, inputs.lam)
    return Advantages(adv, returns)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise ``x`` to mean 0, variance 1 over the masked entries (population
    variance); 0 where masked. With ``shift_mean=False`` the original mean is kept and
    only the scale changes (for rewards, whose sign carries meaning). ``sum_across_ranks``:
    the statistics over every rank's entries."""
    if sum_across_ranks is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
    else:
        m = mask.to(x.dtype)
        n, s = (sum_across_ranks(torch.stack([m.sum(), masked(x, mask).sum()]))).unbind()
        mean = s / n.clamp_min(1e-8)
        var = sum_across_ranks(masked((x - mean) ** 2, mask).sum()) / n.clamp_min(1e-8)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return masked(out, mask)


# -- critic-free baselines: the other answers to the same prompt -----------------------------------

def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)  # (P, G)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(B,) rewards -> (B,) advantages ``r - mean_group`` (``/ (std_group + eps)`` with
    ``scale``). The std is the sample std (n - 1) of the G rewards; without the scaling
    (Dr. GRPO) prompts whose answers all score alike (std near 0) are not weighed up to
    the same magnitude as the informative ones."""
    g = _groups(rewards, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: (B,) rewards -> (B,) ``r_i - mean_{j != i} r_j`` over the other G - 1 answers
    to the same prompt; an unbiased baseline, as it never includes the answer's own reward."""
    g = _groups(rewards, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def per_token(answer_values: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, N): each answer token gets its answer's value, 0 where masked."""
    return masked(answer_values.unsqueeze(1).expand(action_mask.shape), action_mask)


@register_advantage("group_norm")
def group_norm(inputs: AdvantageInputs) -> Advantages:
    return Advantages(per_token(group_advantages(inputs.scores, inputs.group_size), inputs.action_mask), None)


@register_advantage("group_mean")
def group_mean(inputs: AdvantageInputs) -> Advantages:
    return Advantages(per_token(group_advantages(inputs.scores, inputs.group_size, scale=False),
                                inputs.action_mask), None)


@register_advantage("rloo")
def rloo(inputs: AdvantageInputs) -> Advantages:
    return Advantages(per_token(leave_one_out_advantages(inputs.scores, inputs.group_size), inputs.action_mask), None)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(inputs: AdvantageInputs) -> Advantages:
    centred = per_token(group_advantages(inputs.scores, inputs.group_size, scale=False), inputs.action_mask)
    return Advantages(whiten(centred, inputs.action_mask, sum_across_ranks=inputs.sum_across_ranks), None)


def sequence_kl(action_log_probs: torch.Tensor, ref_log_probs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B,) the sampled KL(pi || ref) of each answer, summed over its tokens (k1)."""
    return masked(action_log_probs - ref_log_probs, action_mask).sum(-1)


# -- the KL coefficient ------------------------------------------------------------------------------

class FixedKLController:
    """A constant KL coefficient; ``update`` is a no-op (same interface as the adaptive one)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps


class AdaptiveKLController:
    """Proportional controller of the KL coefficient (Ziegler et al. 2019, sec. 2.2).

    Steers the observed KL (nats per answer, summed over its tokens) towards
    ``target``: the error ``KL / target - 1`` is clipped to +-0.2 so one outlier batch
    cannot swing the coefficient, and the coefficient is multiplied by
    ``1 + error * n_steps / horizon``: ``horizon`` is the number of samples over which
    a persistent error compounds into roughly an e-fold change.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """``n_steps``: rollouts seen since the last update (the generation batch size)."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
