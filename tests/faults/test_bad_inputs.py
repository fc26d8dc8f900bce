"""Bad and hostile inputs are refused before any training, with a message that names the
config field or the file at fault.

Each row of ``CASES`` runs the real CLI entry point (``rlhf_tasks.__main__.main``) in
this process: config values and model directories through a training stage (``sft`` or
``rm``), whose checks all run before the stage opens (``stage_run`` is booby-trapped
here: reaching it fails the test), and data files through ``prepare`` (the DAG's install
task, which reads and validates every dataset). Trigger-form values go through the DAG's
own Params validation. A few rows run as real processes, through the launcher the DAG
uses, to show that shell metacharacters, path traversal and remote code never reach a
shell, never write outside storage and never run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhf_tasks import __main__ as cli
from rlhf_tasks.runtime import stage as stage_module
from rlhf_tasks.storage import run_dir_for
from tests.conftest import load_dag_module

CANARY = "PWNED"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _model_dir(tmp: Path, name: str, config: dict | str | None, weights: bool = True) -> str:
    d = tmp / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        (d / "model.safetensors").write_bytes(b"\0" * 16)
    return str(d)


def _evil_model(tmp: Path) -> str:
    """A model directory whose config asks transformers to import its own Python file."""
    d = Path(_model_dir(tmp, "evil-model", {"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (d / "evil.py").write_text(f"open({str(tmp / CANARY)!r}, 'w').write('ran')\n")
    (d / "tokenizer.json").write_text("{}")
    return str(d)


def _empty_dir(tmp: Path) -> str:
    (tmp / "nothing-here").mkdir()
    return str(tmp / "nothing-here")


GOOD_ROW = {"prompt": "Human: hi Assistant:", "chosen": " hello", "rejected": " go away"}

# (id, stage, overrides(tmp) -> list[str], expected substrings (with {tmp})).
CASES = [
    # --- config values -------------------------------------------------------------------------
    ("lr-negative", "sft", lambda t: ["sft.learning_rate=-1e-4"], ["sft.learning_rate=-0.0001 is invalid", "(0, 1)"]),
    ("batch-zero", "sft", lambda t: ["sft.per_device_train_batch_size=0"],
     ["sft.per_device_train_batch_size=0 is invalid", ">= 1"]),
    ("unknown-key", "sft", lambda t: ["sft.lerning_rate=1e-4"],
     ["unknown config key 'sft.lerning_rate'", "did you mean 'sft.learning_rate'"]),
    ("dtype", "sft", lambda t: ["sft.dtype=fp8"], ["sft.dtype='fp8' is invalid", "'bf16'"]),
    ("zero-stage-4", "rm", lambda t: ["rm.zero_stage=4"], ["rm.zero_stage=4 is invalid", "0, 1, 2 or 3"]),
    ("split-two-parts", "sft", lambda t: ["data.data_split=2,4"], ["data.data_split='2,4' is invalid", "three"]),
    ("split-all-zero", "sft", lambda t: ["data.data_split=0,0,0"], ["data.data_split='0,0,0' is invalid"]),
    ("split-negative", "sft", lambda t: ["data.data_split=2,-4,4"], ["data.data_split='2,-4,4' is invalid"]),
    ("max-seq-len-tiny", "sft", lambda t: ["data.max_seq_len=4"], ["data.max_seq_len=4 is invalid", ">= 8"]),
    ("prompt-not-shorter", "sft", lambda t: ["data.max_prompt_seq_len=128"],
     ["data.max_prompt_seq_len=128 is invalid", "max_seq_len=128"]),
    ("not-a-number", "sft", lambda t: ["ppo.cliprange=wide"], ["ppo.cliprange='wide' is invalid: a number"]),
    ("float-for-int", "rm", lambda t: ["rm.epochs=1.5"], ["rm.epochs=1.5 is invalid: an integer"]),
    ("kl-negative", "sft", lambda t: ["ppo.kl_coef=-0.1"], ["ppo.kl_coef=-0.1 is invalid"]),
    ("top-p", "sft", lambda t: ["ppo.top_p=1.5"], ["ppo.top_p=1.5 is invalid", "(0, 1]"]),
    ("device", "sft", lambda t: ["device=tpu"], ["device='tpu' is invalid"]),
    ("offload-without-zero", "sft", lambda t: ["sft.offload=true"], ["sft.offload=True is invalid", "zero_stage"]),
    ("fp16-on-cpu", "sft", lambda t: ["sft.dtype=fp16"], ["sft.dtype='fp16' is invalid", "needs a GPU"]),
    ("nodes-without-hostfile", "sft", lambda t: ["resources.num_nodes=2"], ["resources.hostfile=None is invalid"]),
    ("scheduler", "sft", lambda t: ["sft.lr_scheduler_type=exponential"], ["sft.lr_scheduler_type='exponential'"]),
    ("override-without-value", "sft", lambda t: ["sft.learning_rate"], ["'sft.learning_rate' must look like key=value"]),
    ("seed-negative", "sft", lambda t: ["seed=-1"], ["seed=-1 is invalid"]),
    ("section-not-a-mapping", "sft", lambda t: ["sft=3"], ["sft must be a mapping"]),
    ("no-datasets", "sft", lambda t: ["data.datasets=[]"], ["data.datasets=[] is invalid"]),
    ("tracking-uri-writes-locally", "sft", lambda t: [f"tracking.tracking_uri=file://{t}/mlruns"],
     ["tracking.tracking_uri='file://{tmp}/mlruns' is invalid"]),
    # --- data files ------------------------------------------------------------------------------
    ("data-missing", "prepare", lambda t: [f"data.datasets=[{t}/nope.jsonl]"],
     ["data.datasets[0]='{tmp}/nope.jsonl'", "does not exist"]),
    ("data-empty-file", "prepare", lambda t: [f"data.datasets=[{(t / 'empty.jsonl').touch() or t / 'empty.jsonl'}]"],
     ["data.datasets[0]='{tmp}/empty.jsonl'", "is empty"]),
    ("data-wrong-columns", "prepare",
     lambda t: [f"data.datasets=[{_jsonl(t / 'cols.jsonl', [{'question': 'q', 'answer': 'a'}] * 4)}]"],
     ["{tmp}/cols.jsonl", "no column(s)", "'prompt'", "found ['question', 'answer']"]),
    ("data-not-json", "prepare",
     lambda t: [f"data.datasets=[{(t / 'broken.jsonl').write_text('not json at all') and t / 'broken.jsonl'}]"],
     ["{tmp}/broken.jsonl", "cannot read"]),
    ("data-all-rows-invalid", "prepare",
     lambda t: [f"data.datasets=[{_jsonl(t / 'bad.jsonl', [{'prompt': 'Q', 'chosen': '', 'rejected': 3}] * 20)}]"],
     ["{tmp}/bad.jsonl", "20 of 20 rows are malformed"]),
    ("data-csv-missing-column", "prepare",
     lambda t: [f"data.datasets=[{(t / 'p.csv').write_text('prompt,chosen' + chr(10) + 'q,a' + chr(10)) and t / 'p.csv'}]"],
     ["{tmp}/p.csv", "no column(s) ['rejected']"]),
    ("data-unsupported-format", "prepare",
     lambda t: [f"data.datasets=[{(t / 'prefs.txt').write_text('x') and t / 'prefs.txt'}]"],
     ["data.datasets[0]='{tmp}/prefs.txt'", "is not a"]),
    ("data-empty-directory", "prepare", lambda t: [f"data.datasets=[{_empty_dir(t)}]"],
     ["data.datasets[0]='{tmp}/nothing-here'", "holds no non-empty"]),
    ("data-unknown-hub-id", "prepare", lambda t: ["data.datasets=[nobody/nothing]"],
     ["data.datasets[0]='nobody/nothing' is invalid"]),
    ("data-unknown-sample", "prepare", lambda t: ["data.datasets=[sample:foo/bar]"],
     ["data.datasets[0]='sample:foo/bar' is invalid", "foo/bar"]),
    ("data-second-of-two-bad", "prepare",
     lambda t: [f"data.datasets=[{_jsonl(t / 'ok.jsonl', [GOOD_ROW] * 30)},{t}/missing.parquet]"],
     ["data.datasets[1]='{tmp}/missing.parquet'", "does not exist"]),
    # --- model directories -----------------------------------------------------------------------
    ("model-missing-dir", "sft", lambda t: [f"model.actor={t}/no-such-model"],
     ["model.actor='{tmp}/no-such-model' is invalid", "does not exist"]),
    ("model-no-config", "sft", lambda t: [f"model.actor={_model_dir(t, 'm', None)}"],
     ["model.actor='{tmp}/m' is invalid", "{tmp}/m/config.json is missing"]),
    ("model-no-model-type", "rm", lambda t: [f"model.rm={_model_dir(t, 'm', {'hidden_size': 8})}"],
     ["model.rm='{tmp}/m' is invalid", "{tmp}/m/config.json has no model_type"]),
    ("model-config-not-json", "sft", lambda t: [f"model.actor={_model_dir(t, 'm', '{oops')}"],
     ["model.actor='{tmp}/m' is invalid", "{tmp}/m/config.json is not valid JSON"]),
    ("model-is-a-file", "sft",
     lambda t: [f"model.actor={(t / 'model.bin').write_bytes(b'x') and t / 'model.bin'}"],
     ["model.actor='{tmp}/model.bin' is invalid", "is a file, not a model directory"]),
    ("model-no-weights", "rm", lambda t: [f"model.rm={_model_dir(t, 'm', {'model_type': 'opt'}, False)}"],
     ["model.rm='{tmp}/m' is invalid", "no weights"]),
    ("tokenizer-no-files", "sft", lambda t: [f"model.tokenizer={_model_dir(t, 'tok', {'model_type': 'opt'})}"],
     ["model.tokenizer='{tmp}/tok' is invalid", "no tokenizer files"]),
    ("model-unknown-builtin", "sft", lambda t: ["model.actor=builtin:huge-opt"],
     ["model.actor='builtin:huge-opt' is invalid", "builtin:tiny-opt"]),
    ("model-shell-metachars", "rm", lambda t: [f"model.rm=opt; touch {t}/{CANARY}"],
     ["model.rm='opt; touch {tmp}/" + CANARY + "' is invalid", "neither an existing directory nor a hub id"]),
    ("model-path-traversal", "sft", lambda t: ["model.actor=../../../../../../etc"],
     ["model.actor='../../../../../../etc' is invalid", "config.json is missing"]),
    ("model-remote-code", "sft", lambda t: [f"model.actor={_evil_model(t)}"],
     ["model.actor='{tmp}/evil-model' is refused", "auto_map", "trust_remote_code"]),
    ("trust-remote-code-without-operator", "sft", lambda t: [f"model.actor={_evil_model(t)}", "model.trust_remote_code=true"],
     ["model.trust_remote_code=True is refused", "RLHF_ALLOW_REMOTE_CODE=1"]),
]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a stage gets as far as opening (process group, MLflow, data)."""
    def trap(*a, **k):
        raise AssertionError("the stage started: the bad input was not refused up front")

    monkeypatch.setattr(stage_module, "stage_run", trap)  # every stage opens through stage.stage -> stage_run


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_field_or_file(case, storage, tiny_model_dir, tmp_path, capsys, no_training,
                                                       monkeypatch):
    name, stage, overrides, expected = case
    monkeypatch.delenv("RLHF_ALLOW_REMOTE_CODE", raising=False)
    data = tmp_path / "in"
    data.mkdir()
    run = tmp_path / "run"
    code = cli.main([stage, "--preset", "tiny-cpu", "--output", str(run), "--set", *overrides(data)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT, err
    for text in expected:
        assert text.format(tmp=data) in err, (text, err)
    assert not (run / stage / "checkpoints").exists() and not (run / stage / "final").exists()
    assert not (data / CANARY).exists()  # nothing ran


def test_unknown_preset_and_bad_preset_file(tmp_path, capsys):
    assert cli.main(["sft", "--preset", "gpt-5", "--output", str(tmp_path / "r")]) == 2
    assert "preset 'gpt-5' not found" in capsys.readouterr().err
    bad = tmp_path / "mine.yaml"
    bad.write_text("- just\n- a list\n")
    assert cli.main(["sft", "--preset", str(bad), "--output", str(tmp_path / "r")]) == 2
    assert f"{bad}: the top level must be a mapping" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --- the trigger form (Airflow Params, JSON schema) --------------------------------------------------

FORM_CASES = [
    ("preset", "gpt-5"), ("preset", "../../etc/passwd"), ("model.actor", ""), ("data.datasets", []),
    ("data.datasets", [""]), ("data.data_split", "2,4,4; rm -rf /"), ("data.max_seq_len", 4), ("sft.epochs", 0),
    ("sft.learning_rate", 5), ("rm.zero_stage", 4), ("ppo.per_device_generation_batch_size", -1),
    ("sft.dtype", "fp8"), ("resources.num_gpus", 0), ("ppo.kl_coef", "0.1"), ("ppo.actor.learning_rate", 0),
    ("overrides", ["no equals sign"]), ("overrides", ["../../x=1"]),
    ("overrides", ["$(touch x)=1"]),
]


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    return load_dag_module("rlhf_pipeline_dag_faults")


@pytest.mark.parametrize("field, bad", FORM_CASES, ids=[f"{f}={b!r}" for f, b in FORM_CASES])
def test_trigger_form_refuses(dag, field, bad):
    """The trigger's params are validated (as Airflow does when a run is created) before
    any task: the error names the field."""
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dag.dag.params)
    with pytest.raises(ParamValidationError) as e:
        params.update({field: bad})
    assert f"Invalid input for param {field}:" in str(e.value), str(e.value)


# --- hostile values through the launcher the DAG uses: real processes, no shell ----------------------

def test_hostile_overrides_never_reach_a_shell(dag, storage, tmp_path):
    """Values the form lets through (free strings) go into the run's config.yaml verbatim, as
    the install task writes it, and are refused by the stage's own checks; nothing they spell
    out is executed."""
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.pipeline.launch import StageFailed, run_stage
    from rlhf_tasks.runtime.run_config import resolve_run_config

    canary = tmp_path / CANARY
    hostile = {"model.actor": f"x; touch {canary}", "data.datasets": [f"$(touch {canary}).jsonl"],
               "overrides": [f"tracking.experiment=$(touch {canary})", "model.tokenizer=/etc/passwd"]}
    params = {k: None for k in dag.dag.params} | hostile
    cfg = resolve_run_config(tmp_path / "run", PipelineConfig.load("tiny-cpu", dag.form_values(params),
                                                                   params["overrides"]))
    assert cfg.model.actor == f"x; touch {canary}"  # kept verbatim, a string like any other
    lines: list[str] = []
    with pytest.raises(StageFailed) as e:
        run_stage("prepare", tmp_path / "run", echo=lines.append)
    assert "model.actor='x; touch" in str(e.value) and "neither an existing directory nor a hub id" in str(e.value)
    assert not canary.exists()
    assert lines[0].startswith("$ ")  # the argv, logged; no shell in between


def test_run_ids_cannot_escape_storage(storage):
    runs = (storage / "runs").resolve()
    for run_id in ("manual__2024-01-01T00:00:00+00:00", "a/b", "../../etc", "/etc/passwd", "x/../../y",
                   ".hidden", "..a", "a\nb", "$(rm -rf ~)", "run;id|x&y", "a" * 500):
        path = run_dir_for(run_id).resolve()
        assert path.parent == runs, (run_id, path)
        assert path.name and not path.name.startswith(".") and len(path.name) <= 200
    for hopeless in ("..", ".", "", "///", "....", "é/ü"):
        with pytest.raises(ValueError, match="run id"):
            run_dir_for(hopeless)


def test_remote_code_runs_only_with_both_switches(storage, tmp_path, monkeypatch):
    """The evil model's code runs only when the config *and* the operator allow it (here
    it then fails to build, having written its canary: proof that the gate was the only
    thing in the way)."""
    from rlhf_tasks.config import ConfigError, PipelineConfig
    from rlhf_tasks.pipeline import preflight

    model = _evil_model(tmp_path)
    cfg = PipelineConfig.load("tiny-cpu", [f"model.actor={model}", "model.trust_remote_code=true"])
    monkeypatch.delenv("RLHF_ALLOW_REMOTE_CODE", raising=False)
    with pytest.raises(ConfigError, match="RLHF_ALLOW_REMOTE_CODE"):
        preflight.check("sft", cfg, run_dir_for("remote-code"))
    monkeypatch.setenv("RLHF_ALLOW_REMOTE_CODE", "1")
    preflight.check_model_source(model, "model.actor", trust_remote_code=True)  # both switches: allowed
    assert not (tmp_path / CANARY).exists()


def test_bad_model_and_bad_data_stop_a_real_stage_process(storage, tiny_model_dir, tmp_path):
    """The same refusals in real ``sft`` processes: exit 2 before any step."""
    from tests.faults.helpers import StageProc

    no_cfg = _model_dir(tmp_path, "m", None)
    cols = _jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}] * 10)
    for overrides, expected in (([f"model.actor={no_cfg}"], f"{no_cfg}/config.json is missing"),
                                ([f"data.datasets=[{cols}]"], f"{cols}")):
        run = tmp_path / f"run-{len(expected)}"
        with StageProc("sft", run, "--preset", "tiny-cpu", "--set", *overrides) as p:
            code = p.finish()
        assert code == 2 and expected in p.text(), p.tail()
        assert not p.steps and not (run / "sft" / "checkpoints").exists()
