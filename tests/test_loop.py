"""How held-out rows are split over ranks (rlhf_tasks/runtime/loop.py): every rank runs as
many forward passes, every row is counted once; and evaluate's way back to prompt order."""

from __future__ import annotations

import pytest

from rlhf_tasks.pipeline.evaluate import unshard
from rlhf_tasks.runtime.loop import shard_batches


@pytest.mark.parametrize("rows, batch, world", [(40, 16, 2), (40, 64, 2), (33, 4, 3), (8, 4, 2), (0, 4, 2),
                                                (10, 3, 1), (5, 1, 8)])
def test_every_rank_gets_as_many_batches_and_every_row_counts_once(rows, batch, world):
    lengths = [(7 * i) % 11 for i in range(rows)]
    shards = [shard_batches(lengths, batch, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # as many forward passes on every rank
    real = sorted(i for s in shards for idx, keep in s if keep for i in idx)
    assert real == list(range(rows))
    assert all(len(idx) <= batch for s in shards for idx, _ in s)
    padding = sum(not keep for s in shards for _, keep in s)
    assert padding == len(shards[0]) * world - -(-rows // batch)  # only what evens the counts out


def test_rows_are_in_length_order_within_a_rank():
    lengths = [5, 1, 4, 2, 3, 0]
    (b0, _), (b1, _) = shard_batches(lengths, 2, 0, 2)[0], shard_batches(lengths, 2, 1, 2)[0]
    assert [lengths[i] for i in b0] == [0, 1] and [lengths[i] for i in b1] == [2, 3]


def test_unshard_puts_the_ranks_rows_back_in_prompt_order():
    sizes = [3, 3, 3, 1]  # four batches of prompts, the last one short
    rows = list(range(10))
    parts = [rows[0:3] + rows[6:9], rows[3:6] + rows[9:10]]  # rank 0: batches 0, 2; rank 1: batches 1, 3
    assert unshard(parts, sizes, 2) == rows
    assert unshard([rows], sizes, 1) == rows
