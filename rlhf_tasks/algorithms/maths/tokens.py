"""Per-token quantities: log-probs from logits, masked means, and the three ways a loss's
per-token values become one number (``aggregate``).

Shapes: B answers (rows), N = T - 1 next-token positions, masked by ``action_mask``
(B, N): 1 on the answer tokens that count, 0 on the prompt and on padding. Masked entries
are *selected away*, never multiplied by 0: padding may hold anything (a pad token's
log-prob, inf from a half-precision overflow), and NaN * 0 is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


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


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with 0 where ``mask`` is 0. Applied *before* any non-linearity: exp(garbage)
    at a masked position would be inf, and its gradient (0 * inf) NaN."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1; 0 (not NaN) where the mask is empty."""
    x = masked(x, mask)
    mask = mask.to(x.dtype)
    if dim is None:
        return x.sum() / mask.sum().clamp_min(1e-8)
    return x.sum(dim) / mask.sum(dim).clamp_min(1e-8)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return masked(x, mask).sum() if dim is None else masked(x, mask).sum(dim)


@dataclass(frozen=True)
class Normaliser:
    """The denominators of a loss's means, so that a mean is taken over the whole optimizer
    step rather than over one micro-batch.

    An optimizer step is ``k`` micro-batches (gradient accumulation x ranks), whose gradients
    DeepSpeed *averages*. For the loss to be the mean over every token of the step, as DAPO
    specifies, each micro-batch divides its sum by ``tokens`` = the step's answer tokens / k
    (likewise ``sequences`` for per-answer means): then the average over the k micro-batches
    is the step's sum over the step's count, whatever the micro-batch size and the number of
    ranks. None: the micro-batch's own count (its own mean). ``max_answer_len``: Dr. GRPO's
    constant normaliser, the answer budget in tokens."""

    tokens: float | None = None
    sequences: float | None = None
    max_answer_len: int | None = None


OWN_MEAN = Normaliser()  # each micro-batch its own mean


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token-mean",
              norm: Normaliser = OWN_MEAN) -> torch.Tensor:
    """(B, N) per-token values -> a scalar.

    - ``token-mean``: sum over every answer token / their number (a long answer weighs
      more: DAPO, PPO as DeepSpeed-Chat);
    - ``seq-mean-token-mean``: each answer's token mean, then the mean over answers (every
      answer weighs the same: GRPO as published);
    - ``seq-mean-token-sum-norm``: each answer's token *sum* over a constant (the answer
      budget), then the mean over answers (Dr. GRPO: no per-answer length normalisation).
    """
    if how == "token-mean":
        denom = norm.tokens if norm.tokens is not None else mask.to(per_token.dtype).sum().clamp_min(1e-8)
        return masked_sum(per_token, mask) / denom
    rows = per_token.shape[0]
    denom = norm.sequences if norm.sequences is not None else max(rows, 1)
    if how == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=-1).sum() / denom
    if how == "seq-mean-token-sum-norm":
        if not norm.max_answer_len:
            raise ValueError("seq-mean-token-sum-norm needs norm.max_answer_len (the answer budget)")
        return masked_sum(per_token, mask, dim=-1).sum() / norm.max_answer_len / denom
    raise ValueError(f"aggregation must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm, got {how!r}")
