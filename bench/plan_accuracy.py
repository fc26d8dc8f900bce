"""The memory plan against a real training step on CPU: planned vs measured peak.

For small random-init OPT, GPT-2 and Llama models (built from configs, no download), with
batch, sequence length and gradient checkpointing varied, it runs the step the SFT stage
runs at ZeRO-0 in fp32 (forward with labels, backward, AdamW step) for real, twice, and
reads the second step's peak from torch's own memory accounting
(``torch.profiler`` with ``profile_memory``: every allocation, categorised by
``torch.profiler._memory_profiler`` into parameters, optimizer state, gradients,
activations, temporaries). The plan comes from ``rlhf_tasks.plan`` for the same config.

    python bench/plan_accuracy.py                      # print the table
    python bench/plan_accuracy.py --update-benchmarks  # also write it into BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- plan-accuracy:begin -->", "<!-- plan-accuracy:end -->")
MACHINE = "2-core CPU VM, no GPU"
VOCAB = 4096
# The peaks measured on an H100 (../shared/gpu/README.md, another session): a plain
# transformers + DeepSpeed loop, random-init OPT, bf16, ZeRO-0, micro-batch 8 x 512, vocabulary
# 50,272, the model's labels= loss; (model, attention, peak in GB).
H100_ROWS = [("opt-125m", "sdpa", 4.9), ("opt-350m", "sdpa", 10.8), ("opt-1.3b", "sdpa", 35.4),
             ("opt-1.3b", "eager", 56.5)]
OPT_SIZES = {  # the published architectures (facebook/opt-*/config.json)
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     word_embed_proj_dim=2048),
}
GPU_MARKERS = ("<!-- plan-gpu:begin -->", "<!-- plan-gpu:end -->")
# (architecture, batch, sequence length, gradient checkpointing)
CASES = [("opt", 8, 256, False), ("opt", 4, 512, True), ("gpt2", 8, 256, False), ("gpt2", 16, 128, True),
         ("llama", 8, 256, False), ("llama", 4, 384, True)]


def tiny_config(arch: str):
    """A 4-layer, 128-wide random-init config of ``arch``, dropout off."""
    import transformers as T

    if arch == "opt":
        return T.OPTConfig(hidden_size=128, word_embed_proj_dim=128, num_hidden_layers=4, num_attention_heads=4,
                           ffn_dim=512, vocab_size=VOCAB, max_position_embeddings=1024, dropout=0.0)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=1024, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "llama":
        return T.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024)
    raise ValueError(f"unknown architecture {arch!r}")


def measure(config, batch: int, seq_len: int, checkpointing: bool) -> dict[str, int]:
    """Peak bytes of the second real training step and the activations at that moment
    (activations + temporaries + inputs + autograd's own buffers), from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Category, MemoryProfileTimeline
    from transformers import AutoModelForCausalLM

    from rlhf_tasks.algorithms.lm_head import lm_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))

    def step() -> None:
        loss = lm_loss(model, ids, torch.ones_like(ids), ids)[0]  # the SFT stage's loss (algorithms/lm_head.py)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here on, as in every later step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    column = {c: i + 1 for i, c in enumerate([Category.PARAMETER, Category.OPTIMIZER_STATE, Category.INPUT,
                                             Category.TEMPORARY, Category.ACTIVATION, Category.GRADIENT,
                                             Category.AUTOGRAD_DETAIL, None])}
    at_peak = max(sizes, key=sum)
    states = sum(at_peak[column[c]] for c in (Category.PARAMETER, Category.OPTIMIZER_STATE, Category.GRADIENT))
    return {"peak": sum(at_peak), "activations": sum(at_peak) - states}


def planned(config, batch: int, seq_len: int, checkpointing: bool) -> dict[str, int]:
    """The SFT stage's plan for the same step: fp32, ZeRO-0, one process."""
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.plan.stages import supervised

    cfg = PipelineConfig.load("tiny-cpu", [f"sft.per_device_train_batch_size={batch}", f"data.max_seq_len={seq_len}",
                                           f"data.max_prompt_seq_len={seq_len // 2}", "sft.dtype=fp32",
                                           f"sft.gradient_checkpointing={str(checkpointing).lower()}",
                                           "sft.dropout=0.0", "model.attn_implementation=sdpa"])
    p = supervised(cfg, {"actor": config}, "sft")
    return {"peak": p.allocated, "activations": p.parts["activations"]}


def h100_plan(name: str, attn: str, logits: str = "whole"):
    """The SFT stage's plan of the measured H100 step (``logits="whole"``: as the plain loop
    computed it; ``"chunked"``: as our stage does)."""
    from transformers import OPTConfig

    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.plan.stages import supervised

    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, dropout=0.1, **OPT_SIZES[name])
    cfg = PipelineConfig.load("opt-1.3b", ["sft.dtype=bf16", "sft.zero_stage=0", "sft.per_device_train_batch_size=8",
                                           "sft.gradient_accumulation_steps=1", "sft.lora_dim=0", "data.max_seq_len=512",
                                           f"model.attn_implementation={attn}"])
    return supervised(cfg, {"actor": config}, "sft", logits=logits)


