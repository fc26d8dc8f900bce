"""GRPO, RLOO, DPO and KTO on tiny-cpu, from the session's trained SFT and reward model: each
must make the model better on held-out prompts (evaluate, the reward model scoring); GRPO
and RLOO hold no critic, DPO and KTO only the policy, and under LoRA no second copy of the
policy serves as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_tasks.storage import RunDir
from tests.runs import fork_run, result_of, run_cli, stage_result

pytestmark = pytest.mark.slow


def fork(trained_run: RunDir, where: Path, stage: str, *overrides: str) -> RunDir:
    """A new run directory holding the session's trained SFT and RM; its config is theirs,
    with step 3 set to ``stage`` and ``overrides``."""
    return fork_run(trained_run, where, f"algorithm={stage}", *overrides)


def align(run: RunDir, stage: str) -> dict:
    return result_of(run_cli(stage, "--output", str(run.path)))  # the fork's config


@pytest.fixture(scope="module", params=["grpo", "rloo", "dpo", "kto"])
def aligned(request, trained_run, tmp_path_factory) -> tuple[str, dict, dict, RunDir]:
    stage = request.param
    run = fork(trained_run, tmp_path_factory.mktemp(stage), stage)
    res = align(run, stage)
    ev = result_of(run_cli("evaluate", "--output", str(run.path)))
    return stage, res, ev, run


def test_alignment_raises_the_held_out_reward(aligned, ppo_run, storage):
    stage, res, ev, run = aligned
    m, e = res["metrics"], ev["metrics"]
    # SFT's side is the pipeline's own (same SFT, prompts and seed): generated once in this
    # storage, then read back from its cache by the next evaluations.
    assert e["sft_reward"] == pytest.approx(stage_result(ppo_run, "evaluate")["metrics"]["sft_reward"], abs=1e-4)
    assert list((storage / "cache" / "evaluate").glob("sft-*.pt"))
    samples = json.loads((run.stage("evaluate") / "samples.json").read_text())
    assert {"prompt", "sft_answer", f"{stage}_answer"} <= set(samples[0])
    if stage in ("dpo", "kto"):
        # tiny-cpu's DPO trains on generated pairs (dpo.pairs: generated): the SFT actor's best
        # and worst of 4 answers by the reward model; KTO on the same answers, unpaired
        # (kto.answers: generated). (The held-out pairs stay the people's: how well the implicit
        # reward ranks them is logged, not asserted; it is not what they learn from, and DPO
        # measured 0.48 to 0.66 from 0.50.)
        assert m["generated_pairs"] > 500 and m["generated_chosen_reward"] > m["generated_rejected_reward"] + 1, m
        assert 0 <= m["reward_accuracy"] <= 1 and m["reward_accuracy_before"] == 0.5, m
        assert any(run.stage(stage).glob("generated_pairs-*/dataset_info.json"))  # kept for a resumed attempt
    if stage == "kto":  # both answers of every pair, one desirable, one undesirable (and the people's, if any)
        assert m["train_answers"] == 2 * m["generated_pairs"] + m["human_answers"], m
        assert m["train_desirable"] >= m["generated_pairs"], m
    # The same held-out prompts as SFT: the aligned actor's answers score higher by a margin
    # several standard errors wide (not sampling luck), and it stayed near the SFT policy.
    assert e["reward_gain"] > 3 * e["reward_gain_se"] and e["reward_gain"] > 0.3, e
    assert e["aligned_win_rate"] > 0.5, e
    assert 0 <= e["kl_aligned_sft"] < 20, e
    # (Not the training rollouts' reward_first < reward_last: each iteration's 8 prompts differ
    # in how well they can score, which the group baseline removes from the update, not from
    # the logged mean.)
    if stage not in ("dpo", "kto"):
        assert m["iterations"] == 40 and m["prompts_per_s"] > 0


def test_alignment_holds_fewer_models_than_ppo(aligned, ppo_run):
    stage, res, _, run = aligned
    m, ppo = res["metrics"], stage_result(ppo_run, "ppo")["metrics"]
    if stage in ("dpo", "kto"):  # the policy alone: reference log-probs were computed before training
        assert m["memory/models_bytes"] == m["memory/policy_bytes"] == ppo["memory/actor_bytes"], m
        return
    assert "memory/critic_bytes" not in m and ppo["memory/critic_bytes"] > 0
    assert m["memory/models_bytes"] < ppo["memory/models_bytes"]
    assert m["memory/models_bytes"] == pytest.approx(ppo["memory/models_bytes"] - ppo["memory/critic_bytes"])
    ckpt = sorted(run.checkpoints(stage).glob("step-*"))[-1]
    assert (ckpt / "actor").is_dir() and not (ckpt / "critic").exists()
    assert not (run.final(stage) / "value_head.safetensors").exists()  # the actor alone, a plain causal LM


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_lora_reference_is_the_actor_with_adapters_off(stage, trained_run, tmp_path):
    """Training LoRA adapters only, the reference policy is the actor with its adapters
    disabled: no copy on the device (0 bytes), and at the first rollout, before any
    update, the policy and its reference are the same function (KL exactly 0)."""
    run = fork(trained_run, tmp_path, stage, f"{stage}.max_steps=2", f"{stage}.actor.lora_dim=8",
               f"{stage}.actor.only_optimize_lora=true", "evaluate.prompts=8")
    m = align(run, stage)["metrics"]
    assert m["memory/reference_bytes"] == 0 and m["memory/actor_bytes"] > 0, m
    # kl_first: the mean over the first 20% of iterations, here the first one alone.
    assert abs(m["kl_first"]) < 1e-5, m  # the first rollout: policy == reference, exactly
    assert m["kl_last"] != 0, m  # after an update they differ
    weights = load_file(str(run.final(stage) / "model.safetensors"))
    assert not any("lora" in k for k in weights)  # saved merged, as a plain model


def test_generated_pairs_are_made_once_and_read_back(trained_run, tmp_path, caplog):
    """dpo.pairs=generated: a second attempt (a resumed stage) trains on the very pairs the
    first made, read back from the stage directory; other settings make other pairs."""
    import logging
    from types import SimpleNamespace

    import torch

    from rlhf_tasks.algorithms.dpo_pairs import generated_pairs
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.runtime.models import load_causal_lm, load_tokenizer

    run = fork(trained_run, tmp_path, "dpo", "dpo.pairs=generated", "dpo.candidates=2", "dpo.generated_prompts=24")
    cfg = PipelineConfig.load(run.config_path)
    tok = load_tokenizer(str(run.final("sft")))
    model = load_causal_lm(str(run.final("sft"))).eval()

    def ctx(cfg):
        return SimpleNamespace(name="dpo", cfg=cfg, run=run, device=torch.device("cpu"), rank=0, world_size=1,
                               is_main=True, stage_dir=run.stage("dpo"))

    first, m = generated_pairs(ctx(cfg), model, tok)
    assert 0 < m["generated_pairs"] == len(first) <= 24
    assert all(c > r for c, r in zip(first["chosen_reward"], first["rejected_reward"], strict=True))
    with caplog.at_level(logging.INFO, logger="rlhf_tasks"):
        again, _ = generated_pairs(ctx(cfg), model, tok)
    assert "read back" in caplog.text and again.to_dict() == first.to_dict()
    other, _ = generated_pairs(ctx(PipelineConfig.load(run.config_path, ["dpo.candidates=3"])), model, tok)
    assert len(list(run.stage("dpo").glob("generated_pairs-*"))) == 2 and len(other) > 0


def test_kto_resumes_mid_stage_to_the_same_result(trained_run, tmp_path):
    """KTO stopped after its step-3 checkpoint (final/, the result and the step-6 checkpoint
    gone, as a kill between the two would leave it), then run again: it resumes from step 3,
    its generated answers read back and its reference point's draws following the engine's
    restored step count, and ends where the uninterrupted run did."""
    import shutil

    run = fork(trained_run, tmp_path, "kto", "kto.generated_prompts=100", "kto.max_steps=6",
               "kto.checkpoint_every_steps=3", "kto.log_every_steps=1")
    first = align(run, "kto")["metrics"]
    weights = load_file(str(run.final("kto") / "model.safetensors"))
    shutil.rmtree(run.final("kto"))
    shutil.rmtree(run.checkpoints("kto") / "step-6")
    run.result_path("kto").unlink()
    second = align(run, "kto")["metrics"]
    assert json.loads((run.stage("kto") / "resume.json").read_text())["resumed_from_step"] == 3
    for k in ("reward_accuracy", "eval_margin", "eval_loss", "eval_kl", "generated_pairs"):
        assert second[k] == pytest.approx(first[k], rel=1e-3, abs=1e-5), (k, second[k], first[k])
    assert first["global_step"] == second["global_step"] == 6
    again = load_file(str(run.final("kto") / "model.safetensors"))
    assert max((again[k] - weights[k]).abs().max().item() for k in weights) <= 1e-4


# The verifier recipe on tiny-cpu: GRPO rewarded by the built-in verifier alone (1 for a right
# answer to a checkable question of the bundled world, else 0), so no reward model is loaded.
# The tiny SFT model answers 9% of the held-out questions right at temperature 1: a sparse
# reward, so 16 prompts x 8 answers per iteration for 60 iterations. Measured on a loaded
# 2-core VM (bench runs, 2026-12-07): +0.073 ± 0.018 (60 iterations), +0.059 ± 0.018 (40); at
# tiny-cpu's own 8 x 4 for 40 iterations the gain was +0.02 ± 0.02, within noise.
VERIFIER_GRPO = ("algorithm=grpo", "reward.source=verifier", "grpo.group_size=8", "grpo.max_steps=60",
                 "grpo.per_device_generation_batch_size=16", "grpo.per_device_train_batch_size=64", "grpo.kl_coef=0.02")


def test_grpo_on_the_verifier_raises_held_out_accuracy_without_a_reward_model(trained_run, tmp_path):
    run = fork_run(trained_run, tmp_path, *VERIFIER_GRPO, stages=("sft",))
    m = align(run, "grpo")["metrics"]
    e = result_of(run_cli("evaluate", "--output", str(run.path)))["metrics"]
    assert not run.final("rm").exists() and m["memory/reward_bytes"] == 0, m
    # Evaluate scores with the verifier too: the reward is the accuracy on checkable prompts.
    assert e["checkable_prompts"] == e["prompts"] and e["aligned_reward"] == pytest.approx(e["aligned_accuracy"]), e
    # Ground truth, not a proxy: more held-out questions answered right, by several standard
    # errors of the paired difference.
    assert e["accuracy_gain"] > 2.5 * e["accuracy_gain_se"] and e["accuracy_gain"] > 0.03, e
    assert {"sft_accuracy_addition", "aligned_accuracy_sound"} <= set(e), e
