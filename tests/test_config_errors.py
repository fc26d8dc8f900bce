"""The config's messages and the trigger form come from one place, the models' JSON
schema: what a message says is allowed is what the form accepts."""

from __future__ import annotations

import pytest

from rlhf_tasks.config import ConfigError, PipelineConfig, flatten, form_schema
from rlhf_tasks.config.errors import describe, schema_at
from rlhf_tasks.config.load import parse_yaml


@pytest.mark.parametrize("prop, words", [
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "a number in (0, 1]"),
    ({"type": "number", "minimum": 0, "exclusiveMaximum": 1, "nullable": True}, "a number in [0, 1) or null"),
    ({"type": "integer", "minimum": 1, "maximum": 1024}, "an integer in [1, 1024]"),
    ({"type": "integer", "minimum": 8}, "an integer >= 8"),
    ({"type": "number", "exclusiveMaximum": 2.5}, "a number < 2.5"),
    ({"type": "integer", "enum": [0, 1, 2, 3]}, "0, 1, 2 or 3"),
    ({"type": "string", "enum": ["fp32", "bf16"]}, "one of ['fp32', 'bf16']"),
    ({"type": "boolean"}, "true or false"),
    ({"type": "string", "minLength": 1}, "a non-empty string"),
    ({"type": "string", "pattern": "^a$", "description": "One letter a\nmore"}, "one letter a"),
    ({"type": "array", "minItems": 1, "items": {"type": "string"}}, "a non-empty list"),
    ({"type": "array", "prefixItems": [{"type": "number", "minimum": 0}] * 2}, "two numbers >= 0"),
    ({"type": "array", "prefixItems": [{"type": "number"}, {"type": "string"}]}, "a list of 2 items"),
    ({"type": "object"}, None),
])
def test_describe_says_what_a_schema_accepts(prop, words):
    assert describe(prop) == words


def test_schema_at_follows_refs_items_and_optionals():
    root = PipelineConfig.model_json_schema()
    assert schema_at(root, ("ppo", "actor", "zero_stage"))["enum"] == [0, 1, 2, 3]
    assert schema_at(root, ("data", "datasets", 0)) == {"type": "string", "minLength": 1}
    assert schema_at(root, ("sft", "adam_betas", 1))["exclusiveMaximum"] == 1
    dropout = schema_at(root, ("sft", "dropout"))
    assert dropout["nullable"] and dropout["type"] == "number" and dropout["minimum"] == 0
    assert schema_at(root, ("sft", "no_such_key")) is None and schema_at(root, ("seed", "x")) is None


def test_ppo_engines_have_their_own_defaults_in_the_schema():
    """ppo.actor and ppo.critic are two engine classes: their defaults are the schema's
    (what the form and MLflow show), not patched in by a validator."""
    root = PipelineConfig.model_json_schema()
    actor, critic = schema_at(root, ("ppo", "actor")), schema_at(root, ("ppo", "critic"))
    assert actor["properties"]["learning_rate"]["default"] == 9.65e-6
    assert critic["properties"]["learning_rate"]["default"] == 5e-6
    assert actor["properties"]["num_warmup_steps"]["default"] == 100 == critic["properties"]["num_warmup_steps"]["default"]
    assert schema_at(root, ("sft", "num_warmup_steps"))["default"] == 0
    c = PipelineConfig(ppo={"critic": {"zero_stage": 2}})
    assert (c.ppo.critic.learning_rate, c.ppo.critic.num_warmup_steps, c.ppo.critic.dropout) == (5e-6, 100, 0.0)


def _outside(prop: dict) -> list[float]:
    """Values just outside a number field's bounds."""
    out = []
    if "minimum" in prop:
        out.append(prop["minimum"] - 1)
    if "exclusiveMinimum" in prop:
        out.append(prop["exclusiveMinimum"])
    if "maximum" in prop:
        out.append(prop["maximum"] + 1)
    if "exclusiveMaximum" in prop:
        out.append(prop["exclusiveMaximum"])
    return out


