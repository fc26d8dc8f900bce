"""The process group's helpers: a free port for its master, and the collectives every
stage uses, the same on one process and on many (each entered by every rank the same
number of times, in the same order)."""

from __future__ import annotations

import socket

import torch


def free_port() -> int:
    """A free TCP port on loopback (the process group's master port, local servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the process group (a new tensor; ``t`` itself on one process)."""
    import torch.distributed as dist

    if world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def min_across_ranks(value: int, device: torch.device) -> int:
    """The smallest of each rank's ``value`` (one collective, one sync)."""
    import torch.distributed as dist

    if world_size() == 1:
        return value
    t = torch.tensor(value, device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    """Wait for every rank (nothing on one process)."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.barrier()


def mean_across_ranks(values: dict[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (every rank passes the same keys): what a stage
    logs is the whole step's, not rank 0's share. One collective, one host sync."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], device=device, dtype=torch.float64).reshape(()) for k in keys])
    means = (sum_across_ranks(t) / world_size()).tolist()
    return dict(zip(keys, means, strict=True))
