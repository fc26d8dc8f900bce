"""Rollout generation: the one function the PPO trainer calls to get answers.

Generation is ~90% of PPO time, so it sits behind :func:`generate` alone: a faster
backend (static KV cache + CUDA graphs, or an inference engine) replaces the body
without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    no_repeat_ngram_size: int = 0


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
    """Sample answers for left-padded prompts (B, P) with HF ``generate``."""
    was_training = model.training
    model.eval()
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, use_cache=True, synced_gpus=_zero3(model))
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
    if settings.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    model.train(was_training)
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


def _zero3(model) -> bool:
    """Under ZeRO-3 every rank must keep stepping until all ranks finish generating."""
    import torch.distributed as dist

    return bool(getattr(model, "_ds_zero3", False)) and dist.is_initialized() and dist.get_world_size() > 1
