"""What a run costs, from wall-clock time: the one formula behind ``cost/gpu_hours``,
``cost/usd``, a stage's ``cost_usd`` and the run report's cost column."""

from __future__ import annotations


def gpu_hours(wall_clock_s: float, num_gpus: int, on_gpu: bool = True) -> float:
    """GPU-hours billed: wall-clock hours x GPUs (idle GPUs are paid for too); none for a
    run that used no GPU (``on_gpu`` False)."""
    return wall_clock_s / 3600.0 * num_gpus if on_gpu else 0.0


def cost_usd(wall_clock_s: float, gpu_hourly_usd: float, num_gpus: int, on_gpu: bool = True) -> float:
    """``cost/usd`` = wall-clock hours x hourly price per GPU x GPUs (0 without a GPU)."""
    return gpu_hours(wall_clock_s, num_gpus, on_gpu) * gpu_hourly_usd
