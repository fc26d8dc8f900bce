"""Rollout generation: the one function the PPO trainer and evaluation call to get answers.

Generation is ~90% of PPO time, so it sits behind :func:`generate` alone, with two
backends chosen by ``generation_backend`` (of an RL section or ``sampling``):

- ``static`` (default): our decode loop on a preallocated KV cache, CUDA graphs on GPU
  (static_decode.py); same tokens as HF under greedy decoding on every architecture in
  ``static_decode.SUPPORTED_MODEL_TYPES``.
- ``hf``: transformers' ``generate()``; also used wherever ``static`` cannot run (ZeRO-3
  partitioned weights, an architecture the static loop has not been checked on).
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass

import torch

from ...config.types import GenerationBackend
from ...runtime.params import is_partitioned
from . import static_decode

log = logging.getLogger("rlhf_tasks")
BACKENDS = typing.get_args(GenerationBackend)  # the config's one list


@dataclass
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    no_repeat_ngram_size: int = 0
    backend: GenerationBackend = "static"
    cache_len: int | None = None  # static backend: fixed KV-cache length (prompt budget + max_new_tokens)
    cuda_graphs: bool = True  # static backend on CUDA: replay the decode step as a CUDA graph

    @classmethod
    def from_section(cls, s, data) -> GenerationSettings:
        """Sampling as a section says: an RL section's rollouts (``cfg.ppo``, ``cfg.grpo``,
        ...) or ``cfg.sampling`` (evaluate, DPO's generated pairs, chat, labelling)."""
        return cls(max_new_tokens=data.max_seq_len - data.max_prompt_seq_len, temperature=s.temperature,
                   top_p=s.top_p, top_k=s.top_k, backend=s.generation_backend, cache_len=data.max_seq_len,
                   cuda_graphs=s.generation_cuda_graphs)

    @classmethod
    def from_config(cls, cfg) -> GenerationSettings:
        """The sampling of the generation-time users that are not an RL step (``cfg.sampling``)."""
        return cls.from_section(cfg.sampling, cfg.data)


@dataclass
class Rollout:
    """Prompt + answer, with the masks the experience maker needs.

    sequences:      (B, T) left-padded prompt ids then answer ids, T = P + A
    attention_mask: (B, T) 1 on real prompt tokens and on answer tokens up to and
                    including the first EOS; 0 on padding on both sides
    action_mask:    (B, T-1) 1 where position t predicts an answer token (t >= P-1)
                    that counts (up to and including EOS); aligned with log-probs
    prompt_len:     P
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    prompt_len: int

    @property
    def answer_lengths(self) -> torch.Tensor:
        return self.action_mask.sum(-1)  # (B,)


def answer_mask(answers: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, A) answer ids -> (B, A) mask that keeps tokens up to and including the first
    EOS. Works when pad == eos (GPT-2-style tokenizers), unlike ``answers != pad``."""
    is_eos = answers == eos_token_id
    # Number of EOS tokens strictly before each position; the first EOS itself counts.
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return (eos_before == 0).long()


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: GenerationSettings,
             eos_token_id: int, pad_token_id: int) -> Rollout:
    """Sample answers for left-padded prompts (B, P) with the configured backend."""
    was_training = model.training
    model.eval()
    try:
        if _use_static(model, settings):
            out = static_decode.static_generate(
                model, prompt_ids, prompt_mask, max_new_tokens=settings.max_new_tokens, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, do_sample=settings.do_sample, temperature=settings.temperature,
                top_k=settings.top_k, top_p=settings.top_p, no_repeat_ngram_size=settings.no_repeat_ngram_size,
                cache_len=settings.cache_len, cuda_graphs=settings.cuda_graphs)
        else:
            out = hf_generate(model, prompt_ids, prompt_mask, settings, eos_token_id, pad_token_id)
    finally:
        model.train(was_training)
    return to_rollout(out, prompt_ids, prompt_mask, eos_token_id, pad_token_id)


def hf_generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: GenerationSettings,
                eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """transformers' ``generate()``: (B, P) -> (B, P + A)."""
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, use_cache=True, synced_gpus=_zero3(model))
    if settings.do_sample:
        # Explicit values, so that nothing is inherited from a checkpoint's generation_config.json
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    if settings.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)


def to_rollout(out: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, eos_token_id: int,
               pad_token_id: int) -> Rollout:
    """(B, P + A) generated ids -> a :class:`Rollout` with answers cut at their first EOS."""
    P = prompt_ids.shape[1]
    answers = out[:, P:]  # (B, A), A <= max_new_tokens
    if answers.shape[1] == 0:  # nothing generated at all: give every row one EOS to score
        answers = torch.full((out.shape[0], 1), eos_token_id, dtype=out.dtype, device=out.device)
    amask = answer_mask(answers, eos_token_id)
    answers = torch.where(amask.bool(), answers, torch.full_like(answers, pad_token_id))
    sequences = torch.cat([prompt_ids, answers], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), amask], dim=1)
    action_mask = torch.zeros_like(attention_mask[:, 1:])
    action_mask[:, P - 1:] = amask  # position t predicts token t+1
    return Rollout(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask, prompt_len=P)


_fallback_logged: set[str] = set()


def _use_static(model, settings: GenerationSettings) -> bool:
    if settings.backend == "hf":
        return False
    if settings.backend != "static":
        raise ValueError(f"generation backend={settings.backend!r} is invalid: one of {', '.join(BACKENDS)}")
    why = None
    if is_partitioned(model):
        why = "the weights are ZeRO-3 partitioned"
    else:
        why = static_decode.unsupported_reason(model)
    if why:
        if why not in _fallback_logged:
            _fallback_logged.add(why)
            log.info("generation: static backend not used (%s); using HF generate()", why)
        return False
    return True


def _zero3(model) -> bool:
    """Under ZeRO-3 every rank must keep stepping until all ranks finish generating."""
    import torch.distributed as dist

    return is_partitioned(model) and dist.is_initialized() and dist.get_world_size() > 1
