"""
# RLHF pipeline: SFT → reward model → step 3 (the form's `algorithm`) → evaluate → register

Three-step RLHF in the spirit of DeepSpeed-Chat, on DeepSpeed and Hugging Face, with the
alignment step chosen by the form's `algorithm` field.

| task | what it does | where |
|---|---|---|
| `install` | checks the worker (packages, torch/CUDA, DeepSpeed ops, disk), resolves the config, validates and caches models and data, opens the MLflow parent run | `gpu` queue |
| `sft` | step 1: supervised fine-tuning of the actor (perplexity) | `gpu` queue, `gpu` pool |
| `rm` | step 2: reward model on preference pairs (accuracy, chosen/rejected scores); skipped when `reward.source` is `verifier` | `gpu` queue, `gpu` pool |
| `algorithm` | picks step 3 from the config's `algorithm`; the other step-3 tasks are skipped | default queue |
| one task per algorithm | step 3 (the algorithms below, from rlhf_tasks/config/algorithms.py) | `gpu` queue, `gpu` pool |
| `evaluate` | SFT vs the aligned actor on held-out prompts (the run's reward: RM and/or verifier; the verifier's accuracy per category), samples side by side | `gpu` queue, `gpu` pool |
| `register` | run report (time, cost, metrics per step), MLflow model version, `champion` alias if better | default queue |
| `request_approval` | with `tracking.champion_approval: human` only: triggers `rlhf_champion_approval`, where a person promotes or rejects the candidate; this run ends at once | default queue |

`sft` and `rm` do not depend on each other: with 2 slots in the `gpu` pool they
run side by side. Every stage writes to `$RLHF_STORAGE/runs/<run id>/<stage>/`; a retried
stage resumes from its newest complete checkpoint and continues the same MLflow run; a
finished stage is not run again.

**Several ranks**: `resources.num_gpus` (GPUs per node; `resources.cpu_processes` on a CPU
run) x `resources.num_nodes` processes run each of `sft`, `rm`, step 3 and `evaluate`, started
by DeepSpeed's launcher; a rank that waits in a collective for
`resources.collective_timeout_minutes` fails the task, naming the stage, phase and rank.

**Trigger form**: pick a preset, then override what you need. Each field is named by its
config path (`sft.learning_rate`), the same name as in the presets, `--set` and MLflow's
parameters; empty fields keep the preset's value; `overrides` takes any other config key as
`section.key=value`.

**Retraining**: the DAG runs whenever the `rlhf_preference_data` asset is updated (a producer
task with `outlets=[preference_data]`, e.g. `dags/ingest_preferences.py`, or
`POST /api/v2/assets/events` with the asset's id), and on the cron schedule in
`RLHF_RETRAIN_CRON` when that variable is set (off by default). A run started by a labelling
batch (`rlhf_label_preferences`, event extra `source: human`) adds the preference store,
`human:`, to `data.datasets` when the config does not name it.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    get_current_context,
    task,
)

# Light: pydantic and yaml, which Airflow loads anyway; the algorithm table is plain data.
from rlhf_tasks.config import ALGORITHMS, form_schema, list_presets

GPU_QUEUE = os.environ.get("RLHF_GPU_QUEUE", "gpu")
GPU_POOL = os.environ.get("RLHF_GPU_POOL", "gpu")
STAGE_TIMEOUT = timedelta(hours=float(os.environ.get("RLHF_STAGE_TIMEOUT_H", "24")))
RETRIES = int(os.environ.get("RLHF_STAGE_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("RLHF_RETRY_DELAY_S", "60")))
PRESETS = list_presets()

preference_data = Asset(name="rlhf_preference_data",
                        uri=os.environ.get("RLHF_PREFERENCE_DATA_URI", "file:///rlhf/preference-data"))
_cron = os.environ.get("RLHF_RETRAIN_CRON", "").strip()
schedule = (AssetOrTimeSchedule(timetable=CronTriggerTimetable(_cron, timezone="UTC"), assets=[preference_data])
            if _cron else [preference_data])


# The form's fields: config paths by form section, step 3's from the algorithm table. Types,
# bounds, enums and descriptions come from the config models (rlhf_tasks/config/), so the
# form cannot drift from the config.
FORM = {
    "Recipe": ["algorithm"],
    "Models": ["model.actor", "model.rm", "model.chat_template"],
    "Data": ["data.datasets", "data.data_split", "data.max_seq_len"],
    "Step 1: SFT": ["sft.epochs", "sft.per_device_train_batch_size", "sft.learning_rate", "sft.lora_dim",
                    "sft.zero_stage", "sft.dtype"],
    "Step 2: reward model": ["rm.epochs", "rm.per_device_train_batch_size", "rm.learning_rate", "rm.zero_stage",
                             "rm.dtype"],
    **{f"Step 3: {a.title}": [f"{a.name}.{k}" for k in a.form] for a in ALGORITHMS.values()},
    "Reward": ["reward.source", "reward.verifier_coef", "reward.length_coef", "reward.repetition_coef",
               "reward.overlong_buffer"],
    "Hardware": ["resources.num_gpus", "resources.cpu_processes", "resources.gpu_hourly_usd",
                 "resources.budget_usd", "resources.budget_gpu_hours",
                 "resources.collective_timeout_minutes"],
}

params = {
    "preset": Param("tiny-cpu", enum=PRESETS, description="Named config: tiny-cpu (CPU, minutes) or opt-1.3b "
                    "(the seed recipe, GPU)", section="Recipe"),
    **{path: Param(None, **schema) for path, schema in form_schema(FORM).items()},
    "overrides": Param([], type="array", items={"type": "string", "pattern": r"^[A-Za-z_][\w.]*=.*$"},
                       description="Any other config key: section.key=value (e.g. ppo.cliprange=0.1, "
                       "resources.num_nodes=2)", section="Advanced"),
}


def form_values(p: dict) -> dict:
    """The trigger form's filled-in fields, by config path (typed: no string round-trip). A
    conf key that is not a field (a REST trigger's typo, an old name) is refused, not ignored."""
    from rlhf_tasks.config import ConfigError

    if unknown := sorted(set(p) - set(params)):
        raise ConfigError(f"unknown trigger conf key(s) {unknown}: the fields are {sorted(params)}; any other "
                          "config key goes in overrides as section.key=value")
    return {path: p[path] for section in FORM.values() for path in section if p.get(path) is not None}


def _labelled_by_people(ctx) -> bool:
    """Whether an asset event that started this run came from the labelling DAG."""
    events = ctx.get("triggering_asset_events") or {}
    return any((e.extra or {}).get("source") == "human" for evs in events.values() for e in evs)


def _run(stage: str, run_dir: str, **kw) -> dict:
    import logging

    from rlhf_tasks.pipeline.launch import StageFailed, run_stage
    from rlhf_tasks.runtime.budget import EXIT_OVER_BUDGET

    ctx = get_current_context()
    ti, dag_run = ctx["ti"], ctx["dag_run"]
    env = {"AIRFLOW_CTX_DAG_ID": ti.dag_id, "AIRFLOW_CTX_DAG_RUN_ID": dag_run.run_id,
           "AIRFLOW_CTX_TASK_ID": ti.task_id, "AIRFLOW_CTX_TRY_NUMBER": str(ti.try_number)}
    # GPUs, nodes and hostfile come from the run's resolved config.yaml (resources.*),
    # read by the launcher itself.
    try:
        return run_stage(stage, run_dir, env=env, echo=logging.getLogger("airflow.task").info, **kw)
    except StageFailed as e:
        if e.code == EXIT_OVER_BUDGET:  # the run spent its budget: a retry would spend more
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"stage {stage} stopped: the run is over its budget "
                                       f"(resources.budget_usd / budget_gpu_hours); see the report\n{e}") from None
        raise


