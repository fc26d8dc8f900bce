"""The pipeline's models as MLflow 3 LoggedModels (``models:/<model_id>``).

- The aligned actor: logged in MLflow's ``transformers`` flavor as a chat model
  (``llm/v1/chat``): MLflow's own tools load it (``mlflow.transformers.load_model``,
  ``mlflow.pyfunc.load_model``) and serve it (``mlflow models serve``). Its weights are
  stored once, in the LoggedModel's artifacts (the run's artifacts hold no other copy).
- The reward model: a pyfunc scoring model (:mod:`.scorer`: prompt and answer -> score), its
  directory stored once in the LoggedModel's artifacts.
- The SFT actor: a LoggedModel whose weights stay in the run directory (MLflow's "external"
  models: a model page, params, tags and linked metrics, no copy of the weights).

Each is found again by (name, source run): a retried register task reuses the models it
logged. Metrics are linked to a model by ``model_id`` and, for evaluations, to the
held-out prompts' dataset (name and digest), which is how the MLflow UI compares models.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .calls import mlflow_client, using_tracking_uri

log = logging.getLogger("rlhf_tasks.tracking")

ROLE_TAG = "rlhf.role"
PATH_TAG = "rlhf.path"
CHAT_TASK = "llm/v1/chat"
# DeepSpeed-Chat's turns ("\n\nHuman: ...\n\nAssistant:"), the format a model without a chat
# template of its own is trained on (rlhf_tasks/data/chat.py): its tokenizer gets this
# template in the logged copy, so that chat requests are rendered as in training.
DSCHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] | trim + '\n\nAssistant:' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim }}"
    "{% else %}{{ m['content'] | trim }}{% endif %}"
    "{% endfor %}"
)


def find_model(client, experiment_id: str, name: str, source_run_id: str | None):
    """The READY LoggedModel called ``name`` that ``source_run_id`` logged, or None."""
    filters = [f"name = '{name}'"] + ([f"source_run_id = '{source_run_id}'"] if source_run_id else [])
    found = client.search_logged_models([experiment_id], filter_string=" AND ".join(filters))
    # (a status filter is not matched by the SQL store: filtered here)
    return next((m for m in found if str(getattr(m.status, "value", m.status)) == "READY"), None)


def _new_model(client, experiment_id: str, name: str, source_run_id: str | None, tags: Mapping[str, str],
               params: Mapping[str, Any], model_type: str):
    """A new (pending) LoggedModel, its params as the strings MLflow stores."""
    return client.create_logged_model(experiment_id, name=name, source_run_id=source_run_id, tags=dict(tags),
                                      params={k: str(v) for k, v in params.items()}, model_type=model_type)


def has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    cfg = model_dir / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def log_chat_model(uri: str, experiment_id: str, model_dir: Path, name: str, source_run_id: str | None, *,
                   tags: Mapping[str, str], params: Mapping[str, Any], model_config: Mapping[str, Any],
                   trust_remote_code: bool = False) -> str:
    """``model_dir`` (save_pretrained, with its tokenizer) as a transformers-flavor chat
    LoggedModel; its model_id. ``model_config``: the generation settings a request gets
    unless it sets its own."""
    client = mlflow_client(uri)
    if found := find_model(client, experiment_id, name, source_run_id):
        log.info("mlflow: %s already logged as model %s", name, found.model_id)
        return found.model_id
    import mlflow.transformers
    from huggingface_hub import ModelCard

    model = _new_model(client, experiment_id, name, source_run_id, {**tags, ROLE_TAG: tags.get(ROLE_TAG, "actor")},
                       params, "chat")
    card = ModelCard(f"# {name}\n\nRLHF actor trained by the rlhf_tasks pipeline from run {source_run_id}.\n")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # In memory, then saved by the flavor (save_pretrained): the weights' one copy in MLflow.
    # (MLflow 3.17's path-only logging cannot read transformers 5's pipeline table.)
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if not has_chat_template(Path(model_dir)):
        tok.chat_template = DSCHAT_TEMPLATE
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", trust_remote_code=trust_remote_code)
    components = {"model": lm, "tokenizer": tok}
    with using_tracking_uri(uri):
        mlflow.transformers.log_model(components, name=name, task=CHAT_TASK, model_id=model.model_id,
                                      model_card=card, model_config=dict(model_config),
                                      pip_requirements=_requirements())
    log.info("mlflow: %s logged as model %s (transformers flavor, %s)", name, model.model_id, CHAT_TASK)
    return model.model_id


def _requirements() -> list[str]:
    """What the logged model needs (given, so that MLflow does not load the model in a
    subprocess to infer them)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "accelerate")
            if _installed(p)]


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version(package))
    except PackageNotFoundError:
        return False


