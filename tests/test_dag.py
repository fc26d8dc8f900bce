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
        "rm": ["install"],
        "algorithm": ["install"],
        "ppo": ["algorithm", "install", "rm", "sft"],
        "grpo": ["algorithm", "install", "rm", "sft"],
        "rloo": ["algorithm", "install", "rm", "sft"],
        # DPO ranks its generated pairs with the reward model; on the dataset's pairs it needs none, but
        # evaluate does: every step-3 task waits for rm, which skips itself in a run that needs no RM.
        "dpo": ["algorithm", "install", "rm", "sft"],
        "kto": ["algorithm", "install", "rm", "sft"],
        "evaluate": ["dpo", "grpo", "install", "kto", "ppo", "rloo", "rm"],
        "register": ["evaluate", "install"],
        "approval_conf": ["register"],
        "request_approval": ["approval_conf"],
    }
    # One alignment step runs; evaluate runs after it although the other three were skipped.
    assert dag.task_dict["evaluate"].trigger_rule == "none_failed_min_one_success"
    # The step-3 tasks are the algorithm table's rows.
    from rlhf_tasks.config import ALGORITHMS

    assert set(ALGORITHMS) <= set(dag.task_dict)
    assert all(dag.task_dict[a].trigger_rule == "none_failed_min_one_success" for a in ALGORITHMS)
    # A champion waiting for a person waits in a run of its own, on no GPU queue or pool.
    trigger = dag.task_dict["request_approval"]
    assert trigger.trigger_dag_id == "rlhf_champion_approval" and not trigger.wait_for_completion
    assert {dag.task_dict[t].queue for t in ("approval_conf", "request_approval")} == {"default"}
    assert {dag.task_dict[t].pool for t in ("approval_conf", "request_approval")} == {"default_pool"}
    for t in ("sft", "rm", *ALGORITHMS, "evaluate"):
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
    ("sft.epochs", 0),
    ("sft.epochs", "three"),
    ("sft.learning_rate", 0),
    ("sft.learning_rate", 5),
    ("sft.zero_stage", 4),
    ("data.data_split", "2,4"),
    ("sft.dtype", "fp8"),
    ("resources.num_gpus", 0),
    ("resources.cpu_processes", 0),
    ("resources.collective_timeout_minutes", 0),
    ("ppo.kl_coef", -1),
    ("ppo.actor.learning_rate", 1),
    ("data.datasets", []),
    ("overrides", ["no equals sign"]),
])
def test_form_rejects_bad_values(dag, name, bad):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(bad)


def test_form_fields_are_config_paths_with_the_configs_own_schema(dag, tmp_path):
    """Form field = config path; filled-in fields go to the config as one typed dict."""
    from rlhf_tasks.config import ConfigError, PipelineConfig, flatten

    good = {"sft.epochs": 2, "sft.learning_rate": 1e-4, "data.data_split": "2,4,4", "rm.dtype": "bf16",
            "data.datasets": ["sample:Dahoas/rm-static"], "overrides": ["ppo.cliprange=0.1"], "ppo.kl_coef": 0.05,
            "ppo.actor.learning_rate": 2e-6, "resources.num_gpus": 2}
    for k, v in good.items():
        assert dag.params.get_param(k).resolve(v) == v
    module = load_dag_module("rlhf_pipeline_dag2")
    params = {k: None for k in dag.params} | good
    values = module.form_values(params)
    assert "overrides" not in values and values["resources.num_gpus"] == 2
    cfg = PipelineConfig.load("opt-1.3b", values, params["overrides"])
    assert cfg.sft.epochs == 2 and cfg.sft.learning_rate == 1e-4 and cfg.ppo.cliprange == 0.1
    assert cfg.rm.dtype == "bf16" and cfg.sft.dtype == "fp16" and cfg.ppo.kl_coef == 0.05
    assert cfg.ppo.actor.learning_rate == 2e-6 and cfg.ppo.critic.learning_rate == 5e-6
    assert cfg.data.datasets == ["sample:Dahoas/rm-static"] and cfg.resources.num_gpus == 2
    # Every form field is a config path, and the form's bounds are the config's: a value the
    # form refuses, the config refuses too (and the other way round).
    paths = set(flatten(cfg.to_dict()))
    fields = [k for k in dag.params if k not in ("preset", "overrides")]
    assert set(fields) <= paths, set(fields) - paths
    assert dag.params.get_param("sft.learning_rate").schema["exclusiveMaximum"] == 1
    assert dag.params.get_param("sft.zero_stage").schema["enum"] == [None, 0, 1, 2, 3]
    # A REST trigger's conf key that is no field (an old name) is refused, not silently dropped.
    with pytest.raises(ConfigError, match=r"unknown trigger conf key\(s\) \['num_gpus'\]"):
        module.form_values(params | {"num_gpus": 2})


