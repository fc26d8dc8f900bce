"""Trace one step of the real model class on fake tensors: parameter counts and the
activations at the step's peak, from the model's ``config.json`` alone.

The model is built by transformers from its config under ``FakeTensorMode`` (tensors
with shapes and dtypes but no storage), wrapped as the stage wraps it (LoRA by peft, the
reward head, gradient checkpointing, dropout), and run through the stage's own loss on a
``(batch, seq_len)`` batch inside torch's ``MemTracker``, which attributes every
allocation to parameters, gradients, activations or temporaries and records the peak.
A full-size OPT-1.3B SFT step traces in about 10 s on one CPU core.

What a trace cannot see is left to :mod:`.states`: ZeRO's partitioning across processes,
offload, DeepSpeed's buffers and the optimizer's fp32 states (DeepSpeed's optimizers are
not torch's). An architecture that cannot be built here (a ``trust_remote_code`` model,
a ``model_type`` this transformers does not know, an op fake tensors cannot run) falls
back to formulas with a warning: the plan is rougher, never refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch

from .states import Counts, fallback_activations, fallback_counts

log = logging.getLogger("rlhf_tasks")

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
TRACE_LAYERS = 2  # deeper models: traced at 2 and 4 blocks, extrapolated (see _trace)
KINDS = ("lm", "reward", "policy", "value", "forward_lm", "forward_value")
_CACHE: dict[tuple, Traced] = {}


@dataclass(frozen=True)
class StepSpec:
    """One traced step. ``kind``: ``lm`` (SFT: causal-LM loss), ``reward`` (RM: pairwise
    loss; ``batch`` counts sequences, chosen + rejected), ``policy`` (PPO-family actor
    update, DPO: log-probs of the taken tokens), ``value`` (critic update), ``forward_lm``
    / ``forward_value`` (the no-grad scoring pass of the rollout)."""

    kind: str
    batch: int
    seq_len: int
    dtype: str
    checkpointing: bool = False
    lora_dim: int = 0
    lora_module_name: str = "auto"
    only_lora: bool = False
    attn: str = "sdpa"
    dropout: float | None = None
    logits: str = "chunked"  # "whole": the (B, T, V) logits and transformers' labels= loss (ZeRO-3, a plain loop)


@dataclass(frozen=True)
class Traced:
    counts: Counts
    grads: int  # gradient bytes live at the step's peak (training dtype)
    activations: int  # activation + temporary bytes at the step's peak
    traced: bool  # False: formulas (see warning)


def arch_numbers(config) -> dict:
    """The few numbers the formulas need, under each family's own config names."""
    d = config if isinstance(config, dict) else config.to_dict()

    def first(*keys, default=None):
        return next((d[k] for k in keys if d.get(k) is not None), default)

    hidden = first("hidden_size", "n_embd", "d_model", "dim")
    heads = first("num_attention_heads", "n_head", "num_heads", "n_heads")
    if not hidden or not heads:
        raise ValueError("config.json names no hidden size / attention heads (hidden_size, n_embd, d_model)")
    return {"hidden": hidden, "heads": heads, "kv_heads": first("num_key_value_heads", "n_head_kv", default=heads),
            "head_dim": first("head_dim", default=hidden // heads),
            "layers": first("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
            "ffn": first("ffn_dim", "intermediate_size", "n_inner", "d_ff", default=4 * hidden) or 4 * hidden,
            "vocab": first("vocab_size"), "positions": first("max_position_embeddings", "n_positions", default=0)}


@contextlib.contextmanager
def _adapters_in_place():
    """peft moves each new adapter next to its base layer (``module.to(device, dtype)``);
    torch cannot swap a fake parameter for its converted self. Every tensor here is already
    on the one fake device, in the training dtype (set as the default while building), so
    each such move is a no-op: make ``Module.to`` one while peft wraps the model."""
    original = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.to = original


def _build(config, spec: StepSpec):
    from transformers import AutoModel, AutoModelForCausalLM

    from ..runtime.lora import apply_lora
    from ..runtime.models import RewardModel, _set_dropout

    config = copy.deepcopy(config)
    _set_dropout(config, spec.dropout)
    value = spec.kind in ("reward", "value", "forward_value")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.dtype]
    auto = AutoModel if value else AutoModelForCausalLM
    # Built in the training dtype from the start: fake parameters cannot be cast (.to) afterwards.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        try:
            model = auto.from_config(config, dtype=dtype, attn_implementation=spec.attn)
        except (ValueError, ImportError):  # no sdpa/flash kernel for this architecture: eager, as models.py loads it
            model = auto.from_config(config, dtype=dtype, attn_implementation="eager")
        if spec.lora_dim:
            with _adapters_in_place():
                model = apply_lora(model, spec.lora_dim, spec.lora_module_name, only_optimize_lora=spec.only_lora)
        if value:
            model = RewardModel(model)
    finally:
        torch.set_default_dtype(previous)
    if spec.checkpointing and not spec.kind.startswith("forward"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(not spec.kind.startswith("forward"))
    return model


def count(model: torch.nn.Module) -> Counts:
    """Parameter counts, tied weights once (``parameters()`` yields a shared tensor once)."""
    params = list(model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return Counts(total=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
                  largest_layer=largest)


def _whole_log_probs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probs from the whole (B, T, V) logits: the stages' path under ZeRO-3, whose
    partitioned head the chunked one cannot read (algorithms/lm_head.py)."""
    from ..algorithms.maths.tokens import log_probs_from_logits

    return log_probs_from_logits(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), ids[:, 1:])


def _step(model, spec: StepSpec, vocab: int) -> None:
    """The stage's own forward and loss on a (batch, seq_len) batch, then backward."""
    from ..algorithms.lm_head import lm_loss
    from ..algorithms.maths.policy import clipped_surrogate, value_loss
    from ..algorithms.maths.preference import pairwise_loss
    from ..algorithms.rl.models import actor_log_probs
    from ..runtime.models import read_score

    B, T = spec.batch, spec.seq_len
    ids = torch.randint(0, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    log_probs = actor_log_probs if spec.logits == "chunked" else _whole_log_probs
    if spec.kind == "forward_lm":
        with torch.no_grad():
            log_probs(model, ids, mask)  # every position: the plan's upper bound
        return
    if spec.kind == "forward_value":
        with torch.no_grad():
            model(ids, mask)
        return
    if spec.kind == "lm" and spec.logits == "whole":
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    elif spec.kind == "lm":
        loss = lm_loss(model, ids, mask, ids, only_labelled=False)[0]
    elif spec.kind == "reward":
        chosen, rejected = read_score(model(ids, mask), mask).chunk(2)
        loss = pairwise_loss(chosen, rejected)
    elif spec.kind == "policy":
        logp = log_probs(model, ids, mask)
        amask = torch.ones(B, T - 1)
        loss = clipped_surrogate(logp, torch.zeros(B, T - 1), torch.ones(B, T - 1), amask)[0]
    else:
        values = model(ids, mask)[:, :-1].float()
        amask = torch.ones(B, T - 1)
        loss = value_loss(values, torch.zeros(B, T - 1), torch.ones(B, T - 1), amask, 0.2)[0]
    loss.backward()


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


def _trace_once(config, spec: StepSpec) -> Traced:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    vocab = arch_numbers(config)["vocab"]
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _build(config, spec)
        counts = count(model)
        tracker = MemTracker()
        tracker.track_external(model)
        # MemTracker hooks every parameter's gradient; a frozen one (LoRA's base weights)
        # cannot take a hook, so mark those as hooked already.
        for p in model.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
        with tracker:
            _step(model, spec, vocab)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    by = {getattr(k, "value", k): v for k, v in peak.items()}
    grads = by.get("Gradient", 0)
    acts = by.get("Total", 0) - by.get("Parameter", 0) - grads - by.get("Optstate", 0)
    return Traced(counts=counts, grads=int(grads), activations=int(acts), traced=True)


def _with_layers(config, n: int):
    c = copy.deepcopy(config)
    setattr(c, next(k for k in LAYER_KEYS if getattr(c, k, None)), n)
    if isinstance(getattr(c, "layer_types", None), list):  # per-layer settings (Qwen2's sliding windows)
        c.layer_types = c.layer_types[:n]
    return c


def _trace(config, spec: StepSpec) -> Traced:
    """A deep model is traced at 2 and 4 blocks and extrapolated linearly to its depth:
    parameters, activations (each block keeps the same tensors, with or without
    checkpointing) and the gradients at the peak grow by the same amount per block of a
    stack of identical blocks, and a trace costs time per block (~10 s for OPT-1.3B's 24)."""
    depth = next((getattr(config, k) for k in LAYER_KEYS if getattr(config, k, None)), 0)
    if depth <= 2 * TRACE_LAYERS:
        return _trace_once(config, spec)
    a, b = (_trace_once(_with_layers(config, n), spec) for n in (TRACE_LAYERS, 2 * TRACE_LAYERS))

    def at_depth(x: int, y: int) -> int:
        return x + (y - x) * (depth - TRACE_LAYERS) // TRACE_LAYERS

    counts = Counts(total=at_depth(a.counts.total, b.counts.total),
                    trainable=at_depth(a.counts.trainable, b.counts.trainable),
                    largest_layer=max(a.counts.largest_layer, b.counts.largest_layer))
    return Traced(counts=counts, grads=at_depth(a.grads, b.grads), activations=at_depth(a.activations, b.activations),
                  traced=True)


def _fallback(config, spec: StepSpec) -> Traced:
    arch = arch_numbers(config)
    counts = fallback_counts(arch, spec.lora_dim, spec.only_lora)
    forward = spec.kind.startswith("forward")
    acts = fallback_activations(arch, spec.batch, spec.seq_len, spec.dtype, spec.checkpointing and not forward,
                                eager=spec.attn == "eager")
    if forward:  # no graph kept: one layer's working set and the logits
        acts //= max(arch["layers"], 1)
    grads = 0 if forward else counts.trainable * (4 if spec.dtype == "fp32" else 2)
    return Traced(counts=counts, grads=grads, activations=acts, traced=False)


def trace(name: str, config, spec: StepSpec) -> Traced:
    """The traced step of ``config`` (a transformers config, or a plain dict when the
    architecture is not one transformers can build), cached per (model, step)."""
    if spec.kind not in KINDS:
        raise ValueError(f"unknown step kind {spec.kind!r}: one of {KINDS}")
    key = (name, config.to_json_string() if hasattr(config, "to_json_string") else repr(config), spec)
    if key in _CACHE:
        return _CACHE[key]
    if isinstance(config, dict):
        log.warning("plan: %s cannot be traced (model_type %r is not built by this transformers, or needs remote "
                    "code): its memory comes from formulas", name, config.get("model_type"))
        out = _fallback(config, spec)
    else:
        try:
            out = _trace(config, spec)
        except Exception as e:  # noqa: BLE001 – any failure of an architecture's code under fake tensors
            log.warning("plan: tracing %s (%s) failed (%s: %s); its memory comes from formulas", name,
                        getattr(config, "model_type", "?"), type(e).__name__, str(e).splitlines()[0][:200] if str(e)
                        else "")
            out = _fallback(config.to_dict(), spec)
    _CACHE[key] = out
    return out
