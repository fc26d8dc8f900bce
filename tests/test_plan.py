"""The memory plan (rlhf_tasks/plan): model states against DeepSpeed's own estimators, the
plan against a real CPU training step measured by torch's profiler, the install task's
refusal of a config that cannot fit (exit 2, with the change that fits), the CLI, and a
warning (never a crash) for an architecture that cannot be traced."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from rlhf_tasks.__main__ import main
from rlhf_tasks.config import PipelineConfig
from rlhf_tasks.plan import make_plan, model_configs, read_config
from rlhf_tasks.plan.fit import largest_batch, smallest_fix, with_changes
from rlhf_tasks.plan.stages import PARTS, plan_stage
from rlhf_tasks.plan.states import Counts, Engine, model_states
from rlhf_tasks.plan.trace import StepSpec, trace
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import plan_accuracy  # noqa: E402

# The published OPT architectures (facebook/opt-*/config.json on the hub).
OPT = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     word_embed_proj_dim=2048),
}


def write_opt_config(tmp_path, name: str):
    path = tmp_path / name / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048,
                                "dropout": 0.1, "activation_function": "relu", **OPT[name]}))
    return path


def deepspeed_counts(config) -> tuple[int, int]:
    """DeepSpeed's own (total, largest layer) parameter counts of the model: built on the
    meta device, each parameter then given a one-element real storage viewed at its full
    shape, because DeepSpeed tells tied weights apart by ``data_ptr``."""
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real: dict[int, torch.nn.Parameter] = {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                real.setdefault(id(p), torch.nn.Parameter(torch.empty(1).expand(p.shape)))
                m._parameters[name] = real[id(p)]
    return model_to_params(model)


@pytest.mark.parametrize("name", list(OPT))
def test_model_states_equal_deepspeeds_estimators(tmp_path, name):
    """fp16 Adam model states per GPU equal estimate_zero2/zero3_model_states_mem_needs (what
    the ``*_all_live`` estimators compute from a model) within 5%, on 1 and 8 GPUs, with and
    without offload. ZeRO-3's estimator leaves out the fp16 gradient partition (2/N bytes a
    parameter, DeepSpeed's grad_partitions_flat_buffer), so that part is compared apart."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = read_config(write_opt_config(tmp_path, name))
    counts = trace(name, config, StepSpec("forward_lm", 1, 8, "fp16")).counts
    total, largest = deepspeed_counts(config)
    assert counts.total == total and counts.largest_layer == largest
    assert counts.total == pytest.approx({"opt-125m": 125e6, "opt-350m": 331e6, "opt-1.3b": 1.316e9}[name], rel=0.01)
    for n in (1, 8):
        for offload in (False, True):
            ours = model_states(Counts(total, total, largest), Engine("fp16", 2, offload, n))
            _, ds = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=n, cpu_offload=offload)
            assert sum(ours.values()) == pytest.approx(ds, rel=0.05), (n, offload, ours)
            ours = model_states(Counts(total, total, largest), Engine("fp16", 3, offload, n))
            _, ds, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=n, cpu_offload=offload,
                                                             cpu_offload_params=offload)
            assert sum(ours.values()) - ours["grads"] == pytest.approx(ds, rel=0.05), (n, offload, ours)
            assert ours["grads"] == (0 if offload else total * 2 // n)


@pytest.mark.parametrize("arch, batch, seq_len, checkpointing",
                         [("opt", 8, 256, False), ("gpt2", 16, 128, True), ("llama", 4, 384, True)])
def test_plan_matches_a_measured_cpu_training_step(arch, batch, seq_len, checkpointing):
    """The SFT step for real on CPU (fp32, AdamW), its peak from torch's profiler memory
    accounting: the plan's activations and total peak are within 15%."""
    config = plan_accuracy.tiny_config(arch)
    measured = plan_accuracy.measure(config, batch, seq_len, checkpointing)
    planned = plan_accuracy.planned(config, batch, seq_len, checkpointing)
    assert planned["activations"] == pytest.approx(measured["activations"], rel=0.15), (planned, measured)
    assert planned["peak"] == pytest.approx(measured["peak"], rel=0.15), (planned, measured)


@pytest.fixture(scope="module")
def tiny(storage):
    cfg = PipelineConfig.load("tiny-cpu")
    return cfg, model_configs(cfg)


def test_fix_and_largest_batch_are_found_by_replanning(tiny):
    """A capacity between the SFT plan with and without gradient checkpointing: the fix is
    checkpointing, and its peak is the re-planned one. The suggested batch fits; one more does not."""
    cfg, configs = tiny
    peak = plan_stage(cfg, configs, "sft").peak
    with_gc = plan_stage(with_changes(cfg, {"sft.gradient_checkpointing": True}), configs, "sft").peak
    assert with_gc < peak
    fix = smallest_fix(cfg, configs, "sft", (peak + with_gc) // 2)
    assert fix == {"change": "gradient checkpointing", "set": {"sft.gradient_checkpointing": True}, "peak": with_gc}
    capacity = peak * 2
    b = largest_batch(cfg, configs, "sft", capacity)
    at = {n: plan_stage(with_changes(cfg, {"sft.per_device_train_batch_size": n}), configs, "sft").peak
          for n in (b, b + 1)}
    assert b > cfg.sft.per_device_train_batch_size and at[b] <= capacity < at[b + 1]


def test_ppo_family_stages(tiny):
    """PPO holds the frozen reference and reward model whole (fp32 here: 4 bytes a
    parameter) and a KV cache of rollout x max_seq_len; GRPO has no critic and G times the
    rollout's cache; DPO has neither frozen models nor a cache."""
    cfg, configs = tiny
    ppo = plan_stage(cfg, configs, "ppo")
    actor = trace("actor", configs["actor"], StepSpec("forward_lm", 1, 8, "fp32")).counts.total
    rm = trace("rm", configs["rm"], StepSpec("forward_value", 1, 8, "fp32")).counts.total
    assert ppo.phases["generation"]["frozen_models"] == 4 * (actor + rm)
    c = configs["actor"]
    kv = 2 * c.num_hidden_layers * cfg.ppo.per_device_generation_batch_size * cfg.data.max_seq_len * c.hidden_size * 4
    assert ppo.phases["generation"]["kv_cache"] == kv
    assert set(ppo.phases) == {"generation", "scoring", "actor_update", "actor_step", "critic_update", "critic_step"}

    grpo_cfg = with_changes(cfg, {"algorithm": "grpo", "grpo.group_size": 4, "grpo.dtype": cfg.ppo.dtype,
                                  "grpo.per_device_generation_batch_size": cfg.ppo.per_device_generation_batch_size})
    grpo = plan_stage(grpo_cfg, configs, "grpo")
    assert not {"critic_update", "critic_step"} & set(grpo.phases)
    assert grpo.phases["generation"]["kv_cache"] == 4 * kv
    assert grpo.phases["actor_update"]["weights"] < ppo.phases["actor_update"]["weights"]  # no critic
    dpo = plan_stage(with_changes(cfg, {"algorithm": "dpo", "dpo.pairs": "dataset"}), configs, "dpo")
    assert dpo.parts["frozen_models"] == 0 and dpo.parts["kv_cache"] == 0 and dpo.parts["activations"] > 0
    assert set(dpo.phases) == {"policy_update", "optimizer_step"}
    # Generated pairs: before training, the policy and the reward model whole, and the cache of
    # one batch of answers (64 // 4 prompts x 4 candidates, the answers of per_device_eval_batch_size).
    gen_cfg = with_changes(cfg, {"algorithm": "dpo", "dpo.pairs": "generated", "dpo.candidates": 4,
                                 "dpo.per_device_eval_batch_size": 64, "dpo.dtype": "fp32"})
    gen = plan_stage(gen_cfg, configs, "dpo").phases["pair_generation"]
    assert gen["weights"] == 4 * actor and gen["frozen_models"] == 4 * rm
    assert gen["kv_cache"] == kv // cfg.ppo.per_device_generation_batch_size * 64


def test_cli_json(storage, capsys):
    assert main(["plan", "--preset", "tiny-cpu", "--gpu-memory-gb", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_memory_gb"] == 40 and out["fits"] is True
    assert set(out["stages"]) == {"sft", "rm", "ppo"}
    for s in out["stages"].values():
        assert set(s["parts"]) == set(PARTS) and s["peak_gb"] == pytest.approx(sum(s["parts"].values()), abs=0.01)


def test_prepare_refuses_a_config_that_does_not_fit(storage, tmp_path, capsys, monkeypatch, tiny):
    """With the GPU capacity given (as a worker's free memory would be), a stage over it fails
    prepare with exit 2 before any GPU stage, naming the stage, its planned peak and the
    change that fits; with no GPU it plans, writes plan.json and does not refuse."""
    cfg, configs = tiny
    plan = make_plan(cfg, configs)
    worst = max(plan.stages.values(), key=lambda p: p.peak)
    monkeypatch.setenv("RLHF_PLAN_GPU_MEMORY_GB", str(worst.peak * 0.97 / 1e9))
    capsys.readouterr()
    assert main(["prepare", "--preset", "tiny-cpu", "--output", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert f"stage {worst.stage} plans a peak of" in err and "smallest change that fits:" in err and "--set" in err
    monkeypatch.delenv("RLHF_PLAN_GPU_MEMORY_GB")
    assert main(["prepare", "--preset", "tiny-cpu", "--output", str(tmp_path / "ok")]) == 0
    saved = json.loads((tmp_path / "ok" / "plan.json").read_text())
    assert saved["gpu_memory_gb"] is None and saved["fits"] is True and set(saved["stages"]) == {"sft", "rm", "ppo"}


def test_an_untraceable_architecture_warns_and_falls_back(tmp_path, caplog, capsys, storage):
    """A model whose code ships with it (auto_map) is never run by the planner: a warning,
    formulas, a plan all the same, through the CLI too."""
    path = tmp_path / "custom" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"model_type": "mystery_lm", "auto_map": {"AutoModelForCausalLM": "m.M"},
                                "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                "intermediate_size": 1024, "vocab_size": 8000, "max_position_embeddings": 512}))
    cfg = PipelineConfig.load("tiny-cpu")
    with caplog.at_level(logging.WARNING, logger="rlhf_tasks"):
        plan = make_plan(cfg, model_configs(cfg, {"actor": path, "rm": path}), 40.0)
    assert "cannot be traced" in caplog.text
    assert all(not p.traced and p.peak > 0 and p.parts["activations"] > 0 for p in plan.stages.values())
    assert main(["plan", "--preset", "tiny-cpu", "--model-config", str(path)]) == 0
    assert "could not be traced" in capsys.readouterr().out


def test_run_report_sets_the_plan_beside_the_measured_peak(tmp_path, monkeypatch):
    """report.md gains a Memory plan table: the install task's plan.json per stage, and the
    peak each stage measured (on CUDA; "–" where none was measured)."""
    from rlhf_tasks.pipeline import register
    from tests.test_register import make_run, md_table

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = make_run(tmp_path / "run")
    sft = json.loads(run.result_path("sft").read_text())
    sft["metrics"]["peak_memory_gb"] = 31.4
    run.result_path("sft").write_text(json.dumps(sft))
    (run.path / "plan.json").write_text(json.dumps({"gpu_memory_gb": 40, "fits": True, "stages": {
        "sft": {"peak_gb": 33.25, "peak_phase": "training"}, "rm": {"peak_gb": 9.5, "peak_phase": "optimizer_step"},
        "ppo": {"peak_gb": 38.0, "peak_phase": "actor_update"}}}))
    register.run(PipelineConfig.load("tiny-cpu"), run)
    rows = md_table((run.path / "report.md").read_text(), "Memory plan")
    assert rows == [("sft", "training", "33.25", "31.40"), ("rm", "optimizer_step", "9.50", "–"),
                    ("ppo", "actor_update", "38.00", "–")]


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_deep_models_extrapolated_from_two_depths_equal_a_full_trace(arch):
    """An 8-block model traced at 2 and 4 blocks and extrapolated gives the full trace's
    parameter counts, gradients and activations exactly, with LoRA and checkpointing too."""
    from rlhf_tasks.plan.trace import _trace, _trace_once, _with_layers

    config = _with_layers(plan_accuracy.tiny_config(arch), 8)
    for spec in (StepSpec("lm", 4, 128, "fp32", dropout=0.0),
                 StepSpec("policy", 4, 128, "bf16", checkpointing=True, lora_dim=8, only_lora=True)):
        assert _trace(config, spec) == _trace_once(config, spec)


def test_plan_exits_6_when_a_stage_does_not_fit(storage, capsys, tiny):
    """`plan` is a check a script can use: exit 6 (5 is a stalled rank) and, on stderr, each
    stage over the capacity with the smallest change that fits; 0 when everything fits."""
    cfg, configs = tiny
    sft = plan_stage(cfg, configs, "sft").peak
    assert main(["plan", "--preset", "tiny-cpu", "--gpu-memory-gb", str(sft * 0.9 / 1e9)]) == 6
    err = capsys.readouterr().err
    assert "error: stage sft plans a peak of" in err and "smallest change that fits" in err
    assert main(["plan", "--preset", "tiny-cpu", "--gpu-memory-gb", "1000"]) == 0


def test_ema_and_unsupervised_loss_are_planned(tiny):
    """ppo.enable_ema holds an fp32 copy of the actor on the device in every phase; the SFT
    loss mixed into PPO's update is a phase of its own (an lm step of the actor)."""
    cfg, configs = tiny
    base = plan_stage(cfg, configs, "ppo")
    ema = plan_stage(with_changes(cfg, {"ppo.enable_ema": True}), configs, "ppo")
    actor = trace("actor", configs["actor"], StepSpec("forward_lm", 1, 8, "fp32")).counts.total
    assert all(p["ema"] == 4 * actor for p in ema.phases.values())
    assert ema.peak == base.peak + 4 * actor
    mixed = plan_stage(with_changes(cfg, {"ppo.unsupervised_coef": 0.5}), configs, "ppo")
    assert mixed.phases["actor_unsupervised"]["activations"] > 0 and "actor_unsupervised" not in base.phases


@pytest.mark.parametrize("name, attn, measured_gb", [("opt-125m", "sdpa", 4.9), ("opt-350m", "sdpa", 10.8),
                                                      ("opt-1.3b", "sdpa", 35.4), ("opt-1.3b", "eager", 56.5)])
def test_plan_of_the_measured_h100_steps(tmp_path, name, attn, measured_gb):
    """The H100 rows of ../shared/gpu/README.md (a plain transformers + DeepSpeed loop: bf16,
    ZeRO-0, batch 8 x 512, whole logits and transformers' labels= loss): the plan of the same
    step is at most 10% under each measured peak and at most 20% over it, whether that peak
    was in GB or GiB. Its optimizer step is DeepSpeed's FP16_Optimizer (bf16 at ZeRO-0)."""
    from rlhf_tasks.plan.stages import supervised

    cfg = PipelineConfig.load("opt-1.3b", ["sft.dtype=bf16", "sft.zero_stage=0", "sft.per_device_train_batch_size=8",
                                           "sft.gradient_accumulation_steps=1", "sft.lora_dim=0", "data.max_seq_len=512",
                                           f"model.attn_implementation={attn}"])
    plan = supervised(cfg, {"actor": read_config(write_opt_config(tmp_path, name))}, "sft", logits="whole")
    for measured in (measured_gb * 1e9, measured_gb * 2**30):
        assert -0.10 <= plan.peak / measured - 1 <= 0.20, (plan.peak / 1e9, measured_gb, plan.parts)
    assert plan.peak_phase == "optimizer_step" or name == "opt-125m"


def test_a_stage_over_only_by_the_allocators_cache_is_tight_not_refused():
    """Refused (exit 6) only when the tensors alive at once exceed the GPU; over only by what
    PyTorch's allocator caches (and gives back before an out-of-memory), it runs with a warning."""
    from rlhf_tasks.plan import Plan, render
    from rlhf_tasks.plan.stages import StagePlan

    gb = 10**9
    stages = {"sft": StagePlan("sft", {"optimizer_step": {"weights": 30 * gb, "allocator_cache": 15 * gb}}),
              "rm": StagePlan("rm", {"training": {"weights": 10 * gb}}),
              "ppo": StagePlan("ppo", {"actor_step": {"weights": 45 * gb}})}
    plan = Plan(40.0, stages)
    assert plan.too_big() == ["ppo"] and plan.tight() == ["sft"] and not plan.fits
    text = render(plan)
    assert "tight" in text and "warning: stage sft fits only if PyTorch's allocator gives its cache back" in text
    assert Plan(40.0, {k: v for k, v in stages.items() if k != "ppo"}).fits
