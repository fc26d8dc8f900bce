"""PPO's losses as pure functions of tensors.

Every loss is a token-level mean over the answer tokens of the whole micro-batch
(``action_mask``), so a long answer weighs more than a short one, as in
DeepSpeed-Chat. Shapes: B rollouts, N = T - 1 next-token positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, N, V) logits, (B, N) labels -> (B, N) log p(label).

    A full ``log_softmax`` would materialise a second (B, N, V) tensor (~2 GB for
    B=8, N=512, V=50k in fp32). Here the label's logit is gathered and only the
    normaliser ``logsumexp`` is computed, one row at a time, so the temporaries are
    (N, V). Half-precision logits are upcast per row: logsumexp in bf16 loses ~1e-2.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, N)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, N)
        return picked - lse
    rows = [F.log_softmax(row.float(), dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
            for row, lab in zip(logits, labels, strict=True)]
    return torch.stack(rows)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1; 0 (not NaN) where the mask is empty.

    Masked entries are selected away, not multiplied by 0: NaN * 0 is NaN, and padding
    positions may hold anything (log-probs of pad tokens, inf from a half-precision overflow).
    """
    keep = mask.bool()
    x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    mask = mask.to(x.dtype)
    if dim is None:
        return x.sum() / mask.sum().clamp_min(1e-8)
    return x.sum(dim) / mask.sum(dim).clamp_min(1e-8)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with 0 where ``mask`` is 0. Applied *before* any non-linearity: exp(garbage)
    at a masked position would be inf, and its gradient (0 * inf) NaN."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "token") -> torch.Tensor:
    """(B, N) per-token values -> a scalar. ``token``: the mean over every answer token of
    the batch (a long answer weighs more); ``sequence``: the mean over each answer's tokens,
    then over answers (each answer weighs the same, GRPO's original form)."""
    if how == "token":
        return masked_mean(x, mask)
    if how == "sequence":
        return masked_mean(x, mask, dim=-1).mean()
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {how!r}")


def policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, clip_eps: float,
                aggregation: str = "token") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, all (B, N) -> scalars.

    loss = -mean(min(r * A, clip(r, 1 - eps, 1 + eps) * A)), r = pi / pi_old, the mean
    taken as ``aggregation`` says (:func:`aggregate`).

    clip_fraction: share of answer tokens where the clipped term is the smaller one,
    i.e. whose gradient is cut off (r > 1+eps with A > 0, or r < 1-eps with A < 0).
    approx_kl: k3 estimator of KL(pi_old || pi), mean((r - 1) - log r) >= 0; a
    health signal for the step size, not a loss term. Both are detached.
    """
    log_ratio = _masked(log_probs - old_log_probs, action_mask)  # (B, N), 0 off the answer
    advantages = _masked(advantages, action_mask)
    ratio = log_ratio.exp()
    surr = ratio * advantages
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = aggregate(-torch.min(surr, surr_clipped), action_mask, aggregation)
    with torch.no_grad():
        clip_fraction = masked_mean((surr_clipped < surr).to(log_probs.dtype), action_mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, action_mask)
    return loss, clip_fraction, approx_kl


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, N) per-token k3 estimate of KL(pi || ref) (Schulman 2020): with d = ref - logp,
    exp(d) - d - 1 >= 0 for every token, unbiased under pi, lower variance than -d; 0 where
    masked. GRPO adds its mean to the loss."""
    d = _masked(ref_log_probs - log_probs, action_mask)
    return _masked(d.exp() - d - 1.0, action_mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor,
               clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, all (B, N) -> scalars.

    The new value may move at most ``clip_eps`` (in reward units) from the rollout's
    value; the loss is the larger of the clipped and unclipped squared errors, so
    clipping can only make the loss more pessimistic:
    loss = 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)).
    clip_fraction (detached): share of answer tokens where the clipped error is larger.
    """
    values, old_values, returns = (_masked(t, action_mask) for t in (values, old_values, returns))
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), action_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err).to(values.dtype), action_mask)
    return loss, clip_fraction
