"""The model registry: a model version per run, and the ``champion`` alias that moves
only when a new version beats the current holder."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .calls import configure_http, error_code, mlflow_client, retry_for, using_tracking_uri
from .models import log_chat_model

log = logging.getLogger("rlhf_tasks.tracking")

CHAMPION_ALIAS = "champion"


def register_model(tracking_uri: str, model_dir: str | Path, name: str, metric_name: str, metric_value: float,
                   run_id: str, higher_is_better: bool = True, *, artifact_path: str = "model",
                   alias: str = CHAMPION_ALIAS, budget_s: float = 120.0, move_alias: bool = True,
                   tags: dict[str, str] | None = None, model_tags: dict[str, str] | None = None,
                   model_params: dict[str, Any] | None = None,
                   model_config: dict[str, Any] | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Register ``model_dir`` (a causal LM's save_pretrained directory, with its tokenizer)
    as a new version of ``name``, and move ``alias`` to it only if it beats the current holder.

    The directory is logged as a LoggedModel of ``run_id`` called ``artifact_path``, in
    MLflow's transformers flavor as a chat model (:func:`.models.log_chat_model`: its
    ``model_tags``, ``model_params``, and ``model_config`` the generation settings), and the
    version's source is that model (``models:/<model_id>``): MLflow loads and serves it. The version is
    tagged ``<metric_name>=<metric_value>`` (and ``tags``, e.g. the algorithm); the alias moves when there is no champion
    yet, or when the value is strictly better than the champion's tag. A champion
    without that tag is kept (warning): it cannot be compared. Idempotent: a retried
    call for the same run and source reuses the version it made. With ``move_alias=False``
    (a person approves the champion) the alias stays; ``promoted`` then says whether the
    metric alone would have moved it.

    Unlike the Tracker, this raises on failure (registering is the task's whole job). Returns {version, champion_version, promoted, previous_champion_metric, source, model_id}.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    client = mlflow_client(tracking_uri)

    def call(fn: Callable[[], Any], what: str) -> Any:
        return retry_for(fn, what, budget_s, raise_on_failure=True)[1]

    experiment_id = call(lambda: client.get_run(run_id), "reading the run").info.experiment_id
    model_id = call(lambda: log_chat_model(tracking_uri, experiment_id, model_dir, artifact_path, run_id,
                                           tags=model_tags or {}, params=model_params or {},
                                           model_config=model_config or {}, trust_remote_code=trust_remote_code),
                    f"logging {model_dir} as a model of run {run_id}")
    source = f"models:/{model_id}"
    _ensure_registered(client, name, call)
    existing = call(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"),
                    "searching model versions")
    mine = [mv for mv in existing if mv.source == source]
    tags = {metric_name: repr(float(metric_value)), "rlhf.metric_name": metric_name,
            "rlhf.higher_is_better": str(higher_is_better).lower(), **(tags or {})}
    if mine:
        mv = max(mine, key=lambda m: int(m.version))
        log.info("mlflow: run %s already registered as %s version %s", run_id, name, mv.version)
    else:
        with using_tracking_uri(tracking_uri):  # a store URI (sqlite:) resolves models:/ in this process
            mv = call(lambda: client.create_model_version(name, source, run_id=run_id, tags=tags, await_creation_for=60,
                                                          model_id=model_id), f"creating a version of {name}")

    aliases = call(lambda: client.get_registered_model(name), f"reading registered model {name}").aliases
    champion = aliases.get(alias)
    previous: float | None = None
    if champion is None:
        promoted = True
    elif str(champion) == str(mv.version):
        promoted, previous = False, float(metric_value)
    else:
        champ = call(lambda: client.get_model_version(name, str(champion)), f"reading {name} version {champion}")
        try:
            previous = float(champ.tags[metric_name])
        except (KeyError, ValueError):
            log.warning("mlflow: champion %s version %s has no %r tag; it cannot be compared and stays champion",
                        name, champion, metric_name)
        promoted = previous is not None and _better(float(metric_value), previous, higher_is_better)
    if promoted and move_alias:
        call(lambda: client.set_registered_model_alias(name, alias, str(mv.version)), f"moving alias {alias}")
        champion = mv.version
    log.info("mlflow: %s version %s %s=%.4g (champion %s: %s)", name, mv.version, metric_name, metric_value,
             champion, ("promoted" if move_alias else "better: awaiting approval") if promoted
             else f"kept, {metric_name}={previous}")
    return {"version": str(mv.version), "champion_version": str(champion), "promoted": promoted,
            "previous_champion_metric": previous, "source": source, "model_id": model_id}


def _ensure_registered(client, name: str, call: Callable[[Callable[[], Any], str], Any]) -> None:
    """The registered model ``name``, created if missing (a concurrent register may win)."""
    try:
        call(lambda: client.get_registered_model(name), f"reading registered model {name}")
    except Exception as exc:
        if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="RLHF actor (PPO, GRPO, RLOO or DPO); alias 'champion' = best so far")
        except Exception as exc2:  # a concurrent register created it
            if error_code(exc2) != "RESOURCE_ALREADY_EXISTS":
                raise


def _better(new: float, old: float, higher_is_better: bool) -> bool:
    if math.isnan(new):
        return False
    return new > old if higher_is_better else new < old


def experiment_of(tracking_uri: str, run_id: str) -> str:
    return mlflow_client(tracking_uri).get_run(run_id).info.experiment_id


def champion_version(tracking_uri: str, name: str, alias: str = CHAMPION_ALIAS) -> dict[str, Any] | None:
    """The version holding ``alias`` ({version, tags, run_id, source}), or None."""
    client = mlflow_client(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return {"version": str(mv.version), "tags": dict(mv.tags), "run_id": mv.run_id, "source": mv.source}


def set_version_tags(tracking_uri: str, name: str, version: str, tags: dict[str, str]) -> None:
    client = mlflow_client(tracking_uri)
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def set_champion(tracking_uri: str, name: str, version: str, alias: str = CHAMPION_ALIAS) -> None:
    mlflow_client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def resolve_version(tracking_uri: str, name: str, ref: str) -> dict[str, Any]:
    """A model reference -> {version, source, run_id, ref}. ``ref`` is an alias
    (``champion``), a version (``3``, ``v3``), ``newest``, or ``run:<MLflow run id>`` (the
    newest version registered from that run). Raises LookupError naming what exists."""
    client = mlflow_client(tracking_uri)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version))
    if not versions:
        raise LookupError(f"registered model {name!r} has no versions at {tracking_uri}: train and register a "
                          "model first, or give a model directory")
    chosen = None
    number = ref[1:] if ref[:1] in "vV" and ref[1:].isdigit() else ref
    if number.isdigit():
        chosen = next((m for m in versions if str(m.version) == number), None)
    elif ref == "newest":
        chosen = versions[-1]
    elif ref.startswith("run:"):
        chosen = next((m for m in reversed(versions) if m.run_id == ref.removeprefix("run:")), None)
    else:
        aliases = client.get_registered_model(name).aliases
        if ref not in aliases:
            raise LookupError(f"registered model {name!r} has no alias {ref!r}; its aliases: "
                              f"{sorted(aliases) or 'none'}; versions 1-{versions[-1].version}")
        chosen = next(m for m in versions if str(m.version) == str(aliases[ref]))
    if chosen is None:
        raise LookupError(f"registered model {name!r} has no version for {ref!r}; versions: "
                          f"{[m.version for m in versions]}")
    return {"version": str(chosen.version), "source": chosen.source, "run_id": chosen.run_id, "ref": ref}


def download_version(tracking_uri: str, source: str, target: Path) -> Path:
    """The version's files in ``target`` (downloaded once: reused when complete): a
    save_pretrained directory with its tokenizer, whether the version is a LoggedModel in
    the transformers flavor (``models:/<model_id>``: its ``model/`` and its tokenizer
    component) or a plain directory registered before the models became LoggedModels."""
    if (target / "config.json").is_file():
        return target
    configure_http()
    import shutil

    from mlflow.artifacts import download_artifacts

    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with using_tracking_uri(tracking_uri):  # models:/ resolves against the (default) registry URI
        path = Path(download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri))
    if (path / "MLmodel").is_file():
        path = hf_directory(path)
    elif not (path / "config.json").is_file():
        raise ValueError(f"model version source {source} holds neither an MLmodel nor a config.json")
    path.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def hf_directory(mlflow_model: Path) -> Path:
    """A transformers-flavor MLflow model's ``model/`` directory, its tokenizer component
    moved in beside the weights (what ``from_pretrained`` reads from one directory)."""
    hf = mlflow_model / "model"
    if not (hf / "config.json").is_file():
        raise ValueError(f"{mlflow_model} is an MLflow model without a transformers model/ directory")
    tok = mlflow_model / "components" / "tokenizer"
    for f in tok.iterdir() if tok.is_dir() else ():
        if not (hf / f.name).exists():
            f.rename(hf / f.name)
    return hf
