"""
# Champion approval: a person decides whether a candidate becomes `champion`

Triggered by `rlhf_pipeline`'s `request_approval` task when the run's config says
`tracking.champion_approval: human`; one run per candidate, so a candidate waiting for a
person never blocks the next retraining run (which has `max_active_runs=1`), and no task
here holds a GPU slot.

| task | what it does |
|---|---|
| `summarise` | candidate vs current champion vs SFT (held-out average reward, KL, win rate, cost) and answers side by side, from the run directory and the registry |
| `decide` | human-in-the-loop: **Promote** or **Reject**; no answer within `tracking.approval_timeout_minutes` keeps the current champion |
| `apply_decision` | moves the `champion` alias on Promote; tags the model version with the decision, who and when; updates the run report |

Answer from a script: `PATCH /api/v2/dags/rlhf_champion_approval/dagRuns/<run>/taskInstances/decide/-1/hitlDetails`
with `{"chosen_options": ["Promote"]}`.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import DAG, Param, get_current_context, task

DAG_ID = "rlhf_champion_approval"


class ChampionApproval(HITLOperator):
    """Promote / Reject, with the subject, body and response timeout of this candidate
    (they come from the run's config and metrics, known only at run time)."""

    def execute(self, context):
        summary = context["ti"].xcom_pull(task_ids="summarise")
        self.subject, self.body = summary["subject"], summary["body"]
        self.response_timeout = timedelta(minutes=float(summary["timeout_minutes"]))
        return super().execute(context)


with DAG(
    dag_id=DAG_ID,
    doc_md=__doc__,
    schedule=None,
    start_date=None,
    catchup=False,
    params={"pipeline_run_id": Param("", type="string", minLength=1,
                                     description="The rlhf_pipeline run whose candidate is to be approved")},
    tags=["rlhf", "human-in-the-loop", "registry"],
    default_args={"owner": "ml-platform"},
) as dag:

    @task(retries=2, retry_delay=timedelta(seconds=30))
    def summarise() -> dict:
        """The request: candidate vs champion vs SFT, a few answers side by side."""
        from rlhf_tasks.pipeline.approval import request
        from rlhf_tasks.storage import RunDir, run_dir_for

        run = RunDir(run_dir_for(get_current_context()["params"]["pipeline_run_id"]))
        return request(run, os.environ.get("MLFLOW_TRACKING_URI"))

    # Reject is the default: Airflow applies it, with no respondent, when the timeout passes.
    decide = ChampionApproval(task_id="decide", subject="Promote the candidate to champion?",
                              options=["Promote", "Reject"], defaults=["Reject"], multiple=False)

    @task(retries=2, retry_delay=timedelta(seconds=30))
    def apply_decision(summary: dict) -> dict:
        """Move the alias (Promote) or not; the decision, who and when into tags and report."""
        from rlhf_tasks.pipeline.approval import apply
        from rlhf_tasks.storage import RunDir

        ctx = get_current_context()
        response = ctx["ti"].xcom_pull(task_ids="decide")
        if not (uri := os.environ.get("MLFLOW_TRACKING_URI")):
            raise RuntimeError("champion approval needs the MLflow registry: set MLFLOW_TRACKING_URI on the workers")
        return apply(RunDir(summary["run_dir"]), response, uri)

    summary = summarise()
    summary >> decide
    apply_decision(summary) << decide
