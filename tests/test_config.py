from __future__ import annotations

import pytest

from rlhf_tasks.config import ConfigError, PipelineConfig, list_presets
from rlhf_tasks.config.load import apply_override


def test_presets_resolve_and_validate():
    assert {"tiny-cpu", "opt-1.3b"} <= set(list_presets())
    tiny = PipelineConfig.load("tiny-cpu")
    assert tiny.device == "cpu" and tiny.sft.dtype == "fp32"
    seed = PipelineConfig.load("opt-1.3b")
    assert seed.model.actor == "facebook/opt-1.3b" and seed.model.rm == "facebook/opt-350m"
    assert seed.data.data_split == "2,4,4" and len(seed.data.datasets) == 4
    assert (seed.sft.per_device_train_batch_size, seed.sft.gradient_accumulation_steps) == (8, 8)
    assert (seed.sft.lora_dim, seed.sft.zero_stage, seed.sft.epochs) == (128, 0, 5)
    assert (seed.rm.per_device_train_batch_size, seed.rm.gradient_accumulation_steps) == (8, 4)
    assert seed.rm.weight_decay == 0.1 and seed.rm.dropout == 0.0


def test_overrides_are_typed():
    c = PipelineConfig.load("tiny-cpu", ["sft.learning_rate=1e-4", "ppo.kl_coef=0.2", "sft.epochs=2",
                                         "data.datasets=[a.jsonl, b.jsonl]", "sft.adam_betas=[0.9, 0.99]"])
    assert c.sft.learning_rate == 1e-4 and isinstance(c.sft.learning_rate, float)
    assert c.ppo.kl_coef == 0.2 and c.sft.epochs == 2
    assert c.data.datasets == ["a.jsonl", "b.jsonl"]
    assert c.sft.adam_betas == (0.9, 0.99)
    # dict overrides (the DAG's form) go through the same path
    assert PipelineConfig.load("tiny-cpu", {"rm.epochs": 3}).rm.epochs == 3


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
    ("resources.num_nodes=2", "resources.hostfile=None is invalid: required when num_nodes > 1"),
    ("ppo.actor.zero_stage=7", "ppo.actor.zero_stage=7 is invalid: 0, 1, 2 or 3"),
    ("ppo.critic.offload=true", "ppo.critic.offload=True is invalid: offload needs zero_stage >= 1"),
    ("sft.epochs=true", "sft.epochs=True is invalid: an integer"),
    ("sft.adam_betas=[0.9]", "sft.adam_betas=[0.9] is invalid: two numbers in [0, 1)"),
    # renamed keys name their new place
    ("cost.num_gpus=2", "unknown config key 'cost' (renamed: use 'resources')"),
    ("reward_terms.length_coef=1.0", "unknown config key 'reward_terms' (renamed: use 'reward')"),
    ("ppo.eval_prompts=8", "renamed: use 'evaluate.prompts'"),
    ("grpo.scale_rewards=false", "renamed: use 'grpo.advantage (group_norm: scaled by the group's std; "
                                 "group_mean: not, Dr. GRPO)'"),
    ("ppo.clip_reward_value=3.0", "renamed: use 'reward.clip_reward_value'"),
    ("ppo.actor_learning_rate=1e-5", "renamed: use 'ppo.actor.learning_rate'"),
    ("ppo.per_device_training_batch_size=4", "renamed: use 'ppo.per_device_train_batch_size'"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load("tiny-cpu", [override])
    assert message in str(e.value)


def test_ema_is_refused_under_zero3_before_any_training():
    """PPO's EMA is a whole copy of the actor on each rank: with a ZeRO-3 actor it is
    refused when the config is read, not at the first update."""
    assert PipelineConfig.load("tiny-cpu", ["ppo.enable_ema=true", "ppo.actor.zero_stage=2"]).ppo.enable_ema
    with pytest.raises(ConfigError, match=r"ppo.enable_ema=True is invalid: .*actor.zero_stage <= 2"):
        PipelineConfig.load("tiny-cpu", ["ppo.enable_ema=true", "ppo.actor.zero_stage=3"])


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


def test_typed_values_by_path_and_ppo_engine_defaults():
    """The form's dict goes in typed (no YAML re-parse); a partly given ppo.actor keeps
    PPO's defaults for the rest, the same engine section type as sft and rm."""
    from rlhf_tasks.config import EngineConfig

    c = PipelineConfig.load("tiny-cpu", {"ppo.actor.learning_rate": 1e-5, "data.datasets": ["x.jsonl"]},
                            ["ppo.critic.zero_stage=2"])
    assert c.ppo.actor.learning_rate == 1e-5 and c.ppo.actor.lr_scheduler_type == "constant"
    assert c.ppo.critic.zero_stage == 2 and c.data.datasets == ["x.jsonl"]
    d = PipelineConfig.load("opt-1.3b", {"ppo.critic.lora_dim": 8})
    assert (d.ppo.critic.learning_rate, d.ppo.critic.num_warmup_steps, d.ppo.critic.dropout) == (5e-6, 100, 0.0)
    assert all(isinstance(e, EngineConfig) for e in (c.sft, c.rm, c.ppo.actor, c.ppo.critic))
    with pytest.raises(ConfigError, match="ppo.actor.learning_rate=2.0 is invalid"):
        PipelineConfig.load("tiny-cpu", {"ppo.actor.learning_rate": 2})


def test_run_config_is_written_once_and_guarded(tmp_path):
    from rlhf_tasks.runtime.run_config import resolve_run_config

    a = PipelineConfig.load("tiny-cpu")
    assert resolve_run_config(tmp_path, a) == a and (tmp_path / "config.yaml").is_file()
    assert resolve_run_config(tmp_path, None).to_dict() == a.to_dict()
    b = PipelineConfig.load("tiny-cpu", ["sft.epochs=7"])
    assert resolve_run_config(tmp_path, b).sft.epochs == 7  # no stage started yet: replaced
    (tmp_path / "sft").mkdir()
    with pytest.raises(ConfigError, match=r"keys \['sft.epochs'\].*stages \['sft'\]"):
        resolve_run_config(tmp_path, a)
