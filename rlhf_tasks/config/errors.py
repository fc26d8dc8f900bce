"""A refused configuration, said in the project's words: pydantic's report, one line per
error, ``<config path>=<value> is invalid: <what is allowed>``.

pydantic gives the location, the input and the kind of each error; what is allowed comes
from the field's JSON schema (:func:`schema_at`, :func:`describe`), the same schema the
trigger form is made of, so the message and the form state one rule. An unknown key
names the key it resembles (difflib) or, for a key of an earlier version, its new name
(:data:`RENAMED`).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


# Keys of earlier versions -> their name now (an old key is refused with the new one named).
RENAMED = {
    "cost": "resources", "model.reward": "model.rm", "reward_terms": "reward",
    "ppo.eval_prompts": "evaluate.prompts",
    **{f"{s}.clip_reward_value": "reward.clip_reward_value" for s in ("ppo", "grpo", "rloo")},
    **{f"{s}.loss_aggregation": f"{s}.loss (ppo: a token mean over the optimizer step; grpo: a mean per answer)"
       for s in ("grpo", "rloo")},
    "grpo.scale_rewards": "grpo.advantage (group_norm: scaled by the group's std; group_mean: not, Dr. GRPO)",
    "ppo.per_device_training_batch_size": "ppo.per_device_train_batch_size",
    **{f"ppo.{who}_{k}": f"ppo.{who}.{k}" for who in ("actor", "critic")
       for k in ("learning_rate", "weight_decay", "zero_stage", "gradient_checkpointing", "lora_dim",
                 "lora_module_name", "dropout")},
    **{f"ppo.{k}": f"ppo.actor.{k} and ppo.critic.{k}"
       for k in ("lr_scheduler_type", "num_warmup_steps", "max_grad_norm", "offload", "only_optimize_lora")},
}

_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_MAPPING_ERRORS = ("model_type", "model_attributes_type", "dict_type")
_COUNT = {2: "two", 3: "three", 4: "four"}


# -- the JSON schema of one field ------------------------------------------------------------------

def _resolve(root: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A property's own schema: its ``$ref`` followed (the property's keys win: its
    description, its default), an Optional's null branch dropped and marked ``nullable``."""
    if "$ref" in node:
        target = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    branches = node.get("anyOf", [])
    real = [b for b in branches if b.get("type") != "null"]
    if len(real) == 1 and len(branches) == 2:
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**_resolve(root, real[0]), **rest, "nullable": True}
    return node


def schema_at(root: dict[str, Any], loc: tuple[str | int, ...]) -> dict[str, Any] | None:
    """The schema at a pydantic location (``("ppo", "actor", "zero_stage")``, ``("data",
    "datasets", 0)``) in a model's ``model_json_schema()``; None where nothing is."""
    node: dict[str, Any] | None = root
    for part in loc:
        node = _resolve(root, node)
        if isinstance(part, int):
            fixed = node.get("prefixItems", [])
            node = fixed[part] if part < len(fixed) else node.get("items")
        else:
            node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return _resolve(root, node)


def _number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _range(prop: dict[str, Any]) -> str:
    """`` in (0, 1]``, `` >= 1``: JSON schema bounds in interval notation."""
    lo = ("[", prop["minimum"]) if "minimum" in prop else ("(", prop.get("exclusiveMinimum"))
    hi = ("]", prop["maximum"]) if "maximum" in prop else (")", prop.get("exclusiveMaximum"))
    if lo[1] is not None and hi[1] is not None:
        return f" in {lo[0]}{_number(lo[1])}, {_number(hi[1])}{hi[0]}"
    if lo[1] is not None:
        return f" {'>=' if lo[0] == '[' else '>'} {_number(lo[1])}"
    if hi[1] is not None:
        return f" {'<=' if hi[0] == ']' else '<'} {_number(hi[1])}"
    return ""


def _array(prop: dict[str, Any]) -> str:
    fixed = prop.get("prefixItems")
    if fixed:  # a tuple: "two numbers in [0, 1)"
        items = {describe(item) for item in fixed}
        if len(items) == 1 and None not in items:
            return f"{_COUNT.get(len(fixed), len(fixed))} " + re.sub(r"^an? (\S+)", r"\1s", items.pop())
        return f"a list of {len(fixed)} items"
    return "a non-empty list" if prop.get("minItems") else "a list"


def describe(prop: dict[str, Any]) -> str | None:
    """What a field accepts, in words, from its JSON schema: ``an integer >= 1``, ``a
    number in (0, 1)``, ``0, 1, 2 or 3``, ``one of ['fp32', 'bf16']``; a string that must
    match a pattern is told by the field's description. None: nothing to say."""
    kind = prop.get("type")
    if "enum" in prop or "const" in prop:
        values = prop.get("enum", [prop.get("const")])
        text = (", ".join(map(str, values[:-1])) + f" or {values[-1]}" if kind == "integer" and len(values) > 1
                else f"one of {values}")
    elif kind in ("integer", "number"):
        text = ("an integer" if kind == "integer" else "a number") + _range(prop)
    elif kind == "boolean":
        text = "true or false"
    elif kind == "string" and "pattern" in prop and prop.get("description"):
        desc = prop["description"].split("\n")[0].strip()
        text = desc[:1].lower() + desc[1:]
    elif kind == "string":
        text = "a non-empty string" if prop.get("minLength") else "a string"
    elif kind == "array":
        text = _array(prop)
    elif "properties" in prop:
        text = "a mapping"
    else:
        return None
    return f"{text} or null" if prop.get("nullable") else text


# -- pydantic's errors in the project's words -------------------------------------------------------

def dotted(loc: tuple[str | int, ...]) -> str:
    """``("data", "datasets", 0)`` -> ``data.datasets[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def unknown_key(root: dict[str, Any], loc: tuple[str | int, ...]) -> str:
    """An unknown key: its new name if it was renamed, else the known key it resembles."""
    path = dotted(loc)
    if path in RENAMED:
        return f"unknown config key '{path}' (renamed: use '{RENAMED[path]}')"
    head = str(loc[0])
    if head in RENAMED and len(loc) > 1:
        return f"unknown config key '{path}' (the '{head}' section is now '{RENAMED[head]}')"
    section = schema_at(root, loc[:-1]) or {}
    known = list(section.get("properties", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"unknown config key '{path}' (did you mean '{dotted((*loc[:-1], close[0]))}'?)"
    return f"unknown config key '{path}'; known keys: {sorted(known)}"


def _line(root: dict[str, Any], err: dict[str, Any]) -> str:
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    if kind == "extra_forbidden":
        return unknown_key(root, loc)
    if kind == "rlhf_rule":  # a cross-field rule (config._rule): the field it names, inside loc's section
        ctx = err["ctx"]
        return f"{dotted((*loc, ctx['field']))}={ctx['value']!r} is invalid: {ctx['allowed']}"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # too few items: said of the whole tuple
        loc = loc[:-1]
    if kind in _MAPPING_ERRORS:
        return f"{dotted(loc) or 'config'} must be a mapping, got {value!r}"
    prop = schema_at(root, loc) or {}
    if kind in _BOUND_ERRORS and prop.get("type") == "number":
        value = float(value)  # the value as the field read it: 2 -> 2.0
    allowed = describe(prop) or re.sub(r"^(Input should be |Value error, )", "", err["msg"])
    return f"{dotted(loc)}={value!r} is invalid: {allowed}"


def explain(error: ValidationError, root: dict[str, Any]) -> str:
    """One line per error of ``error``; ``root`` is the validated model's JSON schema."""
    return "\n".join(dict.fromkeys(_line(root, err) for err in error.errors()))
