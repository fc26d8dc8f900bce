"""The DAG file: thin, parse-safe, the right graph, a trigger form that refuses bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import DAG_FILE, load_dag_module


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    return load_dag_module("rlhf_pipeline_dag").dag


def test_parse_is_light_and_offline(tmp_path):
    """Parsing imports no ML library and opens no socket or database."""
    probe = f"""
import socket, sys, importlib.util
def refuse(*a, **k):
    raise AssertionError("network or database access at parse time")
socket.socket.connect = refuse
socket.create_connection = refuse
spec = importlib.util.spec_from_file_location("d", {str(DAG_FILE)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
heavy = sorted(k for k in ("torch", "deepspeed", "transformers", "datasets", "mlflow", "peft") if k in sys.modules)
print(heavy)
"""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/missing/dir/nope.db"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_task_graph(dag):
    upstream = {t: sorted(x.task_id for x in dag.task_dict[t].upstream_list) for t in dag.task_dict}
    assert upstream == {
        "install": [],
        "sft": ["install"],
        "reward_model": ["install"],
        "ppo": ["install", "reward_model", "sft"],
        "evaluate": ["install", "ppo"],
        "register": ["evaluate", "install"],
    }
    for t in ("sft", "reward_model", "ppo", "evaluate"):
        task = dag.task_dict[t]
        assert task.queue == "gpu" and task.pool == "gpu"
        assert task.retries >= 1 and task.execution_timeout is not None
    assert dag.task_dict["install"].queue == "gpu"  # it checks the GPU worker itself
    assert dag.task_dict["register"].queue != "gpu"
    assert dag.doc_md and "RLHF pipeline" in dag.doc_md


def test_schedule_is_data_aware(dag):
    """Off by default except for new preference data; a cron timetable only when asked."""
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["rlhf_preference_data"]


def test_retraining_cron_is_opt_in(tmp_path):
    probe = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("d", {str(DAG_FILE)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(type(m.dag.timetable).__name__)
"""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "RLHF_RETRAIN_CRON": "0 3 * * 1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "AssetOrTimeSchedule", out.stderr[-2000:]


@pytest.mark.parametrize("name, bad", [
    ("preset", "gpt-5"),
    ("sft_epochs", 0),
    ("sft_epochs", "three"),
    ("sft_learning_rate", 0),
    ("sft_learning_rate", 5),
    ("sft_zero_stage", 4),
    ("data_split", "2,4"),
    ("dtype", "fp8"),
    ("num_gpus", 0),
    ("kl_coef", -1),
    ("datasets", []),
    ("overrides", ["no equals sign"]),
])
def test_form_rejects_bad_values(dag, name, bad):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(bad)


def test_form_accepts_good_values_and_maps_to_config(dag, tmp_path):
    from rlhf_tasks.config import PipelineConfig

    good = {"sft_epochs": 2, "sft_learning_rate": 1e-4, "data_split": "2,4,4", "dtype": "bf16",
            "datasets": ["sample:Dahoas/rm-static"], "overrides": ["ppo.cliprange=0.1"], "kl_coef": 0.05}
    for k, v in good.items():
        dag.params.get_param(k).resolve(v)
    module = load_dag_module("rlhf_pipeline_dag2")
    params = {k: None for k in module.FORM_TO_CONFIG} | good
    overrides = module._overrides(params)
    cfg = PipelineConfig.load("opt-1.3b", overrides)
    assert cfg.sft.epochs == 2 and cfg.sft.learning_rate == 1e-4 and cfg.ppo.cliprange == 0.1
    assert cfg.sft.dtype == cfg.reward.dtype == cfg.ppo.dtype == "bf16" and cfg.ppo.kl_coef == 0.05
    assert cfg.data.datasets == ["sample:Dahoas/rm-static"]
    # Every form field maps onto a real config key.
    for key in module.FORM_TO_CONFIG.values():
        section, field = key.split(".")
        assert field in getattr(cfg, section).__dataclass_fields__
