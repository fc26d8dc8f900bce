from __future__ import annotations

import pytest

from rlhf_tasks.config import ConfigError, PipelineConfig, apply_override, list_presets


def test_presets_resolve_and_validate():
    assert {"tiny-cpu", "opt-1.3b"} <= set(list_presets())
    tiny = PipelineConfig.load("tiny-cpu")
    assert tiny.device == "cpu" and tiny.sft.dtype == "fp32"
    seed = PipelineConfig.load("opt-1.3b")
    assert seed.model.actor == "facebook/opt-1.3b" and seed.model.reward == "facebook/opt-350m"
    assert seed.data.data_split == "2,4,4" and len(seed.data.datasets) == 4
    assert (seed.sft.per_device_train_batch_size, seed.sft.gradient_accumulation_steps) == (8, 8)
    assert (seed.sft.lora_dim, seed.sft.zero_stage, seed.sft.epochs) == (128, 0, 5)
    assert (seed.reward.per_device_train_batch_size, seed.reward.gradient_accumulation_steps) == (8, 4)
    assert seed.reward.weight_decay == 0.1 and seed.reward.dropout == 0.0


def test_overrides_are_typed():
    c = PipelineConfig.load("tiny-cpu", ["sft.learning_rate=1e-4", "ppo.kl_coef=0.2", "sft.epochs=2",
                                         "data.datasets=[a.jsonl, b.jsonl]", "sft.adam_betas=[0.9, 0.99]"])
    assert c.sft.learning_rate == 1e-4 and isinstance(c.sft.learning_rate, float)
    assert c.ppo.kl_coef == 0.2 and c.sft.epochs == 2
    assert c.data.datasets == ["a.jsonl", "b.jsonl"]
    assert c.sft.adam_betas == (0.9, 0.99)
    # dict overrides (the DAG's form) go through the same path
    assert PipelineConfig.load("tiny-cpu", {"reward.epochs": 3}).reward.epochs == 3


@pytest.mark.parametrize("override, message", [
    ("sft.zero_stage=5", "sft.zero_stage=5 is invalid"),
    ("sft.learnin_rate=1e-4", "did you mean 'sft.learning_rate'"),
    ("data.data_split=1,2", "data.data_split"),
    ("data.data_split=0,0,0", "data.data_split"),
    ("sft.dtype=fp8", "one of ['fp32', 'fp16', 'bf16']"),
    ("sft.epochs=abc", "sft.epochs='abc' is invalid: an integer"),
    ("sft.offload=true", "offload needs zero_stage >= 1"),
    ("sft.learning_rate=2", "sft.learning_rate=2.0 is invalid"),
    ("ppo.gamma=0", "ppo.gamma"),
    ("ppo.dtype=fp16", "fp16 needs a GPU"),
    ("data.max_prompt_seq_len=4096", "data.max_prompt_seq_len"),
    ("sft.only_optimize_lora=true", "needs lora_dim > 0"),
    ("cost.num_nodes=2", "required when num_nodes > 1"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load("tiny-cpu", [override])
    assert message in str(e.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny-cpu"):
        PipelineConfig.load("no-such-preset")


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "sft.learning_rate")


def test_roundtrip_through_yaml(tmp_path):
    c = PipelineConfig.load("opt-1.3b", ["ppo.kl_coef=0.05"])
    c.save(tmp_path / "config.yaml")
    again = PipelineConfig.load(tmp_path / "config.yaml")
    assert again.to_dict() == c.to_dict()
