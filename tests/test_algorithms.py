"""The algorithm table (rlhf_tasks/config/algorithms.py) is the one place step 3 is declared:
the config's choices and sections, the CLI, the DAG's tasks and form, preflight, the report
and the planner all read it, and the registered maths match the config's names."""

from __future__ import annotations

import typing

import pytest

from rlhf_tasks.__main__ import STAGE_MODULES, parser
from rlhf_tasks.algorithms.maths import ADVANTAGES, POLICY_LOSSES
from rlhf_tasks.config import ALGORITHMS, STAGES, ConfigError, PipelineConfig
from rlhf_tasks.config.algorithms import AdvantageEstimator, PolicyLoss
from rlhf_tasks.pipeline.preflight import stage_inputs
from rlhf_tasks.pipeline.report import STEPS


def test_the_config_is_built_from_the_table():
    cfg = PipelineConfig()
    assert set(typing.get_args(PipelineConfig.model_fields["algorithm"].annotation)) == set(ALGORITHMS)
    for a in ALGORITHMS.values():
        assert isinstance(getattr(cfg, a.name), a.section)
        assert PipelineConfig.load("tiny-cpu", {"algorithm": a.name}).step3 is a
        for key in a.form:  # the form's fields are fields of the section
            node = getattr(cfg, a.name)
            for part in key.split("."):
                assert part in type(node).model_fields, f"{a.name}.{key} is no config field"
                node = getattr(node, part)
    assert STAGES == ("sft", "rm", *ALGORITHMS, "evaluate")
    with pytest.raises(ConfigError, match="algorithm='a2c' is invalid"):
        PipelineConfig.load("tiny-cpu", {"algorithm": "a2c"})


def test_cli_report_and_preflight_read_the_table():
    commands = parser()._subparsers._group_actions[0].choices
    for a in ALGORITHMS.values():
        assert a.name in commands and STAGE_MODULES[a.name] == a.stage
        assert (a.name, f"Step 3: {a.title}") in STEPS
        cfg = PipelineConfig.load("tiny-cpu", {"algorithm": a.name})
        inputs = stage_inputs(a.name, cfg)
        assert inputs[0] == "sft" and ("rm" in inputs) == getattr(cfg, a.name).trains_with_reward_model()
        assert stage_inputs("evaluate", cfg) == ("sft", "rm", a.name)
    # DPO on the dataset's pairs trains without the reward model; on generated pairs it ranks them with it.
    assert stage_inputs("dpo", PipelineConfig.load("tiny-cpu", {"dpo.pairs": "dataset"})) == ("sft",)
    assert stage_inputs("dpo", PipelineConfig.load("tiny-cpu", {"dpo.pairs": "generated"})) == ("sft", "rm")


def test_the_registered_maths_are_the_configs_choices():
    assert set(POLICY_LOSSES) == set(typing.get_args(PolicyLoss))
    assert set(ADVANTAGES) == set(typing.get_args(AdvantageEstimator))


def test_the_rl_sections_pick_behaviour_by_settings():
    cfg = PipelineConfig.load("tiny-cpu")
    assert (cfg.ppo.advantage, cfg.ppo.kl_penalty, cfg.ppo.loss, cfg.ppo.answers_per_prompt) == ("gae", "reward", "ppo", 1)
    assert cfg.ppo.critic_section is cfg.ppo.critic
    assert (cfg.grpo.advantage, cfg.grpo.kl_penalty, cfg.grpo.loss, cfg.grpo.answers_per_prompt) == (
        "group_norm", "loss", "grpo", 4)
    assert (cfg.rloo.advantage, cfg.rloo.kl_penalty, cfg.rloo.loss) == ("rloo", "reward", "ppo")
    assert cfg.grpo.critic_section is None and cfg.rloo.critic_section is None
    # Every loss and estimator can be chosen for group sampling; GAE needs the critic only PPO has.
    for loss in typing.get_args(PolicyLoss):
        assert PipelineConfig.load("tiny-cpu", {"grpo.loss": loss}).grpo.loss == loss
    for adv in ("group_norm", "group_mean", "rloo", "reinforce_pp_baseline"):
        assert PipelineConfig.load("tiny-cpu", {"grpo.advantage": adv}).grpo.advantage == adv
    with pytest.raises(ConfigError, match="grpo.advantage='gae' is invalid: a group estimator"):
        PipelineConfig.load("tiny-cpu", {"grpo.advantage": "gae"})
    with pytest.raises(ConfigError, match="ppo.loss='gspo' is invalid: a per-token loss"):
        PipelineConfig.load("tiny-cpu", {"ppo.loss": "gspo"})
    with pytest.raises(ConfigError, match="ppo.advantage"):
        PipelineConfig.load("tiny-cpu", {"ppo.advantage": "rloo"})


def test_engines_and_dtypes_of_a_run():
    cfg = PipelineConfig.load("tiny-cpu")
    assert set(cfg.engines()) == {"sft", "rm", "ppo.actor", "ppo.critic"}
    assert set(PipelineConfig.load("tiny-cpu", {"algorithm": "grpo"}).engines()) == {"sft", "rm", "grpo.actor"}
    assert set(PipelineConfig.load("tiny-cpu", {"algorithm": "dpo"}).engines()) == {"sft", "rm", "dpo"}
    assert cfg.dtypes() == {"fp32"}
