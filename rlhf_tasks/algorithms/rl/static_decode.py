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
(tests/test_ppo_generation.py checks it on every architecture in
:data:`SUPPORTED_MODEL_TYPES`).

Sliding-window attention (Mistral, Phi-3, Gemma 2/3, Qwen with ``use_sliding_window``):
every layer keeps all ``T`` cache slots and the sliding layers get their own mask, a key
being visible when it is less than ``sliding_window`` slots behind the query (HF's rule,
over cache slots, left padding included). HF's :class:`StaticSlidingWindowLayer` would keep
only the last ``sliding_window`` keys in a rolling buffer that a mask over slots cannot
address; the full-length buffer costs ``T - sliding_window`` extra slots per sliding layer,
and only when a rollout is longer than the window.
"""

from __future__ import annotations

import logging

import torch

from ...runtime.models import positions_from_mask

log = logging.getLogger("rlhf_tasks")

# The one list of architectures (``config.model_type``) this module drives: their HF
# implementation takes (position_ids, 4-D mask or one per layer type, StaticCache) as given.
# tests/test_ppo_generation.py is parametrised over this very set and checks each one token
# for token against ``generate`` (left padding, rows ending at different steps, n-gram
# blocking, a sliding window shorter than the rollout where the architecture has one), so
# an entry cannot be added without its check. Everything else uses HF ``generate``.
SUPPORTED_MODEL_TYPES = frozenset({
    "opt", "gpt2", "gpt_neox", "gpt_bigcode", "falcon", "phi", "phi3", "starcoder2",
    "llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "cohere2",  # the Llama family
    "gemma", "gemma2", "gemma3_text",  # embedding scale, soft-capping, sliding/full layers
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",  # mixture of experts
})

# Architectures checked and kept on HF ``generate``, with the reason (logged on fallback).
HF_ONLY_MODEL_TYPES = {
    "bloom": "its ALiBi bias is built from a 2-D attention mask, and this loop passes a 4-D one",
}

# Layer types whose mask this module builds: causal, and causal within a sliding window.
# Others (chunked attention, linear/recurrent layers) keep state a KV-slot mask cannot express.
FULL, SLIDING = "full_attention", "sliding_attention"
# Attention kernels that take an additive 4-D mask as is (flash-attention takes none).
MASKED_ATTENTION = ("sdpa", "eager")

# How often (in decode steps) the loop asks the device whether every row has finished:
# each ask is a host sync, which on a GPU stalls the launch queue.
EOS_CHECK_EVERY = {"cuda": 16}


def model_type(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def supports_static(model) -> bool:
    return unsupported_reason(model) is None


def unsupported_reason(model) -> str | None:
    """Why the static loop cannot drive ``model`` (a sentence for the log), or None."""
    mt = model_type(model)
    if mt in HF_ONLY_MODEL_TYPES:
        return f"model_type {mt!r}: {HF_ONLY_MODEL_TYPES[mt]}"
    if mt not in SUPPORTED_MODEL_TYPES:
        return f"model_type {mt!r} is not one it has been checked on"
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    if attn not in MASKED_ATTENTION:
        return f"attn_implementation {attn!r} takes no 4-D attention mask"
    other = set(layer_windows(model.config)) - {FULL, SLIDING}
    if other:
        return f"layer types {sorted(other)} are not plain or sliding-window attention"
    return None


def layer_windows(config) -> dict[str, int | None]:
    """Each attention layer type of the model -> its sliding window in cache slots (None:
    full causal), as the HF modelling code picks them: per layer from ``layer_types`` where
    the config has it, else one mask for all layers, sliding when ``sliding_window`` is set."""
    cfg = config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or [SLIDING if window is not None else FULL]
    return {t: window if t == SLIDING else None for t in types}


def attention_masks(queries: torch.Tensor, key_ok: torch.Tensor, windows: dict[str, int | None],
                    dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The additive masks of one forward: queries (Q,) cache slots of the new tokens,
    key_ok (B, T) keys that hold a real token or an answer slot. A key j is visible to the
    query at slot i when j <= i and, on a sliding layer, i - j < window (HF's
    ``sliding_window_overlay``). One (B, 1, Q, T) tensor when every layer sees the same,
    else {layer type: tensor}, which the hybrid models (Gemma 2/3, Qwen2/3) take as is."""
    slots = torch.arange(key_ok.shape[1], device=key_ok.device)  # (T,)
    behind = queries[:, None] - slots[None, :]  # (Q, T): how far each key is behind each query
    by_window: dict[int | None, torch.Tensor] = {}
    masks = {}
    for layer_type, window in windows.items():
        if window is not None and window >= key_ok.shape[1]:
            window = None  # the window covers the whole cache: plain causal attention
        if window not in by_window:
            visible = (behind >= 0) if window is None else (behind >= 0) & (behind < window)
            by_window[window] = additive_mask(visible[None, None] & key_ok[:, None, None, :], dtype)
        masks[layer_type] = by_window[window]
    return next(iter(masks.values())) if len(by_window) == 1 else masks


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
    on a CPU costs as much as a small model's forward. So under one seed it draws other
    tokens than HF's ``torch.multinomial``, from the same distribution (the tests compare
    the frequencies with HF's warpers').
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
        from transformers.cache_utils import StaticLayer

        key = (batch, length, dtype, str(device))
        cache = self.caches.get(key)
        if cache is None:
            self.caches.clear()  # keep one cache alive: a rollout's KV cache can be GBs
            cache = self.caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
            # Full-length buffers for the sliding layers too: the masks address absolute slots
            # (see the module docstring).
            cache.layers = [StaticLayer(max_cache_len=length) if layer.is_sliding else layer for layer in cache.layers]
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
    windows = layer_windows(model.config)

    # Prefill: the whole prompt at once, its queries at slots 0..P-1.
    positions = positions_from_mask(prompt_mask)  # (B, P)
    prefill_mask = attention_masks(slots[:P], key_ok, windows, dtype)  # (B, 1, P, T) or one per layer type
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
        step_mask = attention_masks(slots[P + t:P + t + 1], key_ok, windows, dtype)  # (B, 1, 1, T) or a dict
        logits = step(tok[:, None], step_mask, next_pos + t, cache).float()
    return out[:, :P + int(steps_alive)]
