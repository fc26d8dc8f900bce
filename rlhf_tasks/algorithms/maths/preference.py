"""Losses on preferences: the reward model's pairwise loss and DPO's, as pure functions
(rlhf_tasks/algorithms/reward.py and dpo.py are the stages around them).

The reward model (Bradley-Terry, as InstructGPT and DeepSpeed-Chat's step 2): for scores
r_w of the chosen and r_l of the rejected answer, ``-log sigmoid(r_w - r_l)``.

DPO: for a pair (prompt x, chosen y_w, rejected y_l), the policy pi and the frozen reference
pi_ref (the SFT actor), with log-probs summed over the answer tokens:

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]   (nats)

- ``sigmoid`` (DPO, Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta h)``; with label
  smoothing eps (conservative DPO: a share eps of the labels taken to be flipped),
  ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
- ``ipo`` (IPO, Azar et al. 2023, eq. 17): ``(h - 1/(2 beta))^2``, where the stage passes
  log-probs *averaged* over each answer's tokens (as TRL does), so that the target margin
  1/(2 beta) does not depend on answer length.

The implicit reward of an answer is ``beta x (log pi - log pi_ref)``; at pi = pi_ref every
reward is 0 and the sigmoid loss is log 2 whatever eps is.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo"]


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of a reward model: -log sigmoid(r_chosen - r_rejected), mean over pairs."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def answer_log_probs(token_log_probs: torch.Tensor, answer_mask: torch.Tensor,
                     average: bool = False) -> torch.Tensor:
    """(B, N) per-token log-probs, (B, N) answer mask -> (B,) their sum over the answer
    tokens (or mean, ``average``). Masked positions are selected away, not multiplied by 0,
    so a non-finite value on padding cannot leak in."""
    mask = answer_mask.bool()
    total = torch.where(mask, token_log_probs, torch.zeros_like(token_log_probs)).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: LossType = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four (B,) log-probs -> (mean loss, (B,) chosen rewards, (B,) rejected rewards).

    The rewards are detached: they are what the metrics report, not part of the graph."""
    if beta <= 0:
        raise ValueError(f"beta={beta}: must be > 0")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 0.5)")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to loss_type=sigmoid only")
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: expected 'sigmoid' or 'ipo'")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """() share of pairs whose implicit reward ranks chosen above rejected; a tie counts
    half, so the untrained policy (every reward 0) is at chance, 0.5."""
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).mean()


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probs of the chosen answers and (B,) their token counts -> the mean
    per-token negative log-likelihood, RPO's term beside the DPO loss."""
    return (-policy_chosen_logps / chosen_tokens.clamp_min(1)).mean()
