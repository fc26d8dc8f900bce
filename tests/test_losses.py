"""The loss set against its papers' formulas, with the arithmetic worked out by hand in the
comments: every registered policy loss (ppo, grpo, dr_grpo, dapo, gspo, cispo), every
advantage estimator, masks with padding and garbage, and the step-level means that the
update takes over several micro-batches (tests/test_rl_steps.py: over 2 real ranks, the
Experience record and DAPO's dynamic sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_tasks.algorithms.maths.advantages import ADVANTAGES, AdvantageInputs, compute_gae
from rlhf_tasks.algorithms.maths.policy import POLICY_LOSSES, LossSpec, kl_k3
from rlhf_tasks.algorithms.maths.tokens import OWN_MEAN, Normaliser, aggregate
from rlhf_tasks.algorithms.rl.experience import Experience
from rlhf_tasks.algorithms.rl.update import step_normalisers


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(a: torch.Tensor, b, tol: float = 1e-6) -> bool:
    return torch.allclose(a.detach(), torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


# --- one batch, worked by hand --------------------------------------------------------------------
#
# Two answers over N = 5 next-token positions. Answer 0: 3 tokens (positions 1-3) with
# importance ratios r = pi / pi_old = 1.5, 0.9, 1.25 and advantage A = +1; answer 1: 1 token
# (position 1) with r = 0.5 and A = -2. Position 0 is the prompt, the rest padding.
# pi_old's log-probs are 0, so log pi = log r.
MASK = t([0, 1, 1, 1, 0], [0, 1, 0, 0, 0])
RATIOS = t([1.0, 1.5, 0.9, 1.25, 1.0], [1.0, 0.5, 1.0, 1.0, 1.0])
ADV = t([1.0, 1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, -2.0, -2.0])
BUDGET = 4  # Dr. GRPO's constant: the answer budget in tokens


def run_loss(name: str, spec: LossSpec | None = None, ratios: torch.Tensor = RATIOS, mask: torch.Tensor = MASK,
             adv: torch.Tensor = ADV):
    """(loss, metrics, d loss / d log pi) of the registered loss ``name`` (its own spec by default)."""
    reg = POLICY_LOSSES[name]
    spec = spec or reg.spec(norm=Normaliser(max_answer_len=BUDGET))
    logp = ratios.log().requires_grad_(True)
    loss, metrics = reg.fn(logp, torch.zeros_like(logp), adv, mask, spec)
    loss.backward()
    return loss.detach(), metrics, logp.grad


def test_ppo_clips_both_sides_and_averages_over_tokens():
    loss, m, grad = run_loss("ppo")
    # eps 0.2, per token -min(r A, clip(r, 0.8, 1.2) A):
    #   r 1.5,  A +1: min(1.5, 1.2) = 1.2       clipped  -> -1.2
    #   r 0.9,  A +1: 0.9 inside               kept     -> -0.9
    #   r 1.25, A +1: min(1.25, 1.2) = 1.2      clipped  -> -1.2
    #   r 0.5,  A -2: min(-1.0, 0.8 x -2 = -1.6) clipped -> +1.6
    # token mean: (-1.2 - 0.9 - 1.2 + 1.6) / 4 = -1.7 / 4 = -0.425; 3 of 4 tokens clipped.
    assert close(loss, -0.425) and close(m["clip_fraction"], 0.75)
    # Only the kept token has a gradient: d(-r A / 4) / d log pi = -r A / 4 = -0.225.
    assert close(grad, [[0, 0, -0.225, 0, 0], [0, 0, 0, 0, 0]])


def test_grpo_averages_each_answer_then_the_answers():
    loss, _, grad = run_loss("grpo")
    # The same per-token terms; answer 0's mean (-1.2 - 0.9 - 1.2) / 3 = -1.1, answer 1's +1.6:
    # (-1.1 + 1.6) / 2 = 0.25. The kept token's gradient -0.9 / 3 / 2 = -0.15.
    assert close(loss, 0.25)
    assert close(grad, [[0, 0, -0.15, 0, 0], [0, 0, 0, 0, 0]])


def test_dr_grpo_sums_tokens_over_the_budget_without_length_normalisation():
    loss, _, grad = run_loss("dr_grpo")
    # Dr. GRPO (arXiv:2503.20783, eq. 2 without 1/|o_i|): each answer's token sum over the
    # budget 4, the mean over answers: (-3.3 / 4 + 1.6 / 4) / 2 = -0.2125.
    assert close(loss, -0.2125)
    assert close(grad, [[0, 0, -0.9 / 4 / 2, 0, 0], [0, 0, 0, 0, 0]])
    # An answer twice as long weighs twice as much under Dr. GRPO, the same under GRPO: one
    # answer of 2 kept tokens (r 1, A 1) against the same answer of 4 tokens.
    short, long = t([1, 1, 0, 0]), t([1, 1, 1, 1])
    ones = torch.ones(1, 4, dtype=torch.float64)
    dr = [run_loss("dr_grpo", ratios=ones, mask=m, adv=ones)[0] for m in (short, long)]
    gr = [run_loss("grpo", ratios=ones, mask=m, adv=ones)[0] for m in (short, long)]
    assert close(dr[0], -2 / 4) and close(dr[1], -4 / 4)  # -(sum of r A) / budget
    assert close(gr[0], -1.0) and close(gr[1], -1.0)  # -(mean of r A)
    with pytest.raises(ValueError, match="max_answer_len"):
        POLICY_LOSSES["dr_grpo"].fn(ones, ones, ones, long, POLICY_LOSSES["dr_grpo"].spec())


def test_dapo_clips_higher_and_averages_over_tokens():
    loss, m, grad = run_loss("dapo")
    # Clip-higher (arXiv:2503.14476, eq. 8-10): [1 - 0.2, 1 + 0.28] = [0.8, 1.28].
    #   r 1.5,  A +1: 1.28 clipped -> -1.28;  r 0.9: -0.9;  r 1.25 < 1.28, kept (PPO clipped it) -> -1.25
    #   r 0.5,  A -2: the lower bound as PPO's, clipped -> +1.6
    # token mean: (-1.28 - 0.9 - 1.25 + 1.6) / 4 = -1.83 / 4 = -0.4575; 2 of 4 clipped.
    assert close(loss, -0.4575) and close(m["clip_fraction"], 0.5)
    # The r 1.25 token now learns: -1.25 / 4 = -0.3125 (PPO: 0).
    assert close(grad, [[0, 0, -0.225, -0.3125, 0], [0, 0, 0, 0, 0]])
    assert POLICY_LOSSES["dapo"].spec() == LossSpec(0.2, 0.28, "token-mean")


def test_gspo_clips_the_length_normalised_sequence_ratio_per_answer():
    wide = LossSpec(0.2, 0.28, "seq-mean-token-mean")
    loss, m, grad = run_loss("gspo", wide)
    # GSPO (arXiv:2507.18071, eq. 5-7): s_i = (prod_t r_t)^(1/|y_i|).
    #   answer 0: (1.5 x 0.9 x 1.25)^(1/3) = 1.6875^(1/3) = 1.1905507, inside [0.8, 1.28] -> -1.1905507
    #   answer 1: s = 0.5, A -2: min(-1, 0.8 x -2) = -1.6 -> +1.6 (clipped)
    # mean over answers: (-1.1905507 + 1.6) / 2 = 0.2047246; 1 of 2 answers clipped.
    s0 = 1.6875 ** (1 / 3)
    assert close(loss, (-s0 + 1.6) / 2) and close(m["clip_fraction"], 0.5)
    # d(-s0 A / 2) / d log pi_t = -s0 / 2 x 1/3 on every token of answer 0: one weight per answer.
    assert close(grad, [[0, -s0 / 6, -s0 / 6, -s0 / 6, 0], [0, 0, 0, 0, 0]])
    # The paper's ranges (3e-4, 4e-4): both answers clipped, -(1.0004 x 1) and -(0.9997 x -2):
    # (-1.0004 + 1.9994) / 2 = 0.4995, and no gradient at all.
    loss, m, grad = run_loss("gspo")
    assert close(loss, 0.4995) and close(m["clip_fraction"], 1.0) and (grad == 0).all()
    assert POLICY_LOSSES["gspo"].spec() == LossSpec(3e-4, 4e-4, "seq-mean-token-mean")


def test_cispo_keeps_a_clipped_stop_gradient_weight_on_every_token():
    loss, m, grad = run_loss("cispo")
    # CISPO (arXiv:2506.13585, eq. 4): -sg(clip(r, 1 - e_low, 1 + e_high)) A log pi, token mean;
    # e_low = 1 (no lower bound), e_high = 0.28. Weights 1.28 (from 1.5), 0.9, 1.25, 0.5.
    #   -1.28 x 1 x ln 1.5 = -0.5189953;  -0.9 x ln 0.9 = 0.0948245;  -1.25 x ln 1.25 = -0.2789294
    #   -0.5 x -2 x ln 0.5 = -0.6931472;  sum -1.3962474, / 4 = -0.3490618
    per_token = [-1.28 * math.log(1.5), -0.9 * math.log(0.9), -1.25 * math.log(1.25), 1.0 * math.log(0.5)]
    assert close(loss, sum(per_token) / 4)
    # The gradient is -w A / 4 on every token, the clipped one (r 1.5) included (PPO gives it
    # none), and nothing from the weight itself (stop-gradient): -0.32, -0.225, -0.3125, +0.25.
    assert close(grad, [[0, -0.32, -0.225, -0.3125, 0], [0, 0.25, 0, 0, 0]])
    assert close(m["clip_fraction"], 0.25)  # one weight of four was clipped
    assert POLICY_LOSSES["cispo"].spec() == LossSpec(1.0, 0.28, "token-mean")
    # With a lower bound set (cliprange), a weight clipped from below counts too: 0.5 -> 0.8.
    _, m, grad = run_loss("cispo", LossSpec(0.2, 0.28, "token-mean"))
    assert close(m["clip_fraction"], 0.5) and close(grad[1, 1], 0.8 * 2 / 4)


def test_the_configs_clip_range_overrides_the_losses_own():
    spec = POLICY_LOSSES["dapo"].spec(0.1, None)
    assert (spec.clip_low, spec.clip_high) == (0.1, 0.28)
    assert POLICY_LOSSES["gspo"].spec(None, 0.3).clip_high == 0.3


# --- garbage where the mask is 0 -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("junk", [math.nan, math.inf, -math.inf, 1e4])
def test_losses_ignore_garbage_at_masked_positions(name, junk):
    """Prompt and padding positions may hold anything (NaN or inf log-probs of pad tokens,
    a log-ratio exp() overflows): loss, metrics and gradient equal the clean ones, and the
    masked positions' gradient is 0."""
    g = torch.Generator().manual_seed(3)
    mask = t([0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1])
    clean_logp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    old = clean_logp + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, 0.7], dtype=torch.float64)[:, None].expand(4, 6).clone()
    ref = clean_logp - 0.2
    reg = POLICY_LOSSES[name]
    spec = reg.spec(0.2, 0.28, Normaliser(max_answer_len=6))
    out = []
    for dirty in (False, True):
        logp, o, a, r = clean_logp.clone(), old.clone(), adv.clone(), ref.clone()
        if dirty:
            off = mask == 0
            logp[off], o[off], a[off], r[off] = junk, -junk, junk, junk
        logp.requires_grad_(True)
        loss, m = reg.fn(logp, o, a, mask, spec)
        kl = aggregate(kl_k3(logp, r, mask), mask, spec.aggregation, spec.norm)
        (loss + kl).backward()
        out.append((loss.detach(), kl.detach(), m, logp.grad))
    (l0, k0, m0, g0), (l1, k1, m1, g1) = out
    assert torch.isfinite(l1) and torch.isfinite(g1).all()
    assert close(l1, l0.item(), 1e-12) and close(k1, k0.item(), 1e-12)
    assert all(close(m1[k], m0[k].item(), 1e-12) for k in m0)
    assert torch.allclose(g1, g0, atol=1e-12) and (g1[mask == 0] == 0).all()


