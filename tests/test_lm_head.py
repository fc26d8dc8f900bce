"""The chunked LM head: log-probs and their gradients equal to those of the whole logits,
for the pure function (tokens.log_probs_from_hidden) and for every architecture the model
path (algorithms/lm_head.py) takes it on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_tasks.algorithms.lm_head import CHUNKED_MODEL_TYPES, head_of, lm_loss, token_log_probs
from rlhf_tasks.algorithms.maths.tokens import chunk_rows, log_probs_from_hidden
from tests.test_ppo_generation import tiny_lm

V, H, N = 97, 16, 23


def reference(h, w, y, b=None, scale=1.0, softcap=None):
    z = F.linear(h, w, b).float() * scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return F.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def leaves(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    return h, w, b, torch.randint(0, V, (N,), generator=g)


def grads(fn, h, w, b, upstream):
    out = fn()
    out.backward(upstream)
    got = [t.grad.clone() for t in (h, w, b) if t is not None]
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    return out.detach(), got


@pytest.mark.parametrize("chunk_bytes", [10**9, 4 * V * 5, 4 * V])  # one chunk; chunks of 5 rows; of 1 row
@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.25, None), (1.0, 3.0), (2.0, 1.5)])
def test_log_probs_from_hidden_equal_whole_logits_values_and_gradients(chunk_bytes, scale, softcap):
    h, w, b, y = leaves()
    upstream = torch.randn(N, dtype=torch.float64)  # a per-token gradient, as the policy losses give
    want, want_g = grads(lambda: reference(h, w, y, b, scale, softcap), h, w, b, upstream)
    got, got_g = grads(lambda: log_probs_from_hidden(h, w, y, b, scale=scale, softcap=softcap,
                                                     chunk_bytes=chunk_bytes), h, w, b, upstream)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)  # the logits are fp32, as the model makes them


def test_log_probs_from_hidden_in_bf16_matches_autograd_through_a_bf16_head():
    h, w, _, y = leaves(torch.bfloat16, bias=False)
    upstream = torch.randn(N)
    want, want_g = grads(lambda: reference(h, w, y), h, w, None, upstream)
    got, got_g = grads(lambda: log_probs_from_hidden(h, w, y, chunk_bytes=4 * V * 4), h, w, None, upstream)
    torch.testing.assert_close(got, want)
    for g1, g2 in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g1.float(), g2.float(), rtol=2e-2, atol=2e-2)  # bf16's own rounding


def test_no_grad_path_and_empty_input():
    h, w, b, y = leaves(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(log_probs_from_hidden(h, w, y, b, chunk_bytes=4 * V * 3), reference(h, w, y, b))
    assert log_probs_from_hidden(h[:0], w, y[:0]).shape == (0,)
    assert chunk_rows(49_152) == 341 and chunk_rows(128_256) == 130  # the 64 MiB budget


def test_ignored_labels_read_token_zero_and_get_no_gradient():
    h, w, b, y = leaves()
    y = y.clone()
    y[3] = -100
    out = log_probs_from_hidden(h, w, y, b)
    torch.testing.assert_close(out[3], reference(h, w, torch.zeros_like(y), b)[3])
    upstream = torch.ones(N, dtype=torch.float64)
    upstream[3] = 0
    out.backward(upstream)
    assert h.grad[3].abs().sum() == 0


def _batch(seed=0, B=3, T=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0  # left padding, as rollouts are
    mask[2, -2:] = 0  # right padding, as SFT batches are
    return ids, mask


@pytest.mark.parametrize("arch", sorted(CHUNKED_MODEL_TYPES))
def test_token_log_probs_equal_the_models_own_logits(arch):
    model = tiny_lm(arch, seed=1)  # eval mode: GPT-2's dropout would draw differently in each pass
    if arch in ("cohere", "cohere2"):
        model.logit_scale = 0.5
    if arch == "granite":
        model.config.logits_scaling = 4.0
    assert not isinstance(head_of(model), str), head_of(model)
    ids, mask = _batch()
    labels = ids[:, 1:]
    where = mask[:, 1:].bool()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, :-1].float()
    want = F.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    upstream = torch.randn(want.shape) * where
    (want * upstream).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = token_log_probs(model, ids, mask, labels, where=where, position_ids=pos, chunk_bytes=4 * V * 4)
    torch.testing.assert_close(got[where], want[where], rtol=1e-5, atol=1e-5)
    assert (got[~where] == 0).all()
    (got * upstream).sum().backward()
    for n, p in model.named_parameters():
        if n in want_grads:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_lm_loss_is_transformers_labels_loss():
    model = tiny_lm("opt", seed=2)
    ids, mask = _batch(seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt: no loss there
    want = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got, n = lm_loss(model, ids, mask, labels, chunk_bytes=4 * V * 2)
    torch.testing.assert_close(got, want)
    assert n == (labels[:, 1:] != -100).sum()
    got.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6)  # fp32 sums in another order (one thread: 3.9e-7 seen)


def test_unknown_architecture_or_adapted_head_keeps_whole_logits():
    from rlhf_tasks.runtime.lora import apply_lora

    model = tiny_lm("opt", seed=4)
    model.config.model_type = "not-checked"
    assert "not one the chunked LM head has been checked on" in head_of(model)
    ids, mask = _batch()
    want = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    got = token_log_probs(model, ids, mask, ids[:, 1:])
    torch.testing.assert_close(got, want.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1))
    adapted = apply_lora(tiny_lm("opt", seed=4), 4, "lm_head")
    assert "not a plain Linear" in head_of(adapted)
    lora_blocks = apply_lora(tiny_lm("opt", seed=4), 4)  # peft around the model, the head untouched
    assert not isinstance(head_of(lora_blocks), str)
