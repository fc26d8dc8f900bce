"""Batches: padded to the longest sequence in the batch (never to ``max_seq_len``), and a
sampler that puts similar lengths together so that little padding is left.

Rows are the tokenised datasets' rows (dicts of python lists); every collator returns only
tensors, so a training loop can move the whole batch with one ``.to(device)`` each. The
batches are exactly transformers' (``DataCollatorForSeq2Seq``, ``DataCollatorWithPadding``,
``tokenizer.pad(padding_side="left")``: tests/test_data_collate.py); these build them about
3x faster (a 16-row SFT batch: 0.97 ms against 3.3 ms, 2-core AMD EPYC), which matters because
the DataLoader collates on the training loop's own thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .tokenize import IGNORE_INDEX


def _width(longest: int, multiple: int | None) -> int:
    return -(-longest // multiple) * multiple if multiple else longest


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False, multiple: int | None = None) -> torch.Tensor:
    """(B, T) int64, T the longest of ``seqs`` (rounded up to ``multiple``), padded with ``value``."""
    width = _width(max((len(s) for s in seqs), default=0), multiple)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _mask(seqs: Sequence[Sequence[int]], width: int, left: bool = False) -> torch.Tensor:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    pos = torch.arange(width)
    if left:
        return (pos >= width - lengths[:, None]).long()  # (B, T)
    return (pos < lengths[:, None]).long()  # (B, T)


class SFTCollator:
    """Right-padded ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with
    IGNORE_INDEX on padding (and on the prompt, as tokenised)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        input_ids = pad(ids, self.pad_id, multiple=self.multiple)
        return {"input_ids": input_ids, "attention_mask": _mask(ids, input_ids.shape[1]),
                "labels": pad([r["labels"] for r in rows], IGNORE_INDEX, multiple=self.multiple)}


class PairCollator:
    """Chosen rows then rejected rows, right-padded into one batch: ``input_ids`` (2B, T),
    ``attention_mask`` (2B, T). One forward pass scores both; ``scores.chunk(2)`` splits them."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        input_ids = pad(ids, self.pad_id, multiple=self.multiple)
        return {"input_ids": input_ids, "attention_mask": _mask(ids, input_ids.shape[1])}


class DPOCollator(PairCollator):
    """A :class:`PairCollator` batch plus ``answer_mask`` (2B, T): 1 on the answer tokens
    (EOS included), 0 on the prompt and padding, for log-probs summed over the answer only
    (chosen and rejected share their prompt, so one ``chosen_prompt_len`` serves both).
    Rows that carry ``ref_chosen_logps``/``ref_rejected_logps`` (the reference pass's, in
    nats) add ``ref_log_probs`` (2B,) float32, in the same chosen-then-rejected order."""

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        prompt_len = torch.tensor([r["chosen_prompt_len"] for r in rows] * 2, dtype=torch.long)
        pos = torch.arange(batch["input_ids"].shape[1])
        batch["answer_mask"] = (pos >= prompt_len[:, None]).long() * batch["attention_mask"]  # (2B, T)
        if rows and "ref_chosen_logps" in rows[0]:
            batch["ref_log_probs"] = torch.tensor([r["ref_chosen_logps"] for r in rows]
                                                  + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32)
        return batch


class KTOCollator:
    """Unpaired answers, right-padded: ``input_ids`` (B, T), ``attention_mask`` (B, T),
    ``answer_mask`` (B, T) (1 on the answer tokens, EOS included), ``desirable`` (B,) float
    1/0 where rows carry it, and ``ref_log_probs`` (B,) float32 where rows carry
    ``ref_logps`` (the reference pass's, in nats)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        input_ids = pad(ids, self.pad_id, multiple=self.multiple)
        attention_mask = _mask(ids, input_ids.shape[1])
        prompt_len = torch.tensor([r["prompt_len"] for r in rows], dtype=torch.long)
        pos = torch.arange(input_ids.shape[1])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "answer_mask": (pos >= prompt_len[:, None]).long() * attention_mask}  # (B, T)
        if rows and "desirable" in rows[0]:
            batch["desirable"] = torch.tensor([float(r["desirable"]) for r in rows])
        if rows and "ref_logps" in rows[0]:
            batch["ref_log_probs"] = torch.tensor([r["ref_logps"] for r in rows], dtype=torch.float32)
        return batch


class PromptCollator:
    """Left-padded prompts ``input_ids`` (B, T) and ``attention_mask`` (B, T): generation
    appends new tokens on the right, so every prompt must end at the same position."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["prompt_input_ids"] for r in rows]
        input_ids = pad(ids, self.pad_id, left=True, multiple=self.multiple)
        return {"input_ids": input_ids, "attention_mask": _mask(ids, input_ids.shape[1], left=True)}


class LengthGroupedBatchSampler:
    """Batches of row indices with similar lengths, in random order.

    Per epoch: shuffle the rows (seeded by ``(seed, epoch)``), cut them into mega-batches of
    ``mega_batches`` batches, sort each mega-batch by length (longest first) and cut it into
    batches, then shuffle the batch order. Batches hold similar lengths (little padding)
    while the data order stays random. With ``world_size`` ranks, rank r takes batches r,
    r + world_size, ...; every rank gets the same number (the list is padded by repeating
    its first batches, or cut when ``drop_last``), so no rank waits on a collective forever.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, mega_batches: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        self.lengths = np.fromiter((int(x) for x in lengths), dtype=np.int64)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.rank, self.world_size, self.mega_batches = rank, world_size, mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        """Every rank's batches for this epoch, before the rank partition."""
        n, B = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        mega = B * self.mega_batches
        batches: list[list[int]] = []
        for start in range(0, n, mega):
            chunk = order[start:start + mega]
            # Stable sort: equal lengths keep their shuffled order.
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + B].tolist() for i in range(0, len(chunk), B)]
        if self.drop_last and batches and len(batches[-1]) < B:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.world_size > 1 and batches:
            if self.drop_last:
                batches = batches[:len(batches) // self.world_size * self.world_size]
            else:
                extra = -len(batches) % self.world_size
                batches += [batches[i % len(batches)] for i in range(extra)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(0)

    def iter_from(self, skip: int) -> Iterator[list[int]]:
        """This rank's batches, without its first ``skip`` (resuming mid-epoch)."""
        return iter(self._all_batches()[self.rank::self.world_size][skip:])

    def __len__(self) -> int:
        n, B = len(self.lengths), self.batch_size
        total = n // B if self.drop_last else -(-n // B)
        if self.world_size > 1:
            total = total // self.world_size * self.world_size if self.drop_last else -(-total // self.world_size) * self.world_size
        return total // self.world_size