def log_scoring_model(uri: str, experiment_id: str, model_dir: Path, name: str, source_run_id: str | None, *,
                      tags: Mapping[str, str], params: Mapping[str, Any], loader: str,
                      model_config: Mapping[str, Any]) -> str:
    """``model_dir`` as a pyfunc scoring model (:mod:`.scorer`: rows of prompt and answer ->
    scores, by ``loader``), its directory stored once in the LoggedModel's artifacts; its model_id."""
    client = mlflow_client(uri)
    if found := find_model(client, experiment_id, name, source_run_id):
        return found.model_id
    from .scorer import log_scorer

    model = _new_model(client, experiment_id, name, source_run_id, tags, params, "reward-model")
    with using_tracking_uri(uri):
        log_scorer(model.model_id, str(model_dir), loader, dict(model_config), _requirements())
    log.info("mlflow: %s logged as model %s (pyfunc scoring model)", name, model.model_id)
    return model.model_id


def log_external_model(uri: str, experiment_id: str, model_dir: Path, name: str, source_run_id: str | None, *,
                       tags: Mapping[str, str], params: Mapping[str, Any], model_type: str) -> str:
    """A LoggedModel for ``model_dir`` whose weights stay where they are (tagged with the
    path); its model_id."""
    client = mlflow_client(uri)
    if found := find_model(client, experiment_id, name, source_run_id):
        return found.model_id
    from mlflow.entities import LoggedModelStatus
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    model = _new_model(client, experiment_id, name, source_run_id,
                       {**tags, PATH_TAG: str(model_dir), MLFLOW_MODEL_IS_EXTERNAL: "true"}, params, model_type)
    with tempfile.TemporaryDirectory(prefix="rlhf-model-") as tmp:
        get_external_mlflow_model_spec(model).save(os.path.join(tmp, MLMODEL_FILE_NAME))
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    log.info("mlflow: %s logged as model %s (weights in %s)", name, model.model_id, model_dir)
    return model.model_id


def link_metrics(uri: str, run_id: str, model_id: str, metrics: Mapping[str, float],
                 dataset: tuple[str, str] | None = None) -> None:
    """``metrics`` logged to ``run_id`` at step 0, linked to the model (and to the dataset
    ``(name, digest)``): they show on the model's page and compare across models."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    name, digest = dataset or (None, None)
    points = [Metric(k, float(v), ts, 0, model_id=model_id, dataset_name=name, dataset_digest=digest, run_id=run_id)
              for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    client = mlflow_client(uri)
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i:i + 1000])


def log_eval_dataset(uri: str, run_id: str, rows: list[dict[str, Any]], name: str,
                     model_ids: list[str] = ()) -> tuple[str, str]:
    """The held-out prompts as an MLflow dataset, an input of ``run_id`` (context
    ``evaluation``) beside the models evaluated on it; its (name, digest): the digest is
    of the prompts, so the same prompts are the same dataset version across runs."""
    import pandas as pd
    from mlflow.data import from_pandas
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    ds = from_pandas(pd.DataFrame(rows), name=name)
    entity = ds._to_mlflow_entity()
    mlflow_client(uri).log_inputs(run_id, datasets=[DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, "evaluation")])],
                            models=[LoggedModelInput(m) for m in model_ids])
    return ds.name, ds.digest
