"""
# RLHF pipeline: SFT → reward model → PPO → evaluate → register

Three-step RLHF in the spirit of DeepSpeed-Chat, on DeepSpeed and Hugging Face.

| task | what it does | where |
|---|---|---|
| `install` | checks the worker (packages, torch/CUDA, DeepSpeed ops, disk), resolves the config, validates and caches models and data, opens the MLflow parent run | `gpu` queue |
| `sft` | step 1: supervised fine-tuning of the actor (perplexity) | `gpu` queue, `gpu` pool |
| `reward_model` | step 2: reward model on preference pairs (accuracy, chosen/rejected scores) | `gpu` queue, `gpu` pool |
| `ppo` | step 3: PPO of the actor against the reward model (average reward, KL) | `gpu` queue, `gpu` pool |
| `evaluate` | SFT vs PPO actor on held-out prompts, sample answers side by side | `gpu` queue, `gpu` pool |
| `register` | run report (time, cost, metrics per step), MLflow model version, `champion` alias if better | default queue |

`sft` and `reward_model` do not depend on each other: with 2 slots in the `gpu` pool they
run side by side. Every stage writes to `$RLHF_STORAGE/runs/<run id>/<stage>/`; a retried
stage resumes from its newest complete checkpoint and continues the same MLflow run; a
finished stage is not run again.

**Trigger form**: pick a preset, then override what you need; empty fields keep the preset's
value; `overrides` takes any other config key as `section.key=value`.

**Retraining**: the DAG runs whenever the `rlhf_preference_data` asset is updated (a producer
task with `outlets=[preference_data]`, e.g. `dags/ingest_preferences.py`, or
`POST /api/v2/assets/events` with the asset's id), and on the cron schedule in
`RLHF_RETRAIN_CRON` when that variable is set (off by default).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    get_current_context,
    task,
)

import rlhf_tasks  # light: the package __init__ imports nothing heavy

GPU_QUEUE = os.environ.get("RLHF_GPU_QUEUE", "gpu")
GPU_POOL = os.environ.get("RLHF_GPU_POOL", "gpu")
STAGE_TIMEOUT = timedelta(hours=float(os.environ.get("RLHF_STAGE_TIMEOUT_H", "24")))
RETRIES = int(os.environ.get("RLHF_STAGE_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("RLHF_RETRY_DELAY_S", "60")))
PRESETS = sorted(p.stem for p in (Path(rlhf_tasks.__file__).parent / "presets").glob("*.yaml"))

preference_data = Asset(name="rlhf_preference_data",
                        uri=os.environ.get("RLHF_PREFERENCE_DATA_URI", "file:///rlhf/preference-data"))
_cron = os.environ.get("RLHF_RETRAIN_CRON", "").strip()
schedule = (AssetOrTimeSchedule(timetable=CronTriggerTimetable(_cron, timezone="UTC"), assets=[preference_data])
            if _cron else [preference_data])


def _opt(type_: str, description: str, section: str, **schema) -> Param:
    """An optional field: empty (null) keeps the preset's value."""
    return Param(None, type=["null", type_], description=description, section=section, **schema)


# Trigger-form field -> config key (see rlhf_tasks/config.py).
FORM_TO_CONFIG = {
    "actor_model": "model.actor", "reward_model": "model.reward", "datasets": "data.datasets",
    "data_split": "data.data_split", "max_seq_len": "data.max_seq_len",
    "sft_epochs": "sft.epochs", "sft_batch_size": "sft.per_device_train_batch_size",
    "sft_learning_rate": "sft.learning_rate", "sft_lora_dim": "sft.lora_dim", "sft_zero_stage": "sft.zero_stage",
    "rm_epochs": "reward.epochs", "rm_batch_size": "reward.per_device_train_batch_size",
    "rm_learning_rate": "reward.learning_rate", "rm_zero_stage": "reward.zero_stage",
    "ppo_epochs": "ppo.epochs", "ppo_max_steps": "ppo.max_steps",
    "ppo_batch_size": "ppo.per_device_generation_batch_size",
    "actor_learning_rate": "ppo.actor_learning_rate", "critic_learning_rate": "ppo.critic_learning_rate",
    "actor_lora_dim": "ppo.actor_lora_dim", "actor_zero_stage": "ppo.actor_zero_stage",
    "critic_zero_stage": "ppo.critic_zero_stage", "kl_coef": "ppo.kl_coef",
    "num_gpus": "cost.num_gpus", "gpu_hourly_usd": "cost.gpu_hourly_usd",
}
DTYPE_KEYS = ("sft.dtype", "reward.dtype", "ppo.dtype")

