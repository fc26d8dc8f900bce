"""The GPU benchmark suite (bench/gpu_suite.py): its tiny mode runs every part end to end on
CPU, and its reports never put a CPU figure where GPU numbers belong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_suite  # noqa: E402


def _section(text: str, which: str) -> str:
    begin, end = gpu_suite.MARKERS[which]
    return text[text.index(begin):text.index(end)]


@pytest.mark.slow
def test_tiny_mode_runs_every_part_on_cpu(tmp_path):
    bench_md = tmp_path / "BENCHMARKS.md"
    shutil.copy(REPO / "BENCHMARKS.md", bench_md)
    gpu_before = _section(bench_md.read_text(), "gpu")
    out = tmp_path / "out"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--tiny", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--benchmarks", str(bench_md), "--update-benchmarks"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((out / "results.json").read_text())
    assert r["mode"] == "tiny" and r["device"] == "cpu"
    assert r["errors"] == [] and r["skipped"] == []
    assert all(p["status"] == "ok" for p in r["parts"].values()), r["parts"]
    # The memory plan of every stage, beside a measured peak only where CUDA measured one.
    assert [m["stage"] for m in r["memory_plan"]] == ["sft", "rm", "ppo"]
    assert all(m["planned_gb"] > 0 and m["measured_gb"] is None for m in r["memory_plan"]), r["memory_plan"]
    assert r["elapsed_s"] <= time.time() - t0
    for key in ("date", "command", "versions", "matmul_peak", "models", "data"):
        assert r[key], key
    assert r["versions"]["torch"] and r["versions"]["transformers"] and r["versions"]["deepspeed"]
    assert r["matmul_peak"]["tflops"] > 0
    assert r["models"]["tokenizer_vocab"] <= r["models"]["model_vocab"]

    # Training: our stage and the plain baseline, for SFT and RM, all measured.
    rows = {(t["stage"], t["implementation"].startswith("ours")): t for t in r["training"]}
    assert set(rows) == {("SFT", True), ("SFT", False), ("RM", True), ("RM", False)}
    for t in rows.values():
        assert t["tokens_per_s"] > 0 and t["model_tflops"] > 0 and 0 < t["mfu"], t
        assert t["timed_steps"] == 2  # 3 steps, the first one is warm-up
        assert t["peak_memory_gb"] is None  # no GPU: no memory figure rather than a made-up one
    # The stage's own summary went through metrics.json (final/) and the RLHF_RESULT line.
    sft_metrics = json.loads((tmp_path / "work" / "run" / "sft" / "final" / "metrics.json").read_text())
    assert sft_metrics["train_tokens_per_s"] == pytest.approx(rows["SFT", True]["tokens_per_s"])

    # Generation: the HF baseline and ours through every backend, same shape.
    gen = {g["key"]: g for g in r["generation"]}
    assert "hf-baseline" in gen and len(gen) >= 2
    for g in gen.values():
        assert g["new_tokens"] > 0 and g["new_tokens_per_s"] > 0 and g["batch"] == 4

    grpo, dpo = ({a["stage"]: a for a in r["alignment"]}[s] for s in ("grpo", "dpo"))
    assert grpo["unit"] == "prompts/s" and grpo["rate"] > 0 and grpo["generation_s"] > 0, grpo
    assert dpo["unit"] == "pairs/s" and dpo["rate"] > 0 and dpo["tokens_per_s"] > 0, dpo
    assert 0 < dpo["models_mb"] < grpo["models_mb"]  # the policy alone, against actor, reference and RM

    ppo = r["ppo"]
    assert ppo["prompts_per_s"] > 0 and ppo["timed_iterations"] == 1
    for k in ("generation_s", "scoring_s", "training_s"):
        assert ppo[k] > 0, k
    assert all(t["met"] is None for t in r["targets"])  # targets are judged on a GPU only

    md = (out / "results.md").read_text()
    assert "| step | implementation | model | batch | real tokens/s | model TFLOP/s | MFU | peak memory |" in md
    assert "| prompts/s | generation s/iter | scoring s/iter | training s/iter |" in md
    assert "not performance numbers" in md
    assert "| target (H100, bf16)" not in md
    for stage in ("sft", "rm", "ppo"):
        assert "RLHF_RESULT" in (out / "logs" / f"{stage}.log").read_text()
    # Models and checkpoints stay in --work: what comes back from a device run is small.
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 2_000_000

    text = bench_md.read_text()
    assert _section(text, "gpu") == gpu_before
    assert "| SFT | ours" in _section(text, "cpu") and "not performance numbers" in _section(text, "cpu")


def _full_results() -> dict:
    """What a full run on a GPU records (made-up numbers, to check the report's shape)."""
    return {
        "mode": "full", "device": "cuda", "gpu": {"name": "Some GPU", "memory_gb": 80.0}, "date": "2026-01-01 00:00 UTC",
        "command": "bash bench/gpu_suite.sh", "git_commit": "abc1234", "versions": {"torch": "2.11.0", "cuda": "13.0"},
        "matmul_peak": {"tflops": 800.0, "how": "test"},
        "models": {"actor": {"arch": "opt-1.3b", "params": 1.2e9}, "reward": {"arch": "opt-350m", "params": 3.3e8},
                   "model_vocab": 8192, "tokenizer_vocab": 1250},
        "training": [{"stage": "SFT", "implementation": "ours: stage", "model": "opt-1.3b", "batch": "8 x 8 acc.",
                      "tokens_per_s": 60_000.0, "model_tflops": 480.0, "mfu": 0.6, "peak_memory_gb": 30.0},
                     {"stage": "SFT", "implementation": "plain transformers + torch", "model": "opt-1.3b",
                      "batch": "8 x 8 acc.", "tokens_per_s": 20_000.0, "model_tflops": 160.0, "mfu": 0.2,
                      "peak_memory_gb": 40.0}],
        "generation": [{"implementation": "HF generate()", "key": "hf-baseline", "model": "opt-1.3b", "vocab": 50272,
                        "batch": 32, "prompt_len": 256, "max_new_tokens": 256, "new_tokens_per_s": 450.0,
                        "seconds": 18.0, "warmup_s": 1.0, "model_tflops": 1.2},
                       {"implementation": "ours: static", "key": "static", "model": "opt-1.3b", "vocab": 50272,
                        "batch": 32, "prompt_len": 256, "max_new_tokens": 256, "new_tokens_per_s": 9_000.0,
                        "seconds": 0.9, "warmup_s": 3.0, "model_tflops": 24.0}],
        "ppo": {"actor": "opt-1.3b", "critic": "opt-350m", "recipe": "r", "generation_backend": "static",
                "prompts_per_iteration": 32, "training_micro_batch": 8, "timed_iterations": 5, "prompts_per_s": 12.0,
                "generation_s": 1.5, "scoring_s": 0.3, "training_s": 0.9, "generation_tokens_per_s": 5000.0,
                "mean_answer_tokens": 230.0, "peak_memory_gb": 40.0},
        "errors": [], "skipped": ["ppo: time budget"], "elapsed_s": 400.0,
    }


def test_full_report_judges_the_targets():
    r = _full_results()
    r["targets"] = gpu_suite.targets(r)
    met = {t["target"].split(",")[0]: t["met"] for t in r["targets"]}
    assert met == {"rollout generation OPT-1.3B": False, "PPO": True, "SFT OPT-1.3B": True}
    md = gpu_suite.render_markdown(r)
    assert md.startswith("### GPU suite: Some GPU (80.0 GB)")
    assert "**800.0 TFLOP/s**" in md and "bash bench/gpu_suite.sh" in md and "vocabulary 8,192" in md
    assert "| SFT | ours: stage | OPT-1.3B | 8 x 8 acc. | 60,000 | 480.0 | 60.0% | 30.0 GB |" in md
    assert "| ours: static | 9,000 |" in md
    assert "| 12.00 | 1.50 | 0.30 | 0.90 | 5,000 | 230 | 40.0 GB |" in md
    assert "| rollout generation OPT-1.3B, batch 32, 256 + 256 | 10,000 new tokens/s | 9,000.0 | **no** |" in md
    assert "HF generate() 450 in this run" in md and "DeepSpeed-Chat ~1.1 (shared/gpu/README.md)" in md
    assert "- ppo: time budget" in md


def test_targets_are_not_judged_off_a_gpu():
    r = {**_full_results(), "device": "cpu"}
    assert all(t["met"] is None for t in gpu_suite.targets(r))


def test_replace_section_rewrites_only_its_markers(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("head\n<!-- gpu-suite:begin -->\nold gpu\n<!-- gpu-suite:end -->\nmid\n"
                    "<!-- cpu-tiny:begin -->\nold cpu\n<!-- cpu-tiny:end -->\ntail\n")
    gpu_suite.replace_section(path, "cpu", "new cpu\n")
    assert path.read_text() == ("head\n<!-- gpu-suite:begin -->\nold gpu\n<!-- gpu-suite:end -->\nmid\n"
                                "<!-- cpu-tiny:begin -->\nnew cpu\n<!-- cpu-tiny:end -->\ntail\n")
    (tmp_path / "C.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="gpu-suite"):
        gpu_suite.replace_section(tmp_path / "C.md", "gpu", "x")


def test_rl_speed_leaves_out_the_first_iteration(monkeypatch):
    """One way to measure speed (iteration.Speed): phase times per iteration, the first
    iteration (warm-up) left out, evaluation/checkpoint pauses not counted."""
    from rlhf_tasks.algorithms.rl.loop import rl_speed
    from rlhf_tasks.runtime import iteration

    clock = [0.0]
    monkeypatch.setattr(iteration.time, "perf_counter", lambda: clock[0])
    speed = iteration.Speed(torch.device("cpu"))
    for gen, score, train, tokens in ((9.0, 1.0, 1.0, 100), (2.0, 0.5, 1.5, 400), (2.0, 0.5, 1.5, 200)):
        for name, dt in (("generation", gen), ("scoring", score), ("training", train)):
            with speed.phase(name):
                clock[0] += dt
        speed.count(tokens)
        speed.step_done()
        with speed.paused():  # a checkpoint: not training time
            clock[0] += 100.0
    s = rl_speed(speed, 8)
    assert s == {"generation_s": 2.0, "scoring_s": 0.5, "training_s": 1.5, "prompts_per_s": 2.0,
                 "generation_tokens_per_s": 150.0, "timed_iterations": 2}
    assert speed.summary()["train_timed_s"] == pytest.approx(8.0)  # two iterations of 4 s, pauses left out
    assert rl_speed(iteration.Speed(torch.device("cpu")), 8) == {}


def test_generation_bench_compares_both_backends_on_the_same_work(tmp_path):
    """bench/generation.py: both backends generate every token of every row, and --update
    writes only its own section of BENCHMARKS.md."""
    import argparse

    import generation as gen_bench

    a = argparse.Namespace(batch=2, prompt_len=8, new_tokens=4, rounds=1, dtype="fp32")
    row = gen_bench.measure("tiny", a, torch.device("cpu"))
    assert row["hf_new_tokens_per_s"] > 0 and row["static_new_tokens_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["static_new_tokens_per_s"] / row["hf_new_tokens_per_s"], rel=0.02)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- gpu-suite:begin -->\nuntouched\n<!-- gpu-suite:end -->\n")
    for _ in range(2):  # the second run replaces the section instead of adding one
        gen_bench.update_benchmarks([row], "python bench/generation.py", md)
    text = md.read_text()
    assert text.count("<!-- generation-cpu:begin -->") == 1 and "untouched" in text
    assert "| tiny |" in text and "speed-up" in text


def test_logits_memory_bench_measures_both_paths_and_ours_is_lower():
    """bench/logits_memory.py at a small vocabulary: every step measured both ways, the
    chunked head's peak below the whole logits' (half of each row is prompt)."""
    import logits_memory

    results = logits_memory.rows(vocab=8192, B=2, T=128)
    assert [r["case"] for r in results] == list(logits_memory.steps(logits_memory.model_for(64), 1, 4, 64))
    assert all(0 < r["ours"] < r["old"] for r in results), results
    assert "| 8,192 | 2 x 128 |" in logits_memory.table(results)


def test_peers_report_sets_ours_beside_the_plain_loop_and_trl():
    import peers

    md = peers.render([{"stage": "sft", "steps": 10, "ours": [110.0, 120.0], "plain": [100.0, 100.0], "ratio": 1.15}],
                      [{"algorithm": "GRPO", "steps": 40, "ours_rate": 128.0, "trl_rate": 64.0, "unit": "answers/s",
                        "quality": "held-out reward", "before": 2.8, "ours_quality": 4.6, "trl_quality": 3.2}],
                      "a 2-core VM", "")
    assert "| sft (10 steps) | 110 (110), 120 (120) | 100 (100), 100 (100) | 1.15x (1.15x) |" in md
    assert ("| GRPO (40 steps) | 128.0 / 64.0 answers/s | 2.00x | 128.0 / 64.0 | 2.00x | held-out reward | 2.800 "
            "| 4.600 | 3.200 |") in md
