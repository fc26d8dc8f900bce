"""The fast rollout backend: one prefill, then fixed-shape decode steps on a static KV cache.

Why it is faster than HF ``generate()``: ``generate`` rebuilds the attention mask, the
cache bookkeeping, the logits processors and the stopping criteria in Python on every
token, and grows a dynamic cache by concatenation. Here every decode step is the model's
forward on ``(B, 1)`` tokens with a preallocated :class:`transformers.StaticCache` and an
additive 4-D mask we build ourselves (HF takes a 4-D mask as is), followed by a handful of
tensor ops for sampling that never read a value back to the host. Shapes never change
between steps, so on CUDA the step is compiled and replayed as a CUDA graph
(``torch.compile(mode="reduce-overhead")``); on CPU it runs eagerly.

The contract is HF ``generate``'s: left-padded prompts, rows that emit EOS keep emitting
``pad_token_id``, the output ends at the step where the last row finished (or at
``max_new_tokens``). With greedy decoding it produces the same tokens as ``generate``
(tests/test_ppo_generation.py checks it on OPT, GPT-2, Llama, Qwen2 and GPT-NeoX).
"""

from __future__ import annotations

import logging

import torch

from ..models import positions_from_mask

log = logging.getLogger("rlhf_tasks")

# Architectures whose HF implementation takes (position_ids, 4-D mask, StaticCache) as this
# module drives them, checked token for token against ``generate`` in the tests. Others
# (e.g. Bloom, whose ALiBi bias is built from a 2-D mask) use HF ``generate``.
SUPPORTED_MODEL_TYPES = frozenset({"opt", "gpt2", "llama", "qwen2", "gpt_neox"})

# How often (in decode steps) the loop asks the device whether every row has finished:
# each ask is a host sync, which on a GPU stalls the launch queue.
EOS_CHECK_EVERY = {"cuda": 16}


def model_type(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def supports_static(model) -> bool:
    return model_type(model) in SUPPORTED_MODEL_TYPES


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (…, Q, K) mask, True = may attend -> additive float mask (0 / dtype min),
    which both the sdpa and the eager attention of every HF model accept as a 4-D mask."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


def ban_repeated_ngrams(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid every token that would complete an n-gram already present in ``tokens``.

    logits: (B, V), modified in place and returned; tokens: (B, L), everything generated
    so far including the prompt (as HF's ``NoRepeatNGramLogitsProcessor`` sees it).
    Vectorised over all windows at once, so there is no host sync and no Python loop
    over the batch.
    """
    B, L = tokens.shape
    if n <= 0 or L < n:
        return logits
    if n == 1:
        banned = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, tokens, True)
        return logits.masked_fill_(banned, float("-inf"))
    windows = tokens.unfold(1, n, 1)  # (B, W, n), W = L - n + 1
    prefix = tokens[:, L - n + 1:]  # (B, n-1): the n-1 most recent tokens
    match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (B, W)
    hits = torch.zeros_like(logits).scatter_add_(1, windows[:, :, -1], match.to(logits.dtype))
    return logits.masked_fill_(hits > 0, float("-inf"))


def choose_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) float logits -> (B,) next tokens: argmax, or a sample after temperature,
    top-k and top-p (nucleus) filtering, in that order.

    Sampling inverts the CDF with one uniform draw per row (``searchsorted``): unlike
    ``torch.multinomial`` it needs no host sync, so it can live inside a CUDA graph, and
    it draws B random numbers per step instead of B x V (the exponential-race trick), which
    on a CPU costs as much as a small model's forward.
    """
    if not do_sample:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V), non-decreasing, last ~1
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype, generator=generator) * cdf[:, -1:]
    # First index whose CDF exceeds u: its probability is > 0, since the CDF rises there.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=V - 1)


class _Runner:
    """Per model: the static caches (one per batch size / length / dtype, reused between
    rollouts so CUDA graphs recorded on them stay valid) and the compiled decode step."""

    def __init__(self, model, cuda_graphs: bool):
        self.model = model
        self.caches: dict[tuple, object] = {}
        self.compiled = None
        self.cuda_graphs = cuda_graphs

    def cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device):
        from transformers import StaticCache

        key = (batch, length, dtype, str(device))
        cache = self.caches.get(key)
        if cache is None:
            self.caches.clear()  # keep one cache alive: a rollout's KV cache can be GBs
            cache = self.caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        else:
            cache.reset()
        return cache

    def forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def decode_step(self, device: torch.device):
        """The per-token forward: compiled with CUDA graphs on CUDA when asked, else eager."""
        if device.type != "cuda" or not self.cuda_graphs:
            return self.forward
        if self.compiled is None:
            self.compiled = torch.compile(self.forward, mode="reduce-overhead", dynamic=False)

        def step(*args):
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(*args).clone()  # the graph's output buffer is reused next step

        return step


