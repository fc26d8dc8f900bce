"""Our stages beside a plain transformers + torch loop and beside TRL 1.16, in one run on CPU.

``plain``: the real ``sft`` and ``rm`` stages (tiny-cpu) and the loop a user writes (bench/
throughput.py's ``plain_train``: the model's own ``labels=`` loss, AdamW, gradient clipping) on
the same micro-batches in the same order, rounds alternating; real tokens per CPU second and per
second, the first step left out. ``trl``: SFT, DPO and GRPO against TRL's SFTTrainer,
DPOTrainer and GRPOTrainer on the same model, data and reward (tiny-cpu's SFT start and rows,
pre-tokenised, loss on the answers; DPO from one SFT model on the third phase's labelled pairs;
GRPO from it, our reward model as TRL's reward function), at tiny-cpu's learning rates, batch
sizes, steps, beta and KL coefficient, TRL's defaults otherwise; quality measured alike for both
(held-out perplexity; implicit-reward accuracy against the SFT reference; the reward model's
average score of answers to held-out prompts, same sampling and seed). TRL goes into a
directory of its own (``pip install --no-deps --target``), never into the project's environment.

    python bench/peers.py plain --rounds 3
    python bench/peers.py all --run RUN_DIR_WITH_SFT_AND_RM --update   # rewrites BENCHMARKS.md's peers-cpu
"""

from __future__ import annotations

import argparse
import json
import os
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

from algorithms import cpu_name, stage  # noqa: E402
from plan_accuracy import update_benchmarks  # noqa: E402

TRL_VERSION = "1.16.0"
TRL_DIR = ROOT / ".bench" / f"trl-{TRL_VERSION}"
MARKERS = ("<!-- peers-cpu:begin -->", "<!-- peers-cpu:end -->")


def install_trl(target: Path = TRL_DIR) -> None:
    """TRL into ``target`` alone (its dependencies are the project's), then importable."""
    if not (target / "trl").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"trl=={TRL_VERSION}"], check=True)
    sys.path.insert(0, str(target))


# -- ours against a plain loop ------------------------------------------------------------------

def plain_loop(kind: str, run: Path, steps: int) -> dict:
    """The plain loop on the micro-batches the stage trained on, in its order: real tokens per
    second and per CPU second."""
    from throughput import plain_train
    from torch.utils.data import DataLoader

    from rlhf_tasks.algorithms.maths.preference import pairwise_loss
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.data import LengthGroupedBatchSampler, PairCollator, SFTCollator, phases
    from rlhf_tasks.runtime.models import RewardModel, load_causal_lm, load_tokenizer, read_score

    cfg = PipelineConfig.load(run / "config.yaml")
    tok = load_tokenizer(cfg.model.actor)
    if kind == "sft":
        t, (ds, _) = cfg.sft, phases.sft_rows(cfg, tok, "train")
        collate, model = SFTCollator(tok.pad_token_id), load_causal_lm(cfg.model.actor, dropout=0.0)

        def loss_fn(m, b):
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                     use_cache=False).loss
    else:
        t, (ds, _) = cfg.rm, phases.rm_pairs(cfg, tok, "train")
        collate, model = PairCollator(tok.pad_token_id), RewardModel.from_pretrained(cfg.model.rm, dropout=0.0)

        def loss_fn(m, b):
            return pairwise_loss(*read_score(m(b["input_ids"], b["attention_mask"]), b["attention_mask"]).chunk(2))
    sampler = LengthGroupedBatchSampler(ds["length"], t.per_device_train_batch_size, seed=cfg.seed)
    sampler.set_epoch(0)
    loader = DataLoader(ds, batch_sampler=list(sampler), collate_fn=collate)
    import torch

    return plain_train(model, loader, loss_fn, steps=steps, accumulation=1, device=torch.device("cpu"), dtype="fp32",
                       flops_per_token=0.0, lr=t.learning_rate, weight_decay=t.weight_decay,
                       max_grad_norm=t.max_grad_norm)


