from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhf_tasks.algorithms.rl import static_decode
from rlhf_tasks.algorithms.rl.generation import GenerationSettings, answer_mask, generate
from rlhf_tasks.algorithms.rl.static_decode import ban_repeated_ngrams, choose_tokens

EOS, PAD = 2, 1
# A small vocabulary, so that the rows of a batch share tokens and one EOS id ends them at
# different steps (_eos_that_splits_rows); the architectures do not depend on its size.
V = 97
HIDDEN, HEAD_DIM = 48, 12
# Shorter than a rollout (9 prompt slots + up to 24 answer tokens), so that on every
# architecture with sliding-window layers the window cuts off keys the full layers still see.
WINDOW = 8
HYBRID = ["sliding_attention", "full_attention"]  # one sliding and one full layer
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
SLIDE = dict(sliding_window=WINDOW)
QWEN_SLIDE = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # layer 0 full, 1 sliding
# Config fields beyond the common ones: names that differ, expert counts, sliding windows.
CONFIG = {
    "opt": dict(word_embed_proj_dim=HIDDEN, ffn_dim=2 * HIDDEN),
    "gpt2": dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128),
    "gpt_bigcode": dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
    "mistral": SLIDE, "phi3": SLIDE, "starcoder2": SLIDE,
    "mixtral": {**MOE, **SLIDE},
    "qwen2": QWEN_SLIDE, "qwen3": {**QWEN_SLIDE, "head_dim": HEAD_DIM},
    "qwen2_moe": {**MOE, **QWEN_SLIDE, "shared_expert_intermediate_size": HIDDEN},
    "qwen3_moe": {**MOE, **QWEN_SLIDE, "head_dim": HEAD_DIM},
    "olmoe": MOE,
    "gemma": dict(head_dim=HEAD_DIM),
    "gemma2": dict(head_dim=HEAD_DIM, layer_types=HYBRID, **SLIDE),
    "gemma3_text": dict(head_dim=HEAD_DIM, layer_types=HYBRID, **SLIDE),
    "cohere2": dict(layer_types=HYBRID, **SLIDE),
    "bloom": dict(n_layer=2, n_head=4),
}
ARCHS = sorted(static_decode.SUPPORTED_MODEL_TYPES)  # the allow-list itself: nothing listed goes unchecked


