"""The alignment algorithms side by side on one trained SFT + reward model: quality and speed.

For each variant (every algorithm of the table, and GRPO's group sampling with each loss
and advantage estimator of the 2025-26 set: DAPO, Dr. GRPO, GSPO, CISPO,
REINFORCE++-baseline) and each alignment seed (``alignment_seed``: the step's own sampling;
the data split and the SFT/RM stay the same), the step runs in a fresh copy of the run
directory, then ``evaluate`` compares the aligned actor with SFT on the held-out prompts
(the reward model scores both). Reported per variant: held-out reward gain over SFT (mean
± standard deviation over the seeds), win rate, KL to SFT, the models held on the device,
and speed: seconds per iteration for the RL steps at the same prompts x answers per
iteration (PPO 32 x 1, the group variants 8 x 4 on tiny-cpu), the offline steps' seconds
per pair against PPO's seconds per prompt.

    python bench/algorithms.py --run RUN_DIR_WITH_SFT_AND_RM --seeds 1 2 3 --update
    python bench/algorithms.py --run RUN_DIR_WITH_SFT --variants ppo grpo rloo dpo \
        --set reward.source=verifier --section algorithms-verifier-cpu --update   # the verifier's reward, no RM

``--update`` rewrites the ``--section`` section of BENCHMARKS.md (``algorithms-cpu``). Where
the verifier can check prompts, its held-out accuracy is reported beside the reward. Every stage is a real
``python -m rlhf_tasks`` process, one at a time, so that their timings do not mix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import replace_section  # noqa: E402

from rlhf_tasks.config import ALGORITHMS  # noqa: E402
from rlhf_tasks.storage import RESULT_PREFIX  # noqa: E402

# label -> (algorithm, overrides): every algorithm of the table as its preset sets it up, then
# GRPO-style group sampling with each loss of the 2025-26 set (the recipes their papers give).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    **{a: (a, []) for a in ALGORITHMS},
    "dapo": ("grpo", ["grpo.loss=dapo", "grpo.dynamic_sampling=true", "reward.overlong_buffer=8", "grpo.kl_coef=0"]),
    "dr_grpo": ("grpo", ["grpo.loss=dr_grpo", "grpo.advantage=group_mean"]),
    "gspo": ("grpo", ["grpo.loss=gspo"]),
    "cispo": ("grpo", ["grpo.loss=cispo"]),
    "reinforce_pp_baseline": ("grpo", ["grpo.advantage=reinforce_pp_baseline", "grpo.loss=ppo",
                                       "grpo.kl_penalty=reward"]),
}


def stage(name: str, run: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rlhf_tasks", name, "--output", str(run), *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)][-1]
    return json.loads(line.removeprefix(RESULT_PREFIX))


def one(trained: Path, work: Path, variant: str, seed: int, preset: str, extra: list[str]) -> dict:
    algo, overrides = VARIANTS[variant]
    run = work / f"{variant}-{seed}"
    for s in ("sft", "rm"):
        if (trained / s / "final").is_dir():  # a verifier recipe (reward.source=verifier) has no rm
            shutil.copytree(trained / s / "final", run / s / "final")
    res = stage(algo, run, "--preset", preset, "--set", f"algorithm={algo}", f"alignment_seed={seed}", *overrides,
                *extra)
    ev = stage("evaluate", run)["metrics"]
    m = res["metrics"]
    out = {"algorithm": variant, "seed": seed, "wall_clock_s": res["wall_clock_s"], "gain": ev["reward_gain"],
           "gain_se": ev["reward_gain_se"], "win_rate": ev["aligned_win_rate"], "kl": ev["kl_aligned_sft"],
           "sft_reward": ev["sft_reward"], "aligned_reward": ev["aligned_reward"],
           "models_mb": m.get("memory/models_bytes", 0.0) / 1e6,
           # The verifier's ground truth beside the reward (held-out checkable prompts).
           **{k: ev[k] for k in ("sft_accuracy", "aligned_accuracy", "accuracy_gain", "accuracy_gain_se") if k in ev}}
    if not ALGORITHMS[algo].rollouts:
        import yaml

        d = yaml.safe_load((run / "config.yaml").read_text())[algo]
        pairs_per_step = d["per_device_train_batch_size"] * d["gradient_accumulation_steps"]
        out["s_per_pair"] = m["train_timed_s"] / max(m["train_timed_steps"], 1) / pairs_per_step
        out["generate_s"] = m.get("generate_s", 0.0)  # dpo.pairs=generated: making the pairs, once
    else:
        per_iter = sum(m.get(k, 0.0) for k in ("generation_s", "scoring_s", "training_s"))
        out.update(s_per_iteration=per_iter, prompts_per_s=m["prompts_per_s"],
                   generation_share=m.get("generation_s", 0.0) / max(per_iter, 1e-9))
    shutil.rmtree(run)
    return out


def cpu_name() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def table(rows: list[dict], machine: str) -> str:
    by = {a: [r for r in rows if r["algorithm"] == a] for a in VARIANTS}
    by = {a: rs for a, rs in by.items() if rs}
    n = max(len(rs) for rs in by.values())
    accuracy = all("accuracy_gain" in r for r in rows)
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {machine}, tiny-cpu preset, one trained SFT (+ reward model where the reward uses one), "
             f"{n} alignment seed(s) per variant (gain: held-out average reward of the aligned actor minus SFT's, "
             "mean ± standard deviation over the seeds"
             + ("; accuracy: the verifier's share of right answers on the held-out checkable prompts, SFT → aligned"
                if accuracy else "") + ").", "",
             "| variant | reward gain over SFT | " + ("accuracy SFT → aligned | " if accuracy else "")
             + "win rate | KL to SFT (nats/answer) | models held (MB) | stage wall-clock (s) | speed |",
             "|---|---|---|---|---|---|---|" + ("---|" if accuracy else "")]
    ppo_per_prompt = None
    if "ppo" in by:
        ppo_per_prompt = statistics.mean(r["s_per_iteration"] for r in by["ppo"]) / 32
    for a, rs in by.items():
        gains = [r["gain"] for r in rs]
        sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
        if "s_per_pair" in rs[0]:
            speed = f"{statistics.mean(r['s_per_pair'] for r in rs) * 1e3:.1f} ms/pair"
            if ppo_per_prompt:
                speed += f" (PPO: {ppo_per_prompt * 1e3:.1f} ms/prompt)"
            if any(r.get("generate_s") for r in rs):
                speed += f", after {statistics.mean(r.get('generate_s', 0.0) for r in rs):.0f} s making generated pairs"
        else:
            speed = (f"{statistics.mean(r['s_per_iteration'] for r in rs):.2f} s/iteration "
                     f"({statistics.mean(r['generation_share'] for r in rs):.0%} generating)")
        acc = (f"{statistics.mean(r['sft_accuracy'] for r in rs):.2f} → "
               f"{statistics.mean(r['aligned_accuracy'] for r in rs):.2f} | " if accuracy else "")
        lines.append(f"| {a} | {statistics.mean(gains):+.2f} ± {sd:.2f} | {acc}"
                     f"{statistics.mean(r['win_rate'] for r in rs):.2f} | {statistics.mean(r['kl'] for r in rs):.1f} | "
                     f"{statistics.mean(r['models_mb'] for r in rs):.1f} | "
                     f"{statistics.mean(r['wall_clock_s'] for r in rs):.0f} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a run directory whose sft and rm stages finished")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--preset", default="tiny-cpu")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every alignment stage")
    ap.add_argument("--update", action="store_true", help="rewrite the --section section of BENCHMARKS.md")
    ap.add_argument("--section", default="algorithms-cpu",
                    help="BENCHMARKS.md section (algorithms-verifier-cpu for --set reward.source=verifier)")
    ap.add_argument("--note", default="", help="a sentence added under the table (e.g. the machine's load)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--with", dest="more", type=Path, nargs="*", default=[],
                    help="rows of earlier runs (their --json files) to tabulate with these")
    a = ap.parse_args(argv)
    rows = [r for f in a.more for r in json.loads(f.read_text())]
    with tempfile.TemporaryDirectory(prefix="rlhf-algos-") as work:
        for seed in a.seeds:  # seeds outermost: a machine slowing down over time slows every algorithm alike
            for variant in a.variants:
                rows.append(one(a.run, Path(work), variant, seed, a.preset, a.set))
                print(json.dumps(rows[-1]), flush=True)
    machine = f"a {os.cpu_count()}-core {cpu_name()} VM, no GPU"
    md = table(rows, machine) + (f"\n\n{a.note}" if a.note else "")
    print(md)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if a.update:
        replace_section(ROOT / "BENCHMARKS.md", a.section, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
