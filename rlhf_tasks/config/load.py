"""A config's raw tree before it is checked: a preset (a name in ``presets/`` or a YAML
file), then values by config path (the trigger form's typed dict), then ``key=value``
strings (the CLI's ``--set``, the form's free-text overrides; values parsed as YAML).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: ``1e-4`` is a number (PyYAML's YAML 1.1 reads a float
    without a dot as a string), so ``--set sft.learning_rate=1e-4`` meets a strict float."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset_dict(preset: str | Path) -> dict[str, Any]:
    path = Path(preset)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {str(preset)!r} not found: choose one of {list_presets()} or give a YAML file path")
    raw = parse_yaml(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw["a"]["b"]["c"] = value`` for ``key="a.b.c"``, making sections as needed."""
    key = key.strip()
    node = raw
    parts = key.split(".")
    if not key or not all(parts):
        raise ConfigError(f"{key!r} is not a config path such as sft.learning_rate")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p!r} is not a section")
    node[parts[-1]] = value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key=value, e.g. sft.learning_rate=1e-4")
    try:
        parsed = parse_yaml(value) if value.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    set_path(raw, key, parsed)


def load_raw(preset: str | Path, values: dict[str, Any] | list[str] | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """The preset's tree with ``values`` (by config path, typed) and then ``overrides``
    (``key=value`` strings) applied. A list as ``values`` is taken as ``overrides``."""
    if isinstance(values, list):
        values, overrides = None, [*values, *(overrides or [])]
    raw = load_preset_dict(preset)
    for key, value in (values or {}).items():
        set_path(raw, key, copy.deepcopy(value))
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: config paths and their values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
