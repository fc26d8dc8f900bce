"""The critic-free maths (GRPO, RLOO), the KL estimators and the reward terms against
hand-computed values: a wrong formula fails here."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from rlhf_tasks.algorithms.maths.advantages import group_advantages, leave_one_out_advantages, sequence_kl
from rlhf_tasks.algorithms.maths.policy import POLICY_LOSSES, LossSpec, kl_k3
from rlhf_tasks.algorithms.maths.tokens import aggregate
from rlhf_tasks.algorithms.rl.rewards import RewardTerms, length_term, repetition_term
from rlhf_tasks.algorithms.verifiers import ALLOW_REWARD_FUNCTION_ENV, load_function
from rlhf_tasks.config import ConfigError, PipelineConfig
from rlhf_tasks.config.sections import RewardConfig


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(a: torch.Tensor, b, tol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


def test_group_advantages_normalise_within_each_prompt():
    # Prompt 0: rewards 1, 2, 3, 6 -> mean 3, deviations -2, -1, 0, 3, sample std sqrt(14 / 3).
    # Prompt 1: all 5 -> nothing to learn, advantage 0 (not NaN).
    r = t(1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0)
    std = math.sqrt(14 / 3)
    assert close(group_advantages(r, 4), [-2 / (std + 1e-4), -1 / (std + 1e-4), 0, 3 / (std + 1e-4), 0, 0, 0, 0])
    # Dr. GRPO: mean-centred only.
    assert close(group_advantages(r, 4, scale=False), [-2, -1, 0, 3, 0, 0, 0, 0])
    # Groups are adjacent rows: the same rewards in another order give other advantages.
    assert close(group_advantages(t(1.0, 5.0, 2.0, 5.0), 2, scale=False), [-2, 2, -1.5, 1.5])


def test_leave_one_out_baseline_is_the_mean_of_the_other_answers():
    # 1 - (2+3+6)/3 = -8/3; 2 - 10/3 = -4/3; 3 - 9/3 = 0; 6 - 6/3 = 4.
    assert close(leave_one_out_advantages(t(1.0, 2.0, 3.0, 6.0), 4), [-8 / 3, -4 / 3, 0, 4])
    assert close(leave_one_out_advantages(t(1.0, 3.0), 2), [-2, 2])
    with pytest.raises(ValueError, match="groups of 3"):
        leave_one_out_advantages(t(1.0, 2.0, 3.0, 4.0), 3)


def test_kl_estimators():
    logp, ref, mask = t([-1.0, -2.0, -7.0]), t([-1.5, -1.0, 0.0]), t([1, 1, 0])
    # k3 with d = ref - logp = -0.5, 1: exp(d) - d - 1 = 0.1065306597, 0.7182818285; masked: 0.
    assert close(kl_k3(logp, ref, mask), [[math.exp(-0.5) - 0.5, math.e - 2, 0]])
    # k1 per answer: (logp - ref) summed over answer tokens: 0.5 - 1 = -0.5.
    assert close(sequence_kl(logp, ref, mask), [-0.5])
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, generator=g) * 3, torch.randn(64, 16, generator=g) * 3
    k3 = kl_k3(a, b, torch.ones(64, 16))
    assert (k3 >= 0).all() and close(kl_k3(a, a, torch.ones(64, 16)), torch.zeros(64, 16))
    assert (kl_k3(a, b, torch.zeros(64, 16)) == 0).all()  # masked positions hold nothing, whatever the inputs


def test_token_and_sequence_aggregation():
    x, mask = t([1.0, 2.0, 3.0], [4.0, 99.0, 99.0]), t([1, 1, 1], [1, 0, 0])
    assert close(aggregate(x, mask, "token-mean"), 2.5)  # (1 + 2 + 3 + 4) / 4
    assert close(aggregate(x, mask, "seq-mean-token-mean"), 3.0)  # mean(2, 4)
    with pytest.raises(ValueError):
        aggregate(x, mask, "batch")
    # At ratio 1 the clipped surrogate is -A, aggregated the same way: ppo a token mean, grpo per answer.
    lp = torch.zeros(2, 3, dtype=torch.float64)
    adv = t([1.0, 1.0, 1.0], [-2.0, 0.0, 0.0])
    assert close(POLICY_LOSSES["ppo"].fn(lp, lp, adv, mask, LossSpec(aggregation="token-mean"))[0], -(3 - 2) / 4)
    assert close(POLICY_LOSSES["grpo"].fn(lp, lp, adv, mask, LossSpec(aggregation="seq-mean-token-mean"))[0],
                 -(1 - 2) / 2)


def test_reward_terms():
    mask = t([0, 1, 1, 1, 0], [0, 1, 0, 0, 0])
    assert close(length_term(mask, 4), [0.75, 0.25])
    answers = torch.tensor([[1, 2, 3, 1, 2, 3], [4, 4, 4, 4, 0, 0]])
    amask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    # Row 0: 3-grams 123, 231, 312, 123 -> 1 of 4 repeats; row 1: 444, 444 -> 1 of 2.
    assert close(repetition_term(answers, amask, 3), [0.25, 0.5])
    terms = RewardTerms(RewardConfig(length_coef=-1.0, repetition_coef=-2.0), max_new_tokens=6)
    seq = torch.cat([torch.tensor([[9], [9]]), answers], dim=1)  # prompt of 1 token, then the answers
    action_mask = amask.float()  # (B, T-1): position t predicts token t+1, so answers start at position 0
    total, parts = terms.total(torch.tensor([1.0, 1.0]), seq, action_mask, prompt_len=1)
    # 1 - 1 * (6/6) - 2 * 0.25 = -0.5; 1 - 1 * (4/6) - 2 * 0.5 = -2/3.
    assert close(total.double(), [-0.5, -2 / 3], 1e-5)
    assert set(parts) == {"length", "repetition"}


def test_reward_function_needs_the_workers_consent(monkeypatch, tmp_path):
    (tmp_path / "my_rewards.py").write_text("def short(prompts, answers):\n    return [-len(a) for a in answers]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_REWARD_FUNCTION_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"refused on this worker.*{ALLOW_REWARD_FUNCTION_ENV}=1"):
        load_function("my_rewards:short")
    assert "my_rewards" not in sys.modules  # refused before anything was imported
    monkeypatch.setenv(ALLOW_REWARD_FUNCTION_ENV, "1")
    assert load_function("my_rewards:short")(["p"], ["abc", "a"]) == [-3, -1]
    with pytest.raises(ConfigError, match="cannot import"):
        load_function("my_rewards:missing")


def test_group_configs_refuse_critic_settings_and_bad_values():
    cfg = PipelineConfig.load("tiny-cpu", {"algorithm": "grpo", "grpo.group_size": 4})
    assert cfg.algorithm == "grpo" and cfg.grpo.actor.learning_rate == 2e-4  # the preset's
    for key, value in (("grpo.critic", {"learning_rate": 1e-5}), ("rloo.gamma", 1.0),
                       ("grpo.whiten_advantages", True)):
        with pytest.raises(ConfigError, match=f"{key}=.* is invalid: GRPO and RLOO train no critic"):
            PipelineConfig.load("tiny-cpu", {key: value})
    with pytest.raises(ConfigError, match="grpo.group_size"):
        PipelineConfig.load("tiny-cpu", {"grpo.group_size": 1})
    with pytest.raises(ConfigError, match="algorithm"):
        PipelineConfig.load("tiny-cpu", {"algorithm": "a2c"})
    with pytest.raises(ConfigError, match="grpo.kl_penalty"):
        PipelineConfig.load("tiny-cpu", {"grpo.kl_penalty": "both"})
    with pytest.raises(ConfigError, match="reward.function"):
        PipelineConfig.load("tiny-cpu", {"reward.function": "os.system"})
