"""PPO maths against numbers worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_tasks.algorithms.maths.advantages import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    whiten,
)
from rlhf_tasks.algorithms.maths.policy import POLICY_LOSSES, LossSpec, value_loss
from rlhf_tasks.algorithms.maths.tokens import log_probs_from_logits, masked_mean
from rlhf_tasks.algorithms.rl.experience import Experience


def policy_loss(logp, old, adv, mask, eps):
    """PPO's registered loss as (loss, clip fraction, approx. KL)."""
    loss, m = POLICY_LOSSES["ppo"].fn(logp, old, adv, mask, LossSpec(eps, eps))
    return loss, m["clip_fraction"], m["approx_kl"]


def value_loss_(values, old, returns, mask, eps):
    loss, m = value_loss(values, old, returns, mask, eps)
    return loss, m["clip_fraction"]


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(a: torch.Tensor, b, tol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


# --- GAE ----------------------------------------------------------------------------------------

GAMMA, LAM = 0.9, 0.8  # gamma * lam = 0.72
# Three answer tokens: V = [1, 2, 0.5], r = [0, 0.5, 2].
# t=2 (last): delta = 2 + 0.9*0 - 0.5 = 1.5                 A2 = 1.5
# t=1:        delta = 0.5 + 0.9*0.5 - 2 = -1.05              A1 = -1.05 + 0.72*1.5 = 0.03
# t=0:        delta = 0 + 0.9*2 - 1 = 0.8                    A0 = 0.8 + 0.72*0.03 = 0.8216
# returns = A + V = [1.8216, 2.03, 2.0]
GAE_ADV = [0.8216, 0.03, 1.5]
GAE_RET = [1.8216, 2.03, 2.0]


def test_gae_by_hand():
    adv, ret = compute_gae(t([1.0, 2.0, 0.5]), t([0.0, 0.5, 2.0]), t([1, 1, 1]), GAMMA, LAM)
    assert close(adv, [GAE_ADV])
    assert close(ret, [GAE_RET])


def test_gae_masked_positions_change_nothing():
    # Row 0: a prompt position in front and a padding position after EOS, holding junk
    # values and rewards. Row 1: a hole in the middle. Both must give the 3-token answer.
    values = t([9.0, 1.0, 2.0, 0.5, 7.0], [1.0, 2.0, -4.0, 0.5, 0.0])
    rewards = t([3.0, 0.0, 0.5, 2.0, 5.0], [0.0, 0.5, 8.0, 2.0, 0.0])
    mask = t([0, 1, 1, 1, 0], [1, 1, 0, 1, 0])
    adv, ret = compute_gae(values, rewards, mask, GAMMA, LAM)
    a0, a1, a2 = GAE_ADV
    r0, r1, r2 = GAE_RET
    assert close(adv, [[0, a0, a1, a2, 0], [a0, a1, 0, a2, 0]])
    assert close(ret, [[0, r0, r1, r2, 0], [r0, r1, 0, r2, 0]])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t. r = [1, 2, 3], V = [0.5, 0.5, 0.5]:
    # reward-to-go [6, 5, 3] -> A = [5.5, 4.5, 2.5].
    adv, _ = compute_gae(t([0.5, 0.5, 0.5]), t([1.0, 2.0, 3.0]), t([1, 1, 1]), 1.0, 1.0)
    assert close(adv, [[5.5, 4.5, 2.5]])


# --- KL-penalised reward ------------------------------------------------------------------------


def test_rewards_kl_penalty_and_clipped_score_on_last_answer_token():
    kl_coef, clip = 0.1, 5.0
    logp = t([-1.0, -1.0, -2.0, -3.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0], [0.0, -2.0, -1.0, 0.0])
    ref = t([-2.0, -1.5, -1.0, -9.0], [-1.0, -1.0, -1.0, -1.0], [-5.0, -5.0, -5.0, -5.0], [0.0, -1.0, -1.0, 0.0])
    mask = t([0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0])
    scores = t(7.0, -8.0, 3.0, 1.5)
    rewards, kl = compute_rewards(scores, logp, ref, mask, kl_coef, clip)
    # Row 0: kl = (logp - ref) * mask = [0, 0.5, -1, 0]; -0.1 * kl = [0, -0.05, 0.1, 0];
    #        score 7 clipped to +5, added at the last answer token (index 2): 0.1 + 5 = 5.1.
    # Row 1: logp == ref, kl = 0; score -8 clipped to -5 at index 3.
    # Row 2: empty answer: no KL term, no score token, no crash.
    # Row 3: kl = [0, -1, 0, 0] -> +0.1 at index 1; score 1.5 is inside +-5, at index 2.
    assert close(kl, [[0, 0.5, -1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, -1, 0, 0]])
    assert close(rewards, [[0, -0.05, 5.1, 0], [0, 0, 0, -5], [0, 0, 0, 0], [0, 0.1, 1.5, 0]])


def test_rewards_all_rows_empty():
    rewards, kl = compute_rewards(t(2.0, -1.0), torch.zeros(2, 3, dtype=torch.float64),
                                  torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3), 0.1, 5.0)
    assert close(rewards, torch.zeros(2, 3)) and close(kl, torch.zeros(2, 3))


