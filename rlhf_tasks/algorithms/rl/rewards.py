"""The reward an RL step optimises (the config's ``reward`` section): its source (the reward
model's score, a verifier's 1/0 from rlhf_tasks/algorithms/verifiers.py, or both weighted)
plus weighted rule-based terms.

Each term is a pure function of the rollout, logged on its own so that a reward hack
shows (answers that grow or repeat because the reward model likes it):

- ``length``: answer tokens / answer budget, in [0, 1];
- ``repetition``: share of the answer's n-grams that repeat an earlier one, in [0, 1];
- ``overlong``: DAPO's soft overlong penalty (Yu et al. 2025, eq. 13): 0 up to the last
  ``overlong_buffer`` tokens of the budget, then falling linearly to -1 at the budget (an
  answer cut off there without EOS gets -1);
- ``function``: ``module:function`` installed on the worker, called as
  ``f(prompts: list[str], answers: list[str]) -> list[float]``. Importing it runs code, so
  it needs the worker's consent as remote model code does: ``RLHF_ALLOW_REWARD_FUNCTION=1``
  in the worker's environment; a trigger-form value alone cannot make the worker run code.
"""

from __future__ import annotations

import torch

from ...config.sections import RewardConfig
from ...data.chat import Renderer, renderer
from ..verifiers import load_function, load_verifier


def length_term(action_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """(B, N) action mask -> (B,) answer length as a share of the budget."""
    return action_mask.float().sum(-1) / max(max_new_tokens, 1)


def overlong_term(action_mask: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """(B, N) action mask -> (B,) in [-1, 0]: ``((L - buffer) - length) / buffer`` over the
    buffer's tokens, 0 before it (L the answer budget)."""
    length = action_mask.float().sum(-1)
    start = max_new_tokens - buffer
    return ((start - length) / max(buffer, 1)).clamp(-1.0, 0.0)


def repetition_term(answers: torch.Tensor, answer_mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, A) answer ids, (B, A) mask -> (B,) share of the n-grams that occurred before in
    the same answer (0 for an answer shorter than n + 1 tokens)."""
    out = torch.zeros(answers.shape[0])
    for i, (row, m) in enumerate(zip(answers.tolist(), answer_mask.tolist(), strict=True)):
        ids = row[:int(sum(m))]
        grams = [tuple(ids[j:j + n]) for j in range(len(ids) - n + 1)]
        if grams:
            out[i] = (len(grams) - len(set(grams))) / len(grams)
    return out


def questions(tok, render: Renderer, sequences: torch.Tensor, prompt_len: int) -> list[str]:
    """(B, T) prompt + answer ids -> each conversation's last user turn, what a verifier
    checks (decoded with the special tokens, so that a chat template's turns can be told apart)."""
    return [render.user_text(p) for p in tok.batch_decode(sequences[:, :prompt_len], skip_special_tokens=False)]


def verified(values: list[float | None]) -> torch.Tensor:
    """A verifier's values -> (B,) reward: an answer it cannot check earns nothing."""
    return torch.tensor([0.0 if v is None else v for v in values])


class RewardTerms:
    """``total(scores, rollout) -> (rewards, parts)``: the source's reward (the RM score, the
    verifier's, or both weighted) plus the weighted terms; ``parts`` holds each term's
    per-answer values (before weighting) for the log."""

    def __init__(self, t: RewardConfig, max_new_tokens: int, tokenizer=None, render: Renderer | None = None):
        self.t, self.max_new_tokens, self.tok = t, max_new_tokens, tokenizer
        self.render = render if render is not None or tokenizer is None else renderer(tokenizer)
        self.fn = load_function(t.function) if t.function else None
        self.verifier = load_verifier(t.verifier) if t.source != "rm" else None

    @property
    def active(self) -> bool:
        return bool(self.t.length_coef or self.t.repetition_coef or self.t.overlong_buffer or self.fn)

    def texts(self, sequences: torch.Tensor, action_mask: torch.Tensor, prompt_len: int) -> tuple[list[str], list[str]]:
        """The prompts and answers as text (what a reward function or verifier reads)."""
        prompts = self.tok.batch_decode(sequences[:, :prompt_len], skip_special_tokens=True)
        answers = [self.tok.decode(s[prompt_len:][m[prompt_len - 1:].bool()], skip_special_tokens=True)
                   for s, m in zip(sequences, action_mask, strict=True)]
        return prompts, answers

    def total(self, scores: torch.Tensor | None, sequences: torch.Tensor, action_mask: torch.Tensor,
              prompt_len: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B,) RM scores (None without a reward model) -> (B,) rewards, and each term's
        per-answer values (B,)."""
        t, parts = self.t, {}
        if t.source == "rm":
            rewards = scores
        else:
            values = self.verifier(questions(self.tok, self.render, sequences, prompt_len),
                                   self.texts(sequences, action_mask, prompt_len)[1])
            parts["verifier"] = verified(values).to(sequences.device)
            rewards = t.verifier_coef * parts["verifier"]
            if t.source == "both":
                rewards = rewards.to(scores) + t.rm_coef * scores
        if t.length_coef:
            parts["length"] = length_term(action_mask, self.max_new_tokens).to(rewards)
            rewards = rewards + t.length_coef * parts["length"]
        if t.overlong_buffer:
            parts["overlong"] = overlong_term(action_mask, self.max_new_tokens, t.overlong_buffer).to(rewards)
            rewards = rewards + t.overlong_coef * parts["overlong"]
        if t.repetition_coef:
            answers, amask = sequences[:, prompt_len:], action_mask[:, prompt_len - 1:]
            parts["repetition"] = repetition_term(answers, amask, t.repetition_ngram).to(rewards)
            rewards = rewards + t.repetition_coef * parts["repetition"]
        if self.fn is not None:
            prompts, answers = self.texts(sequences, action_mask, prompt_len)
            values = self.fn(prompts, answers)
            if len(values) != len(answers):
                raise ValueError(f"{t.function} returned {len(values)} rewards for {len(answers)} answers")
            parts["function"] = torch.tensor([float(v) for v in values]).to(rewards)
            rewards = rewards + t.function_coef * parts["function"]
        return rewards, parts
