"""The trigger form's fields, straight from the config models' JSON schema: a field is a
config path (``sft.learning_rate``) whose type, bounds, choices and description are the
model's, made nullable (an empty field keeps the preset's value)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError, schema_at

# The JSON schema keys a form field keeps: what it accepts (title, default and the like are
# the form's own).
_CONSTRAINTS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "minLength", "items",
                "minItems", "maxItems", "prefixItems")


def field_schema(root: dict[str, Any], path: str) -> dict[str, Any]:
    """The JSON schema of the field at ``path`` in ``root`` (a model's
    ``model_json_schema()``), nullable, titled by its path."""
    prop = schema_at(root, tuple(path.split(".")))
    if prop is None or "properties" in prop or "type" not in prop:
        raise ConfigError(f"{path!r} is not a config field")
    out: dict[str, Any] = {k: prop[k] for k in _CONSTRAINTS if k in prop}
    if "enum" in prop or "const" in prop:
        out["enum"] = [None, *prop.get("enum", [prop.get("const")])]
    out["type"] = ["null", prop["type"]]
    out["title"] = path
    name = path.rpartition(".")[2]
    desc = (prop.get("description") or name.replace("_", " ").capitalize()).split("\n")[0].strip()
    out["description"] = f"{desc} (empty: the preset's)"
    return out


def form_schema(root: dict[str, Any], sections: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """{config path: JSON schema + ``section``} for the trigger form's fields."""
    return {path: {**field_schema(root, path), "section": section}
            for section, paths in sections.items() for path in paths}
