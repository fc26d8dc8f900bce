"""Stages on several ranks for the tests: 2 CPU processes over gloo, started by DeepSpeed's
launcher exactly as the DAG's task starts them (``python -m rlhf_tasks.pipeline.launch``,
which reads the run's ``resources.cpu_processes``), shared by tests/test_ranks.py and
tests/faults/test_ranks_faults.py (one pytest-xdist group: the runs are made once).

The runs are short tiny-cpu ones: 8 SFT / RM steps of micro-batch 8, a checkpoint every
4, 40 held-out rows, 2 RL iterations of 8 prompts; each run directory holds one setting:

    one      1 process, gradient_accumulation_steps=2   (the parity reference: sft, rm, kto)
    zero0    2 ranks, ZeRO-0
    zero3    2 ranks, ZeRO-3 for every trained model: sft, rm, ppo, grpo, rloo, dpo, kto, evaluate
    zero1    2 ranks, ZeRO-1 (sft)
    zero2off 2 ranks, ZeRO-2 with the optimizer offloaded to CPU (sft)

Every run logs to one MLflow server of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_tasks.storage import RunDir

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RLHF_RESULT "
RANKS = 2
STEPS, INTERVAL = 8, 4
SUPERVISED = [f"{s}.{k}" for s in ("sft", "rm") for k in (
    "epochs=1", f"max_steps={STEPS}", f"checkpoint_every_steps={INTERVAL}", "log_every_steps=1",
    "per_device_train_batch_size=8", "per_device_eval_batch_size=16")]
RL = [f"{a}.{k}" for a in ("ppo", "grpo", "rloo") for k in ("max_steps=2", "checkpoint_every_steps=0")] + [
    "ppo.per_device_generation_batch_size=8", "ppo.per_device_train_batch_size=8",
    "grpo.per_device_generation_batch_size=2", "rloo.per_device_generation_batch_size=2",
    "grpo.per_device_train_batch_size=8", "rloo.per_device_train_batch_size=8"]
DPO = [f"{a}.{k}" for a in ("dpo", "kto") for k in (
    "max_steps=4", "generated_prompts=16", "per_device_train_batch_size=4", "per_device_eval_batch_size=16",
    "log_every_steps=1", "checkpoint_every_steps=0")]
# KTO on the dataset's answers (the same on 1 and 2 ranks, where generated ones are not), at a
# rate that moves the weights well past the parity tolerance in 4 steps.
KTO = ["kto.answers=dataset", "kto.learning_rate=1e-3", "kto.num_warmup_steps=0"]
BASE = ["data.max_eval_samples=40", "tracking.system_metrics=false", "evaluate.prompts=24",
        "evaluate.per_device_batch_size=6", *SUPERVISED, *RL, *DPO, *KTO]
ZERO3 = ["sft.zero_stage=3", "rm.zero_stage=3", *(f"{a}.actor.zero_stage=3" for a in ("ppo", "grpo", "rloo")),
         "ppo.critic.zero_stage=3", "dpo.zero_stage=3", "kto.zero_stage=3"]
SETTINGS = {
    "one": ["resources.cpu_processes=1", *(f"{s}.gradient_accumulation_steps=2" for s in ("sft", "rm", "kto"))],
    "zero0": [f"resources.cpu_processes={RANKS}"],
    "zero3": [f"resources.cpu_processes={RANKS}", *ZERO3],
    "zero1": [f"resources.cpu_processes={RANKS}", "sft.zero_stage=1"],
    "zero2off": [f"resources.cpu_processes={RANKS}", "sft.zero_stage=2", "sft.offload=true"],
}


def launcher_env(**extra: str) -> dict[str, str]:
    """This environment for a stage's processes: the repository importable from any
    directory (a script started by DeepSpeed's launcher), one thread per rank."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Launched:
    """One stage run to its end through the launcher."""

    stage: str
    run: RunDir
    code: int
    log: str
    seconds: float

    @property
    def result(self) -> dict:
        assert self.code == 0, f"{self.stage} in {self.run.path} exited {self.code}:\n{self.log[-5000:]}"
        lines = [ln for ln in self.log.splitlines() if ln.startswith(RESULT_PREFIX)]
        assert len(lines) == 1, f"{len(lines)} result lines (one per stage, from rank 0):\n{self.log[-3000:]}"
        return json.loads(lines[0].removeprefix(RESULT_PREFIX))


def launch(stage: str, run: RunDir, timeout: float = 900, env: dict[str, str] | None = None) -> Launched:
    """``python -m rlhf_tasks.pipeline.launch STAGE --output RUN``: the processes the run's
    config asks for, as an Airflow task starts them."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-u", "-m", "rlhf_tasks.pipeline.launch", stage, "--output", str(run.path)],
                          capture_output=True, text=True, timeout=timeout, env=env or launcher_env(), cwd=REPO)
    return Launched(stage, run, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0)


class RankRuns:
    """The runs of :data:`SETTINGS`, each stage made once, on first request."""

    def __init__(self, root: Path, mlflow_url: str):
        self.root, self.mlflow_url = root, mlflow_url
        self.done: dict[tuple[str, str], Launched] = {}

    def run_dir(self, setting: str, *extra: str) -> RunDir:
        from rlhf_tasks.config import PipelineConfig

        name = setting + "".join(f"-{e.replace('=', '_')}" for e in extra)
        run = RunDir(self.root / name)
        if not run.config_path.is_file():
            PipelineConfig.load("tiny-cpu", [*BASE, *SETTINGS[setting], *extra]).save(run.config_path)
        return run

    def stage(self, setting: str, stage: str, *extra: str, needs: tuple[str, ...] = (),
              needs_from: str | None = None) -> Launched:
        """``stage`` run to its end in the run directory of ``setting`` (with ``extra``
        overrides: a directory of its own, whose ``needs`` stages are copied from the
        setting's own run, or ``needs_from``'s, made first)."""
        key = (setting + "|" + ",".join(extra), stage)
        if key in self.done:
            return self.done[key]
        run = self.run_dir(setting, *extra)
        for need in needs:
            base = self.stage(needs_from or setting, need)
            if not run.final(need).is_dir():
                import shutil

                shutil.copytree(base.run.final(need), run.final(need))
                result = json.loads(base.run.result_path(need).read_text())
                result["final_dir"] = str(run.final(need))
                run.result_path(need).write_text(json.dumps(result))
        launched = launch(stage, run, env=launcher_env(MLFLOW_TRACKING_URI=self.mlflow_url))
        print(f"[ranks] {setting} {' '.join(extra)} {stage}: exit {launched.code} in {launched.seconds:.0f} s",
              flush=True)
        self.done[key] = launched
        return launched