def _runner(model, cuda_graphs: bool) -> _Runner:
    """The model's runner, kept on the model itself: the reference cycle is freed with the
    model (a weak-keyed table would keep every model alive through its runner)."""
    r = getattr(model, "_rlhf_static_runner", None)
    if r is None or r.cuda_graphs != cuda_graphs:
        r = _Runner(model, cuda_graphs)
        object.__setattr__(model, "_rlhf_static_runner", r)
    return r


@torch.no_grad()
def static_generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                    eos_token_id: int, pad_token_id: int, do_sample: bool = True, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, no_repeat_ngram_size: int = 0,
                    cache_len: int | None = None, cuda_graphs: bool = True) -> torch.Tensor:
    """(B, P) left-padded prompts -> (B, P + A) prompt and answer ids, A <= max_new_tokens.

    ``cache_len`` fixes the KV-cache length (at least P + max_new_tokens) so that the
    decode step keeps one shape across rollouts whose prompts differ in length: one
    CUDA graph serves them all.
    """
    device = prompt_ids.device
    use_graphs = cuda_graphs and device.type == "cuda" and not getattr(model, "_rlhf_graphs_failed", False)
    try:
        return _decode(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, do_sample,
                       temperature, top_k, top_p, no_repeat_ngram_size, cache_len, use_graphs)
    except Exception as exc:  # noqa: BLE001 - any compile/capture failure falls back to eager
        if not use_graphs:
            raise
        object.__setattr__(model, "_rlhf_graphs_failed", True)
        log.warning("generation: CUDA-graph decode failed (%s: %s); using the eager static decode loop",
                    type(exc).__name__, str(exc)[:300])
        return _decode(model, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, do_sample,
                       temperature, top_k, top_p, no_repeat_ngram_size, cache_len, False)


def _decode(model, prompt_ids, prompt_mask, N, eos, pad, do_sample, temperature, top_k, top_p, ngram,
            cache_len, use_graphs) -> torch.Tensor:
    B, P = prompt_ids.shape
    device = prompt_ids.device
    # A fixed cache length only pays with CUDA graphs (one graph for every prompt length);
    # otherwise the shortest cache is the cheapest to attend over.
    T = max(cache_len or 0, P + N) if use_graphs else P + N
    dtype = model.get_input_embeddings().weight.dtype
    runner = _runner(model, use_graphs)
    cache = runner.cache(B, T, dtype, device)

    # Keys a query may see: real prompt tokens and every answer slot (answer slots not yet
    # written are hidden by the causal part below).
    key_ok = torch.ones(B, T, dtype=torch.bool, device=device)  # (B, T)
    key_ok[:, :P] = prompt_mask.bool()
    slots = torch.arange(T, device=device)  # (T,)

    # Prefill: the whole prompt at once; query i sees keys j <= i.
    positions = positions_from_mask(prompt_mask)  # (B, P)
    causal = slots[None, :] <= torch.arange(P, device=device)[:, None]  # (P, T)
    prefill_mask = additive_mask(causal[None, None] & key_ok[:, None, None, :], dtype)  # (B, 1, P, T)
    logits = runner.forward(prompt_ids, prefill_mask, positions, cache).float()  # (B, V), float32 for sampling

    out = torch.full((B, P + N), pad, dtype=prompt_ids.dtype, device=device)  # (B, P + N)
    out[:, :P] = prompt_ids
    next_pos = positions[:, -1:] + 1  # (B, 1) position id of the first answer token
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps_alive = torch.zeros((), dtype=torch.long, device=device)  # steps where some row was unfinished
    check_every = EOS_CHECK_EVERY.get(device.type, 1)
    step = runner.decode_step(device)
    for t in range(N):
        if ngram:
            ban_repeated_ngrams(logits, out[:, :P + t], ngram)
        tok = choose_tokens(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        steps_alive += (~done).any()
        tok = torch.where(done, torch.full_like(tok, pad), tok)  # (B,)
        out[:, P + t] = tok
        done |= tok == eos
        if t == N - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        # Decode: the token just chosen sits at cache slot P + t.
        step_mask = additive_mask((key_ok & (slots <= P + t))[:, None, None, :], dtype)  # (B, 1, 1, T)
        logits = step(tok[:, None], step_mask, next_pos + t, cache).float()
    return out[:, :P + int(steps_alive)]
