"""A causal LM's log-probs of given tokens without its whole ``(B, T, V)`` logits.

``model(...).logits`` holds every position's logits over the vocabulary, and the loss's
fp32 upcast, log-softmax and their gradients add three more copies: at SmolLM2's 49,152
tokens, 8 x 1,024 positions, each fp32 copy is 1.6 GB, the largest tensors of the step.
Here the model's backbone gives the final hidden states (B, T, H) and the LM head is
applied in chunks of tokens (:func:`~rlhf_tasks.algorithms.maths.tokens.log_probs_from_hidden`),
only at the positions asked for (the answer tokens, the SFT labels): the prompt's
positions never reach the head at all.

This is exact only where the head is what this module knows: a plain ``nn.Linear`` after
the backbone, with the architecture's logit scale or soft-cap. :data:`CHUNKED_MODEL_TYPES`
lists the architectures checked against ``model(...).logits`` (tests/test_lm_head.py);
another architecture, a LoRA-adapted head, or a head partitioned by ZeRO-3 (whose weight
exists whole only inside the engine's own forward) keeps the whole-logits path, with a
log line naming why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .maths.tokens import LOGITS_CHUNK_BYTES, log_probs_from_hidden, log_probs_from_logits

log = logging.getLogger("rlhf_tasks")

# Checked against model(...).logits, forward and backward, on tiny random-init models.
CHUNKED_MODEL_TYPES = frozenset({
    "opt", "gpt2", "gpt_neox", "gpt_bigcode", "falcon", "phi", "phi3", "starcoder2", "bloom",
    "llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "cohere", "cohere2",
    "gemma", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
})
_SCALE_BY = {"cohere": "logit_scale", "cohere2": "logit_scale"}  # logits * scale
_DIVIDE_BY = {"granite": "logits_scaling"}  # logits / scaling
_SOFTCAP = {"gemma2", "gemma3_text"}  # c tanh(logits / c), c = final_logit_softcapping
_WHY_NOT_LOGGED: set[str] = set()


@dataclass(frozen=True)
class Head:
    """What turns the backbone's last hidden state into logits."""

    backbone: nn.Module
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeed engine and/or a peft wrapper (peft's
    adapters sit inside it, so ``disable_adapter`` still applies)."""
    while True:
        if type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def head_of(model: nn.Module) -> Head | str:
    """The :class:`Head` of ``model``, or why the whole-logits path is taken instead."""
    hf = unwrap(model)
    config = getattr(hf, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in CHUNKED_MODEL_TYPES:
        return f"model_type {mt!r} is not one the chunked LM head has been checked on"
    head, backbone = hf.get_output_embeddings(), hf.base_model
    if type(head) is not nn.Linear or backbone is hf:
        return f"its output layer is a {type(head).__name__}, not a plain Linear after the backbone (a LoRA-adapted head?)"
    if hasattr(head.weight, "ds_id"):
        return "its head is partitioned by ZeRO-3"
    scale = 1.0
    if mt in _SCALE_BY:
        scale = float(getattr(hf, "logit_scale", getattr(config, _SCALE_BY[mt])))  # Cohere keeps its own copy
    elif mt in _DIVIDE_BY:
        scale = 1.0 / float(getattr(config, _DIVIDE_BY[mt]))
    softcap = getattr(config, "final_logit_softcapping", None) if mt in _SOFTCAP else None
    return Head(backbone, head.weight, head.bias, scale, softcap)


def _why_not(model: nn.Module, reason: str) -> None:
    if reason not in _WHY_NOT_LOGGED:
        _WHY_NOT_LOGGED.add(reason)
        log.info("log-probs of %s from its whole logits: %s", type(unwrap(model)).__name__, reason)


def token_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    where: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """(B, T) inputs, (B, T-1) ``labels`` (the token each position predicts) -> (B, T-1)
    fp32 log p(label); a label < 0 (ignore_index) reads 0. ``where`` (B, T-1): the only
    positions that go through the head, the others read 0 (the callers select them away);
    None: every position, in shapes that do not depend on the data (the plan traces this
    on fake tensors, which cannot pick rows by value)."""
    kw = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False,
          **({"position_ids": position_ids} if position_ids is not None else {})}
    head = head_of(model)
    if isinstance(head, str):
        _why_not(model, head)
        logits = model(**kw).logits[:, :-1]
        out = log_probs_from_logits(logits.float(), labels.clamp_min(0))
        return torch.where(labels >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    hidden = head.backbone(**kw).last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
    fn = dict(scale=head.scale, softcap=head.softcap, chunk_bytes=chunk_bytes)
    if where is None:
        out = log_probs_from_hidden(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels.reshape(-1), head.bias,
                                    **fn).view(labels.shape)
        return torch.where(labels >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    keep = where.bool() & (labels >= 0)
    picked = log_probs_from_hidden(hidden[keep], head.weight, labels[keep], head.bias, **fn)  # (n,)
    return torch.zeros(labels.shape, dtype=torch.float32, device=picked.device).masked_scatter(keep, picked)


def lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
            only_labelled: bool = True, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal-LM loss of transformers' ``labels=`` path – the mean negative log-likelihood
    of ``labels[:, 1:]`` over the positions whose label is not -100 – and that count. Only
    the labelled positions go through the head (``only_labelled``; off: all, as traced)."""
    target = labels[:, 1:]
    labelled = target >= 0
    logp = token_log_probs(model, input_ids, attention_mask, target, where=labelled if only_labelled else None, **kw)
    n = labelled.sum()
    return -logp.sum() / n.clamp_min(1), n
