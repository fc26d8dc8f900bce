"""Faults of a stage on 2 ranks (CPU processes over gloo, DeepSpeed's launcher):

1. one rank SIGKILLed mid-interval: the stage fails (the launcher stops the other rank and
   exits non-zero, as a GPU worker's would); an attempt on another number of ranks is
   refused before anything loads; the retry on 2 ranks resumes from the newest complete
   checkpoint (complete = every rank wrote its part) and ends bit-exact where the
   uninterrupted 2-rank run ended (tests/ranks.py's ZeRO-3 SFT);
2. a rank that hangs (the issue's bug put back: uneven evaluation shards under ZeRO-3,
   tests/faults/uneven_eval.py): the watchdog fails the stage after
   ``resources.collective_timeout_minutes``, naming the stage, the phase and the rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from rlhf_tasks.config import PipelineConfig
from rlhf_tasks.pipeline.launch import Resources, free_port, stage_env
from rlhf_tasks.storage import RunDir
from tests.faults.helpers import StageProc, complete_steps
from tests.ranks import BASE, INTERVAL, REPO, SETTINGS, STEPS, launcher_env

pytestmark = pytest.mark.slow
KILL_AT = INTERVAL + 2  # mid-interval: step-4 is complete, step-8 is not begun


def rank_pid(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of rank ``rank`` among the launcher's descendants (its RANK variable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.Process(launcher_pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == str(rank) and "rlhf_tasks" in " ".join(p.cmdline()):
                    return p.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise TimeoutError(f"no rank {rank} under pid {launcher_pid}")


def test_sigkill_of_one_rank_then_resume_bit_exact(rank_runs, tmp_path):
    reference = rank_runs.stage("zero3", "sft")  # the uninterrupted run: the same config
    run = RunDir(tmp_path / "run")
    PipelineConfig.load("tiny-cpu", [*BASE, *SETTINGS["zero3"]]).save(run.config_path)
    report: dict = {"interval": INTERVAL, "total": STEPS}

    launcher = ("-m", "rlhf_tasks.pipeline.launch")  # the DAG task's way in
    with StageProc("sft", run.path, entry=launcher, env=launcher_env()) as first:
        assert first.wait_step(KILL_AT), first.tail()
        os.kill(rank_pid(first.pid, 1), signal.SIGKILL)
        code = first.finish()
    report.update(killed_rank=1, rank0_last_step=first.last_step, exit=code)
    assert code != 0, first.tail()
    assert "stage 'sft' exited with code" in first.text(), first.tail()
    assert complete_steps(run, "sft") == [INTERVAL], complete_steps(run, "sft")

    # Another number of ranks: refused before anything loads, naming both counts and the fix.
    t0 = time.monotonic()
    one = subprocess.run([sys.executable, "-m", "rlhf_tasks", "sft", "--output", str(run.path)],
                         capture_output=True, text=True, timeout=300, env=launcher_env(), cwd=REPO)
    report["refused_in_s"] = round(time.monotonic() - t0, 1)
    assert one.returncode == 2, one.stderr[-3000:]
    assert f"step-{INTERVAL} (step {INTERVAL}) was written by 2 rank(s) and this attempt has 1" in one.stderr
    assert "resources.cpu_processes" in one.stderr and "sft: step 1/" not in one.stderr + one.stdout

    with StageProc("sft", run.path, entry=launcher, env=launcher_env()) as retry:
        result = retry.result()
    assert retry.resumed_from() == INTERVAL, retry.tail()
    got, ref = result["metrics"], reference.result["metrics"]
    x = load_file(str(run.final("sft") / "model.safetensors"))
    y = load_file(str(reference.run.final("sft") / "model.safetensors"))
    wdiff = max((x[k] - y[k]).abs().max().item() for k in x)
    report.update(resumed_from=INTERVAL, redone_steps=first.last_step - INTERVAL, perplexity=got["perplexity"],
                  reference_perplexity=ref["perplexity"], max_abs_weight_diff=wdiff)
    print("FAULT-REPORT", json.dumps(report))
    assert got["global_step"] == STEPS
    assert got["perplexity"] == ref["perplexity"] and wdiff == 0.0, report


def test_a_rank_that_hangs_fails_the_stage_naming_stage_phase_and_rank(storage, tiny_model_dir, tmp_path):
    """40 held-out rows in batches of 16: rank 0 gets batches 1 and 3, rank 1 batch 2;
    rank 0's second forward pass waits for a ZeRO-3 all-gather rank 1 never joins."""
    run = RunDir(tmp_path / "run")
    bound_min = 0.75
    PipelineConfig.load("tiny-cpu", [*BASE, *SETTINGS["zero3"], "sft.per_device_eval_batch_size=16",
                                     f"resources.collective_timeout_minutes={bound_min}"]).save(run.config_path)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
           str(Path(__file__).with_name("uneven_eval.py")), "sft", "--output", str(run.path)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=stage_env(Resources(2, cpu=True), launcher_env()))
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    found = re.search(r"error: sft: rank ([01]) of 2 made no progress for (\d+) s in phase 'evaluation' "
                      r"\(bound: resources.collective_timeout_minutes=0.75\)[^\n]*", out)
    print(f"HANG-REPORT exit {proc.returncode} after {elapsed:.0f} s (bound {bound_min} min): "
          f"{found.group(0) if found else None}")
    assert proc.returncode != 0, out[-3000:]
    assert found, out[-5000:]
    assert int(found.group(2)) >= bound_min * 60
    assert "sft: step 1/" not in out  # the first evaluation, before any training
    assert not (run.path / "sft" / "result.json").exists()
