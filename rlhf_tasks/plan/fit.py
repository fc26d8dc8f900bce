"""What to change when a stage does not fit, and the largest batch that does: both found
by re-planning candidate configs, never from a fixed table of hints.

A candidate is one change, as ``--set`` overrides (a change may need two keys: LoRA that
saves memory is ``lora_dim`` with ``only_optimize_lora``; halving the micro-batch doubles
``gradient_accumulation_steps`` so the effective batch stays). Candidates are tried in
order of what they cost the run: gradient checkpointing (~30% more compute), a higher
ZeRO stage (communication), LoRA (a different model update), a smaller micro-batch
(throughput), offload (CPU-bound optimizer steps). The first that fits is named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..config import ALGORITHMS, ConfigError, PipelineConfig
from ..config.load import set_path
from .stages import StagePlan, plan_stage, rl_sections

LORA_DIM = 128  # the seed recipe's LoRA dim
MAX_BATCH = 4096


def _engine_changes(path: str, sec) -> Iterator[tuple[str, dict]]:
    if not sec.gradient_checkpointing:
        yield "gradient checkpointing", {f"{path}.gradient_checkpointing": True}
    for z in range(sec.zero_stage + 1, 4):
        yield f"ZeRO stage {z}", {f"{path}.zero_stage": z}
    if not sec.only_optimize_lora:
        yield "LoRA", {f"{path}.lora_dim": sec.lora_dim or LORA_DIM, f"{path}.only_optimize_lora": True}


def _offload(path: str, sec) -> Iterator[tuple[str, dict]]:
    if not sec.offload:
        yield "optimizer offload", {f"{path}.offload": True, f"{path}.zero_stage": max(sec.zero_stage, 1)}


def candidates(cfg: PipelineConfig, stage: str) -> list[tuple[str, dict]]:
    """(what, overrides) for each single change of ``stage``'s memory settings, cheapest first."""
    if stage in ("sft", "rm"):
        sec = getattr(cfg, stage)
        out = list(_engine_changes(stage, sec))
        if sec.per_device_train_batch_size > 1:
            out.append(("half the micro-batch", {
                f"{stage}.per_device_train_batch_size": sec.per_device_train_batch_size // 2,
                f"{stage}.gradient_accumulation_steps": sec.gradient_accumulation_steps * 2}))
        return out + list(_offload(stage, sec))
    sec, actor, actor_path = rl_sections(cfg, stage)
    critic = getattr(sec, "critic_section", None)
    engines = [(actor_path, actor)] + ([(f"{stage}.critic", critic)] if critic is not None else [])
    out = [c for path, s in engines for c in _engine_changes(path, s)]
    if (b := getattr(sec, "per_device_train_batch_size", 1)) > 1:
        out.append(("half the training micro-batch", {f"{stage}.per_device_train_batch_size": b // 2}))
    if (g := getattr(sec, "per_device_generation_batch_size", 1)) > 1:
        out.append(("half the generation batch", {f"{stage}.per_device_generation_batch_size": g // 2}))
    if not getattr(sec, "offload_reference_model", True):
        out.append(("offload the reference model", {f"{stage}.offload_reference_model": True}))
    return out + [c for path, s in engines for c in _offload(path, s)]


def with_changes(cfg: PipelineConfig, changes: dict) -> PipelineConfig | None:
    """``cfg`` with ``changes`` applied and validated; None when the config refuses them."""
    raw = cfg.to_dict()
    for key, value in changes.items():
        set_path(raw, key, value)
    try:
        return PipelineConfig.from_dict(raw)
    except ConfigError:
        return None


def smallest_fix(cfg: PipelineConfig, configs: dict, stage: str, capacity: int) -> dict | None:
    """The first candidate change (cheapest first) whose re-planned peak fits ``capacity``
    bytes: {"change", "set", "peak"}; None when no single change fits."""
    for what, changes in candidates(cfg, stage):
        new = with_changes(cfg, changes)
        if new is None:
            continue
        p = plan_stage(new, configs, stage)
        if p.peak <= capacity:
            return {"change": what, "set": changes, "peak": p.peak}
    return None


def batch_paths(cfg: PipelineConfig, stage: str) -> list[str]:
    """The per-device batch settings of ``stage`` (PPO-family: the rollout and training
    batches together, equal as in the seed recipe)."""
    if stage in ("sft", "rm"):
        return [f"{stage}.per_device_train_batch_size"]
    keys = ["per_device_train_batch_size"] + (["per_device_generation_batch_size"] if ALGORITHMS[stage].rollouts else [])
    return [f"{stage}.{k}" for k in keys]


def _peak_at(cfg: PipelineConfig, configs: dict, stage: str) -> Callable[[int], int | None]:
    paths = batch_paths(cfg, stage)

    def peak(b: int) -> int | None:
        new = with_changes(cfg, {p: b for p in paths})
        return None if new is None else plan_stage(new, configs, stage).peak
    return peak


def largest_batch(cfg: PipelineConfig, configs: dict, stage: str, capacity: int) -> int:
    """The largest per-device batch of ``stage`` that fits ``capacity`` bytes (0: not even 1).

    Memory grows linearly with the batch (activations, logits, KV cache), so the plans at
    batch 1 and 2 give a first guess; it is then checked by planning it, and stepped down
    (or up) by planning until the answer is the largest batch that fits."""
    peak = _peak_at(cfg, configs, stage)
    p1 = peak(1)
    if p1 is None or p1 > capacity:
        return 0
    p2 = peak(2)
    slope = max((p2 or p1) - p1, 1)
    guess = min(MAX_BATCH, max(1, 1 + (capacity - p1) // slope))

    def fits(b: int) -> bool:
        p = peak(b)
        return p is not None and p <= capacity

    lo, hi = (guess, guess + 1) if fits(guess) else (1, guess)  # lo fits; hi does not, or is unchecked
    while hi <= MAX_BATCH and fits(hi) and hi > lo:
        lo, hi = hi, min(MAX_BATCH + 1, hi + max(1, hi - lo) * 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def describe_fix(plan: StagePlan, fix: dict | None, capacity: int, gb: float = 1e9) -> str:
    """The refusal message: the stage, its planned peak, and the change that fits."""
    head = f"stage {plan.stage} plans a peak of {plan.peak / gb:.1f} GB per GPU, more than the {capacity / gb:.1f} GB free"
    if fix is None:
        return head + "; no single change (gradient checkpointing, ZeRO stage, LoRA, batch size, offload) fits it"
    sets = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fix["set"].items())
    return head + f"; smallest change that fits: {fix['change']} (--set {sets}: {fix['peak'] / gb:.1f} GB)"