def plain(rounds: int, steps: int, work: Path) -> list[dict]:
    rows = []
    for kind in ("sft", "rm"):
        ours, base, ours_cpu, base_cpu = [], [], [], []
        for r in range(rounds):  # alternating: a machine whose load drifts slows both alike
            run = work / f"{kind}-{r}"
            res = stage(kind, run, "--preset", "tiny-cpu", "--set", f"{kind}.max_steps={steps}", f"{kind}.epochs=1",
                        f"{kind}.checkpoint_every_steps=0")
            m, p = res["metrics"], plain_loop(kind, run, steps)
            ours.append(m["train_tokens_per_s"])
            ours_cpu.append(m["train_tokens_per_cpu_s"])
            base.append(p["tokens_per_s"])
            base_cpu.append(p["tokens_per_cpu_s"])
            print(f"[peers] {kind} round {r}: ours {ours[-1]:.0f} ({ours_cpu[-1]:.0f} per CPU s), plain {base[-1]:.0f} "
                  f"({base_cpu[-1]:.0f}) tokens/s", flush=True)
            shutil.rmtree(run)
        rows.append({"stage": kind, "steps": steps, "ours": ours, "plain": base, "ours_cpu": ours_cpu,
                     "plain_cpu": base_cpu, "ratio": statistics.median(o / b for o, b in zip(ours, base, strict=True)),
                     "ratio_cpu": statistics.median(o / b for o, b in zip(ours_cpu, base_cpu, strict=True))})
    return rows


# -- ours against TRL --------------------------------------------------------------------------