params = {
    "preset": Param("tiny-cpu", enum=PRESETS, description="Named config: tiny-cpu (CPU, minutes) or opt-1.3b "
                    "(the seed recipe, GPU)", section="Recipe"),
    "actor_model": _opt("string", "Actor: hub id or directory (empty: preset)", "Models", minLength=1),
    "reward_model": _opt("string", "Reward model: hub id or directory (empty: preset)", "Models", minLength=1),
    "datasets": _opt("array", "Datasets: hub ids, sample:<id>, <id>=<dir> or local files", "Data",
                     items={"type": "string", "minLength": 1}, minItems=1),
    "data_split": _opt("string", "SFT,RM,PPO shares, e.g. 2,4,4", "Data",
                       pattern=r"^\s*\d+(\.\d+)?\s*,\s*\d+(\.\d+)?\s*,\s*\d+(\.\d+)?\s*$"),
    "max_seq_len": _opt("integer", "Max prompt+answer tokens", "Data", minimum=16, maximum=32768),
    "sft_epochs": _opt("integer", "SFT epochs", "Step 1: SFT", minimum=1, maximum=100),
    "sft_batch_size": _opt("integer", "SFT micro-batch per GPU", "Step 1: SFT", minimum=1, maximum=1024),
    "sft_learning_rate": _opt("number", "SFT learning rate", "Step 1: SFT", exclusiveMinimum=0, maximum=1),
    "sft_lora_dim": _opt("integer", "SFT LoRA dim (0 = full fine-tuning)", "Step 1: SFT", minimum=0, maximum=4096),
    "sft_zero_stage": _opt("integer", "SFT ZeRO stage", "Step 1: SFT", enum=[None, 0, 1, 2, 3]),
    "rm_epochs": _opt("integer", "RM epochs", "Step 2: reward model", minimum=1, maximum=100),
    "rm_batch_size": _opt("integer", "RM micro-batch (pairs) per GPU", "Step 2: reward model", minimum=1,
                          maximum=1024),
    "rm_learning_rate": _opt("number", "RM learning rate", "Step 2: reward model", exclusiveMinimum=0, maximum=1),
    "rm_zero_stage": _opt("integer", "RM ZeRO stage", "Step 2: reward model", enum=[None, 0, 1, 2, 3]),
    "ppo_epochs": _opt("integer", "Passes over the PPO prompts", "Step 3: PPO", minimum=1, maximum=100),
    "ppo_max_steps": _opt("integer", "Cap on PPO iterations (0 = no cap)", "Step 3: PPO", minimum=0),
    "ppo_batch_size": _opt("integer", "Prompts per rollout per GPU", "Step 3: PPO", minimum=1, maximum=1024),
    "actor_learning_rate": _opt("number", "Actor learning rate", "Step 3: PPO", exclusiveMinimum=0, maximum=1),
    "critic_learning_rate": _opt("number", "Critic learning rate", "Step 3: PPO", exclusiveMinimum=0, maximum=1),
    "actor_lora_dim": _opt("integer", "Actor LoRA dim", "Step 3: PPO", minimum=0, maximum=4096),
    "actor_zero_stage": _opt("integer", "Actor ZeRO stage", "Step 3: PPO", enum=[None, 0, 1, 2, 3]),
    "critic_zero_stage": _opt("integer", "Critic ZeRO stage", "Step 3: PPO", enum=[None, 0, 1, 2, 3]),
    "kl_coef": _opt("number", "KL penalty coefficient", "Step 3: PPO", minimum=0, maximum=10),
    "dtype": _opt("string", "Training precision of all three steps", "Hardware", enum=[None, "bf16", "fp16", "fp32"]),
    "num_gpus": _opt("integer", "GPUs per node for each training stage (cost.num_gpus; >1 uses the deepspeed "
                     "launcher; nodes: cost.num_nodes and cost.hostfile in overrides)", "Hardware", minimum=1,
                     maximum=64),
    "gpu_hourly_usd": _opt("number", "Price of one GPU-hour, for cost/usd", "Hardware", minimum=0, maximum=1000),
    "overrides": Param([], type="array", items={"type": "string", "pattern": r"^[A-Za-z_][\w.]*=.*$"},
                       description="Any other config key: section.key=value (e.g. ppo.cliprange=0.1)",
                       section="Advanced"),
}


