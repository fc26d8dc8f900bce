"""fork_run (tests/runs.py), which the alignment-stage tests build on: a fork holds the
source's finished SFT and RM, owns its copies, and its config is the source's plus the
overrides, which the next stage reads as the run's own."""

from __future__ import annotations

import json

from rlhf_tasks.config import PipelineConfig
from rlhf_tasks.runtime.run_config import resolve_run_config
from rlhf_tasks.storage import RunDir, StageResult
from tests.runs import fork_run


def _finished_run(path) -> RunDir:
    run = RunDir(path)
    PipelineConfig.load("tiny-cpu").save(run.config_path)
    for stage, score in (("sft", 2.0), ("rm", 0.9)):
        run.final(stage).mkdir(parents=True)
        (run.final(stage) / "model.safetensors").write_bytes(stage.encode() * 100)
        result = StageResult(stage=stage, final_dir=str(run.final(stage)), metrics={"score": score})
        run.result_path(stage).write_text(result.to_json())
    return run


def test_fork_holds_finished_sft_and_rm_of_its_own(tmp_path):
    src = _finished_run(tmp_path / "src")
    fork = fork_run(src, tmp_path / "forks")
    assert fork.path.parent == (tmp_path / "forks").resolve() and fork.path != src.path
    for stage in ("sft", "rm"):
        result = fork.result(stage)  # None if final_dir pointed nowhere
        assert result is not None and result.final_dir == str(fork.final(stage))
        assert result.metrics == json.loads(src.result_path(stage).read_text())["metrics"]
        assert (fork.final(stage) / "model.safetensors").read_bytes() == stage.encode() * 100
    (fork.final("sft") / "model.safetensors").write_bytes(b"changed")  # a copy: the source is untouched
    assert (src.final("sft") / "model.safetensors").read_bytes() == b"sft" * 100
    assert not fork.stage("ppo").exists()
    assert fork_run(src, tmp_path / "forks").path != fork.path  # one fresh directory per call


def test_fork_config_is_the_source_plus_overrides_and_the_next_stage_reads_it(tmp_path):
    src = _finished_run(tmp_path / "src")
    plain = fork_run(src, tmp_path)
    assert PipelineConfig.load(plain.config_path).to_dict() == PipelineConfig.load(src.config_path).to_dict()
    assert PipelineConfig.load(src.config_path).ppo.max_steps != 3
    fork = fork_run(src, tmp_path, "ppo.max_steps=3", "ppo.actor.lora_dim=8")
    cfg = resolve_run_config(fork.path, None)  # what a stage run with --output and no --preset uses
    assert (cfg.ppo.max_steps, cfg.ppo.actor.lora_dim) == (3, 8)
    assert cfg.sft == PipelineConfig.load(src.config_path).sft
