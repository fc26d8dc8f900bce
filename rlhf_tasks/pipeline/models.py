"""The run's models in MLflow (register's part): the SFT actor and the reward model as
LoggedModels with their stage's metrics linked, the held-out prompts as an evaluation
dataset, and both actors' evaluation metrics under the same names, linked to their model
and that dataset, so that the MLflow UI's models page compares them side by side.

The aligned actor itself is logged (transformers flavor) and registered by
:func:`rlhf_tasks.tracking.registry.register_model`; :func:`aligned_model_spec` says
with what lineage and generation settings.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..config import PipelineConfig
from ..storage import RunDir

log = logging.getLogger("rlhf_tasks")

# The evaluation's metrics under one name per model (the UI compares models by metric name).
SFT_EVAL = {"sft_reward": "eval/reward", "sft_accuracy": "eval/accuracy", "sft_answer_length": "eval/answer_length"}
ALIGNED_EVAL = {"aligned_reward": "eval/reward", "aligned_accuracy": "eval/accuracy",
                "aligned_answer_length": "eval/answer_length", "aligned_win_rate": "eval/win_rate_vs_sft",
                "kl_aligned_sft": "eval/kl_to_sft", "reward_gain": "eval/reward_gain_over_sft"}


def model_name(role: str, algo: str) -> str:
    return {"sft": "sft-actor", "rm": "reward-model"}.get(role, f"{algo}-actor")


def run_of(results: dict[str, Any], stage: str, parent: str | None) -> str | None:
    """The MLflow run of ``stage``'s result, else the parent run."""
    r = results.get(stage)
    return (r.mlflow_run_id if r is not None else None) or parent


def _prefixed(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}  # link_metrics keeps the numbers


def lineage(cfg: PipelineConfig, run_dir: RunDir) -> dict[str, str]:
    """Where the run's models come from: the base model, the datasets, the run directory."""
    return {"rlhf.base_actor": cfg.model.actor, "rlhf.base_rm": cfg.model.rm, "rlhf.datasets": json.dumps(list(cfg.data.datasets))[:5000],
            "rlhf.run_dir": str(run_dir.path), "rlhf.preset": cfg.name}


def log_sft_and_rm(uri: str, cfg: PipelineConfig, run_dir: RunDir, results: dict[str, Any],
                   parent: str | None) -> dict[str, str]:
    """The SFT actor (weights left in the run directory) and the reward model (a pyfunc
    scoring model) as LoggedModels, their stage's metrics linked; {role: model_id}."""
    from ..tracking.models import ROLE_TAG, link_metrics, log_external_model, log_scoring_model
    from ..tracking.registry import experiment_of

    ids: dict[str, str] = {}
    base = lineage(cfg, run_dir)
    for stage, kind in (("sft", "actor"), ("rm", "reward-model")):
        final, run_id = run_dir.final(stage), run_of(results, stage, parent)
        if stage not in results or not final.is_dir() or run_id is None:
            continue
        exp, name, tags = experiment_of(uri, run_id), model_name(stage, cfg.algorithm), {**base, ROLE_TAG: stage}
        ids[stage] = (log_scoring_model(uri, exp, final, name, run_id, tags=tags, params={"stage": stage},
                                        loader=f"{__name__}:reward_scorer",
                                        model_config={"chat_template": cfg.model.chat_template}) if stage == "rm" else
                      log_external_model(uri, exp, final, name, run_id, tags=tags, params={"stage": stage},
                                         model_type=kind))
        link_metrics(uri, run_id, ids[stage], _prefixed(results[stage].metrics, stage))
    return ids


def reward_scorer(path: str, config: dict[str, Any]):
    """The logged reward model's scoring function (loaded by MLflow: tracking/scorer.py):
    ``score(prompts, answers) -> scores``, each row tokenised as the rm stage tokenised its
    pairs (the prompt rendered as the run did, the answer, EOS) and scored at its last token."""
    import torch

    from ..data.chat import renderer
    from ..runtime.models import RewardModel, load_tokenizer

    tok = load_tokenizer(path)
    render = renderer(tok, config.get("chat_template", "auto"))
    rm = RewardModel.from_pretrained(path).eval()

    @torch.no_grad()
    def score(prompts: list[str], answers: list[str]) -> list[float]:
        ids = zip(render.encode_prompts(prompts),
                  tok([render.answer(a) for a in answers], add_special_tokens=False)["input_ids"], strict=True)
        rows = [torch.tensor([p + a + [tok.eos_token_id]]) for p, a in ids]
        return [float(rm.score(r, torch.ones_like(r))[0]) for r in rows]
    return score


def aligned_model_spec(cfg: PipelineConfig, run_dir: RunDir, ids: dict[str, str]) -> dict[str, Any]:
    """register_model's keyword arguments for the aligned actor: its lineage (the SFT model
    it started from, the reward model that scored it) and the generation settings the run
    sampled with (``sampling``), the defaults of a chat request."""
    from ..tracking.models import ROLE_TAG

    s = cfg.sampling
    gen = {"max_new_tokens": cfg.data.max_seq_len - cfg.data.max_prompt_seq_len, "do_sample": True,
           "temperature": s.temperature, "top_p": s.top_p, **({"top_k": s.top_k} if s.top_k else {})}
    tags = {**lineage(cfg, run_dir), ROLE_TAG: "aligned", "rlhf.algorithm": cfg.algorithm,
            **{f"rlhf.{k}_model_id": v for k, v in ids.items()}}
    params = {"algorithm": cfg.algorithm, "sft_dir": str(run_dir.final("sft")), "rm_dir": str(run_dir.final("rm")),
              **{f"generation.{k}": v for k, v in gen.items()}}
    return {"artifact_path": model_name("aligned", cfg.algorithm), "model_tags": tags, "model_params": params,
            "model_config": gen, "trust_remote_code": cfg.model.trust_remote_code}


def log_evaluation(uri: str, cfg: PipelineConfig, run_dir: RunDir, results: dict[str, Any], parent: str | None,
                   ids: dict[str, str]) -> tuple[str, str] | None:
    """The held-out prompts as an MLflow dataset (input of the evaluate run) and both
    actors' metrics on it, linked to their models; the dataset's (name, digest)."""
    from ..tracking.models import link_metrics, log_eval_dataset

    run_id = run_of(results, "evaluate", parent)
    samples = run_dir.stage("evaluate") / "samples.json"
    if run_id is None or "evaluate" not in results:
        return None
    ev = results["evaluate"].metrics
    rows = ([{k: r.get(k) for k in ("prompt", "question", "category")} for r in json.loads(samples.read_text())]
            if samples.is_file() else [])
    algo = cfg.algorithm
    models = [m for m in (ids.get("sft"), ids.get(algo)) if m]
    dataset = log_eval_dataset(uri, run_id, rows, f"{cfg.name}-heldout-prompts", models) if rows else None
    for role, names in (("sft", SFT_EVAL), (algo, ALIGNED_EVAL)):
        if role in ids:
            link_metrics(uri, run_id, ids[role], {new: ev[old] for old, new in names.items() if old in ev}, dataset)
    if algo in ids and algo in results:
        link_metrics(uri, run_of(results, algo, parent), ids[algo], _prefixed(results[algo].metrics, algo))
    log.info("register: evaluation of %s on %s linked in MLflow", sorted(ids), dataset)
    return dataset