# --- the step's mean over micro-batches ----------------------------------------------------------

def experience(mask: torch.Tensor, scores: torch.Tensor | None = None) -> Experience:
    """An Experience with ``mask`` as its action mask (B, N) and the other fields filler."""
    B, N = mask.shape
    zeros = torch.zeros(B, N, dtype=torch.float64)
    return Experience(sequences=torch.ones(B, N + 1, dtype=torch.long), attention_mask=torch.ones(B, N + 1),
                      action_mask=mask, action_log_probs=zeros, ref_log_probs=zeros, advantages=zeros,
                      scores=torch.zeros(B, dtype=torch.float64) if scores is None else scores, prompt_len=1)


def random_batch(seed: int, B: int = 7, N: int = 6):
    """Answers of 0 to N tokens (one empty) with random log-probs, old log-probs, advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    lengths[2] = 0
    mask = (torch.arange(N)[None] < lengths[:, None]).double()
    logp = -torch.rand(B, N, generator=g, dtype=torch.float64) - 0.1
    old = logp + 0.3 * torch.randn(B, N, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)[:, None].expand(B, N).clone()
    return mask, logp, old, adv


def step_gradient(name: str, mask, logp, old, adv, micro: int, accumulation: int) -> list[torch.Tensor]:
    """Each optimizer step's gradient as DeepSpeed makes it: every micro-batch's loss
    (divided by its step's normaliser, rl/update.step_normalisers) backpropagated x
    1/accumulation, summed over the step's micro-batches."""
    reg = POLICY_LOSSES[name]
    parts = experience(mask).split(micro)
    norms = step_normalisers(parts, accumulation, max_answer_len=BUDGET)
    grads, rows = [], 0
    for i, (part, norm) in enumerate(zip(parts, norms, strict=True)):
        if i % accumulation == 0:
            leaf = logp.clone().requires_grad_(True)
        sl = slice(rows, rows + len(part))
        rows += len(part)
        loss, _ = reg.fn(leaf[sl], old[sl], adv[sl], mask[sl], reg.spec(norm=norm))
        (loss / accumulation).backward()
        if (i + 1) % accumulation == 0 or i + 1 == len(parts):
            grads.append(leaf.grad)
    return grads


def whole_gradient(name: str, mask, logp, old, adv) -> torch.Tensor:
    """The gradient of the loss over the whole batch at once: its own means (one process, one micro-batch)."""
    reg = POLICY_LOSSES[name]
    leaf = logp.clone().requires_grad_(True)
    reg.fn(leaf, old, adv, mask, reg.spec(norm=Normaliser(max_answer_len=BUDGET)))[0].backward()
    return leaf.grad


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("micro", [1, 2, 3, 7])
def test_a_step_of_micro_batches_is_the_mean_over_the_whole_step(name, micro):
    """7 answers (one empty) in micro-batches of 1, 2, 3 or 7, all one optimizer step:
    the accumulated gradient is the whole batch's (DAPO's token mean over every token of
    the step; GRPO's mean over every answer of the step), whatever the micro-batch size."""
    mask, logp, old, adv = random_batch(0)
    accumulation = -(-7 // micro)
    (got,) = step_gradient(name, mask, logp, old, adv, micro, accumulation)
    assert torch.allclose(got, whole_gradient(name, mask, logp, old, adv), atol=1e-12)


def test_each_step_takes_its_own_mean():
    # 8 answers in micro-batches of 2, two micro-batches per step: rows 0-3 are step 1, rows
    # 4-7 step 2, each the mean over its own tokens (not the iteration's, not the micro-batch's).
    mask, logp, old, adv = random_batch(1, B=8)
    first, second = step_gradient("dapo", mask, logp, old, adv, micro=2, accumulation=2)
    want_first = whole_gradient("dapo", mask[:4], logp[:4], old[:4], adv[:4])
    want_second = whole_gradient("dapo", mask[4:], logp[4:], old[4:], adv[4:])
    assert torch.allclose(first[:4], want_first, atol=1e-12) and (first[4:] == 0).all()
    assert torch.allclose(second[4:], want_second, atol=1e-12) and (second[:4] == 0).all()
    # By hand, one step of two micro-batches: tokens 3 + 1 and 2; normaliser (4 + 2) / 2 = 3 per
    # micro-batch, so each token's weight is 1/3 x 1/2 = 1/6 = 1 / (the step's 6 tokens).
    norms = step_normalisers(experience(t([1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0])).split(2), 2, 3)
    assert [(n.tokens, n.sequences) for n in norms] == [(3.0, 2.0), (3.0, 2.0)]
    # The micro-batch's own mean (OWN_MEAN) weighs micro-batch 1's tokens 1/4 x 1/2 = 1/8 and
    # micro-batch 2's 1/2 x 1/2 = 1/4: a token's weight would hang on its neighbours.
    x, m = torch.ones(2, 3, dtype=torch.float64), t([1, 1, 1], [1, 0, 0])
    assert close(aggregate(x, m, "token-mean", OWN_MEAN), 1.0) and close(aggregate(x, m, "token-mean", norms[0]),
                                                                          4 / 3)


# --- advantage estimators -------------------------------------------------------------------------

# Two prompts, G = 2 answers each: rewards (1, 3) and (0, 0), answers of 1, 2, 1 and 1 tokens.
SCORES = t(1.0, 3.0, 0.0, 0.0)
AMASK = t([1, 0], [1, 1], [1, 0], [1, 0])


def estimate(name: str, scores=SCORES, mask=AMASK, **kw) -> torch.Tensor:
    return ADVANTAGES[name](AdvantageInputs(scores=scores, action_mask=mask, group_size=2, **kw)).advantages


def test_group_estimators_by_hand():
    # group_norm (GRPO): (r - mean) / (sample std + 1e-4); (1, 3): mean 2, std sqrt(2); (0, 0): 0.
    s = math.sqrt(2) + 1e-4
    assert close(estimate("group_norm"), [[-1 / s, 0], [1 / s, 1 / s], [0, 0], [0, 0]])
    # group_mean (Dr. GRPO): r - mean only: -1, +1, 0, 0 on every token of the answer.
    assert close(estimate("group_mean"), [[-1, 0], [1, 1], [0, 0], [0, 0]])
    # rloo: r - mean of the other G - 1 = 1 answer: 1 - 3 = -2, 3 - 1 = 2.
    assert close(estimate("rloo"), [[-2, 0], [2, 2], [0, 0], [0, 0]])


def test_reinforce_pp_baseline_normalises_over_every_token_of_the_batch():
    # REINFORCE++-baseline (arXiv:2501.03262): r - group mean, per token -1 | 1, 1 | 0 | 0;
    # then over the batch's 5 answer tokens: mean 1/5 = 0.2, population variance
    # ((-1.2)^2 + 2 x 0.8^2 + 2 x 0.2^2) / 5 = (1.44 + 1.28 + 0.08) / 5 = 0.56, std 0.7483315.
    # (The all-equal group moves to -0.2 / std: the batch's mean is removed from everything.)
    sd = math.sqrt(0.56 + 1e-8)
    assert close(estimate("reinforce_pp_baseline"), [[-1.2 / sd, 0], [0.8 / sd, 0.8 / sd], [-0.2 / sd, 0],
                                                     [-0.2 / sd, 0]])
    # Batch statistics over every rank: two ranks holding the same rows have the same statistics.
    doubled = estimate("reinforce_pp_baseline", sum_across_ranks=lambda x: 2 * x)
    assert torch.allclose(doubled, estimate("reinforce_pp_baseline"), atol=1e-12)


@pytest.mark.parametrize("name", ["group_norm", "group_mean", "rloo", "reinforce_pp_baseline"])
def test_all_equal_groups_have_no_advantage_and_no_nan(name):
    # Every answer to a prompt scored alike: nothing to learn, 0 everywhere (std 0 divides nothing).
    adv = estimate(name, scores=t(2.5, 2.5, -1.0, -1.0))
    assert torch.isfinite(adv).all() and (adv == 0).all()
    # Padding holding garbage changes nothing.
    mask = t([1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0])
    assert (estimate(name, scores=t(2.5, 2.5, 1.0, 1.0), mask=mask)[mask == 0] == 0).all()


def test_gae_is_registered_and_needs_the_critic():
    # The hand-worked case of tests/test_ppo_maths.py (gamma 0.9, lam 0.8), through the registry.
    inputs = AdvantageInputs(scores=t(0.0), action_mask=t([1, 1, 1]), values=t([1.0, 2.0, 0.5]),
                             token_rewards=t([0.0, 0.5, 2.0]), gamma=0.9, lam=0.8)
    adv, returns = ADVANTAGES["gae"](inputs)
    assert close(adv, [[0.8216, 0.03, 1.5]]) and close(returns, [[1.8216, 2.03, 2.0]])
    assert torch.equal(adv, compute_gae(inputs.values, inputs.token_rewards, inputs.action_mask, 0.9, 0.8)[0])
    with pytest.raises(ValueError, match="critic"):
        ADVANTAGES["gae"](AdvantageInputs(scores=t(0.0), action_mask=t([1, 1, 1])))

