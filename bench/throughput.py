"""Training and generation throughput of our engine setup on random-init OPT models.

Measures what ``../shared/gpu/README.md`` reports for DeepSpeed-Chat and TRL, through the
same code the stages use (``rlhf_tasks.runtime.engine.initialize``, ``ppo.generation.generate``):

    python bench/throughput.py --model opt-1.3b --dtype bf16 --zero 0 --steps 30
    python bench/throughput.py --model opt-350m --generate --batch 32

Prints one JSON line per measurement (tokens/s, model TFLOP/s, peak memory). On CPU use
``--model tiny`` (what the tests do, to keep this script working).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

SIZES = {  # OPT architectures (facebook/opt-*) with DeepSpeed-Chat's vocabulary
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=512, word_embed_proj_dim=128),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     word_embed_proj_dim=768),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     word_embed_proj_dim=2048),
}


def build(name: str, vocab: int, attn: str, device: torch.device | str = "cpu", **config):
    """A random-init OPT model of architecture ``name``, initialised directly on ``device``
    (a 1.3B model initialises in seconds on a GPU, a minute on CPU). ``config``: extra
    OPTConfig fields (token ids)."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=vocab, max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, **SIZES[name], **config)
    cfg._attn_implementation = attn
    with torch.device(device):
        return OPTForCausalLM(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 1) if device.type == "cuda" else None


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 50) -> float:
    """The dense-matmul peak this device reaches here and now: best of 3 rounds of ``iters``
    (n x n) @ (n x n) products, timed with CUDA events on a GPU. MFU is model TFLOP/s over this."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(max(iters // 5, 2)):  # clocks up, cuBLAS heuristics cached
        torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.mm(a, b, out=c)
            seconds = time.perf_counter() - t0
        best = max(best, 2 * n**3 * iters / seconds / 1e12)
    del a, b, c
    return best


def plain_train(model: torch.nn.Module, batches, loss_fn, *, steps: int, accumulation: int, device: torch.device,
                dtype: str, flops_per_token: float, lr: float = 1e-5, weight_decay: float = 0.0,
                max_grad_norm: float = 1.0) -> dict:
    """The baseline a user writes with plain transformers + torch: fp32 weights under bf16
    autocast (what HF Trainer's ``bf16=True`` does), torch's fused AdamW, gradient clipping,
    ``accumulation`` micro-batches per optimizer step. ``batches`` yields the same collated
    micro-batches our stage trains on; ``loss_fn(model, batch)`` -> loss. The first optimizer
    step is warm-up; real (non-padding) tokens/s are counted over the others."""
    from rlhf_tasks.runtime.engine import torch_dtype

    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=device.type == "cuda")
    half = dtype != "fp32"
    batches = iter(batches)
    tokens = torch.zeros((), device=device, dtype=torch.long)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, cpu0, timed = None, 0.0, 0
    for _ in range(steps):
        for _ in range(accumulation):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            with torch.autocast(device.type, dtype=torch_dtype(dtype), enabled=half):
                loss = loss_fn(model, batch)
            (loss / accumulation).backward()
            if t0 is not None:
                tokens += batch["attention_mask"].sum()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if t0 is None:
            sync(device)
            t0, cpu0 = time.perf_counter(), time.process_time()
        else:
            timed += 1
    sync(device)
    seconds = time.perf_counter() - (t0 or time.perf_counter())
    cpu_s = time.process_time() - cpu0
    tok_s = tokens.item() / seconds if timed else 0.0
    return {"tokens_per_s": tok_s, "model_tflops": tok_s * flops_per_token / 1e12, "timed_steps": timed,
            "timed_s": seconds, "tokens_per_cpu_s": tokens.item() / cpu_s if timed else 0.0,
            "peak_memory_gb": peak_memory_gb(device)}


@torch.no_grad()
def hf_generate(model, prompts: torch.Tensor, mask: torch.Tensor, new_tokens: int, eos: int, pad: int) -> torch.Tensor:
    """Plain HF ``generate()`` (sampling, its default dynamic cache) with the sampling settings our
    rollouts use (temperature 1, no top-k/top-p): (B, P) -> number of answer tokens up to EOS."""
    from rlhf_tasks.algorithms.rl.generation import answer_mask

    out = model.generate(input_ids=prompts, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True)
    return answer_mask(out[:, prompts.shape[1]:], eos).sum()


def time_generation(fn, prompts: torch.Tensor, mask: torch.Tensor, new_tokens: int, device: torch.device,
                    warmup_tokens: int) -> dict:
    """``fn(prompts, mask, new_tokens)`` -> answer tokens (tensor); one warm-up call with
    ``warmup_tokens`` new tokens, then one timed call."""
    t0 = time.perf_counter()
    fn(prompts, mask, warmup_tokens)
    sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = int(fn(prompts, mask, new_tokens))
    sync(device)
    seconds = time.perf_counter() - t0
    return {"new_tokens": n, "seconds": seconds, "new_tokens_per_s": n / seconds, "warmup_s": first}


def bench_train(a, device) -> dict:
    from rlhf_tasks.config import EngineConfig
    from rlhf_tasks.runtime.engine import Batching, init_distributed, initialize
    from rlhf_tasks.runtime.loop import flops_per_token

    _, world = init_distributed(device)
    model = build(a.model, a.vocab, a.attn)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fpt = flops_per_token(model, a.seq)
    o = EngineConfig(learning_rate=1e-5, lr_scheduler_type="constant", zero_stage=a.zero)
    engine = initialize(model, o, Batching(a.batch, 1, a.dtype, a.steps + a.warmup), device, world)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            sync(device)
            t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x, use_cache=False).loss
        engine.backward(loss)
        engine.step()
    sync(device)
    dt = time.perf_counter() - t0
    tok_s = a.steps * a.batch * a.seq / dt
    return {"bench": "train", "model": a.model, "dtype": a.dtype, "zero": a.zero, "attn": a.attn,
            "gradient_checkpointing": a.gradient_checkpointing, "batch": a.batch, "seq": a.seq,
            "tokens_per_s": round(tok_s), "model_tflops": round(tok_s * fpt / 1e12, 1),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device.type == "cuda" else None}


@torch.no_grad()
def bench_generate(a, device) -> dict:
    from rlhf_tasks.algorithms.rl.generation import GenerationSettings, generate
    from rlhf_tasks.runtime.engine import torch_dtype

    model = build(a.model, a.vocab, a.attn, device).to(torch_dtype(a.dtype)).eval()
    eos = 2
    # Keep sampling away from EOS so every row generates all its tokens (as the baselines do).
    prompts = torch.randint(3, a.vocab, (a.batch, a.prompt_len), device=device)
    mask = torch.ones_like(prompts)
    gen = GenerationSettings(max_new_tokens=a.new_tokens)
    generate(model, prompts[:, :8], mask[:, :8], GenerationSettings(max_new_tokens=4), eos, 1)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    ro = generate(model, prompts, mask, gen, eos, 1)
    sync(device)
    dt = time.perf_counter() - t0
    new = int(ro.answer_lengths.sum())
    return {"bench": "generate", "model": a.model, "dtype": a.dtype, "batch": a.batch, "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens, "new_tokens_per_s": round(new / dt), "seconds": round(dt, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SIZES), default="opt-1.3b")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--generate", action="store_true", help="measure rollout generation instead of training")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    a = ap.parse_args(argv)
    from rlhf_tasks.runtime.engine import resolve_device

    device = resolve_device(os.environ.get("RLHF_DEVICE", "auto"))
    print(json.dumps(bench_generate(a, device) if a.generate else bench_train(a, device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
