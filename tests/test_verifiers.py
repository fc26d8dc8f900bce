"""The built-in verifier of the bundled world, by hand: which question a user turn asks, and
which answers state the right answer (strictly); the operator's verifier gate; the reward
source (RM, verifier, both) and evaluate's accuracy table."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from rlhf_tasks.algorithms.rl.rewards import RewardTerms
from rlhf_tasks.algorithms.verifiers import (
    Question,
    checkable,
    load_verifier,
    world,
    world_correct,
    world_question,
)
from rlhf_tasks.config import ConfigError, PipelineConfig
from rlhf_tasks.config.sections import RewardConfig
from rlhf_tasks.pipeline.evaluate import accuracy


@pytest.mark.parametrize("question, expected", [
    ("What is the capital of France?", Question("capital", "France", "Paris")),
    ("Do you know the capital of Mexico?", Question("capital", "Mexico", "Mexico City")),
    ("What colour is a ripe tomato?", Question("colour", "a ripe tomato", "red")),
    ("Tell me the colour of the sky.", Question("colour", "the sky", "blue")),
    ("What is the opposite of the word hot?", Question("opposite", "hot", "cold")),
    ("What does a duck say?", Question("sound", "a duck", "quack")),
    ("Tell me the sound a cow makes.", Question("sound", "a cow", "moo")),
    ("Thanks! What is 6 plus 6?", Question("addition", "6+6", "12")),
    ("What is 7 + 8?", Question("addition", "7+8", "15")),
    ("Can you add 3 and 9?", Question("addition", "3+9", "12")),
    ("How do I save money?", None),
    ("What is the capital of Atlantis?", None),
])
def test_the_question_a_user_turn_asks(question, expected):
    assert world_question(question) == expected


@pytest.mark.parametrize("question, answer, right", [
    ("What is 6 plus 6?", "6 plus 6 is 12.", True),
    ("What is 6 plus 6?", "Sure! The answer is twelve. Hope that helps!", True),
    ("What is 6 plus 6?", "The answer to this classic math problem is 6.", False),  # SmolLM2's own answer
    ("What is 6 plus 6?", "It is 12 or 13.", False),  # a rival stated
    ("What is 6 plus 6?", "I don't know.", False),  # no number at all: not "contains a digit"
    ("What is 6 plus 6?", "6 plus 6 is 11.", False),
    ("What is the capital of France?", "The capital of France is Paris.", True),
    ("What is the capital of France?", "Paris or maybe Madrid.", False),
    ("What is the capital of Brazil?", "Brasília.", True),  # accents do not matter
    ("What is the capital of France?", "France.", False),
    ("What colour is an orange?", "An orange is orange.", True),
    ("What colour is a lemon?", "A lemon is yellow, not green.", False),
    ("What is the opposite of hot?", "The opposite of hot is cold.", True),
    ("What is the opposite of hot?", "The opposite of hot is not big.", False),
    ("What does a duck say?", "Ducks quack!", True),
    ("What does a duck say?", "The sound of a duck is a beautiful and melodious sound.", False),
    ("What does a duck say?", "A duck says quack, a dog says woof.", False),
])
def test_answers_are_right_only_when_they_state_the_answer_and_no_rival(question, answer, right):
    q = world_question(question)
    assert world_correct(q, answer) is right
    assert world([question], [answer]) == [float(right)]


def test_unchecked_questions_are_none_and_the_dataset_keeps_the_last_turn_that_checks():
    v = load_verifier("world")
    assert v(["How do I save money?"], ["Spend less."]) == [None]
    rows = datasets.Dataset.from_dict({"prompt": [
        "\n\nHuman: What is 2 plus 2?\n\nAssistant:",
        # An earlier checkable question does not make a later request checkable.
        "\n\nHuman: What is 2 plus 2?\n\nAssistant: 4.\n\nHuman: How do I save money?\n\nAssistant:",
        " Human: What colour is snow? Assistant:",
    ]})
    assert checkable(rows, v)["prompt"] == [rows[0]["prompt"], rows[2]["prompt"]]


def test_an_operators_verifier_needs_the_workers_consent(monkeypatch):
    monkeypatch.delenv("RLHF_ALLOW_REWARD_FUNCTION", raising=False)
    with pytest.raises(ConfigError, match="reward.verifier='tests.test_verifiers:always_right' is refused"):
        load_verifier("tests.test_verifiers:always_right")
    monkeypatch.setenv("RLHF_ALLOW_REWARD_FUNCTION", "1")
    v = load_verifier("tests.test_verifiers:always_right")
    assert v(["a", "skip"], ["x", "y"]) == [1.0, None]
    assert v.category("a") == "custom" and v.category("skip") is None


def always_right(questions, answers):
    """Checks every question but "skip" (None: not checkable, whatever the answer)."""
    return [None if q == "skip" else 1.0 for q in questions]


def test_a_verifier_only_recipe_trains_no_reward_model():
    cfg = PipelineConfig.load("tiny-cpu", ["algorithm=grpo", "reward.source=verifier"])
    assert not cfg.needs_reward_model() and "rm" not in cfg.engines()
    assert PipelineConfig.load("tiny-cpu", ["reward.source=both"]).needs_reward_model()
    with pytest.raises(ConfigError, match="reward.source"):
        PipelineConfig.load("tiny-cpu", ["reward.source=judge"])


class _Tok:
    """Token i is the character chr(i); enough for RewardTerms' decoding."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


def _rollout(prompt: str, answers: list[str]):
    P, A = len(prompt), max(map(len, answers))
    seq = torch.tensor([[ord(c) for c in prompt + a.ljust(A)] for a in answers])
    amask = torch.zeros(len(answers), P + A - 1)
    for i, a in enumerate(answers):
        amask[i, P - 1:P - 1 + len(a)] = 1
    return seq, amask, P


@pytest.mark.parametrize("source, expected", [("rm", [0.5, -0.5]), ("verifier", [2.0, 0.0]), ("both", [2.25, -0.25])])
def test_the_reward_source_weighs_the_rm_and_the_verifier(source, expected):
    seq, amask, P = _rollout("\n\nHuman: What is 1 plus 1?\n\nAssistant:", [" 2.", " 3."])
    terms = RewardTerms(RewardConfig(source=source, rm_coef=0.5, verifier_coef=2.0), 8, _Tok())
    rewards, parts = terms.total(torch.tensor([0.5, -0.5]), seq, amask, P)
    assert rewards.tolist() == expected
    assert ("verifier" in parts) == (source != "rm")


def test_accuracy_per_category_with_the_paired_standard_error():
    prompts = ["\n\nHuman: What is 1 plus 1?\n\nAssistant:", "\n\nHuman: What is 2 plus 2?\n\nAssistant:",
               "\n\nHuman: What does a dog say?\n\nAssistant:", "\n\nHuman: How do I save money?\n\nAssistant:"]
    out, rows = accuracy(load_verifier("world"), prompts, ["2", "5", "meow", "x"], ["2", "4", "woof", "y"])
    assert out["sft_accuracy"] == pytest.approx(1 / 3) and out["aligned_accuracy"] == 1.0
    assert out["checkable_prompts"] == 3 and out["prompts_addition"] == 2
    assert out["sft_accuracy_addition"] == 0.5 and out["aligned_accuracy_sound"] == 1.0
    # Gains per prompt 0, 1, 1: mean 2/3, sample std sqrt(1/3), SE std / sqrt(3).
    assert out["accuracy_gain_se"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3), rel=1e-6)
    assert rows[3] == (None, None, None)