# --- policy and value losses --------------------------------------------------------------------


def test_policy_loss_clips_on_both_sides():
    eps = 0.2
    # Tokens: a) ratio 1.5, A=+1  b) ratio 0.5, A=-1  c) ratio 1.1, A=+2  d) ratio 1.5, A=-1
    #         e) masked (ratio 3, A=10).
    ratio = t([1.5, 0.5, 1.1, 1.5, 3.0])
    adv = t([1.0, -1.0, 2.0, -1.0, 10.0])
    mask = t([1, 1, 1, 1, 0])
    old = torch.zeros_like(ratio)
    logp = ratio.log().requires_grad_(True)
    loss, clip_frac, approx_kl = policy_loss(logp, old, adv, mask, eps)
    # a) min(1.5*1, 1.2*1) = 1.2      clipped (ratio above 1+eps, A > 0)   -> -1.2
    # b) min(0.5*-1, 0.8*-1) = -0.8   clipped (ratio below 1-eps, A < 0)   -> +0.8
    # c) 1.1 inside [0.8, 1.2]: 2.2   not clipped                          -> -2.2
    # d) min(1.5*-1, 1.2*-1) = -1.5   not clipped (pessimistic side)       -> +1.5
    # loss = (-1.2 + 0.8 - 2.2 + 1.5) / 4 = -1.1 / 4 = -0.275; clip fraction 2/4.
    assert close(loss, -0.275)
    assert close(clip_frac, 0.5)
    # k3 = (r - 1) - ln r per token, mean over the 4 answer tokens.
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 1.5)]
    assert close(approx_kl, sum(k3) / 4)
    # Clipped tokens get no gradient; unclipped ones d(-r*A/4)/dlogp = -r*A/4:
    # c) -1.1*2/4 = -0.55, d) -1.5*-1/4 = 0.375; the masked token none.
    loss.backward()
    assert close(logp.grad, [[0.0, 0.0, -0.55, 0.375, 0.0]])


@pytest.mark.parametrize("junk", [math.nan, math.inf, -math.inf, 1e4])
def test_losses_ignore_garbage_at_masked_positions(junk):
    """Masked positions (prompt, padding after EOS) may hold anything: NaN or inf log-probs
    of pad tokens, a huge log-ratio that exp() overflows. The loss, its gradient and the
    stats must equal those of the clean tensors, and the masked gradient must be 0."""
    eps = 0.2
    mask = t([0, 1, 1, 1, 0], [1, 1, 0, 0, 0])
    clean_logp = t([0.0, -1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0, 0.0])
    old = t([0.0, -1.2, -1.9, -0.4, 0.0], [-0.2, -0.9, 0.0, 0.0, 0.0])
    adv = t([0.0, 0.5, -1.0, 2.0, 0.0], [1.0, -0.5, 0.0, 0.0, 0.0])
    dirty = mask == 0
    results = []
    for garbage in (False, True):
        logp = clean_logp.clone()
        a, o = adv.clone(), old.clone()
        if garbage:
            logp[dirty], a[dirty], o[dirty] = junk, junk, -junk
        logp.requires_grad_(True)
        loss, clip_frac, approx_kl = policy_loss(logp, o, a, mask, eps)
        loss.backward()
        results.append((loss.detach(), clip_frac, approx_kl, logp.grad))
    (l0, c0, k0, g0), (l1, c1, k1, g1) = results
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    assert close(l1, l0.item()) and close(c1, c0.item()) and close(k1, k0.item())
    assert torch.equal(g1, g0) and (g1[dirty] == 0).all()

    values = t([0.0, 1.0, 2.0, 0.5, 0.0], [0.3, -0.2, 0.0, 0.0, 0.0])
    clean = value_loss_(values, values - 0.1, values + 0.3, mask, eps)
    v = values.clone()
    v[dirty] = junk
    v.requires_grad_(True)
    ret = values + 0.3
    ret[dirty] = junk
    loss, clip_frac = value_loss_(v, v.detach() - 0.1, ret, mask, eps)
    loss.backward()
    assert close(loss.detach(), clean[0].item()) and close(clip_frac, clean[1].item())
    assert torch.isfinite(v.grad).all() and (v.grad[dirty] == 0).all()
    assert torch.isfinite(whiten(v.detach(), mask)).all()  # whitening too


