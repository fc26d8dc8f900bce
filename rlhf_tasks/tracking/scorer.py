"""A scoring model as an MLflow pyfunc: rows of ``prompt`` and ``answer`` in, one score per
row out (``mlflow.pyfunc.load_model`` or ``mlflow models serve`` on it). The reward model is
logged as one (rlhf_tasks/pipeline/models.py).

What scores is not known here (tracking does not import the training code): the model holds
the dotted name of a loader, ``loader(artifact_dir, model_config) -> score(prompts, answers)``,
called when the model is loaded. Imported only where a model is logged or loaded (it imports
mlflow).
"""

from __future__ import annotations

import importlib

import mlflow.pyfunc


class ScoringModel(mlflow.pyfunc.PythonModel):
    def __init__(self, loader: str):
        self.loader = loader  # "package.module:function"

    def load_context(self, context) -> None:
        module, _, name = self.loader.partition(":")
        load = getattr(importlib.import_module(module), name)
        self.score = load(context.artifacts["model"], dict(context.model_config or {}))

    def predict(self, context, model_input, params=None):  # no type hints: the signature is given when logged
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        return [float(s) for s in self.score([str(r["prompt"]) for r in rows], [str(r["answer"]) for r in rows])]


def log_scorer(model_id: str, model_dir: str, loader: str, model_config: dict, requirements: list[str]) -> None:
    """Log a :class:`ScoringModel` of ``loader`` with ``model_dir`` as its artifact (one copy,
    in the LoggedModel's artifacts) into the LoggedModel ``model_id`` (tracking URI set by
    the caller)."""
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"prompt": ["\n\nHuman: Hello\n\nAssistant:"], "answer": [" Hello! How can I help?"]})
    mlflow.pyfunc.log_model(name="scorer", python_model=ScoringModel(loader), artifacts={"model": model_dir},
                            model_id=model_id, signature=infer_signature(example, [0.0]),
                            model_config=model_config, pip_requirements=requirements)
