"""
# Ingest preference data → retrain

An example producer for data-aware retraining. Point it at a directory of new
prompt/chosen/rejected files (json, jsonl, parquet or csv); it validates them with the
pipeline's own readers and, if they are sound, updates the `rlhf_preference_data` asset,
which triggers `rlhf_pipeline`.

Any other system can do the same through the REST API:

```
curl -X POST "$AIRFLOW/api/v2/assets/events" -H "Authorization: Bearer $TOKEN" \\
     -H 'Content-Type: application/json' \\
     -d '{"asset_id": <id of rlhf_preference_data>, "extra": {"path": "/data/prefs/2026-11-24.jsonl"}}'
```
"""

from __future__ import annotations

import os

from airflow.sdk import DAG, Asset, Param, task

preference_data = Asset(name="rlhf_preference_data",
                        uri=os.environ.get("RLHF_PREFERENCE_DATA_URI", "file:///rlhf/preference-data"))

with DAG(
    dag_id="ingest_preferences",
    doc_md=__doc__,
    schedule=None,
    catchup=False,
    params={"path": Param("", type="string", minLength=1, description="File or directory of new preference pairs")},
    tags=["rlhf", "data"],
) as dag:

    @task(outlets=[preference_data])
    def validate_and_publish(params=None, outlet_events=None):
        """Read the files with the pipeline's readers; fail (no asset event) if malformed."""
        from rlhf_tasks.data import load_pairs, resolve_spec

        path = params["path"]
        splits, reports = load_pairs(resolve_spec(path), seed=0)
        rows = {name: len(ds) for name, ds in splits.items()}
        outlet_events[preference_data].extra = {"path": path, "rows": rows}
        return {"path": path, "rows": rows, "reports": [str(r) for r in reports]}

    validate_and_publish()
