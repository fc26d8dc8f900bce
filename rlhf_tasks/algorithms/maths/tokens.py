"""Per-token quantities: log-probs (from logits, or from hidden states through the LM
head in chunks of tokens), masked means, and the three ways a loss's per-token values
become one number (``aggregate``).

Shapes: B answers (rows), N = T - 1 next-token positions, masked by ``action_mask``
(B, N): 1 on the answer tokens that count, 0 on the prompt and on padding. Masked entries
are *selected away*, never multiplied by 0: padding may hold anything (a pad token's
log-prob, inf from a half-precision overflow), and NaN * 0 is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

# The most fp32 logits that exist at once on the head path: 64 MiB is 341 tokens of a
# 49,152 vocabulary (SmolLM2), 130 of Llama 3's 128,256. A chunk is one matmul of that
# many rows, large enough to keep a GPU's tensor cores busy.
LOGITS_CHUNK_BYTES = 64 * 2**20


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


def chunk_rows(vocab: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(vocab, 1)))


def _head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                 softcap: float | None) -> torch.Tensor:
    """(C, H) hidden -> (C, V) fp32 logits, as the model's head makes them: the matmul in
    the model's dtype (what ``lm_head`` does), then fp32; a logit scale (Cohere, Granite)
    and soft-capping ``c tanh(z / c)`` (Gemma 2/3) after it."""
    z = F.linear(h, weight, bias).float()
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def _picked(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


class _HeadLogProbs(torch.autograd.Function):
    """log p(label) through the LM head, chunk by chunk (see :func:`log_probs_from_hidden`).

    Backward, per chunk, with g the incoming (C,) gradient and p = softmax(logits):
    d logits = g (onehot(label) - p), through the soft-cap's derivative 1 - (l / c)^2 and
    the scale, then d hidden = d z W, d W = d z^T h and d bias = sum d z, the matmuls in the
    model's dtype as autograd through ``lm_head`` would do them. One chunk: its log-softmax
    is kept from the forward, as autograd would keep it. Several: each chunk's logits are
    recomputed, so that at most one chunk of them exists at any time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, softcap, rows):
        outs, logp = [], None
        for h, y in zip(hidden.split(rows), labels.split(rows), strict=True):
            logp = F.log_softmax(_head_logits(h, weight, bias, scale, softcap), dim=-1)  # (C, V)
            outs.append(_picked(logp, y))
        kept = logp if len(outs) == 1 else None
        ctx.save_for_backward(hidden, weight, bias, labels, kept)
        ctx.scale, ctx.softcap, ctx.rows = scale, softcap, rows
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight, d_biases, single = None, [], kept is not None
        for start in range(0, hidden.shape[0], ctx.rows):
            sl = slice(start, start + ctx.rows)
            h, y, g = hidden[sl], labels[sl], grad[sl].float().unsqueeze(-1)  # g: (C, 1)
            logp = kept if kept is not None else F.log_softmax(
                _head_logits(h, weight, bias, ctx.scale, ctx.softcap), dim=-1)
            d = logp.exp_().mul_(-g)  # (C, V): -g p, in the log-softmax's memory
            d.scatter_add_(-1, y.clamp_min(0).unsqueeze(-1), g)
            if ctx.softcap:  # l = c tanh(z / c): dl/dz = 1 - (l / c)^2
                l_c = _head_logits(h, weight, bias, ctx.scale, ctx.softcap).div_(ctx.softcap)
                d.mul_(l_c.mul_(l_c).neg_().add_(1))
                del l_c
            if ctx.scale != 1.0:
                d.mul_(ctx.scale)
            d = d.to(hidden.dtype)
            if need_h:
                d_hidden[sl] = d @ weight
            if need_w:
                d_weight = _accumulate(d_weight, d, h, single)
            if need_b:
                d_biases.append(d.float().sum(0))
        d_bias = torch.stack(d_biases).sum(0).to(bias.dtype) if d_biases else None
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), d_bias, None, None, None, None


def _accumulate(total: torch.Tensor | None, d: torch.Tensor, h: torch.Tensor, single: bool) -> torch.Tensor:
    """``total + d^T h`` (V, H): one chunk gives autograd's own matmul; several add up in one
    fp32 buffer (an fp32 model's straight into it, no (V, H) temporary)."""
    if single:
        return d.t() @ h
    if total is None:
        total = torch.zeros(d.shape[1], h.shape[1], dtype=torch.float32, device=h.device)
    if h.dtype == torch.float32:
        return total.addmm_(d.t(), h)
    return total.add_(d.t() @ h)


def log_probs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, *, scale: float = 1.0, softcap: float | None = None,
                          chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """(N, H) final hidden states, the LM head's (V, H) weight (and (V,) bias), (N,) labels
    -> (N,) fp32 log p(label): the values and gradients of ``log_softmax(lm_head(h))``
    at the labels, without the (N, V) logits ever existing whole: at most ``chunk_bytes``
    of fp32 logits (and their log-softmax) at a time, forward and backward. A label < 0
    (an ignore_index) reads token 0: such positions are the caller's to select away."""
    softcap = softcap if softcap and math.isfinite(softcap) else None
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    rows = chunk_rows(weight.shape[0], chunk_bytes)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _HeadLogProbs.apply(hidden, weight, bias, labels, float(scale), softcap, rows)
    outs = [_picked(F.log_softmax(_head_logits(h, weight, bias, scale, softcap), dim=-1), y)
            for h, y in zip(hidden.split(rows), labels.split(rows), strict=True)]
    return torch.cat(outs)


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
