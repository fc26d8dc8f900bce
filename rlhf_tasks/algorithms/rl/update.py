"""The RL update: ``ppo_epochs`` passes over micro-batches of one :class:`Experience`, the
section's policy loss on the actor (plus the KL as a loss term where the section puts it
there, and PPO's mixed-in language-modelling loss), PPO's value loss on the critic.

Means are over the optimizer step. DeepSpeed averages the gradients of an optimizer step's
micro-batches (``gradient_accumulation_steps`` on every rank); each micro-batch therefore
divides its sums by its step's count (tokens, answers: counted over every rank) over that
number of micro-batches (:func:`step_normalisers`), so that a token-level mean is the mean
over every token of the step (DAPO) whatever the micro-batch size and the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ...runtime.ranks import sum_across_ranks, world_size
from ..lm_head import lm_loss
from ..maths.policy import POLICY_LOSSES, kl_k3, value_loss
from ..maths.tokens import Normaliser, aggregate, masked_mean
from .experience import Experience
from .models import Models, actor_log_probs


def step_normalisers(micro_batches: list[Experience], accumulation: int, max_answer_len: int) -> list[Normaliser]:
    """One :class:`Normaliser` per micro-batch: its optimizer step's answer tokens and
    answers, summed over the step's micro-batches and over the ranks (one collective), each
    divided by the number of micro-batches DeepSpeed averages over (accumulation x ranks)."""
    if not micro_batches:
        return []
    device = micro_batches[0].action_mask.device
    counts = torch.stack([torch.stack([mb.action_mask.sum().double(), torch.tensor(float(len(mb)), device=device,
                                                                                  dtype=torch.float64)])
                          for mb in micro_batches])  # (M, 2): tokens, answers
    steps = [counts[i:i + accumulation].sum(0) for i in range(0, len(counts), accumulation)]
    per_step = (sum_across_ranks(torch.stack(steps)) / (accumulation * world_size())).tolist()  # one sync
    return [Normaliser(tokens=max(per_step[i // accumulation][0], 1e-8), sequences=max(per_step[i // accumulation][1], 1.0),
                       max_answer_len=max_answer_len) for i in range(len(micro_batches))]


def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    for k, v in metrics.items():
        v = v.detach().float()
        sums[k] = sums[k] + v if k in sums else v


def update(m: Models, exp: Experience, sec, kl_coef: float, max_answer_len: int,
           unsupervised: Iterator[dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
    """``ppo_epochs`` passes over ``exp``; the mean of each metric over the micro-batches
    and the ranks (one collective, one host sync)."""
    loss_fn = POLICY_LOSSES[sec.loss]
    micro = exp.split(sec.per_device_train_batch_size)
    norms = step_normalisers(micro, sec.gradient_accumulation_steps, max_answer_len)
    kl_in_loss = sec.kl_penalty == "loss"
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for _ in range(sec.ppo_epochs):
        for mb, norm in zip(micro, norms, strict=True):
            logp = actor_log_probs(m.actor, mb.sequences, mb.attention_mask, mb.action_mask)
            spec = loss_fn.spec(sec.cliprange, sec.cliprange_high, norm)
            policy, metrics = loss_fn.fn(logp, mb.action_log_probs, mb.advantages, mb.action_mask, spec)
            loss = policy
            step = {"policy_loss": policy, "actor_clip_fraction": metrics["clip_fraction"],
                    "approx_kl": metrics["approx_kl"], "entropy_proxy": -masked_mean(logp, mb.action_mask)}
            if kl_in_loss:
                kl_loss = aggregate(kl_k3(logp, mb.ref_log_probs, mb.action_mask), mb.action_mask, spec.aggregation,
                                    norm)
                loss = loss + kl_coef * kl_loss
                step["kl_loss"] = kl_loss
            step["actor_loss"] = loss
            m.actor.backward(loss)
            m.actor.step()
            if unsupervised is not None:
                b = next(unsupervised)
                u_loss, _ = lm_loss(m.actor, b["input_ids"], b["attention_mask"], b["labels"])
                m.actor.backward(sec.unsupervised_coef * u_loss)
                m.actor.step()
                step["unsupervised_loss"] = u_loss
            if m.critic is not None:
                values = m.critic(mb.sequences, mb.attention_mask)[:, :-1].float()
                c_loss, c_metrics = value_loss(values, mb.values, mb.returns, mb.action_mask, sec.cliprange_value,
                                               norm)
                m.critic.backward(c_loss)
                m.critic.step()
                step.update(critic_loss=c_loss, critic_clip_fraction=c_metrics["clip_fraction"])
            _accumulate(sums, step)
            n += 1
    if not sums:
        return {}
    keys = sorted(sums)
    means = sum_across_ranks(torch.stack([sums[k] for k in keys])) / (n * world_size())
    return dict(zip(keys, means.tolist(), strict=True))
