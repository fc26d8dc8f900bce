"""Every stage on 2 ranks (CPU processes over gloo, started by DeepSpeed's launcher as the
DAG's task starts them), at ZeRO 0-3 and with offload, and what must hold there:

- the issue's repro (torchrun, SFT at ZeRO-3, 30 steps) finishes: every rank runs as
  many evaluation forward passes (loop.shard_batches), so no collective waits for ever;
- parity: 2 ranks at micro-batch b train the same weights as 1 rank at micro-batch b
  with 2 accumulation steps (the same global batch, the same data order), and ZeRO 1, 2
  (with offload) and 3 train the same weights as ZeRO-0, to float tolerance;
- ``final/`` of a ZeRO-3 run is a plain ``save_pretrained`` directory, gathered from the
  ranks' shards; its checkpoints hold every rank's part;
- ppo, grpo, rloo, dpo on both kinds of pairs, kto and evaluate run at ZeRO-3 on 2 ranks
  (generation synchronised across ranks: HF generate's ``synced_gpus``); KTO's 2 ranks at
  ZeRO-3 train what 1 rank with 2 accumulation steps does;
- what MLflow gets is over all ranks, logged once, by rank 0, in one run per stage.

The runs are shared (tests/ranks.py) and short; the fault cases (a rank killed, a rank
that hangs) are tests/faults/test_ranks_faults.py's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_tasks.storage import RunDir
from tests.ranks import REPO, STEPS, launcher_env

pytestmark = pytest.mark.slow

# Float tolerance of the parity checks: the same sums in another order (gloo's all-reduce
# against DeepSpeed's accumulation, ZeRO's flat partitions against per-parameter AdamW).
WEIGHT_ATOL = 5e-5
METRIC_RTOL = 1e-4


def weights(run: RunDir, stage: str) -> dict:
    """Every tensor of the stage's final/ (the reward model's value head is a file of its own)."""
    out: dict = {}
    for f in sorted(run.final(stage).glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def max_weight_diff(a: RunDir, b: RunDir, stage: str) -> float:
    x, y = weights(a, stage), weights(b, stage)
    assert x.keys() == y.keys()
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


KEY = {"sft": "perplexity", "rm": "accuracy"}


def test_the_issues_repro_finishes(storage, tiny_model_dir, tmp_path):
    """``torchrun --nproc_per_node 2 -m rlhf_tasks sft --preset tiny-cpu --set
    sft.zero_stage=3 sft.max_steps=30`` hung for ever in its first evaluation (rank 0 in a
    ZeRO-3 all-gather of a forward pass rank 1 never ran). 40 held-out rows are one
    evaluation batch: rank 1's share is a padding pass."""
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "-m", "rlhf_tasks", "sft",
           "--preset", "tiny-cpu", "--output", str(run), "--set", "sft.zero_stage=3", "sft.max_steps=30",
           "data.max_eval_samples=40", "tracking.system_metrics=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=launcher_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RLHF_RESULT ")][0][12:])
    assert result["metrics"]["global_step"] == 30
    assert result["metrics"]["perplexity"] < result["metrics"]["perplexity_before"]
    assert "world_size=2 rank=1" in out


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_two_ranks_equal_one_rank_with_two_accumulation_steps(rank_runs, stage):
    one, two = rank_runs.stage("one", stage), rank_runs.stage("zero0", stage)
    a, b = one.result["metrics"], two.result["metrics"]
    diff = max_weight_diff(one.run, two.run, stage)
    print(f"PARITY {stage} 1 rank x 2 accumulation vs 2 ranks: {KEY[stage]} {a[KEY[stage]]:.6f} vs "
          f"{b[KEY[stage]]:.6f}, max |weight diff| {diff:.2e}")
    assert a["global_step"] == b["global_step"] == STEPS
    assert math.isclose(a[KEY[stage]], b[KEY[stage]], rel_tol=METRIC_RTOL)
    assert diff <= WEIGHT_ATOL
    assert "world_size=2 rank=1" in two.log and "world_size=1 rank=0" in one.log


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_zero3_equals_zero0_and_final_is_gathered(rank_runs, stage):
    z0, z3 = rank_runs.stage("zero0", stage), rank_runs.stage("zero3", stage)
    diff = max_weight_diff(z0.run, z3.run, stage)
    a, b = z0.result["metrics"], z3.result["metrics"]
    print(f"PARITY {stage} ZeRO-3 vs ZeRO-0 on 2 ranks: {KEY[stage]} {b[KEY[stage]]:.6f} vs {a[KEY[stage]]:.6f}, "
          f"max |weight diff| {diff:.2e}")
    assert math.isclose(a[KEY[stage]], b[KEY[stage]], rel_tol=METRIC_RTOL) and diff <= WEIGHT_ATOL
    # final/: whole tensors that transformers loads as they are (not DeepSpeed shards).
    final = z3.run.final(stage)
    assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in z0.run.final(stage).iterdir())
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.pt"))
    ckpt = z3.run.checkpoints(stage) / f"step-{STEPS}"
    names = sorted(p.name for p in ckpt.iterdir())
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(names)
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 2


