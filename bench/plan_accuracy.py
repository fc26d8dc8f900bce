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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- plan-accuracy:begin -->", "<!-- plan-accuracy:end -->")
MACHINE = "2-core CPU VM, no GPU"
VOCAB = 4096
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

    from rlhf_tasks.runtime.lm_head import lm_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))

    def step() -> None:
        loss = lm_loss(model, ids, torch.ones_like(ids), ids)[0]  # the SFT stage's loss (runtime/lm_head.py)
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
    return {"peak": p.peak, "activations": p.parts["activations"]}


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
    return (f"{MARKERS[0]}\nMeasured on a {MACHINE} (torch {torch.__version__}, {platform.python_implementation()} "
            f"{platform.python_version()}), by `python bench/plan_accuracy.py --update-benchmarks`: 4-layer, 128-wide "
            f"random-init models, vocabulary {VOCAB}, fp32, one SFT step (forward with labels, backward, AdamW), the "
            "second step's peak from torch's profiler memory accounting.\n\n" + table(results) + f"\n{MARKERS[1]}")


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
    print(text)
    if args.update_benchmarks:
        update_benchmarks(args.benchmarks, text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
