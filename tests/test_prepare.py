"""The ``prepare`` stage (the DAG's install task): fail fast and clearly, before GPU time.

The success case runs the real command line (``python -m rlhf_tasks prepare``) in a
subprocess, as the DAG does. The failure cases call the same CLI entry point
(``rlhf_tasks.__main__.main``) in-process: same code path and exit status, without
paying for a fresh interpreter importing torch and DeepSpeed each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rlhf_tasks.__main__ import RESULT_PREFIX, main
from rlhf_tasks.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]
PHASE_SPLITS = {f"{phase}/{split}" for phase in ("sft", "rm", "ppo") for split in ("train", "eval")}


def prepare(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m rlhf_tasks prepare ARGS`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    code = main(["prepare", *args])
    out, err = capsys.readouterr()
    return code, out, err


def result_payload(stdout: str) -> dict:
    """The stage's result: the last stdout line, ``RLHF_RESULT {json}``."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(RESULT_PREFIX), f"last stdout line is not the result: {last!r}"
    return json.loads(last[len(RESULT_PREFIX):])


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime: to prove nothing changed. The
    lock files a stage holds while it runs (``.locks/``, ``.config.lock``) are not data."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))
            if p.is_file() and not (p.name.endswith(".lock") and p.relative_to(root).parts[0].startswith("."))}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mostly_malformed_rows() -> list[dict]:
    """6 good preference pairs and 14 with an empty or missing answer."""
    good = [{"prompt": f"\n\nHuman: what is {i} plus {i}?\n\nAssistant:", "chosen": f"{2 * i}.",
             "rejected": "I do not know."} for i in range(6)]
    bad = [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": "", "rejected": "no"} for i in range(8)]
    bad += [{"prompt": f"\n\nHuman: other {i}?\n\nAssistant:", "chosen": None, "rejected": "no"} for i in range(6)]
    return good + bad


# --- success -----------------------------------------------------------------------------


def test_tiny_cpu_prepare_succeeds(storage, tmp_path):
    """On the embedded default, prepare exits 0, saves the resolved config, writes
    environment.json (packages, torch, disk, models, data) and ends its output with the
    RLHF_RESULT line holding the row count of every phase and split."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "rlhf_tasks", "prepare", "--preset", "tiny-cpu",
                           "--output", str(run_dir)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = result_payload(proc.stdout)
    assert result["stage"] == "prepare" and result["run_dir"] == str(run_dir.resolve())
    assert set(result["data"]) == PHASE_SPLITS
    assert all(isinstance(n, int) and n > 0 for n in result["data"].values()), result["data"]
    # The 2,4,4 split: the RM and PPO phases get about twice SFT's rows.
    assert result["data"]["rm/train"] > 1.5 * result["data"]["sft/train"]
    assert result["mlflow_parent_run_id"] is None  # tracking is off in tests

    env_json = json.loads(Path(result["environment"]).read_text())
    assert Path(result["environment"]) == run_dir.resolve() / "environment.json"
    assert {"packages", "torch", "disk", "models", "data", "deepspeed"} <= set(env_json)
    assert {"torch", "deepspeed", "transformers", "datasets"} <= set(env_json["packages"])
    assert env_json["torch"]["cuda_available"] is False and env_json["torch"]["torch"]
    assert env_json["disk"]["storage"] == str(storage.resolve()) and env_json["disk"]["free_gb"] > 0
    assert env_json["models"]["actor"]["model_type"] == "opt"
    assert env_json["models"]["rm"]["name"] == "builtin:tiny-rm"  # tiny-cpu's 2 x 64 reward model, the actor's tokenizer
    assert env_json["models"]["tokenizer"]["vocab_size"] > 0
    assert env_json["data"] == result["data"]

    saved = PipelineConfig.load(run_dir / "config.yaml")
    assert saved.to_dict() == PipelineConfig.load("tiny-cpu").to_dict()


def test_num_gpus_on_a_cpu_run_only_prices_it(storage, tmp_path, capsys):
    """``resources.num_gpus=2`` with device=cpu is a pricing input, not a hardware demand:
    prepare must pass on a worker without (enough) GPUs."""
    code, out, err = prepare(capsys, "--preset", "tiny-cpu", "--set", "resources.num_gpus=2",
                             "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert set(result_payload(out)["data"]) == PHASE_SPLITS


def test_cpu_run_on_a_gpu_worker_ignores_the_gpu_count(monkeypatch):
    """The same on a worker that *has* a GPU (faked here): a device=cpu run with
    resources.num_gpus=2 on a 1-GPU machine must not fail the GPU count check, while a
    device=cuda run asking for 2 GPUs there must."""
    import torch

    from rlhf_tasks.pipeline import prepare as prepare_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=24 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)

    info = prepare_mod.check_torch(PipelineConfig.load("tiny-cpu", ["resources.num_gpus=2"]))
    assert info["gpus"] == ["Fake GPU"]
    with pytest.raises(prepare_mod.EnvironmentError_, match="resources.num_gpus=2"):
        prepare_mod.check_torch(PipelineConfig.load("tiny-cpu", ["device=cuda", "resources.num_gpus=2"]))


# --- failures: exit 2 with a message that names the culprit ---------------------------------


def test_missing_actor_model_names_the_key(storage, tmp_path, capsys):
    """A model path that does not exist: exit 2, stderr names ``model.actor`` and the
    path, and no environment.json claims the worker is ready."""
    run_dir = tmp_path / "run"
    code, out, err = prepare(capsys, "--preset", "tiny-cpu", "--set", "model.actor=/no/such/dir",
                             "--output", str(run_dir))
    assert code == 2
    assert "model.actor" in err and "/no/such/dir" in err
    assert RESULT_PREFIX not in out
    assert not (run_dir / "environment.json").exists()


def test_mostly_malformed_dataset_names_the_file(storage, tmp_path, capsys):
    """A dataset whose rows are mostly unusable stops prepare (exit 2) instead of
    training on the remainder; the message names the file and what is wrong."""
    bad = write_jsonl(tmp_path / "prefs-broken.jsonl", mostly_malformed_rows())
    code, out, err = prepare(capsys, "--preset", "tiny-cpu", "--set", f"data.datasets=[{bad}]",
                             "--output", str(tmp_path / "run"))
    assert code == 2, err
    assert str(bad) in err and "malformed" in err
    assert RESULT_PREFIX not in out


@pytest.mark.parametrize(("split", "phase"), [("10,0,0", "rm"), ("0,0,10", "sft")])
def test_data_split_leaving_a_phase_empty_names_it(storage, tmp_path, capsys, split, phase):
    """A data_split that gives a phase nothing to train on is a config error that
    names the phase (here the first empty one), not a crash minutes into that stage."""
    code, out, err = prepare(capsys, "--preset", "tiny-cpu", "--set", f"data.data_split={split}",
                             "--output", str(tmp_path / "run"))
    assert code == 2
    assert f"the {phase} phase" in err and "data.data_split" in err
    assert RESULT_PREFIX not in out


# --- a failed prepare leaves a run's finished work alone -------------------------------------


def finished_run(run_dir: Path, cfg: PipelineConfig) -> None:
    """A run whose SFT step finished earlier: saved config, sft/final/ and result.json,
    and the environment.json of its first prepare."""
    cfg.save(run_dir / "config.yaml")
    final = run_dir / "sft" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"weights")
    (final / "metrics.json").write_text('{"perplexity": 3.2}')
    (run_dir / "sft" / "result.json").write_text(json.dumps(
        {"stage": "sft", "final_dir": str(final), "metrics": {"perplexity": 3.2}, "mlflow_run_id": None,
         "wall_clock_s": 12.0, "skipped": False}))
    (run_dir / "environment.json").write_text('{"data": {"sft/train": 1}}')


def test_failed_prepare_leaves_a_finished_run_untouched(storage, tmp_path, capsys):
    """Re-running prepare on an existing run whose dataset has since been corrupted:
    it fails (exit 2) and writes nothing in the run directory: sft/final, its
    result.json, the config and the old environment.json stay byte-identical."""
    bad = write_jsonl(tmp_path / "prefs.jsonl", mostly_malformed_rows())
    run_dir = tmp_path / "run"
    finished_run(run_dir, PipelineConfig.load("tiny-cpu", [f"data.datasets=[{bad}]"]))
    before = snapshot(run_dir)

    code, _, err = prepare(capsys, "--output", str(run_dir))  # reuse the run's saved config
    assert code == 2 and str(bad) in err
    assert snapshot(run_dir) == before


def test_prepare_with_a_different_config_refuses_an_existing_run(storage, tmp_path, capsys):
    """Pointing a new config at an existing run is refused (exit 2, naming the
    differing key) before anything is written: a run never mixes settings."""
    run_dir = tmp_path / "run"
    finished_run(run_dir, PipelineConfig.load("tiny-cpu"))
    before = snapshot(run_dir)

    code, _, err = prepare(capsys, "--preset", "tiny-cpu", "--set", "model.actor=/no/such/dir",
                           "--output", str(run_dir))
    assert code == 2 and "model.actor" in err
    assert snapshot(run_dir) == before