def test_final_of_zero3_loads_with_transformers(rank_runs):
    from transformers import AutoModelForCausalLM

    z3 = rank_runs.stage("zero3", "sft")
    model = AutoModelForCausalLM.from_pretrained(z3.run.final("sft"))
    assert sum(p.numel() for p in model.parameters()) > 500_000  # whole, not a rank's shard


@pytest.mark.parametrize("setting", ["zero1", "zero2off"])
def test_zero1_and_zero2_with_offload_equal_zero0(rank_runs, setting):
    z0, other = rank_runs.stage("zero0", "sft"), rank_runs.stage(setting, "sft")
    diff = max_weight_diff(z0.run, other.run, "sft")
    a, b = z0.result["metrics"]["perplexity"], other.result["metrics"]["perplexity"]
    print(f"PARITY sft {setting} vs zero0 on 2 ranks: perplexity {b:.6f} vs {a:.6f}, max |weight diff| {diff:.2e}")
    assert math.isclose(a, b, rel_tol=METRIC_RTOL) and diff <= WEIGHT_ATOL


ALIGNMENT = [("ppo", ()), ("grpo", ()), ("rloo", ()), ("dpo", ()), ("dpo", ("dpo.pairs=dataset",))]


@pytest.mark.parametrize("stage, extra", ALIGNMENT, ids=["ppo", "grpo", "rloo", "dpo-generated", "dpo-dataset"])
def test_alignment_stages_run_on_two_ranks_at_zero3(rank_runs, stage, extra):
    done = rank_runs.stage("zero3", stage, *extra, needs=("sft", "rm"))
    m = done.result["metrics"]
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
    assert "world_size=2 rank=1" in done.log
    if stage == "dpo":
        assert m["global_step"] == 4 and m["train_pairs"] > 0
        assert ("generated_pairs" in m) == (not extra)
    else:
        assert m["iterations"] == 2
        assert "static backend not used (the weights are ZeRO-3 partitioned)" in done.log
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(done.run.final(stage))


# A smaller third phase for KTO (694 training answers, not 8586): its reference pass scores them all;
# the dataset's answers (the preset's generated ones need the reward model and a sampling pass).
KTO_RUN = ("data.data_split=2,4,0.2", "kto.answers=dataset")


