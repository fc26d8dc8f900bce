"""The RL update's batches: the step-level means over 2 real ranks (torch.distributed over
gloo, an uneven batch), the :class:`Experience` record, and DAPO's dynamic sampling
(degenerate groups dropped and refilled, the same number kept on every rank, whole
optimizer steps). The losses themselves: tests/test_losses.py."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from rlhf_tasks.algorithms.maths.advantages import ADVANTAGES, AdvantageInputs
from rlhf_tasks.algorithms.maths.policy import POLICY_LOSSES
from rlhf_tasks.algorithms.maths.tokens import Normaliser
from rlhf_tasks.algorithms.rl.experience import Experience
from rlhf_tasks.algorithms.rl.update import step_normalisers
from rlhf_tasks.runtime.ranks import free_port, sum_across_ranks
from tests.test_losses import AMASK, BUDGET, SCORES, close, experience, random_batch, t

REPO = Path(__file__).resolve().parents[1]


# --- Experience, DAPO's dynamic sampling ----------------------------------------------------------

def test_experience_concat_pads_prompts_left_and_answers_right():
    # Part a: prompt of 2 tokens, answer of 2 (T = 4); part b: prompt of 3, answer of 1 (T = 4).
    # Together: prompts of 3 (a gets one pad on the left), answers of 2 (b one on the right).
    def part(seq, prompt_len, amask):
        e = experience(t(amask), scores=t(float(seq[0])))
        return Experience(**{**e.__dict__, "sequences": torch.tensor([seq]), "attention_mask": torch.ones(1, 4),
                             "prompt_len": prompt_len, "action_log_probs": t([float(s) for s in seq[1:]])})

    a, b = part([5, 6, 7, 8], 2, [0, 1, 1]), part([9, 9, 9, 4], 3, [0, 0, 1])
    both = Experience.concat([a, b])
    assert both.prompt_len == 3 and both.sequences.tolist() == [[0, 5, 6, 7, 8], [9, 9, 9, 4, 0]]
    assert both.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Position t predicts token t + 1: a's answer tokens 7, 8 at columns 3, 4 are predicted at 2, 3.
    assert both.action_mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert both.action_log_probs.tolist() == [[0, 6, 7, 8], [9, 9, 4, 0]]
    assert both.scores.tolist() == [5.0, 9.0]
    assert both.select(torch.tensor([1])).sequences.tolist() == [[9, 9, 9, 4, 0]]
    assert Experience.concat([a]) is a


def scored(scores: list[float], width: int = 2) -> Experience:
    return experience(torch.ones(len(scores), width, dtype=torch.float64), scores=t(*scores))


def test_informative_and_kept_groups():
    from rlhf_tasks.algorithms.rl.rollout import informative_groups, keep_groups

    exp = scored([1, 1, 0, 1, 2, 2, 3, -3])  # groups of 2: (1, 1) (0, 1) (2, 2) (3, -3)
    assert informative_groups(exp, 2).tolist() == [False, True, False, True]
    assert keep_groups(exp, torch.tensor([1, 3]), 2).scores.tolist() == [0, 1, 3, -3]
    assert informative_groups(scored([0.5, 0.5 + 1e-9]), 2).tolist() == [False]  # equal up to float noise


def sampling(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"group_size": 2, "per_device_generation_batch_size": 3, "max_sampling_rounds": 3,
                              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                              "advantage": "group_mean", **kw})


def sample(first: list[float], *more: list[float], **kw):
    from rlhf_tasks.algorithms.rl.rollout import dynamic_sample

    sec, calls = sampling(**kw), []

    def score(batch):  # as rollout.Scorer does: the advantages over the rollout batch
        calls.append(batch)
        exp = scored(batch)
        adv = ADVANTAGES[sec.advantage](AdvantageInputs(scores=exp.scores, action_mask=exp.action_mask, group_size=2))
        return Experience(**{**exp.__dict__, "advantages": adv.advantages}), {}

    exp, stats = dynamic_sample(score, score(first), iter(more), sec, torch.device("cpu"))
    return exp, stats, len(calls)


def test_dynamic_sampling_drops_degenerate_groups_and_refills():
    # Target 3 groups. Round 1: (1, 1) (0, 1) (2, 2): one informative. Round 2: (0, 5) (3, 3)
    # (1, 2): two more. 3 kept of 6 seen; a third batch is never rolled out.
    exp, stats, calls = sample([1, 1, 0, 1, 2, 2], [0, 5, 3, 3, 1, 2], [7, 8, 7, 8, 7, 8])
    assert exp.scores.tolist() == [0, 1, 0, 5, 1, 2] and calls == 2
    assert stats == {"sampling_rounds": 2.0, "kept_groups": 3.0, "informative_share": 0.5}
    # The kept batch's advantages (group_mean): r - group mean on every answer token.
    assert close(exp.advantages, [[-0.5] * 2, [0.5] * 2, [-2.5] * 2, [2.5] * 2, [-0.5] * 2, [0.5] * 2])
    # At most max_sampling_rounds rollouts: what was found by then trains.
    exp, stats, calls = sample([1, 1, 0, 1, 2, 2], [3, 3, 3, 3, 3, 3], [0, 1, 0, 1, 0, 1], max_sampling_rounds=2)
    assert exp.scores.tolist() == [0, 1] and calls == 2 and stats["kept_groups"] == 1
    # Nothing informative, or the data ends: no update (None), no crash.
    assert sample([1, 1, 2, 2, 3, 3], [4, 4, 4, 4, 4, 4])[0] is None
    exp, stats, calls = sample([1, 1, 0, 1, 2, 2])
    assert exp.scores.tolist() == [0, 1] and calls == 1 and stats["sampling_rounds"] == 1


def test_dynamic_sampling_renormalises_reinforce_pp_baseline_over_the_kept_batch():
    # The degenerate group (3, 3) is dropped: the batch statistics are those of the kept answers
    # (mean 0, std 1 over their tokens), not of the rollout that held the dropped group.
    exp, _, _ = sample([3, 3, 0, 1, 2, 6], advantage="reinforce_pp_baseline", per_device_generation_batch_size=2)
    a = exp.advantages
    assert exp.scores.tolist() == [0, 1, 2, 6]
    assert abs(a.mean().item()) < 1e-9 and abs(a.var(unbiased=False).item() - 1) < 1e-6


def test_dynamic_sampling_keeps_whole_optimizer_steps():
    from rlhf_tasks.algorithms.rl.rollout import whole_steps

    # Groups of 2 in micro-batches of 4, 2 micro-batches a step: 5 groups = 10 answers = 3
    # micro-batches, one left over -> 4 groups (2 micro-batches); 1 group -> none.
    assert [whole_steps(g, 2, 4, 2) for g in (5, 4, 3, 1)] == [4, 4, 3, 0]
    assert [whole_steps(g, 2, 4, 1) for g in (5, 1)] == [5, 1]  # one micro-batch a step: all
    exp, stats, _ = sample([0, 1, 0, 2, 0, 3], per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert stats["kept_groups"] == 2 and exp.scores.tolist() == [0, 1, 0, 2]


def test_an_iteration_must_fill_whole_optimizer_steps():
    from rlhf_tasks.config import ConfigError, PipelineConfig

    # tiny-cpu's GRPO: 8 prompts x 4 answers in micro-batches of 8 = 4 micro-batches.
    base = ["grpo.per_device_train_batch_size=8"]
    assert PipelineConfig.load("tiny-cpu", [*base, "grpo.gradient_accumulation_steps=4"]).grpo.loss == "grpo"
    with pytest.raises(ConfigError, match=r"grpo\.gradient_accumulation_steps=3 is invalid: a divisor of the 4 "):
        PipelineConfig.load("tiny-cpu", [*base, "grpo.gradient_accumulation_steps=3"])


# --- 2 ranks --------------------------------------------------------------------------------------
#
# A shared parameter theta (3 numbers) makes every log-prob: log pi[b, n] = base[b, n] +
# features[b, n] . theta, as a model's weights make every rank's log-probs. DeepSpeed's
# optimizer step sees the ranks' gradients of theta averaged, each rank's being its
# micro-batches' losses x 1/gradient_accumulation_steps summed (engine.backward).

def log_probs(theta: torch.Tensor, rows: slice) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    base = -torch.rand(7, 6, generator=g, dtype=torch.float64) - 0.1
    features = 0.3 * torch.randn(7, 6, 3, generator=g, dtype=torch.float64)
    return (base + features @ theta)[rows]


THETA = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
SHARES = (slice(0, 4), slice(4, 7))  # rank 0: 4 answers, rank 1: 3 (micro-batches 2 + 2 and 2 + 1)


def rank_gradient(name: str, rows: slice, micro: int = 2, accumulation: int = 2) -> torch.Tensor:
    """This rank's share of one optimizer step, as DeepSpeed would take it: d loss / d theta."""
    mask, _, old, adv = random_batch(5)
    mask, old, adv = mask[rows], old[rows], adv[rows]
    reg, theta = POLICY_LOSSES[name], THETA.clone().requires_grad_(True)
    parts = experience(mask).split(micro)
    for i, (part, norm) in enumerate(zip(parts, step_normalisers(parts, accumulation, BUDGET), strict=True)):
        sl = slice(i * micro, i * micro + len(part))
        loss, _ = reg.fn(log_probs(theta, rows)[sl], old[sl], adv[sl], mask[sl], reg.spec(norm=norm))
        (loss / accumulation).backward()
    return theta.grad