gpu_task = dict(queue=GPU_QUEUE, pool=GPU_POOL, retries=RETRIES, retry_delay=RETRY_DELAY,
                execution_timeout=STAGE_TIMEOUT)

with DAG(
    dag_id="rlhf_pipeline",
    doc_md=__doc__ + "\n**Step 3** (`algorithm`):\n\n" + "\n".join(
        f"- `{a.name}`: {a.summary}" for a in ALGORITHMS.values()),
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
        """Resolve the config, check the worker, cache data and models, open the MLflow run."""
        from airflow.sdk.exceptions import AirflowFailException

        from rlhf_tasks.config import ConfigError, PipelineConfig
        from rlhf_tasks.runtime.run_config import resolve_run_config
        from rlhf_tasks.storage import run_dir_for

        ctx = get_current_context()
        p = ctx["params"]
        run_dir = run_dir_for(ctx["dag_run"].run_id)  # a run id with "/" or ".." stays inside storage
        # The form's values go into the run's config.yaml as they are; every stage reads that file.
        try:
            values, overrides = form_values(p), list(p.get("overrides") or [])
            cfg = PipelineConfig.load(p["preset"], values, overrides)
            if _labelled_by_people(ctx):  # retraining after a labelling batch trains on the labels
                from rlhf_tasks.feedback.store import with_human_store

                values["data.datasets"] = with_human_store(cfg.data.datasets)
                cfg = PipelineConfig.load(p["preset"], values, overrides)
            resolve_run_config(run_dir, cfg)
        except ConfigError as e:  # bad input: a retry cannot fix it
            raise AirflowFailException(f"invalid configuration: {e}") from None
        return {**_run("prepare", str(run_dir)), "algorithm": cfg.algorithm, "needs_rm": cfg.needs_reward_model()}

    @task(**gpu_task)
    def sft(prep: dict) -> dict:
        """Step 1: supervised fine-tuning."""
        return _run("sft", prep["run_dir"])

    @task(**gpu_task)
    def rm(prep: dict) -> dict:
        """Step 2: reward model; skipped when the run's reward needs none (a verifier's)."""
        if not prep.get("needs_rm", True):
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException("reward.source is verifier: this run trains no reward model")
        return _run("rm", prep["run_dir"])

    @task.branch
    def algorithm(prep: dict) -> str:
        """Step 3 is the config's algorithm (resolved by install: the form, or the preset's)."""
        return prep["algorithm"]

    def step3(a) -> object:
        """The step-3 task of one algorithm of the table; it runs when the branch picks it,
        after SFT and the reward model (or with the reward model skipped: the run needs none)."""
        @task(task_id=a.name, doc_md=f"Step 3: {a.title}: {a.summary}", trigger_rule="none_failed_min_one_success",
              **gpu_task)
        def step(prep: dict) -> dict:
            return _run(a.name, prep["run_dir"])
        return step

    @task(**gpu_task, trigger_rule="none_failed_min_one_success")
    def evaluate(prep: dict) -> dict:
        """SFT vs the aligned actor on held-out prompts: the run's reward (reward model and/or
        verifier) and the verifier's accuracy."""
        return _run("evaluate", prep["run_dir"])

    @task(retries=RETRIES, retry_delay=RETRY_DELAY, execution_timeout=timedelta(hours=1))
    def register(prep: dict, eval_result: dict) -> dict:
        """Report, model registry, champion alias."""
        return _run("register", prep["run_dir"])

    @task
    def approval_conf(reg: dict) -> dict:
        """The approval run's conf, or skip (nothing to approve: the alias moved by itself)."""
        from airflow.sdk.exceptions import AirflowSkipException

        if (reg.get("registered") or {}).get("approval") != "pending":
            raise AirflowSkipException("tracking.champion_approval is auto: the champion alias was decided by register")
        return {"pipeline_run_id": get_current_context()["dag_run"].run_id}

    prep = install()
    trained = [sft(prep), rm(prep)]
    choice = algorithm(prep)
    steps = [step3(a)(prep) for a in ALGORITHMS.values()]
    for step in steps:
        [choice, *trained] >> step
    done = evaluate(prep)
    [*steps, trained[1]] >> done
    registered = register(prep, done)
    # The decision waits in a run of its own: this run (max_active_runs=1) finishes, the
    # next retraining can start, and no GPU slot is held while a person thinks.
    TriggerDagRunOperator(task_id="request_approval", trigger_dag_id="rlhf_champion_approval",
                          conf=approval_conf(registered), trigger_run_id="approve__{{ run_id }}",
                          wait_for_completion=False, skip_when_already_exists=True)