def test_install_writes_the_form_into_the_run_config_and_fails_bad_input_without_retry(dag, monkeypatch, tmp_path):
    """The install task resolves the form's typed values into the run's config.yaml before
    it launches anything; a value the config refuses fails the task for good (no retry),
    with the field named."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from rlhf_tasks.config import PipelineConfig

    module = load_dag_module("rlhf_pipeline_dag_install")
    monkeypatch.setenv("RLHF_STORAGE", str(tmp_path))
    launched: list[tuple] = []
    monkeypatch.setattr(module, "_run", lambda stage, run_dir, **kw: launched.append((stage, run_dir)) or {})
    params = {k: None for k in module.dag.params} | {"preset": "tiny-cpu", "overrides": ["ppo.cliprange=0.3"],
                                                     "ppo.actor.learning_rate": 3e-5}
    context = {"params": params, "dag_run": SimpleNamespace(run_id="manual__one")}
    monkeypatch.setattr(module, "get_current_context", lambda: context)
    install = module.dag.task_dict["install"].python_callable
    prep = install()
    (stage, run_dir), = launched
    cfg = PipelineConfig.load(f"{run_dir}/config.yaml")
    assert stage == "prepare" and cfg.ppo.actor.learning_rate == 3e-5 and cfg.ppo.cliprange == 0.3
    assert prep["algorithm"] == "ppo" and prep["needs_rm"] is True  # the rm task reads it

    context["params"] = params | {"overrides": ["rm.zero_stage=4"]}
    context["dag_run"] = SimpleNamespace(run_id="manual__two")
    with pytest.raises(AirflowFailException, match=r"rm.zero_stage=4 is invalid: 0, 1, 2 or 3"):
        install()
    assert len(launched) == 1 and not (tmp_path / "runs" / "manual__two" / "config.yaml").exists()


def test_a_run_started_by_a_labelling_batch_is_told_apart(dag):
    from types import SimpleNamespace

    module = load_dag_module("rlhf_pipeline_dag_labels")
    human = {"rlhf_preference_data": [SimpleNamespace(extra={"source": "human", "rows": 4})]}
    ingest = {"rlhf_preference_data": [SimpleNamespace(extra={"path": "/data/new.jsonl"})]}
    assert module._labelled_by_people({"triggering_asset_events": human})
    assert not module._labelled_by_people({"triggering_asset_events": ingest})
    assert not module._labelled_by_people({})


def test_the_rm_task_skips_itself_when_the_reward_needs_no_reward_model(monkeypatch):
    from airflow.sdk.exceptions import AirflowSkipException

    module = load_dag_module("rlhf_pipeline_dag_rm_skip")
    launched: list[str] = []
    monkeypatch.setattr(module, "_run", lambda stage, run_dir, **kw: launched.append(stage) or {})
    rm = module.dag.task_dict["rm"].python_callable
    with pytest.raises(AirflowSkipException, match="reward.source is verifier"):
        rm({"run_dir": "/x", "needs_rm": False})
    rm({"run_dir": "/x", "needs_rm": True})
    assert launched == ["rm"]
