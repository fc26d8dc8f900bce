"""The memory plan per rank against the peak each rank measured: 2 CPU ranks, ZeRO 1, 2, 3.

The SFT stage's own path on 2 processes started by DeepSpeed's launcher (gloo): the model
loaded by ``runtime.models.load_trainable`` (partitioned as it loads under ZeRO-3), the
engine built by ``runtime.engine.initialize``, then the step the stage runs (forward with
labels, backward, optimizer step) twice; each rank reads the second step's peak from
torch's profiler memory accounting (every CPU allocation: its parameters and their ZeRO
partitions, gradients, optimizer states, DeepSpeed's flat buffers, activations). The plan
is ``rlhf_tasks.plan``'s for the same config with ``resources.cpu_processes=2``.

    python bench/plan_ranks.py                      # print the table
    python bench/plan_ranks.py --update-benchmarks  # also write it into BENCHMARKS.md

A rank's peak in the profiler is what torch allocated, not its resident memory: DeepSpeed's
reduce buckets (``reduce_bucket_size``, 500M elements, two of them under ZeRO-1/2 with
``overlap_comm``) are allocated whole and count, although the OS backs only the pages
written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- plan-ranks:begin -->", "<!-- plan-ranks:end -->")
MACHINE = "2-core CPU VM, no GPU"
RANKS = 2
BATCH, SEQ, VOCAB = 4, 128, 4096
STAGES = (1, 2, 3)
# DeepSpeed's default buckets (reduce_bucket_size 500M elements: 4 GB of fp32 buffers per rank
# at ZeRO-1/2, which hide everything else at this model size), then buckets of 1M elements,
# where the partitioned weights, gradients and optimizer states make the peak.
BUCKETS = (None, 1_000_000)


def model_config():
    """An OPT model whose states weigh as much as the step's activations (8.9M parameters: 35
    MB of fp32 weights, 71 MB of Adam states, partitioned by ZeRO; random init, dropout off)."""
    import transformers as T

    return T.OPTConfig(hidden_size=320, word_embed_proj_dim=320, num_hidden_layers=6, num_attention_heads=5,
                       ffn_dim=1280, vocab_size=VOCAB, max_position_embeddings=512, dropout=0.0,
                       attention_dropout=0.0, activation_dropout=0.0)


def config_for(zero: int):
    from rlhf_tasks.config import PipelineConfig

    return PipelineConfig.load("tiny-cpu", [f"resources.cpu_processes={RANKS}", f"sft.zero_stage={zero}",
                                            f"sft.per_device_train_batch_size={BATCH}", f"data.max_seq_len={SEQ}",
                                            f"data.max_prompt_seq_len={SEQ // 2}", "sft.dtype=fp32",
                                            "sft.gradient_checkpointing=false", "sft.dropout=0.0",
                                            "model.attn_implementation=sdpa"])


def with_buckets(elements: int | None) -> None:
    """DeepSpeed's reduce and ZeRO-3 prefetch buckets of ``elements`` (None: as the stages
    set them), in the engine config and in the plan's layout alike."""
    if elements is None:
        return
    from rlhf_tasks.plan import states
    from rlhf_tasks.runtime import engine

    zero_section = engine._zero_section

    def small(o):
        z = zero_section(o)
        z["reduce_bucket_size"] = z["allgather_bucket_size"] = elements
        if z["stage"] == 3:
            z["stage3_prefetch_bucket_size"] = elements
        return z

    engine._zero_section = small
    states.REDUCE_BUCKET_ELEMENTS = states.PREFETCH_BUCKET_ELEMENTS = elements


def planned(zero: int, buckets: int | None) -> dict[str, int]:
    from rlhf_tasks.plan.stages import supervised

    with_buckets(buckets)
    p = supervised(config_for(zero), {"actor": model_config()}, "sft")
    return {"peak": p.peak, **{k: v for k, v in p.parts.items() if v}}