def union_gradient(name: str) -> torch.Tensor:
    """One process, the whole batch in one micro-batch: the step's own means."""
    mask, _, old, adv = random_batch(5)
    reg, theta = POLICY_LOSSES[name], THETA.clone().requires_grad_(True)
    reg.fn(log_probs(theta, slice(None)), old, adv, mask, reg.spec(norm=Normaliser(max_answer_len=BUDGET)))[0].backward()
    return theta.grad


# Rank 1's share of the advantage and sampling checks: one prompt (2, 5), answers of 2 and 1 tokens.
RANK1_SCORES, RANK1_MASK = t(2.0, 5.0), t([1, 1], [1, 0])


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank of test_two_ranks_take_the_mean_over_the_whole_step (a process of its own)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result = {}
        for name in sorted(POLICY_LOSSES):
            g = rank_gradient(name, SHARES[rank])
            dist.all_reduce(g)
            result[name] = g / world  # DeepSpeed averages the ranks' gradients
        scores, mask = (SCORES, AMASK) if rank == 0 else (RANK1_SCORES, RANK1_MASK)
        result["reinforce_pp_baseline"] = ADVANTAGES["reinforce_pp_baseline"](AdvantageInputs(
            scores=scores, action_mask=mask, group_size=2, sum_across_ranks=sum_across_ranks)).advantages
        # Dynamic sampling, target 2 groups: rank 0 finds 2 in its first rollout, rank 1 only 1,
        # so both roll out again (in step); then rank 1 has 2 and both keep 2.
        batches = ([[1, 2, 0, 3], [5, 5, 5, 5]], [[1, 1, 0, 3], [2, 7, 3, 3]])[rank]
        exp, stats, calls = sample(*batches, per_device_generation_batch_size=2, advantage="reinforce_pp_baseline")
        result["sampled"] = (exp.scores, exp.advantages, stats, calls)
        torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_take_the_mean_over_the_whole_step(tmp_path):
    """2 processes over gloo, 4 and 3 answers (one empty), 2 micro-batches each: their
    averaged gradient is the one-process gradient over the union of their answers, for
    every loss; REINFORCE++-baseline's statistics and dynamic sampling span both ranks."""
    port, outs = free_port(), [tmp_path / f"rank{r}.pt" for r in range(2)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", f"from tests.test_rl_steps import rank_main; "
                               f"rank_main({r}, 2, {port}, {str(outs[r])!r})"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    ranks = [torch.load(o, weights_only=False) for o in outs]
    for name in POLICY_LOSSES:
        want = union_gradient(name)
        assert torch.allclose(ranks[0][name], want, atol=1e-12) and torch.equal(ranks[0][name], ranks[1][name]), name
    union = ADVANTAGES["reinforce_pp_baseline"](AdvantageInputs(
        scores=torch.cat([SCORES, RANK1_SCORES]), action_mask=torch.cat([AMASK, RANK1_MASK]), group_size=2)).advantages
    assert close(torch.cat([ranks[0]["reinforce_pp_baseline"], ranks[1]["reinforce_pp_baseline"]]), union, 1e-12)
    (s0, a0, stats0, calls0), (s1, a1, stats1, calls1) = ranks[0]["sampled"], ranks[1]["sampled"]
    assert s0.tolist() == [1, 2, 0, 3] and s1.tolist() == [0, 3, 2, 7] and calls0 == calls1 == 2
    assert stats0["kept_groups"] == stats1["kept_groups"] == 2 and stats0["sampling_rounds"] == 2
    kept = torch.cat([a0, a1])  # normalised over both ranks' kept answers: mean 0, variance 1
    assert abs(kept.mean().item()) < 1e-9 and abs(kept.var(unbiased=False).item() - 1) < 1e-6
