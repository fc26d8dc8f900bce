"""What a run costs, from wall-clock time: the one formula behind ``cost/gpu_hours``,
``cost/usd``, a stage's ``cost_usd`` and the run report's cost column."""

from __future__ import annotations

from collections.abc import Mapping


def gpu_hours(wall_clock_s: float, num_gpus: int, on_gpu: bool = True) -> float:
    """GPU-hours billed: wall-clock hours x GPUs (idle GPUs are paid for too); none for a
    run that used no GPU (``on_gpu`` False)."""
    return wall_clock_s / 3600.0 * num_gpus if on_gpu else 0.0


def cost_usd(wall_clock_s: float, gpu_hourly_usd: float, num_gpus: int, on_gpu: bool = True) -> float:
    """``cost/usd`` = wall-clock hours x hourly price per GPU x GPUs (0 without a GPU)."""
    return gpu_hours(wall_clock_s, num_gpus, on_gpu) * gpu_hourly_usd


def stage_cost(metrics: Mapping, wall_clock_s: float, gpu_hourly_usd: float, num_gpus: int) -> tuple[float, float]:
    """A finished stage's (USD, GPU-hours): the figures it recorded, else priced from its
    wall-clock as a GPU stage (a result from before stages recorded them)."""
    usd = metrics.get("cost_usd", cost_usd(wall_clock_s, gpu_hourly_usd, num_gpus))
    hours = metrics.get("cost_gpu_hours", gpu_hours(wall_clock_s, num_gpus, "cost_usd" not in metrics))
    return float(usd), float(hours)
