"""SFT, the reward model and PPO on tiny-cpu through the real DeepSpeed engine (CPU, gloo).

They must learn, not just run: held-out perplexity falls clearly, the reward model ranks
held-out pairs, PPO raises the reward on held-out prompts, and the saved weights differ
from the starting ones. The trained run is the session's (tests/conftest.py:
``trained_run``, tiny-cpu's whole DAG through Airflow, trained once and shared with
tests/e2e/test_pipeline.py); the tests here that train more do it in run directories of
their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_tasks.storage import RunDir
from tests.runs import fork_run, result_of, run_cli, stage_result

pytestmark = pytest.mark.slow


def _weights_changed(before: Path, after: Path) -> float:
    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    common = [k for k in a if k in b and a[k].shape == b[k].shape]
    assert common
    return max((a[k].float() - b[k].float()).abs().max().item() for k in common)


def test_sft_perplexity_falls_clearly(trained_run, tiny_model_dir):
    m = stage_result(trained_run, "sft")["metrics"]
    assert m["perplexity"] < 0.5 * m["perplexity_before"], m
    assert m["perplexity"] < 20, m
    final = trained_run.final("sft")
    for f in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml", "metrics.json"):
        assert (final / f).is_file(), f
    assert _weights_changed(tiny_model_dir, final) > 1e-3
    assert not list(trained_run.checkpoints("sft").glob(".*tmp*"))


def test_reward_model_ranks_held_out_pairs(trained_run):
    m = stage_result(trained_run, "rm")["metrics"]
    assert m["accuracy"] >= 0.85, m
    assert m["chosen_score"] > m["rejected_score"], m
    assert m["accuracy_before"] < 0.75  # it learned this; the untrained head scores every answer 0
    final = trained_run.final("rm")
    assert (final / "value_head.safetensors").is_file() and (final / "reward_model.json").is_file()
    head = load_file(str(final / "value_head.safetensors"))["weight"]
    assert head.abs().sum().item() > 0


def test_finished_stage_is_a_no_op(trained_run):
    before = (trained_run.final("sft") / "model.safetensors").stat().st_mtime_ns
    again = result_of(run_cli("sft", "--output", str(trained_run.path)))
    assert again["skipped"] is True
    assert (trained_run.final("sft") / "model.safetensors").stat().st_mtime_ns == before


def test_checkpoints_have_markers_and_config(trained_run):
    ckpts = sorted(trained_run.checkpoints("sft").glob("step-*"))
    assert ckpts, "no checkpoint was written"
    for c in ckpts:
        assert (c / "COMPLETE").is_file() and (c / "config.yaml").is_file()


def test_resume_continues_from_the_checkpoint(storage, tmp_path):
    """Stop SFT after a checkpoint (max_steps), then run again with more steps: it resumes."""
    run = RunDir(tmp_path / "resume")
    common = ["--set", "sft.epochs=1", "sft.checkpoint_every_steps=10", "data.max_eval_samples=64"]
    first = run_cli("sft", "--preset", "tiny-cpu", "--output", str(run.path), *common, "sft.max_steps=20")
    result_of(first)
    # Make the run look interrupted: drop the final output, keep the checkpoints.
    shutil.rmtree(run.final("sft"))
    run.result_path("sft").unlink()
    cfg = (run.config_path).read_text().replace("max_steps: 20", "max_steps: 30")
    run.config_path.write_text(cfg)
    second = result_of(run_cli("sft", "--output", str(run.path)))
    resume = json.loads((run.stage("sft") / "resume.json").read_text())
    assert resume["resumed_from_step"] == 20
    assert second["metrics"]["global_step"] == 30


def test_config_conflict_is_refused(trained_run):
    proc = run_cli("sft", "--preset", "tiny-cpu", "--set", "sft.learning_rate=0.5", "--output", str(trained_run.path))
    assert proc.returncode == 2
    assert "already holds a different config" in proc.stderr and "sft.learning_rate" in proc.stderr


def test_bad_data_fails_before_training(storage, tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text("\n".join(json.dumps({"prompt": "Q", "chosen": "", "rejected": 3}) for _ in range(20)))
    run = tmp_path / "badrun"
    proc = run_cli("sft", "--preset", "tiny-cpu", "--set", f"data.datasets=[{bad}]", "--output", str(run))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(bad) in proc.stderr
    assert not (run / "sft" / "checkpoints").exists()


def test_lora_under_zero2_and_zero3_saves_one_merged_model(storage, tmp_path):
    """LoRA (peft) through the engine under ZeRO-2 and ZeRO-3 (which partitions the actor
    as it loads, through HfDeepSpeedConfig, and merges the adapters layer by layer under a
    gather), training only the adapters: both learn, and both save the same plain model,
    without adapters."""
    out = {}
    for zero in (2, 3):
        run = tmp_path / f"zero{zero}"
        proc = run_cli("sft", "--preset", "tiny-cpu", "--output", str(run), "--set", "sft.lora_dim=8",
                       f"sft.zero_stage={zero}", "sft.max_steps=10", "sft.epochs=1", "data.max_eval_samples=64",
                       "sft.only_optimize_lora=true")
        res = result_of(proc)
        assert res["metrics"]["perplexity"] < res["metrics"]["perplexity_before"]
        assert res["metrics"]["train_tflops"] > 0  # the parameters were counted, also as ZeRO-3 shards
        params = [ln.split("optimizer steps, ")[1] for ln in proc.stderr.splitlines() if "M params" in ln]
        out[zero] = res, params, load_file(str(Path(res["final_dir"]) / "model.safetensors"))
    (res2, params2, sd2), (res3, params3, sd3) = out[2], out[3]
    assert params2 == params3 and params3, (params2, params3)
    assert sorted(sd3) == sorted(sd2) and not any("lora" in k for k in sd3)
    assert all(torch.isfinite(v).all() for v in sd3.values())
    assert max((sd3[k] - sd2[k]).abs().max().item() for k in sd3) < 1e-4
    assert res3["metrics"]["perplexity"] == pytest.approx(res2["metrics"]["perplexity"], rel=1e-4)


def test_ppo_raises_the_reward_on_held_out_prompts(ppo_run):
    ev = stage_result(ppo_run, "evaluate")["metrics"]
    # The same held-out prompts: the PPO actor's answers score clearly higher than the SFT
    # actor's, by a margin several standard errors wide (not sampling luck).
    assert ev["reward_gain"] > 0.3, ev
    assert ev["reward_gain"] > 3 * ev["reward_gain_se"], ev
    assert ev["aligned_win_rate"] > 0.5, ev
    assert 0 <= ev["kl_aligned_sft"] < 20, ev  # moved, but stayed near the SFT policy
    ppo = stage_result(ppo_run, "ppo")["metrics"]
    # Not reward_last > reward_first: each iteration's 32 training prompts differ in how well
    # they can score (a 2026-12-01 run: 5.20 -> 5.14 with a held-out gain of +0.99, 7 standard
    # errors); the held-out gain above is the measure. The policy did move from the reference:
    assert ppo["kl_last"] > ppo["kl_first"] + 1.0, ppo
    samples = json.loads((ppo_run.stage("evaluate") / "samples.json").read_text())
    assert len(samples) == ev["prompts"] and {"prompt", "sft_answer", "ppo_answer"} <= set(samples[0])


def test_ppo_ema_with_lora_saves_the_plain_model_it_averages(trained_run, tmp_path):
    """ppo.enable_ema with a LoRA actor: final/ema/ holds the same tensors as final/ (the
    plain, merged model), averaged: close to the SFT start after a few updates, where the
    PPO actor has moved on."""
    run = fork_run(trained_run, tmp_path, "ppo.max_steps=3", "ppo.actor.lora_dim=8", "ppo.enable_ema=true")
    res = result_of(run_cli("ppo", "--output", str(run.path)))
    final = Path(res["final_dir"])
    ema, ppo = load_file(str(final / "ema" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    sft = load_file(str(run.final("sft") / "model.safetensors"))
    assert sorted(ema) == sorted(ppo)

    def dist(a, b):
        return sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in ppo) ** 0.5

    assert 0 < dist(ema, sft) < 0.2 * dist(ppo, sft)


def test_chat_answers_without_repeating(ppo_run):
    final = str(ppo_run.final("ppo"))
    proc = run_cli("chat", "--path", final, "--prompt", "What is the capital of France?", "--max-new-tokens", "40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = proc.stdout.strip().splitlines()[-1]
    assert answer
    words = answer.split()
    ngrams = [tuple(words[i:i + 5]) for i in range(len(words) - 4)]
    assert len(ngrams) == len(set(ngrams))  # no_repeat_ngram_size=5 by default