def h100_table() -> str:
    lines = ["| model | attention | measured peak (GB) | planned (GB) | error if GB | error if GiB | planned peak phase "
             "| of which allocator cache (GB) | our stage's plan, chunked head (GB) |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, attn, gb in H100_ROWS:
        p, ours = h100_plan(name, attn), h100_plan(name, attn, "chunked")
        lines.append(f"| {name} | {attn} | {gb} | {p.peak / 1e9:.2f} | {p.peak / (gb * 1e9) - 1:+.1%} "
                     f"| {p.peak / (gb * 2**30) - 1:+.1%} | {p.peak_phase} | {p.parts['allocator_cache'] / 1e9:.2f} "
                     f"| {ours.peak / 1e9:.2f} |")
        print(f"[plan-accuracy] H100 {name} {attn}: planned {p.peak / 1e9:.2f} vs {gb} GB", flush=True)
    return "\n".join(lines)


def rows(cases=CASES) -> list[dict]:
    out = []
    for arch, b, t, gc in cases:
        config = tiny_config(arch)
        m, p = measure(config, b, t, gc), planned(config, b, t, gc)
        out.append({"arch": arch, "batch": b, "seq_len": t, "checkpointing": gc, "measured": m, "planned": p,
                    "error_peak": p["peak"] / m["peak"] - 1, "error_activations": p["activations"] / m["activations"] - 1})
        print(f"[plan-accuracy] {arch} B={b} T={t} gc={gc}: peak {p['peak'] / 1e6:.1f} planned vs "
              f"{m['peak'] / 1e6:.1f} MB measured ({out[-1]['error_peak']:+.1%})", flush=True)
    return out


def table(results: list[dict]) -> str:
    head = ("| model | batch | seq len | grad. ckpt | activations planned / measured (MB) | error "
            "| peak planned / measured (MB) | error |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, m = r["planned"], r["measured"]
        lines.append(f"| {r['arch']} | {r['batch']} | {r['seq_len']} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {p['activations'] / 1e6:.1f} / {m['activations'] / 1e6:.1f} | {r['error_activations']:+.1%} "
                     f"| {p['peak'] / 1e6:.1f} / {m['peak'] / 1e6:.1f} | {r['error_peak']:+.1%} |")
    return "\n".join(lines)


def section(results: list[dict]) -> str:
    return (f"{MARKERS[0]}\nMeasured {time.strftime('%Y-%m-%d')} on a {MACHINE} (torch {torch.__version__}, {platform.python_implementation()} "
            f"{platform.python_version()}), by `python bench/plan_accuracy.py --update-benchmarks`: 4-layer, 128-wide "
            f"random-init models, vocabulary {VOCAB}, fp32, one step of the SFT stage's loss (the chunked LM head of "
            "algorithms/lm_head.py), backward, AdamW, the second step's peak from torch's profiler memory accounting; the "
            "plan's `allocated` peak (a CPU has no caching allocator: the GPU-only allocator share is 0 in fp32 at "
            "ZeRO-0 anyway).\n\n" + table(results) + f"\n{MARKERS[1]}")


def update_benchmarks(path: Path, text: str, markers: tuple[str, str] = MARKERS,
                      heading: str = "Memory plan against measured peak (CPU)") -> None:
    """Replace the section between ``markers`` in BENCHMARKS.md (or append it under ``heading``)."""
    md = path.read_text()
    if markers[0] in md:
        md = re.sub(re.escape(markers[0]) + ".*?" + re.escape(markers[1]), lambda _: text, md, flags=re.S)
    else:
        md = md.rstrip() + f"\n\n## {heading}\n\n" + text + "\n"
    path.write_text(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update-benchmarks", action="store_true")
    ap.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md")
    args = ap.parse_args(argv)
    results = rows()
    text = section(results)
    gpu = (f"{GPU_MARKERS[0]}\nPlanned by `python bench/plan_accuracy.py --update-benchmarks` (no GPU needed) for the "
           "steps measured on an H100 by another session (`../shared/gpu/README.md`: a plain transformers + DeepSpeed "
           "loop, random-init OPT, bf16, ZeRO-0, batch 8 x 512, vocabulary 50,272, the model's own labels= loss, so "
           "planned with the whole logits); that README does not say whether its GB are 10^9 or 2^30 bytes, so both "
           "errors are given.\n\n" + h100_table() + f"\n{GPU_MARKERS[1]}")
    print(text + "\n\n" + gpu)
    if args.update_benchmarks:
        update_benchmarks(args.benchmarks, text)
        update_benchmarks(args.benchmarks, gpu, GPU_MARKERS, "Memory plan against the measured H100 peaks")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
