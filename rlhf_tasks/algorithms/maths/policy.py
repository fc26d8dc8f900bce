"""Policy losses, registered by name (the config's ``<algo>.loss``), and the value loss.

Every policy loss has one contract::

    loss_fn(log_probs, old_log_probs, advantages, action_mask, spec) -> (loss, metrics)

all tensors (B, N) over next-token positions (``advantages`` per token: a group
estimator's answer-level advantage repeated over the answer's tokens), ``spec`` the
numbers the loss reads (:class:`LossSpec`: clip range, aggregation, normaliser), ``loss``
a scalar to backpropagate and ``metrics`` detached scalar tensors (no host sync here).
With ``r = exp(log_probs - old_log_probs)`` the importance ratio of the policy being
trained over the one that sampled:

- ``ppo``: PPO's clipped surrogate ``-min(r A, clip(r, 1-e, 1+e) A)``, a token mean
  (DeepSpeed-Chat's step 3);
- ``grpo``: the same surrogate, each answer's token mean then the mean over answers
  (GRPO, Shao et al. 2024, eq. 3);
- ``dr_grpo``: the same surrogate, each answer's token *sum* over the answer budget, the
  mean over answers: no per-answer length normalisation (Dr. GRPO, Liu et al. 2025, eq. 2);
- ``dapo``: the surrogate with clip-higher (``1 - e_low``, ``1 + e_high``; 0.2, 0.28) and a
  token mean over every token of the optimizer step (DAPO, Yu et al. 2025, eq. 8);
- ``gspo``: a sequence-level ratio ``s = exp(mean_t log r_t)`` clipped per answer,
  ``-min(s A, clip(s, 1-e_low, 1+e_high) A)`` averaged over answers (GSPO, Zheng et al.
  2025, eq. 5-7; ranges 3e-4 and 4e-4);
- ``cispo``: the clipped importance weight, stop-gradient, on every token's REINFORCE
  term: ``-sg(clip(r, 1-e_low, 1+e_high)) A log pi``, a token mean (CISPO, MiniMax-M1,
  Chen et al. 2025, eq. 4; no lower bound: e_low = 1).

``clip_fraction`` is the share of tokens (answers for gspo) whose gradient the clip cuts
off (for cispo: whose weight it changes); ``approx_kl`` the k3 estimate of KL(pi_old || pi).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .tokens import OWN_MEAN, Aggregation, Normaliser, aggregate, masked, masked_mean

Metrics = dict[str, torch.Tensor]
PolicyLossFn = Callable[..., tuple[torch.Tensor, Metrics]]


@dataclass(frozen=True)
class LossSpec:
    """What a policy loss reads besides tensors: numbers only, never a config object."""

    clip_low: float = 0.2  # the ratio's lower bound is 1 - clip_low
    clip_high: float = 0.2  # its upper bound 1 + clip_high
    aggregation: Aggregation = "token-mean"
    norm: Normaliser = OWN_MEAN


@dataclass(frozen=True)
class RegisteredLoss:
    fn: PolicyLossFn
    clip: tuple[float, float]  # the paper's (clip_low, clip_high)
    aggregation: Aggregation
    sequence_level: bool = False  # needs one advantage per answer (its ratio is per answer)

    def spec(self, clip_low: float | None = None, clip_high: float | None = None,
             norm: Normaliser = OWN_MEAN) -> LossSpec:
        """The loss's spec: the given clip range where set, else the loss's own."""
        low = self.clip[0] if clip_low is None else clip_low
        high = self.clip[1] if clip_high is None else clip_high
        return LossSpec(low, high, self.aggregation, norm)


POLICY_LOSSES: dict[str, RegisteredLoss] = {}


def register_policy_loss(name: str, *, clip: tuple[float, float] = (0.2, 0.2),
                         aggregation: Aggregation = "token-mean", sequence_level: bool = False):
    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = RegisteredLoss(fn, clip, aggregation, sequence_level)
        return fn
    return wrap


def _ratio_stats(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_old || pi) per token, mean over the answer tokens (>= 0)."""
    with torch.no_grad():
        return masked_mean(log_ratio.exp() - 1.0 - log_ratio, mask)


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      action_mask: torch.Tensor, spec: LossSpec = LossSpec()) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate per token, aggregated as ``spec`` says (ppo, grpo, dr_grpo, dapo)."""
    log_ratio = masked(log_probs - old_log_probs, action_mask)  # (B, N), 0 off the answer
    advantages = masked(advantages, action_mask)
    ratio = log_ratio.exp()
    surr = ratio * advantages
    surr_clipped = ratio.clamp(1.0 - spec.clip_low, 1.0 + spec.clip_high) * advantages
    loss = aggregate(-torch.min(surr, surr_clipped), action_mask, spec.aggregation, spec.norm)
    with torch.no_grad():
        clip_fraction = masked_mean((surr_clipped < surr).to(log_probs.dtype), action_mask)
    return loss, {"clip_fraction": clip_fraction, "approx_kl": _ratio_stats(log_ratio, action_mask)}


for _name, _clip, _agg in (("ppo", (0.2, 0.2), "token-mean"), ("grpo", (0.2, 0.2), "seq-mean-token-mean"),
                           ("dr_grpo", (0.2, 0.2), "seq-mean-token-sum-norm"), ("dapo", (0.2, 0.28), "token-mean")):
    register_policy_loss(_name, clip=_clip, aggregation=_agg)(clipped_surrogate)


@register_policy_loss("gspo", clip=(3e-4, 4e-4), aggregation="seq-mean-token-mean", sequence_level=True)
def gspo(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, action_mask: torch.Tensor,
         spec: LossSpec = LossSpec()) -> tuple[torch.Tensor, Metrics]:
    """GSPO: s_i = exp(mean over answer i's tokens of log r), clipped per answer; the
    answer's advantage is the mean of its per-token advantages (a group estimator repeats
    one value). Answers without tokens contribute nothing."""
    log_ratio = masked(log_probs - old_log_probs, action_mask)
    seq_log_ratio = masked_mean(log_ratio, action_mask, dim=-1)  # (B,)
    seq_adv = masked_mean(advantages, action_mask, dim=-1)  # (B,)
    ratio = seq_log_ratio.exp()
    surr = ratio * seq_adv
    surr_clipped = ratio.clamp(1.0 - spec.clip_low, 1.0 + spec.clip_high) * seq_adv
    has_answer = action_mask.sum(-1) > 0
    per_answer = torch.where(has_answer, -torch.min(surr, surr_clipped), torch.zeros_like(surr))  # (B,)
    denom = spec.norm.sequences if spec.norm.sequences is not None else max(per_answer.shape[0], 1)
    loss = per_answer.sum() / denom
    with torch.no_grad():
        clipped = ((surr_clipped < surr) & has_answer).to(log_probs.dtype)
        clip_fraction = clipped.sum() / has_answer.sum().clamp_min(1)
    return loss, {"clip_fraction": clip_fraction, "approx_kl": _ratio_stats(log_ratio, action_mask)}


@register_policy_loss("cispo", clip=(1.0, 0.28), aggregation="token-mean")
def cispo(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, action_mask: torch.Tensor,
          spec: LossSpec = LossSpec()) -> tuple[torch.Tensor, Metrics]:
    """CISPO: -sg(clip(r, 1 - e_low, 1 + e_high)) x A x log pi per token: every token keeps
    a gradient (PPO's clip drops the clipped tokens'), with a bounded weight."""
    log_ratio = masked(log_probs - old_log_probs, action_mask)
    ratio = log_ratio.exp()
    weight = ratio.clamp(1.0 - spec.clip_low, 1.0 + spec.clip_high).detach()
    per_token = -weight * masked(advantages, action_mask) * masked(log_probs, action_mask)
    loss = aggregate(per_token, action_mask, spec.aggregation, spec.norm)
    with torch.no_grad():
        clip_fraction = masked_mean((weight != ratio).to(log_probs.dtype), action_mask)
    return loss, {"clip_fraction": clip_fraction, "approx_kl": _ratio_stats(log_ratio, action_mask)}


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) per-token k3 estimate of KL(pi || ref) (Schulman 2020): with d = ref - logp,
    exp(d) - d - 1 >= 0 for every token, unbiased under pi, lower variance than -d; 0 where
    masked. GRPO adds it to the loss, aggregated as the policy loss is."""
    d = masked(ref_log_probs - log_probs, action_mask)
    return masked(d.exp() - d - 1.0, action_mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor,
               clip_eps: float, norm: Normaliser = OWN_MEAN) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped value loss, all (B, N) -> a token mean.

    The new value may move at most ``clip_eps`` (in reward units) from the rollout's
    value; the loss is the larger of the clipped and unclipped squared errors, so
    clipping can only make the loss more pessimistic:
    loss = 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)).
    clip_fraction (detached): share of answer tokens where the clipped error is larger.
    """
    values, old_values, returns = (masked(t, action_mask) for t in (values, old_values, returns))
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.max(err, err_clipped), action_mask, "token-mean", norm)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err).to(values.dtype), action_mask)
    return loss, {"clip_fraction": clip_fraction}
