"""Checks that run before a stage spends anything: model directories, dataset files,
the outputs of earlier stages, and the remote-code switch.

Each failure is a :class:`~rlhf_tasks.config.ConfigError` (the CLI exits 2) naming the
config field and the file or directory at fault. The deeper checks (a dataset's rows and
columns, a model's weights) happen when they are read, still before the first training
step; these are the cheap ones that need no model or dataset loaded.

Remote code: a model directory whose ``config.json`` has an ``auto_map`` asks
``transformers`` to import Python files shipped with the model. That runs only when the
config says ``model.trust_remote_code: true`` *and* the worker's operator has set
``RLHF_ALLOW_REMOTE_CODE=1``: a trigger-form user alone cannot make the GPU worker
execute code they supply.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..config import ALGORITHMS, STAGES, ConfigError, PipelineConfig
from ..storage import RunDir

ALLOW_REMOTE_CODE_ENV = "RLHF_ALLOW_REMOTE_CODE"
BUILTIN_MODELS = ("builtin:tiny-opt", "builtin:tiny-rm")
# A Hugging Face hub id: "name" or "owner/name", letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
# Models each stage loads from the config (later stages load the earlier stages' outputs).
STAGE_MODELS = {"prepare": ("actor", "rm"), "sft": ("actor",), "rm": ("rm",)}
STAGES_WITH_DATA = ("prepare", *STAGES)


def stage_inputs(stage: str, cfg: PipelineConfig) -> tuple[str, ...]:
    """The earlier stages whose outputs ``stage`` loads: step 3 the SFT actor (and the
    reward model when it scores with one), evaluate the SFT and aligned actors and the RM."""
    rm = ("rm",) if cfg.needs_reward_model() else ()
    if stage == "evaluate":
        return ("sft", *rm, cfg.algorithm)
    if stage in ALGORITHMS:
        return ("sft", *(rm if getattr(cfg, stage).trains_with_reward_model() else ()))
    return ()


def remote_code_allowed() -> bool:
    return os.environ.get(ALLOW_REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~"))


def check_gguf_source(name: str, field: str) -> None:
    """A GGUF spec names an existing file (or an installed package's), and transformers can
    read GGUF here (the ``gguf`` package)."""
    import importlib.util

    from ..runtime.gguf import gguf_file

    try:
        gguf_file(name)
    except ValueError as e:
        raise ConfigError(f"{field}={name!r} is invalid: {e}") from None
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{field}={name!r} needs the gguf package on this worker (pip install gguf; "
                          "requirements.txt pins it): transformers reads GGUF files with it")


def check_model_source(name: str, field: str, trust_remote_code: bool, *, need_weights: bool = True) -> None:
    """A model name is ``builtin:...``, a GGUF file (``x.gguf``, ``pkg:<package>/<file>.gguf``),
    an existing ``save_pretrained`` directory, or a hub id."""
    from ..runtime.gguf import is_gguf_spec

    if is_gguf_spec(name):
        check_gguf_source(name, field)
        return
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ConfigError(f"{field}={name!r} is invalid: the built-in models are {list(BUILTIN_MODELS)}")
        return
    path = Path(name).expanduser()
    if path.exists():
        _check_model_dir(path, name, field, trust_remote_code, need_weights)
        return
    if _looks_like_path(name):
        raise ConfigError(f"{field}={name!r} is invalid: {path} does not exist (give a directory written by "
                          "save_pretrained, a hub id such as facebook/opt-1.3b, or builtin:tiny-opt)")
    if not _HUB_ID.match(name) or ".." in name:
        raise ConfigError(f"{field}={name!r} is invalid: neither an existing directory nor a hub id "
                          "(owner/name: letters, digits, '-', '_', '.')")


def _check_model_dir(path: Path, name: str, field: str, trust_remote_code: bool, need_weights: bool) -> None:
    if not path.is_dir():
        raise ConfigError(f"{field}={name!r} is invalid: {path} is a file, not a model directory "
                          "(the output of save_pretrained, with config.json)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{field}={name!r} is invalid: {cfg_file} is missing, so {path} is not a model "
                          "directory written by save_pretrained")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}={name!r} is invalid: {cfg_file} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{field}={name!r} is invalid: {cfg_file} must hold a JSON object")
    if not cfg.get("model_type"):
        raise ConfigError(f"{field}={name!r} is invalid: {cfg_file} has no model_type, so transformers cannot "
                          "tell which architecture to build")
    if cfg.get("auto_map"):
        if not trust_remote_code:
            raise ConfigError(f"{field}={name!r} is refused: {cfg_file} asks to run Python code shipped with the "
                              f"model (auto_map {sorted(cfg['auto_map'])}); set model.trust_remote_code=true only "
                              f"for a model you trust (the worker must also allow it: {ALLOW_REMOTE_CODE_ENV}=1)")
    if need_weights and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"{field}={name!r} is invalid: {path} has config.json but no weights "
                          f"(one of {list(WEIGHT_FILES)})")


def check_tokenizer_source(name: str, field: str, trust_remote_code: bool) -> None:
    check_model_source(name, field, trust_remote_code, need_weights=False)
    path = Path(name).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{field}={name!r} is invalid: {path} has no tokenizer files (one of "
                          f"{list(TOKENIZER_FILES)}); save the tokenizer there too, or set model.tokenizer")


def check_datasets(cfg: PipelineConfig) -> None:
    """Every dataset spec resolves; local files exist and are not empty."""
    from ..data.loading import BUILDERS, resolve_spec

    for i, spec in enumerate(cfg.data.datasets):
        field = f"data.datasets[{i}]"
        try:
            ds = resolve_spec(spec)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{field}={spec!r} is invalid: {e}") from None
        if not ds.is_local:
            continue
        path = Path(ds.location)
        if path.is_file() and path.stat().st_size == 0:
            raise ConfigError(f"{field}={spec!r} is invalid: {path} is empty")
        if path.is_dir() and not any(p.suffix.lower() in BUILDERS and p.stat().st_size > 0
                                     for p in path.rglob("*") if p.is_file()):
            raise ConfigError(f"{field}={spec!r} is invalid: {path} holds no non-empty "
                              f"{'/'.join(BUILDERS)} file")


def check(stage: str, cfg: PipelineConfig, run: RunDir) -> None:
    """All the checks ``stage`` needs, in the order a user would fix them."""
    m = cfg.model
    if m.trust_remote_code and not remote_code_allowed():
        raise ConfigError(f"model.trust_remote_code=True is refused on this worker: running code shipped with a "
                          f"model needs the operator's consent too ({ALLOW_REMOTE_CODE_ENV}=1 in the worker's "
                          "environment)")
    for role in STAGE_MODELS.get(stage, ()):
        check_model_source(getattr(m, role), f"model.{role}", m.trust_remote_code)
    if stage in STAGE_MODELS:
        tok_field = "model.tokenizer" if m.tokenizer else "model.actor"
        check_tokenizer_source(m.tokenizer or m.actor, tok_field, m.trust_remote_code)
    for earlier in stage_inputs(stage, cfg):
        final = run.final(earlier)
        if not final.is_dir() and run.result(stage) is None:
            raise ConfigError(f"{stage} needs the {earlier} stage's output {final}, which does not exist: run "
                              f"`{earlier}` first with --output {run.path}")
    if stage in STAGES_WITH_DATA:
        check_datasets(cfg)
    if cfg.reward.function and (stage == "prepare" or stage in ALGORITHMS and ALGORITHMS[stage].rollouts):
        from ..algorithms.verifiers import load_function

        load_function(cfg.reward.function)
    if cfg.reward.verifier != "world" and (stage in ("prepare", "evaluate") or stage in ALGORITHMS):
        from ..algorithms.verifiers import load_verifier

        load_verifier(cfg.reward.verifier)
