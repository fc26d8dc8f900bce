from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_tasks.config import EngineConfig
from rlhf_tasks.pipeline.launch import launch_argv
from rlhf_tasks.runtime.engine import (
    Batching,
    deepspeed_config,
    normalise_cuda_arch_list,
    param_groups,
    prepare_environment,
)


@pytest.mark.parametrize("value, expected", [
    ("9.0a", "9.0"),
    ("8.0;9.0a", "8.0;9.0"),
    ("8.6 9.0a+PTX", "8.6;9.0+PTX"),
    ("10.0a;12.0", "10.0;12.0"),
    ("9.0", "9.0"),
])
def test_cuda_arch_list_is_normalised_for_deepspeed(value, expected):
    env = {"TORCH_CUDA_ARCH_LIST": value}
    assert normalise_cuda_arch_list(env) == expected
    assert env["TORCH_CUDA_ARCH_LIST"] == expected
    # What DeepSpeed's op builder does with each entry must now work:
    for entry in expected.split(";"):
        int(entry.replace("+PTX", "").replace(".", ""))
    assert normalise_cuda_arch_list({}) is None


@pytest.mark.skipif(not (Path(sys.executable).parent / "ninja").is_file(), reason="no ninja in this environment")
def test_ops_build_with_this_environments_ninja_whoever_started_the_stage(monkeypatch):
    """A shell's PATH puts the system's ninja first, Airflow's the venv's: each read the
    other's build log as stale, and a DeepSpeed op was rebuilt by every stage that followed
    a stage started the other way (ten times in one test run, 20-40 s each)."""
    env_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin", env_bin]))
    prepare_environment()
    assert shutil.which("ninja") == os.path.join(env_bin, "ninja")
    assert os.environ["PATH"].split(os.pathsep) == [env_bin, "/usr/bin", "/bin"]
    prepare_environment()  # idempotent
    assert os.environ["PATH"].split(os.pathsep) == [env_bin, "/usr/bin", "/bin"]


def test_deepspeed_config():
    """The engine reads the user's config section as it is (sft, rm, ppo.actor, ppo.critic)."""
    b = Batching(micro_batch_size=8, gradient_accumulation_steps=4, dtype="bf16", total_steps=10)
    c = deepspeed_config(EngineConfig(max_grad_norm=0.5), b, world_size=2)
    assert c["train_batch_size"] == 8 * 4 * 2 and c["gradient_clipping"] == 0.5
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["zero_optimization"]["stage"] == 0 and "offload_optimizer" not in c["zero_optimization"]
    fp16 = Batching(8, 4, "fp16", 10)
    z3 = deepspeed_config(EngineConfig(zero_stage=3, offload=True), fp16, world_size=1)["zero_optimization"]
    assert z3["offload_optimizer"]["device"] == "cpu" and z3["offload_param"]["device"] == "cpu"
    z2 = deepspeed_config(EngineConfig(zero_stage=2, offload=True), b, world_size=1)["zero_optimization"]
    assert "offload_param" not in z2


def test_no_weight_decay_on_biases_and_norms():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 1  # the Linear weight only
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_weight_decay_groups_read_zero3_shapes():
    """Under ZeRO-3 a parameter is an empty 1-D placeholder with its shape in ``ds_shape``:
    grouped by that, a partitioned weight still decays (every ZeRO-3 run trained without
    weight decay before: the reward model's weights moved 1.7e-3 from ZeRO-0's in 8 steps)."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for p in m.parameters():
        p.ds_shape, p.data = p.shape, torch.empty(0)  # what zero.Init leaves on each rank
    decay, no_decay = param_groups(m, 0.1)
    assert len(decay["params"]) == 1 and decay["params"][0] is m[0].weight
    assert len(no_decay["params"]) == 3


def test_launch_argv():
    assert launch_argv("sft", ["--output", "d"]) == [sys.executable, "-u", "-m", "rlhf_tasks", "sft", "--output", "d"]
    argv = launch_argv("ppo", ["--output", "d"], num_gpus=8, num_nodes=2, hostfile="/etc/hosts.ds")
    assert argv[:7] == ["deepspeed", "--hostfile", "/etc/hosts.ds", "--num_nodes", "2", "--num_gpus", "8"]
    assert argv[-5:] == ["--module", "rlhf_tasks", "ppo", "--output", "d"]


def test_one_cpu_process_builds_no_shared_memory_allreduce(tmp_path):
    """A single-process CPU stage makes its process group without compiling DeepSpeed's
    shared-memory allreduce (it would take 20-40 s on 2 cores, and a compiler), and its
    collectives still work."""
    code = """
import torch
from deepspeed.comm import comm as ds_dist
from rlhf_tasks.runtime.engine import init_distributed
print(init_distributed(torch.device("cpu")))
t = torch.ones(3)
ds_dist.all_reduce(t)
print(t.tolist(), ds_dist.cdb.shm_comm_op)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["(0, 1)", "[1.0, 1.0, 1.0] None"], proc.stdout
    assert not (tmp_path / "ext").exists()


def test_one_fp32_process_skips_the_lone_allreduce_and_clips_as_deepspeed_does(tmp_path):
    """fp32 at ZeRO-0 in one process: no gradient all-reduce over a group of one, and the
    gradient clipping without DeepSpeed's all-reduce of the norm leaves the very gradients
    (to the bit) of DeepSpeed's own clip_grad_norm_."""
    code = """
import torch
from deepspeed.runtime.utils import clip_grad_norm_
from rlhf_tasks.config.train import EngineConfig
from rlhf_tasks.runtime.engine import Batching, init_distributed, initialize
init_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
engine = initialize(model, EngineConfig(max_grad_norm=0.01), Batching(4, 1, "fp32", 10), torch.device("cpu"), 1)
engine.backward(model(torch.randn(4, 8)).pow(2).sum())
want = [p.grad.clone() for p in model.parameters()]
ref = [torch.nn.Parameter(torch.zeros_like(w)) for w in want]
for r, w in zip(ref, want):
    r.grad = w.clone()
clip_grad_norm_(ref, 0.01)
engine.clip_fp32_gradients()
print(engine.enable_backward_allreduce, all(torch.equal(p.grad, r.grad) for p, r in zip(model.parameters(), ref)))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "False True", proc.stdout