def test_every_bound_the_form_states_the_config_refuses_in_the_same_words():
    """For every number field of the tree: a value on the wrong side of a bound of its form
    schema is refused by the config, naming the path and the rule the form states."""
    root = PipelineConfig.model_json_schema()
    paths = [p for p, v in flatten(PipelineConfig().to_dict()).items() if isinstance(v, (int, float))
             and not isinstance(v, bool)]
    checked = 0
    for path in paths:
        field = form_schema({"S": [path]})[path]
        if "enum" in field:
            continue
        for bad in _outside(field):
            with pytest.raises(ConfigError) as e:
                PipelineConfig.load("tiny-cpu", {path: bad})
            prop = schema_at(root, tuple(path.split(".")))
            shown = float(bad) if prop["type"] == "number" else bad  # the value as the field reads it
            assert f"{path}={shown!r} is invalid: {describe(prop)}" in str(e.value).splitlines()
            checked += 1
    assert checked > 60


@pytest.mark.parametrize("values, message", [
    ({"sft.epochs": True}, "sft.epochs=True is invalid: an integer >= 1"),
    ({"sft.epochs": 2.0}, "sft.epochs=2.0 is invalid: an integer >= 1"),
    ({"ppo.kl_coef": "0.1"}, "ppo.kl_coef='0.1' is invalid: a number >= 0"),
    ({"ppo.whiten_advantages": "yes"}, "ppo.whiten_advantages='yes' is invalid: true or false"),
    ({"ppo.whiten_advantages": 1}, "ppo.whiten_advantages=1 is invalid: true or false"),
    ({"model.tokenizer": 3}, "model.tokenizer=3 is invalid: a non-empty string or null"),
    ({"sft.adam_betas": [0.9, 1.5]}, "sft.adam_betas[1]=1.5 is invalid: a number in [0, 1)"),
    ({"data.datasets": ["a", ""]}, "data.datasets[1]='' is invalid: a non-empty string"),
])
def test_strict_types_refuse_coercion_naming_the_rule(values, message):
    """A bool is no integer, a string no number: refused, not read as 1 or 0.1."""
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load("tiny-cpu", values)
    assert str(e.value) == message


def test_numbers_still_arrive_as_the_field_wants():
    c = PipelineConfig.load("tiny-cpu", {"sft.weight_decay": 0, "ppo.gamma": 1},
                            ["sft.learning_rate=1e-4", "ppo.kl_coef=5E-2", "rm.epochs=2"])
    assert (c.sft.weight_decay, c.ppo.gamma) == (0.0, 1.0) and isinstance(c.sft.weight_decay, float)
    assert (c.sft.learning_rate, c.ppo.kl_coef, c.rm.epochs) == (1e-4, 0.05, 2)


def test_yaml_values_read_floats_as_yaml_1_2_does():
    assert [parse_yaml(v) for v in ("1e-4", "-2E3", "1.0e-3", "3", ".5", "1e", "e5", "abc")] == \
        [1e-4, -2000.0, 1e-3, 3, 0.5, "1e", "e5", "abc"]


def test_every_error_is_one_line():
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load("tiny-cpu", ["sft.epochs=0", "rm.dtype=fp8", "ppo.kl_coeff=1"])
    assert str(e.value).splitlines() == [
        "sft.epochs=0 is invalid: an integer >= 1",
        "rm.dtype='fp8' is invalid: one of ['fp32', 'fp16', 'bf16']",
        "unknown config key 'ppo.kl_coeff' (did you mean 'ppo.kl_coef'?)",
    ]


def test_a_form_path_that_is_no_field_is_refused():
    with pytest.raises(ConfigError, match="'sft' is not a config field"):
        form_schema({"S": ["sft"]})
    with pytest.raises(ConfigError, match="'sft.nope' is not a config field"):
        form_schema({"S": ["sft.nope"]})