def tiny_lm(arch: str, pad: int = PAD, eos: int = EOS, seed: int = 0):
    """A random-init 2-layer, 48-wide model of ``arch`` (a ``model_type``) whose greedy
    outputs vary from token to token (a large init spread keeps it from repeating one token)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(arch, vocab_size=V, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=128, pad_token_id=pad, eos_token_id=eos, bos_token_id=eos,
                               **CONFIG.get(arch, {}))
    # Gemma 2/3 multiply the embeddings by sqrt(hidden) and soft-cap the logits: at a large
    # init spread the last token dominates and is repeated forever, so they get HF's usual one.
    cfg.initializer_range = 0.02 if arch in ("gemma2", "gemma3_text") else 0.3
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the matrices are tiny, and on a shared 2-core machine a second
    spinning OpenMP thread makes each decode step slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def left_padded_prompts(pad: int = PAD, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, V, (5, 9), generator=g)  # (B, P)
    mask = torch.ones_like(prompts)
    for row, n_pad in enumerate([3, 6, 0, 8, 1]):  # one row is a single real token
        prompts[row, :n_pad] = pad
        mask[row, :n_pad] = 0
    return prompts, mask


def greedy(backend: str, **kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=24, do_sample=False, backend=backend, **kw)


def test_answer_mask_keeps_up_to_first_eos_even_when_pad_is_eos():
    answers = torch.tensor([[5, 6, EOS, EOS, EOS],   # eos, then padding that equals eos
                            [EOS, 7, 8, 9, 9],       # empty answer: only the eos counts
                            [5, 6, 7, 8, 9]])        # ran out of tokens: no eos at all
    assert answer_mask(answers, EOS).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_generate_masks_align_with_log_probs(backend):
    model = tiny_lm("opt")
    prompts, mask = left_padded_prompts()
    ro = generate(model, prompts, mask, GenerationSettings(max_new_tokens=6, backend=backend), EOS, PAD)
    B, T = ro.sequences.shape
    P = ro.prompt_len
    assert P == prompts.shape[1] and T <= P + 6
    assert ro.action_mask.shape == (B, T - 1)
    assert ro.action_mask[:, : P - 1].sum() == 0  # prompt positions never count as actions
    # action t predicts token t+1: the action mask is the attention mask of the answer, shifted by one
    torch.testing.assert_close(ro.action_mask[:, P - 1:], ro.attention_mask[:, P:])
    # everything after an answer's eos is padding with attention 0
    for b in range(B):
        ans = ro.sequences[b, P:]
        n = int(ro.attention_mask[b, P:].sum())
        assert (ans[n:] == PAD).all()
    assert (ro.answer_lengths >= 1).all()
    assert not model.training


def _eos_that_splits_rows(model, prompts, mask) -> int:
    """A token that some rows emit early and others late or never, so that with it as EOS
    the rows of one batch end at different lengths."""
    free = generate(model, prompts, mask, greedy("hf"), eos_token_id=V + 5, pad_token_id=PAD)
    answers = free.sequences[:, prompts.shape[1]:]
    for tok in answers[:, 1:8].flatten().tolist():  # tokens every row reaches soon, row 0 first
        first = [(row == tok).nonzero()[0].item() if (row == tok).any() else None for row in answers]
        if len(set(first)) >= 3 and tok != PAD:
            return tok
    pytest.fail("no token splits the rows; change the seed")


@pytest.mark.parametrize("arch", ARCHS)
def test_static_greedy_equals_hf_generate(arch):
    """Token for token, on every architecture the static backend is used for: left padding,
    rows finishing at different steps, n-gram blocking, sliding windows shorter than the
    rollout (the sliding layers see fewer keys than the full ones)."""
    model = tiny_lm(arch)
    assert model.config.model_type == arch and static_decode.supports_static(model)
    windows = [w for w in static_decode.layer_windows(model.config).values() if w is not None]
    assert all(w == WINDOW for w in windows)  # where the architecture has a window, it is set short
    prompts, mask = left_padded_prompts()
    eos = _eos_that_splits_rows(model, prompts, mask)
    for ngram in (0, 3):
        hf = generate(model, prompts, mask, greedy("hf", no_repeat_ngram_size=ngram), eos, PAD)
        fast = generate(model, prompts, mask, greedy("static", no_repeat_ngram_size=ngram), eos, PAD)
        assert torch.equal(fast.sequences, hf.sequences), ngram
        assert torch.equal(fast.attention_mask, hf.attention_mask)
        assert torch.equal(fast.action_mask, hf.action_mask)
        assert len(set(fast.answer_lengths.tolist())) >= 2  # rows really ended at different lengths
        if windows:
            assert fast.sequences.shape[1] > WINDOW + 1  # the window cut off keys of the later answer tokens


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_greedy_equals_hf_when_pad_is_eos(arch):
    model = tiny_lm(arch, pad=EOS, eos=EOS)
    prompts, mask = left_padded_prompts(pad=EOS)
    eos = _eos_that_splits_rows(model, prompts, mask)
    hf = generate(model, prompts, mask, greedy("hf"), eos, eos)  # the tokenizer's pad == eos
    fast = generate(model, prompts, mask, greedy("static"), eos, eos)
    assert torch.equal(fast.sequences, hf.sequences)
    assert torch.equal(fast.action_mask, hf.action_mask)


def test_generation_stops_when_every_row_has_finished():
    model = tiny_lm("llama")
    prompts, mask = left_padded_prompts()
    eos = _eos_that_splits_rows(model, prompts, mask)
    ro = generate(model, prompts, mask, greedy("static"), eos, PAD)
    assert ro.sequences.shape[1] - ro.prompt_len == int(ro.answer_lengths.max())


def test_sampled_rollouts_keep_the_contract_and_follow_the_seed():
    model = tiny_lm("qwen2")
    prompts, mask = left_padded_prompts()
    s = GenerationSettings(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, backend="static")
    torch.manual_seed(1)
    a = generate(model, prompts, mask, s, EOS, PAD)
    torch.manual_seed(1)
    b = generate(model, prompts, mask, s, EOS, PAD)
    assert torch.equal(a.sequences, b.sequences)  # reproducible under a seed, as evaluate needs
    P = a.prompt_len
    assert torch.equal(a.sequences[:, :P], prompts)
    torch.testing.assert_close(a.action_mask[:, P - 1:], a.attention_mask[:, P:])
    assert a.action_mask.shape == (prompts.shape[0], a.sequences.shape[1] - 1)
    # top_k=1 samples the argmax: the same tokens as greedy decoding
    one = generate(model, prompts, mask, GenerationSettings(max_new_tokens=12, top_k=1, backend="static"), EOS, PAD)
    g = generate(model, prompts, mask, GenerationSettings(max_new_tokens=12, do_sample=False, backend="static"),
                 EOS, PAD)
    assert torch.equal(one.sequences, g.sequences)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 8, 0.7)])
def test_sampler_draws_from_hf_warped_distribution(temperature, top_k, top_p):
    """Empirical frequencies of our on-device sampler match the distribution HF's
    temperature / top-k / top-p warpers define (chi-square-like bound)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g) * 2  # (1, V)
    warped = logits.clone()
    for w in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
              TopPLogitsWarper(top_p) if top_p < 1 else None):
        if w is not None:
            warped = w(None, warped)
    expected = warped.softmax(-1)[0]  # (V,)
    n = 40000
    draws = choose_tokens(logits.expand(n, -1).clone(), do_sample=True, temperature=temperature, top_k=top_k,
                          top_p=top_p, generator=g)
    freq = torch.bincount(draws, minlength=12).float() / n
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn
    tol = 4 * (expected * (1 - expected) / n).sqrt() + 1e-3
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_ban_matches_hf_processor(n):
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 6, (4, 30), generator=g)  # a small vocabulary repeats n-grams often
    logits = torch.randn(4, 6, generator=g)
    ours = ban_repeated_ngrams(logits.clone(), tokens, n)
    theirs = NoRepeatNGramLogitsProcessor(n)(tokens, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


@pytest.mark.parametrize("arch", sorted(static_decode.HF_ONLY_MODEL_TYPES))
def test_hf_only_architecture_falls_back_to_hf(arch, caplog, monkeypatch):
    from rlhf_tasks.algorithms.rl import generation

    monkeypatch.setattr(generation, "_fallback_logged", set())
    model = tiny_lm(arch)
    assert not static_decode.supports_static(model)
    prompts, mask = left_padded_prompts()
    with caplog.at_level("INFO", logger="rlhf_tasks"):
        ro = generate(model, prompts, mask, greedy("static"), EOS, PAD)
    assert f"model_type {arch!r}: " in caplog.text and "HF generate()" in caplog.text  # the reason is logged
    hf = generate(model, prompts, mask, greedy("hf"), EOS, PAD)
    assert torch.equal(ro.sequences, hf.sequences)


def test_every_architecture_the_test_matrices_build_is_classified():
    """The stage matrices (tests/test_models.py, tests/faults/test_architectures.py) run PPO
    and evaluate on these architectures: each one is either checked above or kept on HF
    generate() for a stated reason, never silently untested."""
    from tests import test_models
    from tests.faults import test_architectures

    built = set(test_models.ARCHS) | set(test_architectures.ARCHS)
    assert built <= static_decode.SUPPORTED_MODEL_TYPES | set(static_decode.HF_ONLY_MODEL_TYPES)
    assert not static_decode.SUPPORTED_MODEL_TYPES & set(static_decode.HF_ONLY_MODEL_TYPES)
    assert len(static_decode.SUPPORTED_MODEL_TYPES) >= 10


def test_other_kernels_and_layer_types_fall_back(monkeypatch):
    model = tiny_lm("llama")
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    assert "takes no 4-D attention mask" in static_decode.unsupported_reason(model)
    model = tiny_lm("qwen3")
    model.config.layer_types = ["full_attention", "chunked_attention"]
    assert "['chunked_attention']" in static_decode.unsupported_reason(model)
    assert static_decode.unsupported_reason(tiny_lm("mistral")) is None


def test_attention_masks_by_hand():
    """Slot 0 is left padding; queries at slots 0..4 of a 5-slot cache. 1 = may attend."""
    key_ok = torch.tensor([[False, True, True, True, True]])  # (B=1, T=5)
    masks = static_decode.attention_masks(torch.arange(5), key_ok, {"sliding_attention": 2, "full_attention": None},
                                          torch.float32)
    visible = {k: (m[0, 0] == 0).int().tolist() for k, m in masks.items()}
    assert visible["full_attention"] == [[0, 0, 0, 0, 0],
                                         [0, 1, 0, 0, 0],
                                         [0, 1, 1, 0, 0],
                                         [0, 1, 1, 1, 0],
                                         [0, 1, 1, 1, 1]]
    assert visible["sliding_attention"] == [[0, 0, 0, 0, 0],  # a key is seen while it is < 2 slots behind
                                            [0, 1, 0, 0, 0],
                                            [0, 1, 1, 0, 0],
                                            [0, 0, 1, 1, 0],
                                            [0, 0, 0, 1, 1]]
    assert masks["full_attention"].min() == torch.finfo(torch.float32).min
    # A window as long as the cache is plain causal attention: one mask serves every layer.
    one = static_decode.attention_masks(torch.arange(5), key_ok, {"sliding_attention": 5, "full_attention": None},
                                        torch.float32)
    assert torch.equal(one, masks["full_attention"])
    # A decode step: one query, at slot 4.
    step = static_decode.attention_masks(torch.tensor([4]), key_ok, {"sliding_attention": 2}, torch.float32)
    assert (step[0, 0] == 0).int().tolist() == [[0, 0, 0, 1, 1]]


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])  # one mask for all layers; one mask per layer type
def test_the_sliding_window_changes_the_answers(arch):
    """So that equality with HF above really checks the window: without it the same weights
    answer differently."""
    model = tiny_lm(arch)
    prompts, mask = left_padded_prompts()
    windowed = generate(model, prompts, mask, greedy("static"), V + 5, PAD)
    model.config.sliding_window = 10_000
    full = generate(model, prompts, mask, greedy("static"), V + 5, PAD)
    assert not torch.equal(windowed.sequences, full.sequences)


