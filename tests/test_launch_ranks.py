"""The launcher with several ranks on CPU (``resources.cpu_processes``): DeepSpeed's launcher
with its CPU accelerator, the path a multi-GPU worker takes, and the no-ssh multi-node
command (the runs themselves: tests/test_ranks.py, tests/test_two_hosts.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.test_launch import form_run, planned_argv, resolved_run


def test_form_cpu_processes_start_ranks_on_cpu(monkeypatch, tmp_path):
    """The trigger form's ``resources.cpu_processes`` on the embedded default starts that many
    CPU ranks through DeepSpeed's launcher, the path of a multi-GPU worker."""
    run = form_run(monkeypatch, tmp_path, "tiny-cpu", "resources.cpu_processes", 2)
    assert planned_argv(monkeypatch, "rm", run)[:3] == ["deepspeed", "--num_gpus", "2"]


def test_cpu_run_counts_processes_not_gpus(monkeypatch, tmp_path):
    """On CPU ``num_gpus`` only prices the run; ``resources.cpu_processes`` starts that many
    ranks through DeepSpeed's launcher, the path a multi-GPU worker takes (its --num_gpus
    counts processes on CPU), evaluate included."""
    run2 = resolved_run(tmp_path / "b", "resources.cpu_processes=2", preset="tiny-cpu")
    for stage in ("sft", "rm", "ppo", "grpo", "rloo", "dpo", "evaluate"):
        argv = planned_argv(monkeypatch, stage, run2, visible="5")  # CUDA_VISIBLE_DEVICES means nothing on CPU
        assert argv[:4] == ["deepspeed", "--num_gpus", "2", "--master_port"], argv
        assert argv[5:] == ["--no_local_rank", "--module", "rlhf_tasks", stage, "--output", str(run2)]
    assert planned_argv(monkeypatch, "register", run2)[:4] == [sys.executable, "-u", "-m", "rlhf_tasks"]


def test_cpu_ranks_get_deepspeeds_cpu_accelerator_and_this_environments_launcher(monkeypatch, tmp_path):
    from rlhf_tasks.pipeline.launch import Resources, stage_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    env = stage_env(Resources(2, cpu=True), {"X": "1"})
    assert env["DS_ACCELERATOR"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in env and env["X"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    gpu = stage_env(Resources(2))
    assert "DS_ACCELERATOR" not in gpu or gpu["DS_ACCELERATOR"] == os.environ.get("DS_ACCELERATOR")
    assert gpu["CUDA_VISIBLE_DEVICES"] == "3"


def test_no_ssh_node_command(tmp_path):
    """DeepSpeed's multi-node launch without ssh: every node starts its own launcher with its
    node rank and node 0's address, on the run directory they all see."""
    from rlhf_tasks.pipeline.launch import ResourceError, node_argv

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host-a slots=2\nhost-b slots=2\n")
    run = resolved_run(tmp_path, "resources.cpu_processes=2", "resources.num_nodes=2",
                       f"resources.hostfile={hostfile}", preset="tiny-cpu")
    assert node_argv("sft", run, 1, "10.1.0.1", 29555) == [
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "2", "--no_ssh", "--node_rank",
        "1", "--master_addr", "10.1.0.1", "--master_port", "29555", "--no_local_rank", "--module", "rlhf_tasks",
        "sft", "--output", str(run)]
    with pytest.raises(ResourceError, match="outside resources.num_nodes=2"):
        node_argv("sft", run, 2, "10.1.0.1", 29555)
    with pytest.raises(ResourceError, match="resources.hostfile is not set"):
        node_argv("sft", resolved_run(tmp_path / "c", preset="tiny-cpu"), 0, "10.1.0.1", 29555)
