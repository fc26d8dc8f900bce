"""The plots logged as image artifacts: figures built without pyplot (no global state,
no GUI backend, safe off the main thread). matplotlib is imported when a plot is made."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def _figure(width_in: float, height_in: float):
    """A figure not registered with pyplot: no global state, no GUI backend, safe off
    the main thread, garbage-collected once logged."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), layout="constrained")


def plot_curves(history: Mapping[str, Iterable[tuple[int, float]]], title: str):
    """One subplot per metric, (step, value) pairs, up to 3 subplots a row."""
    names = [k for k, v in history.items() if list(v)]
    if not names:
        fig = _figure(4, 3)
        fig.suptitle(title)
        fig.add_subplot().text(0.5, 0.5, "no data", ha="center", va="center")
        return fig
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows)
    fig.suptitle(title)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps, values = zip(*history[name], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    return fig


def plot_score_histogram(chosen_scores: Iterable[float], rejected_scores: Iterable[float]):
    """Reward-model scores of chosen vs rejected answers on shared bins, with the
    means and, for paired lists, the pairwise accuracy in the title."""
    chosen, rejected = [float(x) for x in chosen_scores], [float(x) for x in rejected_scores]
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    both = chosen + rejected
    if both:
        lo, hi = min(both), max(both)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        for scores, label, color in ((chosen, "chosen", "tab:green"), (rejected, "rejected", "tab:red")):
            if scores:
                mean = sum(scores) / len(scores)
                ax.hist(scores, bins=bins, alpha=0.5, color=color, label=f"{label} (mean {mean:.3f})")
                ax.axvline(mean, color=color, linestyle="--", linewidth=1)
    title = "reward model scores"
    if chosen and len(chosen) == len(rejected):
        acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
        title += f", accuracy {acc:.3f} on {len(chosen)} pairs"
    ax.set_title(title)
    ax.set_xlabel("score")
    ax.set_ylabel("count")
    ax.legend()
    return fig
