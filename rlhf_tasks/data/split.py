"""Disjoint per-phase shares of every dataset (DeepSpeed-Chat's ``data_split``).

``"2,4,4"`` gives SFT (phase 1) the first 20% of a seeded permutation of the rows, the RM
(phase 2) the next 40% and PPO (phase 3) the last 40%: no phase sees another's rows, and
together they cover every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np

PHASES = (1, 2, 3)


def parse_data_split(data_split: str | Sequence[float]) -> np.ndarray:
    """``"2,4,4"`` -> fractions ``[0.2, 0.4, 0.4]``; ValueError naming the value otherwise."""
    try:
        parts = [p.strip() for p in data_split.split(",")] if isinstance(data_split, str) else list(data_split)
        weights = np.array([float(p) for p in parts], dtype=np.float64)
    except (TypeError, ValueError):
        weights = np.array([])
    if len(weights) != len(PHASES) or not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"data_split={data_split!r}: expected {len(PHASES)} non-negative comma-separated weights "
                         f"for SFT,RM,PPO with a positive sum, such as '2,4,4' or '10,0,0'")
    return weights / weights.sum()


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Contiguous shares of one seeded permutation of ``range(n)``, sized by ``fractions``.

    Boundaries are the rounded cumulative fractions, the last pinned to ``n``, so the shares
    are disjoint and cover everything whatever the rounding.
    """
    if n < 0:
        raise ValueError(f"n={n}: a dataset size cannot be negative")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.rint(np.cumsum(fractions) * n).astype(np.int64)
    bounds[-1] = n
    starts = np.concatenate([[0], bounds[:-1]])
    return [order[s:e] for s, e in zip(starts, bounds, strict=True)]


def phase_indices(n: int, data_split: str | Sequence[float], phase: int, seed: int) -> np.ndarray:
    """The row indices (int64) of ``phase`` (1 = SFT, 2 = RM, 3 = PPO) among ``n`` rows."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: expected one of {PHASES} (1 = SFT, 2 = reward model, 3 = PPO)")
    return split_indices(n, parse_data_split(data_split), seed)[phase - 1]


def blend(named: Sequence[tuple[str, datasets.Dataset]], data_split: str | Sequence[float], phase: int,
          seed: int) -> datasets.Dataset:
    """Concatenate each dataset's ``phase`` share into one dataset with a ``source`` column
    (the name each came with). Datasets must share their columns."""
    if not named:
        raise ValueError("blend needs at least one dataset")
    parts = []
    for name, ds in named:
        share = ds.select(phase_indices(len(ds), data_split, phase, seed))
        parts.append(share.add_column("source", [name] * len(share), feature=datasets.Value("string")))
    return datasets.concatenate_datasets(parts)
