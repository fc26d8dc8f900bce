"""SIGKILL of real SFT, reward-model, PPO and GRPO processes, twice per run, then resume.

Per case (stage, seed), on the tiny-cpu preset with a checkpoint every few steps:

1. two processes are started on the same run directory at once: the stage lock admits
   one and refuses the other (exit 3, naming the holder's pid and the directory);
2. the admitted one is SIGKILLed at a step drawn from the seed (mid-interval);
3. a second attempt resumes and is SIGKILLed *inside* a checkpoint write (the files
   written, the COMPLETE marker not yet: ``paused_stage.py`` holds it there), at a
   checkpoint drawn from the seed;
4. a third attempt runs to the end.

Checked: every attempt resumes from the newest complete checkpoint on disk when it
starts (never the half-written one, which is removed), at most one checkpoint interval
of steps is redone per kill, and the final metrics and weights match an uninterrupted run
(RNG state is checkpointed, so they match to float precision). CI runs one seed per
stage; ``RLHF_FAULT_SEEDS=N`` runs seeds 1..N for every stage.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_tasks.storage import RunDir
from tests.faults.helpers import (
    ALIGNMENT,
    FAST,
    INTERVAL,
    KEY_METRICS,
    RL,
    TOTAL,
    StageProc,
    complete_steps,
    fault_seeds,
    partial_dirs,
)
from tests.faults.paused_stage import PAUSE_ENV
from tests.runs import fork_run

pytestmark = pytest.mark.slow

CASES = [("sft", s) for s in fault_seeds([1])] + [("rm", s) for s in fault_seeds([2])] + \
        [("ppo", s) for s in fault_seeds([9])] + [("grpo", s) for s in fault_seeds([5])]
PAUSED_STAGE = str(Path(__file__).with_name("paused_stage.py"))
METRIC_RTOL = 1e-3
WEIGHT_ATOL = 1e-4


def _start_two_at_once(stage: str, run: RunDir, args: list[str]) -> StageProc:
    """Start two processes on one run directory; return the one the lock admitted."""
    a, b = StageProc(stage, run.path, *args), StageProc(stage, run.path, *args)
    t0 = time.monotonic()
    while a.proc.poll() is None and b.proc.poll() is None:
        assert time.monotonic() - t0 < 120, "neither process was refused by the stage lock"
        time.sleep(0.05)
    loser, winner = (a, b) if a.proc.poll() is not None else (b, a)
    loser.finish()
    text = loser.text()
    assert loser.proc.returncode == 3, text
    assert "is in use" in text and str(run.path) in text and f"pid {winner.pid}" in text, text
    return winner


def _weights_diff(a, b) -> float:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


@pytest.mark.parametrize("stage, seed", CASES, ids=[f"{s}-seed{n}" for s, n in CASES])
def test_sigkill_twice_then_resume(stage, seed, fault_reference, tmp_path):
    rng = random.Random(seed)
    interval, total = INTERVAL[stage], TOTAL[stage]
    if stage in ALIGNMENT:
        fault_reference.result("sft"), fault_reference.result("rm")  # the alignment step's inputs
        run = fork_run(fault_reference.run, tmp_path)
        args: list[str] = []
    else:
        run = RunDir(tmp_path / "run")
        args = ["--preset", "tiny-cpu", "--set", *FAST]
    report: dict = {"stage": stage, "seed": seed, "interval": interval, "total": total}

    # 1-2: the lock admits one of two; SIGKILL it at a seeded step.
    first = _start_two_at_once(stage, run, args)
    with first:
        k1 = rng.randint(1, total - interval - 1)
        assert first.wait_step(k1), f"{stage} ended before step {k1}:\n{first.tail()}"
        first.kill()
    last1, on_disk1 = first.last_step, complete_steps(run, stage)
    resume1 = max(on_disk1, default=None)
    report.update(kill1_at_step=last1, complete_after_kill1=on_disk1)

    # 3: resume; SIGKILL inside the write of a later checkpoint (files written, no marker).
    later = [c for c in range(interval, total + 1, interval) if c > (resume1 or 0) and (c < total or stage not in RL)]
    newer = [c for c in later if c > last1]
    assert last1 - (resume1 or 0) <= interval
    c2 = rng.choice(newer or later) if later else None  # None: the first kill came too late to leave one
    partial = run.checkpoints(stage) / f".step-{c2}.partial"
    last2, resume2 = last1, resume1
    if c2 is not None:
        with StageProc(stage, run.path, env={PAUSE_ENV: f"60@{c2}"}, entry=(PAUSED_STAGE,)) as second:
            assert second.wait_for(lambda: (partial / ".paused").exists()), second.tail()
            second.kill()
        assert second.resumed_from() == resume1, second.tail()
        written = sorted(p.name for p in partial.rglob("*") if p.is_file())
        assert any(name.endswith("model_states.pt") for name in written), written
        assert "COMPLETE" not in written and c2 not in complete_steps(run, stage)
        last2, on_disk2 = second.last_step, complete_steps(run, stage)
        resume2 = max(on_disk2, default=None)
        report.update(kill2_in_checkpoint=c2, files_in_half_checkpoint=written, complete_after_kill2=on_disk2)
    report.update(resumed1_from=resume1)

    # 4: the last attempt resumes from the newest complete checkpoint, not the half one.
    with StageProc(stage, run.path) as third:
        result = third.result()
    assert third.resumed_from() == resume2, third.tail()
    assert resume2 is None or c2 is None or resume2 < c2
    assert last2 - (resume2 or 0) <= interval
    assert not partial.exists() and not partial_dirs(run, stage), partial_dirs(run, stage)
    if resume2 is not None:
        saved = json.loads((run.stage(stage) / "resume.json").read_text())
        assert saved["resumed_from_step"] == resume2

    got, ref = result["metrics"], fault_reference.result(stage)["metrics"]  # made meanwhile, side by side
    rel = {k: abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-8) for k in KEY_METRICS[stage]}
    wdiff = _weights_diff(run.final(stage), fault_reference.run.final(stage))
    report.update(resumed2_from=resume2, redone_steps=[last1 - (resume1 or 0), last2 - (resume2 or 0)],
                  metrics={k: got[k] for k in KEY_METRICS[stage]}, reference={k: ref[k] for k in KEY_METRICS[stage]},
                  max_rel_metric_diff=max(rel.values()), max_abs_weight_diff=wdiff)
    print("FAULT-REPORT", json.dumps(report))
    assert max(rel.values()) <= METRIC_RTOL, report
    assert wdiff <= WEIGHT_ATOL, report
    if stage not in RL:
        assert got["global_step"] == total
    else:
        assert got["iterations"] == total