def test_group_sampling_rollout_on_the_static_backend(monkeypatch):
    """GRPO / RLOO: P prompts, each repeated G times with its copies adjacent, in one batch.
    Sampling gives G different answers per prompt, and the rollout has the shapes the group
    trainer reshapes to (P, G): sequences (P*G, T), action_mask (P*G, T-1)."""
    from rlhf_tasks.algorithms.rl import generation

    def no_hf(*args, **kwargs):
        raise AssertionError("the group rollout fell back to HF generate()")

    monkeypatch.setattr(generation, "hf_generate", no_hf)
    model = tiny_lm("qwen3")
    prompts, mask = left_padded_prompts()
    P, G = 3, 4
    group_ids, group_mask = prompts[:P].repeat_interleave(G, 0), mask[:P].repeat_interleave(G, 0)  # (P*G, 9)
    torch.manual_seed(0)
    ro = generate(model, group_ids, group_mask, GenerationSettings(max_new_tokens=12, backend="static"), EOS, PAD)
    T, L = ro.sequences.shape[1], ro.prompt_len
    assert ro.sequences.shape == ro.attention_mask.shape == (P * G, T) and ro.action_mask.shape == (P * G, T - 1)
    by_group = ro.sequences.view(P, G, T)
    assert torch.equal(by_group[:, :, :L], prompts[:P, None].expand(P, G, L))  # every copy keeps its prompt
    for p in range(P):
        answers = {tuple(a) for a in by_group[p, :, L:].tolist()}
        assert len(answers) == G, f"prompt {p}: only {len(answers)} different answers of {G}"
    torch.testing.assert_close(ro.action_mask[:, L - 1:], ro.attention_mask[:, L:])
    assert ro.answer_lengths.view(P, G).min() >= 1


def test_unknown_backend_is_refused():
    model = tiny_lm("opt")
    prompts, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="backend='vllm' is invalid"):
        generate(model, prompts, mask, GenerationSettings(max_new_tokens=2, backend="vllm"), EOS, PAD)
