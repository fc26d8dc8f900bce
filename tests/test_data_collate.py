"""Collators pad each batch to its own longest row; the sampler groups lengths and splits ranks."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rlhf_tasks.data import IGNORE_INDEX, LengthGroupedBatchSampler, PairCollator, PromptCollator, SFTCollator

PAD = 0


def test_sft_collator_right_pads_to_the_batch_longest():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}]
    b = SFTCollator(PAD)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert all(v.dtype == torch.long for v in b.values())


def test_pad_to_multiple_of():
    b = SFTCollator(PAD, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert b["input_ids"].shape == (1, 8) and b["attention_mask"].sum() == 3


@pytest.mark.parametrize("multiple", [None, 8])
def test_collators_build_what_transformers_collators_build(multiple):
    """The three collators produce exactly transformers' batches – DataCollatorForSeq2Seq
    for SFT rows, DataCollatorWithPadding for the stacked pairs, tokenizer.pad on the
    left for prompts – and keep their own only for speed (about 3x faster on CPU, with
    the DataLoader's collation on the training loop's path; measured 2026-11-26)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    from rlhf_tasks.runtime.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny-opt")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 500, int(n)).tolist() for n in rng.integers(1, 40, 12)]
    sft = [{"input_ids": s, "labels": [IGNORE_INDEX] * (len(s) // 3) + s[len(s) // 3:]} for s in seqs]
    pairs = [{"chosen_input_ids": a, "rejected_input_ids": b} for a, b in zip(seqs[::2], seqs[1::2], strict=True)]
    prompts = [{"prompt_input_ids": s} for s in seqs]

    def same(ours, theirs):
        assert sorted(ours) == sorted(theirs)
        for k in ours:
            assert torch.equal(ours[k], theirs[k].long()), k

    same(SFTCollator(tok.pad_token_id, multiple)(sft),
         DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=multiple,
                                return_tensors="pt")([dict(r) for r in sft]))
    stacked = [{"input_ids": r["chosen_input_ids"]} for r in pairs] + [{"input_ids": r["rejected_input_ids"]}
                                                                          for r in pairs]
    same(PairCollator(tok.pad_token_id, multiple)(pairs),
         DataCollatorWithPadding(tok, pad_to_multiple_of=multiple, return_tensors="pt")(stacked))
    same(PromptCollator(tok.pad_token_id, multiple)(prompts),
         dict(tok.pad([{"input_ids": r["prompt_input_ids"]} for r in prompts], padding_side="left",
                      pad_to_multiple_of=multiple, return_tensors="pt")))


def test_pair_collator_stacks_chosen_then_rejected():
    rows = [{"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 4]},
            {"chosen_input_ids": [5], "rejected_input_ids": [5, 6, 7, 8]}]
    b = PairCollator(PAD)(rows)
    assert b["input_ids"].shape == (4, 4)  # (2B, T), T = longest of all four
    assert b["input_ids"].tolist() == [[1, 2, 3, PAD], [5, PAD, PAD, PAD], [1, 4, PAD, PAD], [5, 6, 7, 8]]
    assert b["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]
    assert set(b) == {"input_ids", "attention_mask"}


def test_prompt_collator_left_pads():
    rows = [{"prompt_input_ids": [1, 2, 3], "chosen": " text"}, {"prompt_input_ids": [4], "chosen": " more"}]
    b = PromptCollator(PAD)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert set(b) == {"input_ids", "attention_mask"}  # text columns are left out


def test_collators_work_on_dataset_rows_through_a_dataloader():
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in (3, 9, 4)], "labels": [[1] * n for n in (3, 9, 4)],
                                     "length": [3, 9, 4], "source": ["a", "b", "c"]})
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=SFTCollator(PAD))))
    assert batch["input_ids"].shape == (2, 9)  # the batch's longest, never max_seq_len


# -- the sampler -------------------------------------------------------------------------

def lengths(n: int = 1000, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(5, 200, size=n).tolist()


def test_every_row_once_per_epoch():
    s = LengthGroupedBatchSampler(lengths(1003), 8, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 126
    assert sorted(i for b in batches for i in b) == list(range(1003))


def test_batches_hold_similar_lengths():
    ls = np.array(lengths())
    s = LengthGroupedBatchSampler(ls.tolist(), 16, seed=1)
    grouped = sum(16 * ls[b].max() - ls[b].sum() for b in s)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ls))
    random_batches = [perm[i:i + 16] for i in range(0, len(perm), 16)]
    random_padding = sum(16 * ls[b].max() - ls[b].sum() for b in random_batches)
    assert grouped < 0.1 * random_padding


def test_deterministic_per_seed_and_epoch():
    a = LengthGroupedBatchSampler(lengths(), 8, seed=3)
    b = LengthGroupedBatchSampler(lengths(), 8, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and list(a) != first
    assert list(LengthGroupedBatchSampler(lengths(), 8, seed=4)) != first


def test_batch_order_is_shuffled():
    s = LengthGroupedBatchSampler(lengths(), 8, seed=3)
    firsts = [max(lengths()[i] for i in b) for b in s]
    assert firsts != sorted(firsts, reverse=True)


def test_no_shuffle_keeps_order_within_mega_batches():
    s = LengthGroupedBatchSampler([1, 2, 3, 4, 5, 6], 2, seed=0, shuffle=False, mega_batches=1)
    assert list(s) == [[1, 0], [3, 2], [5, 4]]


def test_drop_last():
    s = LengthGroupedBatchSampler(lengths(1003), 8, seed=1, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 125 and all(len(b) == 8 for b in batches)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n", [1000, 1003, 17])
def test_ranks_partition_the_batches(n, drop_last):
    world = 3
    per_rank = [list(LengthGroupedBatchSampler(lengths(n), 8, seed=5, rank=r, world_size=world, drop_last=drop_last))
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # equal counts: no rank waits on a collective alone
    assert all(len(p) == len(LengthGroupedBatchSampler(lengths(n), 8, seed=5, rank=0, world_size=world,
                                                       drop_last=drop_last)) for p in per_rank)
    single = list(LengthGroupedBatchSampler(lengths(n), 8, seed=5, drop_last=drop_last))
    interleaved = [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(world)]
    if drop_last:
        assert interleaved == single[:len(interleaved)]
    else:
        assert interleaved[:len(single)] == single  # then a few repeated batches, to even out
        assert sorted({i for b in interleaved for i in b}) == list(range(n))


def test_resume_skips_the_first_batches():
    s = LengthGroupedBatchSampler(lengths(), 8, seed=1)
    s.set_epoch(2)
    assert list(s.iter_from(10)) == list(s)[10:]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler([1, 2], 0, seed=0)
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler([1, 2], 1, seed=0, rank=2, world_size=2)


def test_accepts_a_dataset_column():
    ds = datasets.Dataset.from_dict({"length": [3, 1, 2]})
    assert sorted(i for b in LengthGroupedBatchSampler(ds["length"], 2, seed=0) for i in b) == [0, 1, 2]
