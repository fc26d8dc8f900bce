"""Peak memory of the logits path on CPU, before and after the chunked LM head, at a real
vocabulary and length.

One training step (forward and backward; the scoring pass without backward) of a
random-init model with SmolLM2-135M's width and vocabulary (49,152; or Llama 3's 128,256)
and two of its blocks: the blocks' activations are a small, equal share of both columns, so
the difference is the logits path. Each step is measured by torch's profiler memory
accounting (every allocation, as bench/plan_accuracy.py), in one process, the old way and
ours in turn:

- SFT: transformers' ``labels=`` loss (the whole logits, fp32 upcast, log-softmax) against
  ``algorithms.lm_head.lm_loss`` (the head in 64 MiB chunks, only the labelled positions);
- RL update: log-probs of every position from the whole logits, then the policy loss,
  against ``actor_log_probs`` on the answer tokens (DPO's pair log-probs are the same path);
- scoring: the same without backward (rollout scoring, the reference pass, evaluate).

    python bench/logits_memory.py                      # print the table
    python bench/logits_memory.py --update-benchmarks  # also write it into BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- logits-memory:begin -->", "<!-- logits-memory:end -->")


def model_for(vocab: int, layers: int = 2):
    """SmolLM2-135M's shape (LlamaConfig: 576 wide, 9 heads, 3 KV heads, tied embeddings),
    ``layers`` blocks, random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).train()


def peak_bytes(step) -> int:
    """Peak bytes of everything ``step()`` allocates (parameters included), from the profiler."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    step()  # warm-up: lazily built state exists before the measured call, as in training
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max(sum(s) for s in sizes)


def steps(model, B: int, T: int, vocab: int) -> dict[str, tuple]:
    """(old, ours) step functions per case."""
    from rlhf_tasks.algorithms.lm_head import lm_loss
    from rlhf_tasks.algorithms.maths.policy import clipped_surrogate
    from rlhf_tasks.algorithms.maths.tokens import log_probs_from_logits
    from rlhf_tasks.algorithms.rl.models import actor_log_probs

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    labels[:, : T // 2] = -100  # the prompt: no loss
    answer = (labels[:, 1:] != -100).float()  # (B, T-1)
    adv = torch.randn(B, T - 1, generator=g)

    def backward(loss):
        loss.backward()
        model.zero_grad(set_to_none=True)

    def policy(logp):
        return clipped_surrogate(logp, logp.detach(), adv, answer)[0]

    def old_logp():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return log_probs_from_logits(logits[:, :-1].float(), ids[:, 1:])

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    return {
        "SFT loss (labels=)": (lambda: backward(model(input_ids=ids, attention_mask=mask, labels=labels).loss),
                              lambda: backward(lm_loss(model, ids, mask, labels)[0])),
        "RL update / DPO (log-probs of the answer)": (lambda: backward(policy(old_logp())),
                                                      lambda: backward(policy(actor_log_probs(model, ids, mask,
                                                                                              answer)))),
        "scoring (no grad)": (no_grad(old_logp), no_grad(lambda: actor_log_probs(model, ids, mask, answer))),
    }


def rows(vocab: int, B: int, T: int) -> list[dict]:
    model = model_for(vocab)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    out = []
    for case, (old, ours) in steps(model, B, T, vocab).items():
        res = {}
        for name, fn in (("old", old), ("ours", ours)):
            t = time.process_time()
            res[name] = peak_bytes(fn)
            res[name + "_s"] = time.process_time() - t
        out.append({"case": case, "vocab": vocab, "B": B, "T": T, "params": params, **res})
        print(f"[logits-memory] V={vocab} {case}: {res['old'] / 1e6:.0f} -> {res['ours'] / 1e6:.0f} MB", flush=True)
    return out


def table(results: list[dict]) -> str:
    lines = ["| vocabulary | batch x tokens | step | peak before (MB) | peak after (MB) | after / before "
             "| of which above the weights: before / after (MB) |", "|---|---|---|---:|---:|---:|---|"]
    for r in results:
        w = r["params"]
        lines.append(f"| {r['vocab']:,} | {r['B']} x {r['T']} | {r['case']} | {r['old'] / 1e6:,.0f} "
                     f"| {r['ours'] / 1e6:,.0f} | {r['ours'] / r['old']:.2f} "
                     f"| {(r['old'] - w) / 1e6:,.0f} / {(r['ours'] - w) / 1e6:,.0f} |")
    return "\n".join(lines)


def section(results: list[dict], machine: str) -> str:
    return (f"{MARKERS[0]}\nMeasured {time.strftime('%Y-%m-%d')} on {machine} (torch {torch.__version__}, "
            f"{platform.python_implementation()} {platform.python_version()}), by `python bench/logits_memory.py "
            "--update-benchmarks`: SmolLM2-135M's width with 2 of its 30 blocks, fp32, random init; half of each row "
            "is prompt (no loss, no log-prob needed); peak of all allocations in the step, weights included.\n\n"
            + table(results) + f"\n{MARKERS[1]}")


def main(argv: list[str] | None = None) -> int:
    from plan_accuracy import update_benchmarks  # noqa: PLC0415 – bench/ is on sys.path when run as a script

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49_152, 128_256])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--machine", default="a 2-core CPU VM, no GPU")
    ap.add_argument("--update-benchmarks", action="store_true")
    a = ap.parse_args(argv)
    results = [r for v in a.vocab for r in rows(v, a.batch, a.tokens)]
    text = section(results, a.machine)
    print(text)
    if a.update_benchmarks:
        update_benchmarks(REPO / "BENCHMARKS.md", text, MARKERS, "Logits path: peak memory before and after (CPU)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    sys.exit(main())