def rank_step(model_dir: str, zero: int, buckets: int | None, out: str) -> None:
    """One rank (started by DeepSpeed's launcher): the SFT stage's engine and step, the
    second step's peak bytes written to ``out``-rank<r>.json."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    from rlhf_tasks.runtime.engine import Batching, init_distributed, initialize
    from rlhf_tasks.runtime.models import load_trainable

    with_buckets(buckets)
    cfg = config_for(zero)
    device = torch.device("cpu")
    rank, world = init_distributed(device)
    torch.manual_seed(0)
    model = load_trainable(model_dir, cfg.sft, "fp32", world, attn_implementation="sdpa")
    engine = initialize(model, cfg.sft, Batching(BATCH, 1, "fp32", 10), device, world)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))

    def step() -> None:
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()

    step()  # the optimizer's state and DeepSpeed's buckets exist from here on
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    Path(f"{out}-rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world,
                                                          "peak": max(sum(s) for s in sizes)}))


def measured(model_dir: Path, zero: int, buckets: int | None, work: Path) -> list[dict]:
    """Start 2 ranks through DeepSpeed's launcher (as the stages are on CPU); their peaks."""
    from rlhf_tasks.pipeline.launch import Resources, free_port, stage_env

    out = work / f"zero{zero}-{buckets}"
    cmd = ["deepspeed", "--num_gpus", str(RANKS), "--master_port", str(free_port()), "--no_local_rank",
           str(Path(__file__).resolve()), "--rank-step", str(model_dir), str(zero), str(buckets or 0), str(out)]
    env = stage_env(Resources(RANKS, cpu=True), {"PYTHONPATH": str(REPO), "RLHF_DEVICE": "cpu"})
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    return [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in range(RANKS)]


def rows() -> list[dict]:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from rlhf_tasks.runtime.models import resolve_model_path

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(model_config()).save_pretrained(model_dir)
        PreTrainedTokenizerFast.from_pretrained(resolve_model_path("builtin:tiny-opt")).save_pretrained(model_dir)
        for buckets in BUCKETS:
            for zero in STAGES:
                plan, ranks = planned(zero, buckets), measured(model_dir, zero, buckets, Path(tmp))
                for r in ranks:
                    out.append({"zero": zero, "buckets": buckets, "rank": r["rank"], "planned": plan,
                                "measured": r["peak"], "error": plan["peak"] / r["peak"] - 1})
                    print(f"[plan-ranks] ZeRO-{zero} buckets {buckets or 'default'} rank {r['rank']}: peak "
                          f"{plan['peak'] / 1e6:.1f} planned vs {r['peak'] / 1e6:.1f} MB measured "
                          f"({out[-1]['error']:+.1%})", flush=True)
    return out


def table(results: list[dict]) -> str:
    lines = ["| ZeRO | buckets (elements) | rank | planned parts (MB) | peak planned / measured (MB) | error |",
             "|---|---|---|---|---|---|"]
    for r in results:
        parts = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r["planned"].items() if k != "peak")
        lines.append(f"| {r['zero']} | {r['buckets'] or 'default (500M)'} | {r['rank']} | {parts} | "
                     f"{r['planned']['peak'] / 1e6:.1f} / {r['measured'] / 1e6:.1f} | {r['error']:+.1%} |")
    return "\n".join(lines)


def section(results: list[dict]) -> str:
    return (f"{MARKERS[0]}\nMeasured on a {MACHINE} (torch {torch.__version__}, {platform.python_implementation()} "
            f"{platform.python_version()}), by `python bench/plan_ranks.py --update-benchmarks`: {RANKS} CPU ranks "
            f"started by DeepSpeed's launcher (gloo), a 6-layer, 320-wide random-init OPT model (8.9M parameters, "
            f"vocabulary {VOCAB}), fp32, micro-batch {BATCH} x {SEQ} tokens, one SFT step through the stage's own "
            "engine; each rank's peak of the second step from torch's profiler memory accounting, against "
            f"`plan` with `resources.cpu_processes={RANKS}`; with DeepSpeed's default buckets (as the stages run), "
            "then with reduce and prefetch buckets of 1M elements (set in the engine and in the plan alike), "
            "where the partitioned states, not 4 GB of buffers, make the peak.\n\n" + table(results) + f"\n{MARKERS[1]}")


def update_benchmarks(path: Path, text: str) -> None:
    md = path.read_text()
    if MARKERS[0] in md:
        md = re.sub(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), lambda _: text, md, flags=re.S)
    else:
        md = md.rstrip() + "\n\n## Memory plan per rank against each rank's measured peak (CPU, 2 ranks)\n\n" + \
            text + "\n"
    path.write_text(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update-benchmarks", action="store_true")
    ap.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--rank-step", nargs=4, metavar=("MODEL_DIR", "ZERO", "BUCKETS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_step:
        model_dir, zero, buckets, out = args.rank_step
        rank_step(model_dir, int(zero), int(buckets) or None, out)
        return 0
    os.environ.setdefault("RLHF_DEVICE", "cpu")
    text = section(rows())
    print(text)
    if args.update_benchmarks:
        update_benchmarks(args.benchmarks, text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