class StepClock:
    """A TRL callback: seconds of the optimizer steps after the first (warm-up)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                now, cpu = time.perf_counter(), time.process_time()
                if clock.first is None:
                    clock.first, clock.cpu_first = now, cpu
                clock.last, clock.cpu_last, clock.steps = now, cpu, state.global_step

        self.first = self.last = None
        self.cpu_first = self.cpu_last = 0.0
        self.steps = 0
        self.callback = _CB()

    @property
    def timed(self) -> tuple[int, float]:
        return self.steps - 1, (self.last or 0.0) - (self.first or 0.0)

    @property
    def cpu(self) -> float:
        """CPU seconds of this process over the timed steps."""
        return self.cpu_last - self.cpu_first


def trl_common(out: Path, steps: int, lr: float, sched: str, warmup: int) -> dict:
    return dict(output_dir=str(out), max_steps=steps, learning_rate=lr, lr_scheduler_type=sched, warmup_steps=warmup,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=max(steps // 4, 1), seed=1234,
                dataloader_num_workers=0, disable_tqdm=True)


def sft_vs_trl(work: Path, steps: int) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlhf_tasks.algorithms import sft as sft_stage
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.data import SFTCollator, phases
    from rlhf_tasks.runtime.loop import cap_eval
    from rlhf_tasks.runtime.models import load_causal_lm, load_tokenizer

    run = work / "sft-ours"
    res = stage("sft", run, "--preset", "tiny-cpu", "--set", f"sft.max_steps={steps}", "sft.epochs=1",
                "sft.checkpoint_every_steps=0")
    cfg = PipelineConfig.load(run / "config.yaml")
    t, tok = cfg.sft, load_tokenizer(cfg.model.actor)
    ds, _ = phases.sft_rows(cfg, tok, "train")
    eval_ds, _ = phases.sft_rows(cfg, tok, "eval")
    eval_ds = cap_eval(eval_ds, cfg.data.max_eval_samples, cfg.seed)
    rows = Dataset.from_dict({"input_ids": ds["input_ids"],
                              "completion_mask": [[int(x != -100) for x in lab] for lab in ds["labels"]]})
    clock = StepClock()
    model = load_causal_lm(cfg.model.actor, dropout=0.0)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=rows, callbacks=[clock.callback],
                         args=SFTConfig(**trl_common(work / "sft-trl", steps, t.learning_rate, t.lr_scheduler_type,
                                                     t.num_warmup_steps), per_device_train_batch_size=
                                        t.per_device_train_batch_size, weight_decay=t.weight_decay,
                                        max_length=cfg.data.max_seq_len, completion_only_loss=True,
                                        max_grad_norm=t.max_grad_norm))
    trainer.train()
    n, seconds = clock.timed
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
    import torch

    ppl = sft_stage.evaluate(trainer.model, eval_ds, SFTCollator(tok.pad_token_id), t.per_device_eval_batch_size,
                             torch.device("cpu"))["perplexity"]
    m = res["metrics"]
    return {"algorithm": "SFT", "steps": steps, "ours_rate": m["train_tokens_per_s"], "trl_rate": tokens * n / steps / seconds,
            "ours_cpu_rate": m["train_tokens_per_cpu_s"], "trl_cpu_rate": tokens * n / steps / clock.cpu,
            "unit": "real tokens/s", "quality": "held-out perplexity", "ours_quality": m["perplexity"],
            "trl_quality": ppl, "before": m["perplexity_before"]}


def fork(trained: Path, where: Path) -> Path:
    for s in ("sft", "rm"):
        shutil.copytree(trained / s / "final", where / s / "final")
    return where


def dpo_vs_trl(trained: Path, work: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf_tasks.algorithms import dpo as dpo_stage
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.data import DPOCollator, phases
    from rlhf_tasks.runtime.loop import cap_eval
    from rlhf_tasks.runtime.models import load_causal_lm, load_tokenizer

    run = fork(trained, work / "dpo-ours")
    res = stage("dpo", run, "--preset", "tiny-cpu", "--set", "algorithm=dpo", "dpo.pairs=dataset",
                f"dpo.max_steps={steps}", "dpo.checkpoint_every_steps=0")
    cfg = PipelineConfig.load(run / "config.yaml")
    d, sft_dir = cfg.dpo, str(run / "sft" / "final")
    tok = load_tokenizer(sft_dir)
    ds, _ = phases.dpo_pairs(cfg, tok, "train")

    def text(ids, start, end=None):
        return tok.decode(ids[start:end], skip_special_tokens=True)

    pairs = Dataset.from_dict({
        "prompt": [text(r["chosen_input_ids"], 0, r["chosen_prompt_len"]) for r in ds],
        "chosen": [text(r["chosen_input_ids"], r["chosen_prompt_len"]) for r in ds],
        "rejected": [text(r["rejected_input_ids"], r["chosen_prompt_len"]) for r in ds]})  # one prompt, both
    clock = StepClock()
    trainer = DPOTrainer(model=load_causal_lm(sft_dir, dropout=0.0), processing_class=tok, train_dataset=pairs,
                         callbacks=[clock.callback],
                         args=DPOConfig(**trl_common(work / "dpo-trl", steps, d.learning_rate, d.lr_scheduler_type,
                                                     d.num_warmup_steps), beta=d.beta,
                                        per_device_train_batch_size=d.per_device_train_batch_size,
                                        max_length=cfg.data.max_seq_len, weight_decay=d.weight_decay))
    trainer.train()
    n, seconds = clock.timed
    eval_ds, _ = phases.dpo_pairs(cfg, tok, "eval")
    eval_ds = cap_eval(eval_ds, cfg.data.max_eval_samples, cfg.seed)
    collate, cpu = DPOCollator(tok.pad_token_id), torch.device("cpu")
    ref = dpo_stage.reference_log_probs(load_causal_lm(sft_dir), eval_ds, collate, d.per_device_eval_batch_size, cpu,
                                        d.loss_type == "ipo")
    acc = dpo_stage.evaluate(trainer.model, dpo_stage.with_reference(eval_ds, ref), collate, d, cpu)["reward_accuracy"]
    m = res["metrics"]
    cpu_s = m["train_tokens_per_s"] * m["train_timed_s"] / m["train_tokens_per_cpu_s"]
    return {"algorithm": "DPO", "steps": steps, "ours_rate": m["train_pairs_per_s"],
            "trl_rate": n * d.per_device_train_batch_size / seconds,
            "ours_cpu_rate": m["train_pairs_per_s"] * m["train_timed_s"] / cpu_s,
            "trl_cpu_rate": n * d.per_device_train_batch_size / clock.cpu, "unit": "pairs/s",
            "quality": "held-out implicit-reward accuracy", "ours_quality": m["reward_accuracy"], "trl_quality": acc,
            "before": m["reward_accuracy_before"]}


def held_out_reward(actor, run: Path, prompts: int) -> float:
    """The reward model's average (clipped) score of ``actor``'s answers to the first
    ``prompts`` held-out prompts, sampled as evaluate samples them (same settings, same seed)."""
    import torch
    from torch.utils.data import DataLoader

    from rlhf_tasks.algorithms.rl.generation import GenerationSettings
    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.data import PromptCollator, phases
    from rlhf_tasks.pipeline.evaluate import answer_and_score
    from rlhf_tasks.runtime.loop import cap_eval
    from rlhf_tasks.runtime.models import RewardModel, load_tokenizer

    cfg = PipelineConfig.load(run / "config.yaml")
    tok = load_tokenizer(str(run / "sft" / "final"))
    ds, _ = phases.ppo_prompts(cfg, tok, "eval")
    ds = cap_eval(ds, prompts, cfg.seed)
    batches = list(DataLoader(ds, batch_size=cfg.evaluate.per_device_batch_size,
                              collate_fn=PromptCollator(tok.pad_token_id)))
    reward = RewardModel.from_pretrained(str(run / "rm" / "final")).eval()
    with torch.no_grad():
        r, *_ = answer_and_score(actor.eval(), reward, batches, GenerationSettings.from_config(cfg), tok,
                                 torch.device("cpu"), cfg.reward.clip_reward_value, cfg.seed)
    return r.mean().item()


def grpo_vs_trl(trained: Path, work: Path, steps: int, prompts: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.data import phases
    from rlhf_tasks.runtime.models import RewardModel, load_causal_lm, load_tokenizer

    run = fork(trained, work / "grpo-ours")
    res = stage("grpo", run, "--preset", "tiny-cpu", "--set", "algorithm=grpo", f"grpo.max_steps={steps}",
                "grpo.checkpoint_every_steps=0")
    cfg = PipelineConfig.load(run / "config.yaml")
    g, sft_dir = cfg.grpo, str(run / "sft" / "final")
    tok = load_tokenizer(sft_dir)
    ds, _ = phases.ppo_prompts(cfg, tok, "train")
    prompts_text = Dataset.from_dict({"prompt": tok.batch_decode([r["prompt_input_ids"] for r in ds],
                                                                 skip_special_tokens=True)})
    reward = RewardModel.from_pretrained(str(run / "rm" / "final")).eval()
    clip = cfg.reward.clip_reward_value

    @torch.no_grad()
    def rm_score(prompts, completion_ids, **_):
        """Our reward model on prompt + answer tokens, as the RL stages score them."""
        seqs = [tok(p)["input_ids"] + list(c) for p, c in zip(prompts, completion_ids, strict=True)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return reward.score(ids, mask).clamp(-clip, clip).tolist()

    rollout = g.per_device_generation_batch_size * g.group_size
    clock = StepClock()
    trainer = GRPOTrainer(model=load_causal_lm(sft_dir, dropout=0.0), reward_funcs=[rm_score], processing_class=tok,
                          train_dataset=prompts_text, callbacks=[clock.callback],
                          args=GRPOConfig(**trl_common(work / "grpo-trl", steps, g.actor.learning_rate,
                                                       g.actor.lr_scheduler_type, g.actor.num_warmup_steps),
                                          beta=g.kl_coef, num_generations=g.group_size,
                                          per_device_train_batch_size=rollout, steps_per_generation=1,
                                          max_completion_length=cfg.data.max_seq_len - cfg.data.max_prompt_seq_len,
                                          temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or None))
    trainer.train()
    n, seconds = clock.timed
    m = res["metrics"]
    per_iter = sum(m.get(k, 0.0) for k in ("generation_s", "scoring_s", "training_s"))
    before = held_out_reward(load_causal_lm(sft_dir), run, prompts)
    ours = held_out_reward(load_causal_lm(str(run / "grpo" / "final")), run, prompts)
    return {"algorithm": "GRPO", "steps": steps, "ours_rate": rollout / per_iter, "trl_rate": n * rollout / seconds,
            "ours_cpu_rate": rollout / m["cpu_s_per_iteration"], "trl_cpu_rate": n * rollout / clock.cpu,
            "unit": "answers/s", "quality": f"held-out reward ({prompts} prompts)", "ours_quality": ours,
            "trl_quality": held_out_reward(trainer.model, run, prompts), "before": before}


# -- the report ----------------------------------------------------------------------------------

def render(plain_rows: list[dict], trl_rows: list[dict], machine: str, note: str) -> str:
    out = [f"Measured {time.strftime('%Y-%m-%d')} on {machine}, tiny-cpu, one process per run, "
           f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`. {note}".strip(), ""]
    if plain_rows:
        out += ["| stage | ours: real tokens per CPU second (per wall second), each round | plain loop, the same "
                "| ours / plain per CPU second (per wall second), median |", "|---|---|---|---:|"]
        for r in plain_rows:
            def rounds(cpu, wall):
                return ", ".join(f"{c:,.0f} ({w:,.0f})" for c, w in zip(cpu, wall, strict=True))
            out.append(f"| {r['stage']} ({r['steps']} steps) | {rounds(r.get('ours_cpu', r['ours']), r['ours'])} "
                       f"| {rounds(r.get('plain_cpu', r['plain']), r['plain'])} "
                       f"| {r.get('ratio_cpu', r['ratio']):.2f}x ({r['ratio']:.2f}x) |")
        out.append("")
    if trl_rows:
        out += [f"| step | per CPU second: ours / TRL {TRL_VERSION} | ratio | per wall second: ours / TRL | ratio "
                "| quality | before | ours | TRL |", "|---|---|---:|---|---:|---|---:|---:|---:|"]
        for r in trl_rows:
            oc, tc = r.get("ours_cpu_rate", r["ours_rate"]), r.get("trl_cpu_rate", r["trl_rate"])
            out.append(f"| {r['algorithm']} ({r['steps']} steps) | {oc:,.1f} / {tc:,.1f} {r['unit']} | {oc / tc:.2f}x "
                       f"| {r['ours_rate']:,.1f} / {r['trl_rate']:,.1f} | {r['ours_rate'] / r['trl_rate']:.2f}x "
                       f"| {r['quality']} | {r['before']:.3f} | {r['ours_quality']:.3f} | {r['trl_quality']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["plain", "trl", "all"])
    ap.add_argument("--run", type=Path, help="a run directory whose sft and rm stages finished (trl)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plain-steps", type=int, default=120)
    ap.add_argument("--sft-steps", type=int, default=120)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=256, help="held-out prompts GRPO's actors answer")
    ap.add_argument("--only", nargs="*", default=["sft", "dpo", "grpo"])
    ap.add_argument("--note", default="")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--update", action="store_true", help="rewrite the peers-cpu section of BENCHMARKS.md")
    a = ap.parse_args(argv)
    import torch  # the plain loop and TRL run in this process: as many threads as a stage's process

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    plain_rows, trl_rows = [], []
    with tempfile.TemporaryDirectory(prefix="rlhf-peers-") as tmp:
        work = Path(tmp)
        if a.what in ("plain", "all"):
            plain_rows = plain(a.rounds, a.plain_steps, work)
        if a.what in ("trl", "all"):
            if a.run is None:
                ap.error("trl needs --run (a run directory with sft and rm)")
            install_trl()
            fns = {"sft": lambda: sft_vs_trl(work, a.sft_steps), "dpo": lambda: dpo_vs_trl(a.run, work, a.dpo_steps),
                   "grpo": lambda: grpo_vs_trl(a.run, work, a.grpo_steps, a.prompts)}
            for name in a.only:
                trl_rows.append(fns[name]())
                print(json.dumps(trl_rows[-1]), flush=True)
    machine = f"a {os.cpu_count()}-core {cpu_name()} VM, no GPU"
    md = render(plain_rows, trl_rows, machine, a.note)
    print(md)
    if a.json:
        a.json.write_text(json.dumps({"plain": plain_rows, "trl": trl_rows}, indent=2))
    if a.update:
        update_benchmarks(ROOT / "BENCHMARKS.md", f"{MARKERS[0]}\n{md}\n{MARKERS[1]}", MARKERS,
                          "Our trainers beside a plain loop and beside TRL (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