def _overrides(p: dict) -> list[str]:
    """Trigger-form values -> ``key=value`` overrides (JSON is valid YAML)."""
    import json

    out = [f"{key}={json.dumps(p[name])}" for name, key in FORM_TO_CONFIG.items() if p.get(name) is not None]
    if p.get("dtype"):
        out += [f"{k}={p['dtype']}" for k in DTYPE_KEYS]
    return out + list(p.get("overrides") or [])


def _run(stage: str, run_dir: str, **kw) -> dict:
    import logging

    from rlhf_tasks.launch import run_stage

    ctx = get_current_context()
    ti, dag_run = ctx["ti"], ctx["dag_run"]
    env = {"AIRFLOW_CTX_DAG_ID": ti.dag_id, "AIRFLOW_CTX_DAG_RUN_ID": dag_run.run_id,
           "AIRFLOW_CTX_TASK_ID": ti.task_id, "AIRFLOW_CTX_TRY_NUMBER": str(ti.try_number)}
    # GPUs, nodes and hostfile come from the run's resolved config.yaml (the form's
    # num_gpus is one override of cost.num_gpus), read by the launcher itself.
    return run_stage(stage, run_dir, env=env, echo=logging.getLogger("airflow.task").info, **kw)


gpu_task = dict(queue=GPU_QUEUE, pool=GPU_POOL, retries=RETRIES, retry_delay=RETRY_DELAY,
                execution_timeout=STAGE_TIMEOUT)

with DAG(
    dag_id="rlhf_pipeline",
    doc_md=__doc__,
    schedule=schedule,
    start_date=None,
    catchup=False,
    max_active_runs=1,
    params=params,
    tags=["rlhf", "deepspeed", "mlflow"],
    default_args={"owner": "ml-platform"},
) as dag:

    @task(queue=GPU_QUEUE, retries=1, execution_timeout=timedelta(hours=2))
    def install() -> dict:
        """Check the worker, resolve the config, cache data and models, open the MLflow run."""
        from rlhf_tasks.storage import run_dir_for

        ctx = get_current_context()
        run_dir = run_dir_for(ctx["dag_run"].run_id)  # a run id with "/" or ".." stays inside storage
        return _run("prepare", str(run_dir), preset=ctx["params"]["preset"], overrides=_overrides(ctx["params"]))

    @task(**gpu_task)
    def sft(prep: dict) -> dict:
        """Step 1: supervised fine-tuning."""
        return _run("sft", prep["run_dir"])

    @task(**gpu_task)
    def reward_model(prep: dict) -> dict:
        """Step 2: reward model."""
        return _run("reward", prep["run_dir"])

    @task(**gpu_task)
    def ppo(prep: dict, sft_result: dict, rm_result: dict) -> dict:
        """Step 3: PPO."""
        return _run("ppo", prep["run_dir"])

    @task(**gpu_task)
    def evaluate(prep: dict, ppo_result: dict) -> dict:
        """SFT vs PPO actor on held-out prompts."""
        return _run("evaluate", prep["run_dir"])

    @task(retries=RETRIES, retry_delay=RETRY_DELAY, execution_timeout=timedelta(hours=1))
    def register(prep: dict, eval_result: dict) -> dict:
        """Report, model registry, champion alias."""
        return _run("register", prep["run_dir"])

    prep = install()
    register(prep, evaluate(prep, ppo(prep, sft(prep), reward_model(prep))))
