"""
# Label answer pairs → preference data → retraining

People judge pairs of model answers; their judgements become preference rows that retrain
the reward model.

| task | what it does | where |
|---|---|---|
| `generate` | checks the form, loads the prompts and the two models, samples two answers per prompt, drops pairs whose answers are identical | `gpu` queue, `gpu` pool |
| `label` | one human-in-the-loop request per pair (and per labeller): the prompt and both answers, in a recorded random order; *A better*, *B better*, *Tie*, *Both bad*, *Skip* | no worker, no pool slot while waiting |
| `write_preferences` | writes answered pairs to `$RLHF_STORAGE/preferences/human/<run>.jsonl` with provenance, counts ties / both bad / skips, logs the batch to MLflow, updates `rlhf_preference_data` (which triggers `rlhf_pipeline`) | default queue |

**Form**: `pairs` (how many prompts), `model` (the `champion` alias by default, a version such as
`3`, `newest`, `run:<MLflow run id>`, or a model directory), `compare_with` (`newest` version,
another reference, or `self` for two samples of one model), `prompts` (`held-out`: the held-out
prompts of the preset's datasets; or the path of a `.txt`/`.json`/`.jsonl` file on the workers),
`labellers` (user ids; empty: anyone allowed on this DAG) and `labels_per_pair` (2 or more: that
many different people judge each pair, and their agreement is reported).

**Answer** in the UI (*Required actions*, or the task's page) or from a script:
`PATCH /api/v2/dags/rlhf_label_preferences/dagRuns/<run>/taskInstances/label/<map index>/hitlDetails`
with `{"chosen_options": ["A better"]}`. A request answers once; a user who is not assigned is
refused. Unanswered requests count as unanswered after `RLHF_LABEL_TIMEOUT_H` hours (default 72).
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import DAG, Asset, Param, get_current_context, task

GPU_QUEUE = os.environ.get("RLHF_GPU_QUEUE", "gpu")
GPU_POOL = os.environ.get("RLHF_GPU_POOL", "gpu")
LABEL_TIMEOUT = timedelta(hours=float(os.environ.get("RLHF_LABEL_TIMEOUT_H", "72")))
# The labelling options, as in rlhf_tasks/feedback/labels.py (not imported: DAG files stay light).
OPTIONS = ["A better", "B better", "Tie", "Both bad", "Skip"]

preference_data = Asset(name="rlhf_preference_data",
                        uri=os.environ.get("RLHF_PREFERENCE_DATA_URI", "file:///rlhf/preference-data"))
_cron = os.environ.get("RLHF_LABEL_CRON", "").strip() or None

params = {
    "pairs": Param(8, type="integer", minimum=1, maximum=1000, description="How many prompts to put to people"),
    "model": Param("champion", type="string", minLength=1, description="The champion alias, a version (3), "
                   "newest, run:<MLflow run id>, or a model directory (builtin:tiny-opt)"),
    "compare_with": Param("newest", type="string", minLength=1, description="The second model: newest, another "
                          "reference, or self (two samples of the first model)"),
    "prompts": Param("held-out", type="string", minLength=1, description="held-out (the preset's held-out "
                     "prompts) or the path of a .txt/.json/.jsonl prompt file on the workers"),
    "labellers": Param([], type="array", items={"type": "string", "minLength": 1},
                       description="User ids who may answer (empty: anyone allowed on this DAG)"),
    "labels_per_pair": Param(1, type="integer", minimum=1, maximum=5,
                             description="How many different labellers judge each pair (2+: agreement is reported)"),
    "max_new_tokens": Param(48, type="integer", minimum=1, maximum=1024, description="Answer length, tokens"),
    "preset": Param("tiny-cpu", type="string", description="The config whose datasets, seed and registered "
                    "model name the batch uses"),
    "overrides": Param([], type="array", items={"type": "string"}, description="Config overrides key=value"),
}

with DAG(
    dag_id="rlhf_label_preferences",
    doc_md=__doc__,
    schedule=_cron,
    start_date=None,
    catchup=False,
    params=params,
    tags=["rlhf", "human-in-the-loop", "data"],
    default_args={"owner": "ml-platform"},
) as dag:

    @task(queue=GPU_QUEUE, pool=GPU_POOL, retries=0, execution_timeout=timedelta(hours=2))
    def generate() -> list[dict]:
        """Form -> two answers per prompt -> one request per pair and labeller."""
        from airflow.sdk.exceptions import AirflowFailException

        from rlhf_tasks.feedback.batch import prepare
        from rlhf_tasks.feedback.pairs import LabellingInputError

        ctx = get_current_context()
        try:
            return prepare(dict(ctx["params"]), ctx["dag_run"].run_id, os.environ.get("MLFLOW_TRACKING_URI"))
        except LabellingInputError as e:  # bad input: a retry cannot fix it, and nothing was written
            raise AirflowFailException(f"labelling request refused: {e}") from None

    requests = generate()
    label = HITLOperator.partial(
        task_id="label", options=OPTIONS, defaults=["Skip"], multiple=False, response_timeout=LABEL_TIMEOUT,
        map_index_template="{{ task.subject }}",
    ).expand_kwargs(requests)

    @task(outlets=[preference_data], trigger_rule="all_done_min_one_success")
    def write_preferences(requests: list[dict], outlet_events=None) -> dict:
        """Answered pairs -> the preference store (+ provenance), counts, MLflow, asset event."""
        from airflow.sdk.exceptions import AirflowSkipException

        from rlhf_tasks.feedback.batch import collect

        ctx = get_current_context()
        ti, run_id = ctx["ti"], ctx["dag_run"].run_id
        answers = [ti.xcom_pull(task_ids="label", map_indexes=i) for i in range(len(requests))]
        summary = collect(run_id, answers, os.environ.get("MLFLOW_TRACKING_URI"))
        if not summary["labelled"]:  # nothing new to train on: no asset event, no retraining
            raise AirflowSkipException(f"no pair was labelled A or B better: {summary}")
        outlet_events[preference_data].extra = {"path": summary["path"], "rows": summary["labelled"],
                                                "source": "human", "dag_run_id": run_id}
        return summary

    write_preferences(requests) << label
