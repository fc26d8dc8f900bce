"""``deepspeed ... tests/faults/uneven_eval.py <stage> ...``: ``python -m rlhf_tasks <stage>``
with the evaluation shards as they were before issue 24: rank r takes every world-th
held-out batch and nothing pads the shorter shares. Under ZeRO-3 every forward pass is a
collective, so the rank with one batch fewer leaves the others waiting in it for ever (the
issue's hang). The hook replaces :func:`rlhf_tasks.runtime.loop.shard_batches` from outside
the package; the watchdog must turn the hang into an error naming the stage, phase and rank."""

from __future__ import annotations

import runpy

from rlhf_tasks.runtime import loop


def uneven_shards(lengths, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[list[int], bool]]:
    order = sorted(range(len(lengths)), key=list(lengths).__getitem__)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [(b, True) for b in batches[rank::world_size]]


if __name__ == "__main__":
    loop.shard_batches = uneven_shards  # eval_batches looks it up at each call
    runpy.run_module("rlhf_tasks", run_name="__main__", alter_sys=True)