def test_kto_at_zero3_on_two_ranks_equals_one_rank_with_two_accumulation_steps(rank_runs):
    """KTO's reference pass (on the engine, gathered), its held-out evaluation and its
    reference point z0 (every step, on every rank) in lockstep at ZeRO-3; from one SFT
    model, 2 ranks at ZeRO-3 train the weights of 1 rank with 2 accumulation steps at ZeRO-0
    (the same global batches, z0 over the same mismatched pairs)."""
    one, z3 = (rank_runs.stage(s, "kto", *KTO_RUN, needs=("sft",), needs_from="one") for s in ("one", "zero3"))
    a, b = one.result["metrics"], z3.result["metrics"]
    diff = max_weight_diff(one.run, z3.run, "kto")
    sft, kto = weights(one.run, "sft"), weights(one.run, "kto")
    moved = max((kto[k] - sft[k]).abs().max().item() for k in sft)
    print(f"PARITY kto 1 rank x 2 accumulation (ZeRO-0) vs 2 ranks ZeRO-3: reward_accuracy {a['reward_accuracy']:.6f} "
          f"vs {b['reward_accuracy']:.6f}, eval_loss {a['eval_loss']:.6f} vs {b['eval_loss']:.6f}, max |weight diff| "
          f"{diff:.2e} (moved from SFT: {moved:.2e})")
    assert a["global_step"] == b["global_step"] == 4 and a["train_answers"] == b["train_answers"] > 0
    assert moved > 20 * WEIGHT_ATOL and diff <= WEIGHT_ATOL
    for key in ("reward_accuracy", "eval_margin", "eval_kl", "eval_loss"):
        assert math.isclose(a[key], b[key], rel_tol=METRIC_RTOL, abs_tol=1e-6), (key, a[key], b[key])
    # What MLflow got per step is over every rank: z0's estimate (unclamped: it is 0 at step 1, then
    # negative here, so the loss saw max(0, z0) = 0) and the training rewards match one process's.
    for metric in ("kl", "desirable_reward", "undesirable_reward"):
        x, y = (logged_curve(rank_runs, launched, metric, 4) for launched in (one, z3))
        print(f"PARITY kto logged {metric}: {x} vs {y}")
        assert all(math.isclose(p, q, rel_tol=METRIC_RTOL, abs_tol=1e-6) for p, q in zip(x, y, strict=True))
    assert "world_size=2 rank=1" in z3.log and b["reward_accuracy"] > b["reward_accuracy_before"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(z3.run.final("kto"))


def test_evaluate_shards_the_prompts_over_two_ranks(rank_runs):
    rank_runs.stage("zero3", "ppo", needs=("sft", "rm"))
    done = rank_runs.stage("zero3", "evaluate")
    m = done.result["metrics"]
    assert m["prompts"] == 24 and math.isfinite(m["reward_gain"])
    rows = json.loads((done.run.stage("evaluate") / "samples.json").read_text())
    assert len(rows) == 24 and len({r["prompt"] for r in rows}) == 24
    for rank in (0, 1):
        assert f"evaluate: rank {rank} of 2 answered 12 of the 24 prompts" in done.log, done.log[-3000:]


def logged_curve(rank_runs, launched, metric: str, steps: int) -> list[float]:
    """``<stage>/<metric>`` as the stage's one MLflow run holds it: one point per step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(rank_runs.mlflow_url)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`rlhf.stage` = '{launched.stage}' and tags.`rlhf.run_dir` = '{launched.run.path}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.run_id == launched.result["mlflow_run_id"]
    history = client.get_metric_history(runs[0].info.run_id, f"{launched.stage}/{metric}")
    assert sorted(h.step for h in history) == list(range(1, steps + 1))
    return [h.value for h in sorted(history, key=lambda h: h.step)]


def test_metrics_are_over_all_ranks_logged_once_by_rank_zero(rank_runs):
    """One MLflow run per stage whatever the ranks; its loss curve has one point per step
    and is the whole step's loss: the one-process run's (the same global batches)."""
    one, two = rank_runs.stage("one", "sft"), rank_runs.stage("zero0", "sft")
    a, b = (logged_curve(rank_runs, launched, "loss", STEPS) for launched in (one, two))
    print(f"PARITY sft logged loss, 1 rank x 2 accumulation vs 2 ranks: {a} vs {b}")
    assert all(math.isclose(x, y, rel_tol=METRIC_RTOL) for x, y in zip(a, b, strict=True))
    assert os.environ.get("MLFLOW_TRACKING_URI") is None  # the runs got the server through their own env
