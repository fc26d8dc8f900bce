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

KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8), on unpaired answers, each desirable or
undesirable: with ``r = log pi(y|x) - log pi_ref(y|x)`` (summed over the answer, nats) and the
reference point ``z0 = max(0, KL)``, KL the mean of ``r`` over mismatched prompt/answer pairs
(detached: a baseline, not a target),

    desirable:    lambda_D x (1 - sigmoid(beta (r - z0)))
    undesirable:  lambda_U x (1 - sigmoid(beta (z0 - r)))

averaged over the answers (``lambda_y - v(x, y)`` of the paper). At pi = pi_ref every value is
``lambda_y / 2``.
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


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B,) log-probs of each answer under the policy and the reference, (B,) ``desirable``
    (1/0), ``kl`` () the mean log-ratio on mismatched pairs -> (mean loss, metrics): ``rewards``
    (B,) the implicit rewards ``beta x r`` and ``z0`` (), both detached."""
    if beta <= 0:
        raise ValueError(f"beta={beta}: must be > 0")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(f"desirable_weight={desirable_weight}, undesirable_weight={undesirable_weight}: must be > 0")
    ratio = policy_logps - ref_logps  # (B,) nats
    z0 = kl.detach().clamp_min(0)
    good = desirable.bool()
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))  # (B,)
    return losses.mean(), {"rewards": beta * ratio.detach(), "z0": z0}


def mean_log_ratio(policy_logps: torch.Tensor, ref_logps: torch.Tensor, sum_across_ranks=None) -> torch.Tensor:
    """() the mean of ``log pi - log pi_ref`` over (B,) answers, and over every rank's answers
    with ``sum_across_ranks``: KTO's KL estimate on mismatched pairs, detached (0 for none)."""
    with torch.no_grad():
        diff = (policy_logps - ref_logps).double()
        total = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)])
        if sum_across_ranks is not None:
            total = sum_across_ranks(total)
        return (total[0] / total[1].clamp_min(1)).float()


def reward_auc(rewards: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """() the share of (desirable, undesirable) answer pairs whose implicit reward ranks the
    desirable one higher, a tie counting half (the ROC AUC; 0.5 at the start, every reward 0,
    and when either kind is missing). Unpaired answers have no partner of their own: every
    desirable answer is compared with every undesirable one."""
    good = desirable.bool()
    d, u = rewards[good].double(), rewards[~good].double().sort().values
    if not len(d) or not len(u):
        return torch.tensor(0.5)
    below = torch.searchsorted(u, d, right=False)  # undesirable answers strictly below each desirable one
    below_or_tied = torch.searchsorted(u, d, right=True)
    return ((below + below_or_tied).double() / 2).sum() / (len(d) * len(u))