def test_value_loss_clipping():
    eps = 0.2
    old = t([1.0, 1.0, 1.0, 5.0])
    new = t([1.5, 1.5, 0.9, -5.0])
    ret = t([2.0, 1.0, 0.0, 0.0])
    mask = t([1, 1, 1, 0])
    loss, clip_frac = value_loss_(new, old, ret, mask, eps)
    # a) clipped V = 1 + 0.2 = 1.2: (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped is larger)
    # b) clipped V = 1.2:           (1.5-1)^2 = 0.25, (1.2-1)^2 = 0.04 -> 0.25
    # c) 0.9 within 0.2 of 1:       (0.9-0)^2 = 0.81 both             -> 0.81
    # loss = 0.5 * (0.64 + 0.25 + 0.81) / 3 = 0.5 * 1.7 / 3; clip fraction 1/3.
    assert close(loss, 0.5 * 1.7 / 3)
    assert close(clip_frac, 1 / 3)


def test_masked_mean_and_log_probs():
    assert close(masked_mean(t([1.0, 2.0, 30.0]), t([1, 1, 0])), 1.5)
    assert close(masked_mean(t([1.0, 2.0]), t([0, 0])), 0.0)  # empty mask: 0, not NaN
    assert close(masked_mean(t([1.0, 3.0], [5.0, 7.0]), t([1, 1], [1, 0]), dim=1), [2.0, 5.0])
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    want = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(log_probs_from_logits(logits, labels), want, atol=1e-5)
    got_bf16 = log_probs_from_logits(logits.bfloat16(), labels)
    assert got_bf16.dtype == torch.float32 and torch.allclose(got_bf16, want, atol=5e-2)
    # By hand: two equal logits -> log(1/2).
    assert close(log_probs_from_logits(torch.zeros(1, 1, 2), torch.tensor([[1]])), math.log(0.5), tol=1e-6)


# --- whitening, KL controllers ------------------------------------------------------------------


def test_whiten():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    # mean over the mask = 2, population variance = (1 + 0 + 1) / 3 = 2/3, std = 0.8164966
    # (x - 2) / std = [-1.2247449, 0, 1.2247449]; the masked entry is 0.
    s = 1 / math.sqrt(2 / 3)
    assert close(whiten(x, mask), [[-s, 0.0, s, 0.0]], tol=1e-6)
    assert close(whiten(x, mask, shift_mean=False), [[2 - s, 2.0, 2 + s, 0.0]], tol=1e-6)


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # KL too high: error 12/6 - 1 = 1, clipped to 0.2: x(1 + 0.2*100/10000)
    assert ctl.value == pytest.approx(0.1 * 1.002)
    before = ctl.value
    ctl.update(3.0, n_steps=100)  # KL too low: error -0.5, clipped to -0.2: x(1 - 0.002)
    assert ctl.value == pytest.approx(before * 0.998) and ctl.value < before
    before = ctl.value
    ctl.update(6.6, n_steps=100)  # small error 0.1, not clipped: x(1 + 0.001)
    assert ctl.value == pytest.approx(before * 1.001)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 8)
    assert fixed.value == 0.05


# --- Experience ---------------------------------------------------------------------------------


def make_experience(B: int = 5, T: int = 4) -> Experience:
    per_action = {k: torch.arange(B * (T - 1), dtype=torch.float32).view(B, T - 1) + i
                  for i, k in enumerate(("action_mask", "action_log_probs", "ref_log_probs", "values", "advantages",
                                         "returns"))}
    return Experience(sequences=torch.arange(B * T).view(B, T), attention_mask=torch.ones(B, T, dtype=torch.long),
                      scores=torch.arange(B, dtype=torch.float32), prompt_len=2, **per_action)


def test_experience_split_to_detach():
    exp = make_experience()
    parts = exp.split(2)
    assert [len(p) for p in parts] == [2, 2, 1]
    assert all(p.prompt_len == 2 and p.sequences.shape[1] == 4 for p in parts)
    assert torch.equal(torch.cat([p.values for p in parts]), exp.values)
    assert torch.equal(parts[2].scores, torch.tensor([4.0]))
    assert torch.equal(parts[1].sequences, exp.sequences[2:4])
    assert len(exp.split(8)) == 1
    moved = exp.to("cpu").detach()
    assert torch.equal(moved.returns, exp.returns) and not moved.returns.requires_grad
    with pytest.raises(ValueError):
        exp.split(0)


def test_experience_rejects_misaligned_shapes():
    exp = make_experience()
    with pytest.raises(ValueError, match="values"):
        Experience(**{**exp.__dict__, "values": torch.zeros(5, 4)})
