"""Rollout generation speed: our ``static`` backend vs HF ``generate()``, side by side in one run.

Both backends go through ``rlhf_tasks.algorithms.rl.generation.generate`` (the function PPO calls) on
the same random-init model, the same prompts and the same sampling settings (PPO's
defaults: temperature 1, no top-k/top-p). A model is an OPT size of bench/throughput.py
(``tiny``, ``opt-125m``, ...) or any architecture the static backend is checked on, by its
``model_type`` (``llama``, ``mistral``, ``gemma2``, ``qwen3_moe``, ...), built at the tiny
OPT's size (4 layers, 128 wide, MLP 512; MoE: 4 experts of 128, 2 per token). Every row generates all ``--new-tokens`` (the EOS
id is one the model cannot emit), so both do the same work. Rounds alternate the backends so
that a machine busy with something else slows both alike; the median of each is reported
with the ratio.

    python bench/generation.py                         # CPU: tiny + OPT-125M, writes the table
    python bench/generation.py --models opt-1.3b --batch 32 --prompt-len 256 --new-tokens 256
    python bench/generation.py --models llama,mistral,gemma2,qwen3,mixtral,qwen3_moe    # architectures

Prints one JSON line per model and a markdown table; ``--update`` rewrites the
``generation-cpu`` section of BENCHMARKS.md (on CPU only: GPU numbers come from the GPU suite).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import SIZES, build, sync  # noqa: E402

from rlhf_tasks.algorithms.rl import static_decode  # noqa: E402
from rlhf_tasks.algorithms.rl.generation import GenerationSettings, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = {"tiny": 8192}  # the tiny model's vocabulary is the bundled tokenizer's order of size; others OPT's


def build_arch(model_type: str, vocab: int, device: torch.device):
    """A random-init model of ``model_type`` at the tiny OPT's size. The MoE fields are set
    under each family's name (experts, local experts); other configs keep them as unused
    attributes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in static_decode.SUPPORTED_MODEL_TYPES:
        raise SystemExit(f"--models {model_type!r}: neither an OPT size ({', '.join(SIZES)}) nor an architecture "
                         f"the static backend is checked on ({', '.join(sorted(static_decode.SUPPORTED_MODEL_TYPES))})")
    tiny = SIZES["tiny"]
    hidden, heads = tiny["hidden_size"], tiny["num_attention_heads"]
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=tiny["ffn_dim"],
                               num_hidden_layers=tiny["num_hidden_layers"], num_attention_heads=heads,
                               num_key_value_heads=heads // 2, head_dim=hidden // heads, max_position_embeddings=2048,
                               num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                               shared_expert_intermediate_size=hidden, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg)


def measure(name: str, a: argparse.Namespace, device: torch.device) -> dict:
    vocab = VOCAB.get(name, 50272 if name in SIZES else VOCAB["tiny"])
    torch.manual_seed(0)
    model = build(name, vocab, "sdpa", device) if name in SIZES else build_arch(name, vocab, device)
    model = model.to(dtype=_dtype(a.dtype)).eval()
    prompts = torch.randint(3, vocab, (a.batch, a.prompt_len), device=device)
    mask = torch.ones_like(prompts)
    mask[: a.batch // 2, : a.prompt_len // 4] = 0  # half the rows left-padded, as in a real rollout batch
    eos = vocab + 1  # never sampled: every row generates all its tokens
    times: dict[str, list[float]] = {"hf": [], "static": []}
    for backend in times:  # warm-up (allocator, kernels, CUDA graph capture)
        generate(model, prompts, mask, GenerationSettings(max_new_tokens=min(8, a.new_tokens), backend=backend), eos, 1)
    for _ in range(a.rounds):
        for backend in times:
            s = GenerationSettings(max_new_tokens=a.new_tokens, backend=backend, cache_len=a.prompt_len + a.new_tokens)
            sync(device)
            t0 = time.perf_counter()
            ro = generate(model, prompts, mask, s, eos, 1)
            sync(device)
            times[backend].append(time.perf_counter() - t0)
            assert int(ro.answer_lengths.sum()) == a.batch * a.new_tokens
    new = a.batch * a.new_tokens
    tps = {b: new / statistics.median(t) for b, t in times.items()}
    return {"bench": "generation", "model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "vocab": vocab, "device": _device_name(device), "threads": torch.get_num_threads(), "dtype": a.dtype,
            "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "rounds": a.rounds,
            "hf_s": round(statistics.median(times["hf"]), 3), "static_s": round(statistics.median(times["static"]), 3),
            "hf_new_tokens_per_s": round(tps["hf"], 1), "static_new_tokens_per_s": round(tps["static"], 1),
            "speedup": round(tps["static"] / tps["hf"], 2)}


def table(rows: list[dict]) -> str:
    lines = ["| model | params | batch | prompt + new | HF generate() new tok/s | static new tok/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']}M | {r['batch']} | {r['prompt_len']} + {r['new_tokens']} | "
                     f"{r['hf_new_tokens_per_s']:,} | {r['static_new_tokens_per_s']:,} | {r['speedup']}x |")
    return "\n".join(lines)


def update_benchmarks(rows: list[dict], command: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    import transformers

    r0 = rows[0]
    body = (f"Measured {time.strftime('%Y-%m-%d')} on {r0['device']} ({r0['threads']} torch threads), "
            f"{r0['dtype']}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"median of {r0['rounds']} alternating rounds; command: `{command}`\n\n{table(rows)}\n")
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = "<!-- generation-cpu:begin -->", "<!-- generation-cpu:end -->"
    block = f"{begin}\n{body}{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Rollout generation on CPU\n\n{block}\n"
    path.write_text(text)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,opt-125m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--update", action="store_true", help="rewrite the generation-cpu section of BENCHMARKS.md")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("RLHF_DEVICE") != "cpu" else "cpu")
    rows = []
    for name in a.models.split(","):
        rows.append(measure(name, a, device))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if a.update:
        if device.type != "cpu":
            print("--update writes CPU numbers only; GPU numbers come from bench/gpu_suite.sh", file=sys.stderr)
            return 2
        update_benchmarks(rows, "python bench/generation.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
