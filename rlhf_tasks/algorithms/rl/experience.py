"""The typed record that a rollout hands to the update.

Everything the update needs is here and nothing else: the update never calls the
reference or reward model again, and the rollout never looks at optimiser state.
Tensors are per-token over the ``T - 1`` next-token positions of a sequence:
position ``t`` holds the quantity for the action "emit token ``t + 1``", so it lines
up with ``actor_log_probs(model, sequences, attention_mask)`` (rl/models.py: the LM head in chunks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# Fields shaped (B, T-1): one entry per next-token position (None where an algorithm has none).
_PER_ACTION = ("action_mask", "action_log_probs", "ref_log_probs", "advantages", "values", "returns")


@dataclass
class Experience:
    """One batch of rollouts, scored and ready for ``ppo_epochs`` of updates.

    B is the number of rollouts, T = P + A the padded prompt + answer length.

    sequences:        (B, T) int, left-padded prompt ids then answer ids
    attention_mask:   (B, T) 1 on real tokens, 0 on padding on either side
    action_mask:      (B, T-1) 1 where position t predicts an answer token that counts
                      (answer tokens up to and including EOS; 0 on the prompt and on the
                      padding after EOS)
    action_log_probs: (B, T-1) log pi_old(token t+1 | tokens <= t) of the policy that sampled
    ref_log_probs:    (B, T-1) the same under the frozen reference (SFT) model
    advantages:       (B, T-1) by the section's estimator, 0 where masked
    scores:           (B,) the reward of each answer (reward model + terms), clipped
    prompt_len:       P, the padded prompt length (answers start at column P)
    values:           (B, T-1) the critic's V(state before action t) (PPO; else None)
    returns:          (B, T-1) the critic's targets, advantages + values before whitening (PPO)
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    action_log_probs: torch.Tensor
    ref_log_probs: torch.Tensor
    advantages: torch.Tensor
    scores: torch.Tensor
    prompt_len: int
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Shape checks only: they read metadata, never the device, so they cost no sync.
        B, T = self.sequences.shape
        if self.attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask is {tuple(self.attention_mask.shape)}, expected {(B, T)}")
        for name in _PER_ACTION:
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (B, T - 1):
                raise ValueError(f"{name} is {tuple(value.shape)}, expected {(B, T - 1)} (one entry per next-token "
                                 "position)")
        if tuple(self.scores.shape) != (B,):
            raise ValueError(f"scores is {tuple(self.scores.shape)}, expected {(B,)}")
        if not 0 < self.prompt_len <= T:
            raise ValueError(f"prompt_len {self.prompt_len} is outside (0, {T}]")

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "prompt_len" and getattr(self, f.name) is not None}

    def _map(self, fn) -> Experience:
        return dataclasses.replace(self, **{k: fn(v) for k, v in self._tensors().items()})

    def to(self, device: torch.device | str) -> Experience:
        """A copy on ``device`` (tensors already there are not copied)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def detach(self) -> Experience:
        """A copy cut from any autograd graph: the update must treat the rollout as data."""
        return self._map(torch.Tensor.detach)

    def select(self, rows: torch.Tensor | slice) -> Experience:
        """The rollouts ``rows`` (indices or a slice), every field alike."""
        return self._map(lambda t: t[rows])

    def split(self, micro_batch_size: int) -> list[Experience]:
        """Consecutive micro-batches of at most ``micro_batch_size`` rollouts (views, no copy).

        The last one is smaller when B is not a multiple; every one keeps the full T
        so that masks and positions stay aligned.
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        return [self.select(slice(i, i + micro_batch_size)) for i in range(0, len(self), micro_batch_size)]

    @staticmethod
    def concat(parts: list[Experience]) -> Experience:
        """One record of several rollout batches: each is padded on the left to the longest
        prompt and on the right to the longest answer (masked columns: positions come from
        the attention mask, so padding changes no log-prob)."""
        if len(parts) == 1:
            return parts[0]
        P = max(p.prompt_len for p in parts)
        A = max(p.sequences.shape[1] - p.prompt_len for p in parts)

        def pad(part: Experience, t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 1:
                return t
            left = P - part.prompt_len
            return torch.nn.functional.pad(t, (left, P + A - left - part.sequences.shape[1]))

        fields = {name: torch.cat([pad(p, getattr(p, name)) for p in parts]) for name in parts[0]._tensors()}
        return Experience(**fields, prompt_len=P)
