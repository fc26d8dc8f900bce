"""A model's parameters under ZeRO-3 too: whether they are partitioned, their full sizes,
the whole state dict gathered one parameter at a time, train/eval mode for a block."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def is_partitioned(model: nn.Module) -> bool:
    """ZeRO-3 gives each parameter a ``ds_id`` and keeps only a shard of it on each rank."""
    p = next(model.parameters(), None)
    return p is not None and hasattr(p, "ds_id")


def numel(p: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 holds only a shard of it (``ds_numel``;
    transformers' ``num_parameters`` would count 0)."""
    return getattr(p, "ds_numel", None) or p.numel()


def gathered_state_dict(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a ZeRO-3 model, on CPU on the main rank (``None`` on the
    others): every rank takes part in gathering one parameter at a time, so apart from the
    main rank's copy no rank ever holds more than one whole parameter. Tied weights stay
    one tensor, as in ``state_dict()``."""
    import deepspeed

    out, seen = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            if hasattr(t, "ds_id"):
                with deepspeed.zero.GatheredParameters([t]):
                    seen[id(t)] = t.data.to("cpu", copy=True) if is_main else None
            else:
                seen[id(t)] = t.detach().to("cpu", copy=True) if is_main else None
        out[name] = seen[id(t)]
    return out if is_main else None


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(map(numel, model.parameters()))
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable
