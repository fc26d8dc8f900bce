"""The GPU benchmark suite: our real SFT, reward-model and PPO stages on random-init
OPT-1.3B (actor) and OPT-350M (reward model and critic), next to plain transformers + torch
baselines measured in the same run, rollout generation against HF ``generate()``, and the
matmul peak that MFU is relative to.

    bash bench/gpu_suite.sh                    # on a lent GPU machine: see BENCHMARKS.md
    python bench/gpu_suite.py --out DIR        # the same, wheels already installed
    python bench/gpu_suite.py --tiny --out DIR # CPU smoke run of every part (tests/test_bench.py)

Parts, in order: environment, matmul peak, rollout generation (OPT-1.3B, batch 32, prompt
256 + 256 new tokens: HF ``generate()`` vs ``rlhf_tasks.algorithms.rl.generation.generate`` through
each backend), model directories (random init, saved with ``save_pretrained``, tokenizer
trained on the bundled samples), synthetic preference data with seed-like lengths, then
``python -m rlhf_tasks sft|reward|ppo`` (the opt-1.3b preset, bf16, bounded by ``max_steps``),
each training stage followed by the plain baseline on the same micro-batches.

Writes DIR/results.json after every part (a run cut short keeps what it measured),
DIR/results.md (the tables) and DIR/logs/<stage>.log. The full mode on a GPU also rewrites
the GPU section of BENCHMARKS.md; ``--tiny`` writes only its clearly labelled CPU section,
and only with ``--update-benchmarks``. Model directories, run directories and tokenised
data go to ``--work`` (a temporary directory by default), never to DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import throughput  # noqa: E402  (bench/throughput.py: model sizes, timing helpers)

from rlhf_tasks.storage import RESULT_PREFIX  # noqa: E402
from rlhf_tasks.tracking import git_commit  # noqa: E402

MARKERS = {"gpu": ("<!-- gpu-suite:begin -->", "<!-- gpu-suite:end -->"),
           "cpu": ("<!-- cpu-tiny:begin -->", "<!-- cpu-tiny:end -->"),
           "algorithms-cpu": ("<!-- algorithms-cpu:begin -->", "<!-- algorithms-cpu:end -->"),
           "algorithms-verifier-cpu": ("<!-- algorithms-verifier-cpu:begin -->", "<!-- algorithms-verifier-cpu:end -->"),
           "realmodel-cpu": ("<!-- realmodel-cpu:begin -->", "<!-- realmodel-cpu:end -->")}
# Numbers to beat, from ../shared/gpu/README.md (measured on an H100 by another session).
REFERENCE = {"hf_generate_b32": 446, "dschat_ppo_prompts_per_s": 1.1, "dschat_sft_bf16_real_tokens_per_s": 25_000}
TARGETS = {"generation": 10_000, "ppo": 11.0, "sft": 55_000}
LABEL = {"opt-1.3b": "OPT-1.3B", "opt-350m": "OPT-350M", "opt-125m": "OPT-125M", "tiny": "tiny OPT"}


@dataclass(frozen=True)
class Plan:
    """What one mode runs. Lengths in tokens; ``*_len`` distributions are log-normal
    (median, sigma) clipped to [lo, hi]."""

    preset: str
    actor: str  # throughput.SIZES key
    reward: str
    model_vocab: int  # embedding rows; the tokenizer uses its first len(tok) ids (0: len(tok))
    dtype: str
    max_seq_len: int
    max_prompt_seq_len: int
    prompt_len: tuple[float, float, int, int]
    answer_len: tuple[float, float, int, int]
    rows: int
    data_split: str
    sft_batch: int
    sft_accumulation: int
    sft_steps: int
    rm_batch: int
    rm_accumulation: int
    rm_steps: int
    ppo_batch: int
    ppo_train_batch: int
    ppo_iterations: int
    eval_rows: int
    gen_model: str
    gen_vocab: int
    gen_batch: int
    gen_prompt: int
    gen_new: int
    matmul_n: int
    budget_s: float


# The seed recipe's models and lengths (DeepSpeed-Chat: actor OPT-1.3B, RM OPT-350M, prompt
# and answer up to 256 each, ~260 real tokens per prompt + answer on average). Sized so the
# whole suite (both models built, three stages, two baselines, generation, peak) fits a
# 10-minute device command with room to spare.
FULL = Plan(preset="opt-1.3b", actor="opt-1.3b", reward="opt-350m", model_vocab=8192, dtype="bf16",
            max_seq_len=512, max_prompt_seq_len=256, prompt_len=(120.0, 0.6, 16, 248), answer_len=(105.0, 0.75, 8, 256),
            rows=4000, data_split="6,3,1", sft_batch=8, sft_accumulation=8, sft_steps=24, rm_batch=8,
            rm_accumulation=4, rm_steps=24, ppo_batch=32, ppo_train_batch=8, ppo_iterations=6, eval_rows=64,
            gen_model="opt-1.3b", gen_vocab=50272, gen_batch=32, gen_prompt=256, gen_new=256, matmul_n=8192,
            budget_s=540)
# Every part on a ~1M-parameter model, a few steps each: proves the suite runs end to end.
TINY = Plan(preset="tiny-cpu", actor="tiny", reward="tiny", model_vocab=0, dtype="fp32", max_seq_len=40,
            max_prompt_seq_len=24, prompt_len=(14.0, 0.4, 4, 22), answer_len=(10.0, 0.5, 2, 16), rows=320,
            data_split="6,3,1", sft_batch=8, sft_accumulation=1, sft_steps=3, rm_batch=8, rm_accumulation=1,
            rm_steps=3, ppo_batch=4, ppo_train_batch=4, ppo_iterations=2, eval_rows=8, gen_model="tiny",
            gen_vocab=2048, gen_batch=4, gen_prompt=16, gen_new=8, matmul_n=256, budget_s=480)


class Suite:
    def __init__(self, args: argparse.Namespace, plan: Plan, device: torch.device):
        self.a, self.plan, self.device = args, plan, device
        self.out = Path(args.out).resolve()
        self.work = Path(args.work or tempfile.mkdtemp(prefix="rlhf-gpu-suite-")).resolve()
        self.start = time.time()
        self.deadline = self.start + (args.budget_s or plan.budget_s)
        self.tok = None
        # Storage, caches and offline switches for this process and the stage processes alike
        # (set before anything imports datasets, which reads its cache location once).
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # a benchmark must not log into someone's tracking server
        os.environ.update(RLHF_STORAGE=str(self.work / "storage"), HF_DATASETS_CACHE=str(self.work / "hf-datasets"),
                          HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                          TOKENIZERS_PARALLELISM="false")
        if device.type == "cpu":
            os.environ.update(RLHF_DEVICE="cpu", DS_ACCELERATOR="cpu")
            # ~1M-parameter models gain nothing from intra-op threads, and on a shared CPU
            # the threads' spinning makes every step several times slower.
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.R: dict[str, Any] = {"mode": "tiny" if args.tiny else "full", "parts": {}, "training": [],
                                  "generation": [], "ppo": None, "errors": [], "skipped": []}

    # -- bookkeeping ----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        from rlhf_tasks.runtime.engine import torch_dtype

        return torch_dtype(self.plan.dtype)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.R["elapsed_s"] = round(time.time() - self.start, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.R, indent=2, default=str) + "\n")
        (self.out / "results.md").write_text(render_markdown(self.R))

    def part(self, name: str, fn, needs: tuple[str, ...] = (), min_s: float = 0.0) -> None:
        """Run one part; a failure is recorded and the parts that need it are skipped."""
        missing = [n for n in needs if self.R["parts"].get(n, {}).get("status") != "ok"]
        why = (f"needs {missing}" if missing else f"time budget: {self.remaining():.0f} s left, needs ~{min_s:.0f} s"
               if self.remaining() < min_s else f"--skip {name}" if name in (self.a.skip or []) else None)
        if why:
            self.R["parts"][name] = {"status": "skipped", "why": why}
            self.R["skipped"].append(f"{name}: {why}")
            print(f"[suite] {name}: skipped ({why})", flush=True)
            self.save()
            return
        print(f"[suite] {name} ... ({time.time() - self.start:.0f} s into the run)", flush=True)
        t0 = time.time()
        try:
            fn()
            status = {"status": "ok"}
        except Exception as e:  # noqa: BLE001 - one broken part must not cost the others' numbers
            traceback.print_exc()
            status = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            self.R["errors"].append(f"{name}: {type(e).__name__}: {e}")
        status["seconds"] = round(time.time() - t0, 1)
        self.R["parts"][name] = status
        print(f"[suite] {name}: {status['status']} in {status['seconds']} s", flush=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save()

    # -- parts ----------------------------------------------------------------------

    def environment(self) -> None:
        from importlib.metadata import PackageNotFoundError, version

        versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
        for pkg in ("transformers", "deepspeed", "peft", "datasets", "accelerate"):
            try:
                versions[pkg] = version(pkg)
            except PackageNotFoundError:
                versions[pkg] = None
        gpu = None
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            gpu = {"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1), "count": torch.cuda.device_count()}
        self.R.update(
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), device=self.device.type, gpu=gpu,
            cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), versions=versions,
            command=os.environ.get("RLHF_BENCH_COMMAND") or shlex.join([Path(sys.executable).name, *sys.argv]),
            git_commit=git_commit(), plan=dataclasses.asdict(self.plan), work_dir=str(self.work),
            env={k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")})

    def matmul_peak(self) -> None:
        n = self.plan.matmul_n
        tflops = throughput.matmul_peak_tflops(self.device, self.dtype, n=n, iters=50 if self.device.type == "cuda" else 5)
        self.R["matmul_peak"] = {"tflops": tflops, "n": n, "dtype": self.plan.dtype,
                                 "how": f"best of 3 rounds of ({n}x{n}) @ ({n}x{n}) {self.plan.dtype} torch.mm, "
                                        + ("CUDA events" if self.device.type == "cuda" else "wall clock")}

    def generation(self) -> None:
        """Rollout generation at the issue's shape, HF first, then ours through each backend."""
        from rlhf_tasks.algorithms.rl import generation as G

        p = self.plan
        torch.manual_seed(0)
        model = throughput.build(p.gen_model, p.gen_vocab, "sdpa", self.device).to(self.dtype).eval()
        n_params = sum(x.numel() for x in model.parameters())
        eos, pad = 2, 1
        # Random prompt ids away from EOS/PAD: every row samples all its tokens, as in the baselines.
        prompts = torch.randint(3, p.gen_vocab, (p.gen_batch, p.gen_prompt), device=self.device)
        mask = torch.ones_like(prompts)
        backends = sorted(G.BACKENDS, key=lambda b: b != "hf")  # hf first: the backend that matches the baseline

        def ours(backend):
            def fn(ids, m, new):
                ro = G.generate(model, ids, m, G.GenerationSettings(max_new_tokens=new, backend=backend), eos, pad)
                return ro.answer_lengths.sum()
            return fn

        variants = [("HF generate() (dynamic cache)", "hf-baseline",
                     lambda ids, m, new: throughput.hf_generate(model, ids, m, new, eos, pad))]
        variants += [(f"ours: generate(), {b} backend", b, ours(b)) for b in backends]
        for label, key, fn in variants:
            if self.remaining() < 60 and key != "hf-baseline":
                self.R["skipped"].append(f"generation {key}: time budget")
                continue
            # HF's loop has nothing to compile or capture: a short warm-up is enough. Other
            # backends may capture CUDA graphs per shape: warm them up at the timed shape.
            warm = min(8, p.gen_new // 2) if key in ("hf-baseline", "hf") else p.gen_new
            try:
                r = throughput.time_generation(fn, prompts, mask, p.gen_new, self.device, warm)
            except Exception as e:  # noqa: BLE001 - a backend that fails is reported, the others still run
                traceback.print_exc()
                self.R["errors"].append(f"generation {key}: {type(e).__name__}: {e}")
                continue
            tflops = 2 * n_params * r["new_tokens_per_s"] / 1e12  # forward matmuls per generated token
            self.R["generation"].append({"implementation": label, "key": key, "model": p.gen_model, "params": n_params,
                                         "vocab": p.gen_vocab, "batch": p.gen_batch, "prompt_len": p.gen_prompt,
                                         "max_new_tokens": p.gen_new, "model_tflops": tflops, **r})
            self.save()

    def models(self) -> None:
        from rlhf_tasks.data.tokenizer import sample_texts, train_tiny_tokenizer

        p = self.plan
        self.tok = train_tiny_tokenizer(sample_texts(), vocab_size=8192)
        vocab = max(p.model_vocab, len(self.tok))
        out = {"tokenizer_vocab": len(self.tok), "model_vocab": vocab}
        for role, size in (("actor", p.actor), ("reward", p.reward)):
            torch.manual_seed({"actor": 1, "reward": 2}[role])
            t0 = time.time()
            model = throughput.build(size, vocab, "sdpa", self.device, pad_token_id=self.tok.pad_token_id,
                                     bos_token_id=self.tok.bos_token_id, eos_token_id=self.tok.eos_token_id)
            model.generation_config.pad_token_id = self.tok.pad_token_id
            target = self.work / "models" / f"{role}-{size}"
            model.to(self.dtype).save_pretrained(target)  # the stages load it in fp32 and cast as configured
            self.tok.save_pretrained(target)
            out[role] = {"arch": size, "dir": str(target), "params": sum(x.numel() for x in model.parameters()),
                         "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                         "build_s": round(time.time() - t0, 1)}
            del model
        self.R["models"] = out

    def data(self) -> None:
        self.R["data"] = {"rows": self.plan.rows, **write_synthetic_data(self.tok, self.plan,
                                                                          self.work / "data" / "synthetic.jsonl")}

    # -- stages ---------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    def overrides(self) -> list[str]:
        from rlhf_tasks.config.algorithms import PPOConfig

        p, m = self.plan, self.R["models"]
        o = [f"device={self.device.type}", f"model.actor={m['actor']['dir']}", f"model.rm={m['reward']['dir']}",
             "model.attn_implementation=sdpa", f"data.datasets={self.R['data']['path']}",
             f"data.data_split={p.data_split}", f"data.max_seq_len={p.max_seq_len}",
             f"data.max_prompt_seq_len={p.max_prompt_seq_len}", f"data.max_eval_samples={p.eval_rows}"]
        for stage, batch, acc, steps in (("sft", p.sft_batch, p.sft_accumulation, p.sft_steps),
                                         ("rm", p.rm_batch, p.rm_accumulation, p.rm_steps)):
            o += [f"{stage}.dtype={p.dtype}", f"{stage}.epochs=1", f"{stage}.max_steps={steps}",
                  f"{stage}.per_device_train_batch_size={batch}", f"{stage}.gradient_accumulation_steps={acc}",
                  f"{stage}.per_device_eval_batch_size=16", f"{stage}.checkpoint_every_steps=0",
                  f"{stage}.eval_every_steps=0", f"{stage}.log_every_steps={max(steps // 3, 1)}"]
        # SFT without LoRA: the DeepSpeed-Chat bf16 number we compare with is "bf16 and no LoRA".
        o += ["sft.lora_dim=0", f"ppo.dtype={p.dtype}", f"ppo.max_steps={p.ppo_iterations}", "ppo.epochs=1",
              f"ppo.per_device_generation_batch_size={p.ppo_batch}",
              f"ppo.per_device_train_batch_size={p.ppo_train_batch}", "ppo.checkpoint_every_steps=0",
              # GRPO at PPO's rollouts per iteration (a quarter of the prompts, 4 answers each); DPO
              # at the reward model's batch and steps (pairs per step, as the RM trains).
              f"grpo.dtype={p.dtype}", f"grpo.max_steps={p.ppo_iterations}", "grpo.epochs=1", "grpo.group_size=4",
              f"grpo.per_device_generation_batch_size={max(p.ppo_batch // 4, 1)}",
              f"grpo.per_device_train_batch_size={p.ppo_train_batch}", "grpo.checkpoint_every_steps=0",
              f"dpo.dtype={p.dtype}", f"dpo.max_steps={p.rm_steps}", "dpo.epochs=1",
              f"dpo.per_device_train_batch_size={p.rm_batch}", "dpo.checkpoint_every_steps=0"]
        if "generation_backend" in PPOConfig.model_fields and self.a.ppo_backend:
            o.append(f"ppo.generation_backend={self.a.ppo_backend}")
        return o

    def stage_env(self) -> dict[str, str]:
        paths = [str(REPO), *[x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x and x != str(REPO)]]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}

    def run_stage(self, stage: str) -> dict:
        args = ["--output", str(self.run_dir)]
        if stage == "sft":
            args += ["--preset", self.plan.preset, "--set", *self.overrides()]
        cmd = [sys.executable, "-m", "rlhf_tasks", stage, *args]
        log_path = self.out / "logs" / f"{stage}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.stage_env(),
                                  timeout=max(self.remaining() - 15, 30))
        wall = time.time() - t0
        lines = log_path.read_text().splitlines()
        results = [ln for ln in lines if ln.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not results:
            tail = "\n".join(lines[-15:])
            raise RuntimeError(f"`{stage}` exited with {proc.returncode} (log: {log_path}):\n{tail}")
        result = json.loads(results[-1].removeprefix(RESULT_PREFIX))
        result["process_wall_s"] = wall
        self.R.setdefault("stages", {})[stage] = {"command": shlex.join(cmd), "wall_s": wall,
                                                  "metrics": result.get("metrics", {})}
        return result

    def training_row(self, stage: str, impl: str, model: str, m: dict, batch: str) -> None:
        peak = self.R.get("matmul_peak", {}).get("tflops")
        tflops = m.get("model_tflops", m.get("train_tflops"))
        self.R["training"].append({
            "stage": stage, "implementation": impl, "model": model, "batch": batch,
            "tokens_per_s": m.get("tokens_per_s", m.get("train_tokens_per_s")), "model_tflops": tflops,
            "mfu": tflops / peak if tflops and peak else None, "peak_memory_gb": m.get("peak_memory_gb"),
            "timed_steps": m.get("timed_steps", m.get("train_timed_steps")),
            "timed_s": m.get("timed_s", m.get("train_timed_s"))})

    def sft(self) -> None:
        r = self.run_stage("sft")
        p = self.plan
        self.training_row("SFT", "ours: `rlhf_tasks sft` stage (DeepSpeed ZeRO-0)", p.actor, r["metrics"],
                          f"{p.sft_batch} x {p.sft_accumulation} acc.")

    def reward(self) -> None:
        r = self.run_stage("rm")
        p = self.plan
        self.training_row("RM", "ours: `rlhf_tasks rm` stage (DeepSpeed ZeRO-0)", p.reward, r["metrics"],
                          f"{p.rm_batch} pairs x {p.rm_accumulation} acc.")

    def baseline(self, kind: str) -> None:
        """The plain loop on the micro-batches the stage trained on, in the same order."""
        from torch.utils.data import DataLoader

        from rlhf_tasks.algorithms.maths.preference import pairwise_loss
        from rlhf_tasks.config import PipelineConfig
        from rlhf_tasks.data import LengthGroupedBatchSampler, PairCollator, SFTCollator, phases
        from rlhf_tasks.runtime import loop
        from rlhf_tasks.runtime.models import RewardModel, load_causal_lm, load_tokenizer, read_score

        cfg = PipelineConfig.load(self.run_dir / "config.yaml")
        tok = load_tokenizer(cfg.model.actor)
        p = self.plan
        if kind == "sft":
            t, (ds, _) = cfg.sft, phases.sft_rows(cfg, tok, "train")
            collate = SFTCollator(tok.pad_token_id)
            model = load_causal_lm(cfg.model.actor, attn_implementation="sdpa", dropout=0.0)
            flops = loop.flops_per_token(model, int(sum(ds["length"]) / len(ds)))

            def loss_fn(m, b):
                return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                         use_cache=False).loss
        else:
            t, (ds, _) = cfg.rm, phases.rm_pairs(cfg, tok, "train")
            collate = PairCollator(tok.pad_token_id)
            model = RewardModel.from_pretrained(cfg.model.rm, attn_implementation="sdpa", dropout=0.0)
            flops = loop.flops_per_token(model.backbone, int(sum(ds["length"]) / len(ds)))

            def loss_fn(m, b):
                return pairwise_loss(*read_score(m(b["input_ids"], b["attention_mask"]), b["attention_mask"]).chunk(2))

        sampler = LengthGroupedBatchSampler(ds["length"], t.per_device_train_batch_size, seed=cfg.seed)
        sampler.set_epoch(0)
        batches = list(sampler)
        steps = min(t.max_steps or 10**9, len(batches) // t.gradient_accumulation_steps)
        loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=0,
                            pin_memory=self.device.type == "cuda")
        m = throughput.plain_train(model, loader, loss_fn, steps=steps, accumulation=t.gradient_accumulation_steps,
                                   device=self.device, dtype=p.dtype, flops_per_token=flops, lr=t.learning_rate,
                                   weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm)
        name, size = ("SFT", p.actor) if kind == "sft" else ("RM", p.reward)
        batch = (f"{p.sft_batch} x {p.sft_accumulation} acc." if kind == "sft"
                 else f"{p.rm_batch} pairs x {p.rm_accumulation} acc.")
        self.training_row(name, "plain transformers + torch (autocast, fused AdamW)", size, m, batch)
        del model

    def ppo(self) -> None:
        from rlhf_tasks.config import PipelineConfig

        r = self.run_stage("ppo")
        m, p = r["metrics"], self.plan
        cfg = PipelineConfig.load(self.run_dir / "config.yaml")
        c = cfg.ppo
        recipe = (f"{cfg.name} preset: actor LoRA {c.actor.lora_dim or 'none'}"
                  f"{' + gradient checkpointing' if c.actor.gradient_checkpointing else ''}, ZeRO-{c.actor.zero_stage}, "
                  f"{c.dtype}, answers up to {cfg.data.max_seq_len - cfg.data.max_prompt_seq_len} tokens")
        backend = next((o.split("=", 1)[1] for o in self.overrides() if o.startswith("ppo.generation_backend=")),
                       "hf (no generation_backend setting yet)")
        new_tokens = m.get("generation_tokens_per_s", 0) * m.get("generation_s", 0)
        self.R["ppo"] = {"actor": p.actor, "critic": p.reward, "prompts_per_iteration": p.ppo_batch,
                         "training_micro_batch": p.ppo_train_batch, "iterations": m.get("iterations"),
                         "timed_iterations": m.get("timed_iterations"), "generation_backend": backend,
                         "prompts_per_s": m.get("prompts_per_s"), "generation_s": m.get("generation_s"),
                         "scoring_s": m.get("scoring_s"), "training_s": m.get("training_s"),
                         "generation_tokens_per_s": m.get("generation_tokens_per_s"),
                         "mean_answer_tokens": new_tokens / p.ppo_batch if new_tokens else None,
                         "peak_memory_gb": m.get("peak_memory_gb"), "reward_first": m.get("reward_first"),
                         "reward_last": m.get("reward_last"),
                         "recipe": recipe}

    def alignment(self, stage: str) -> None:
        """GRPO or DPO in the same run: throughput, peak memory and the models held."""
        m = self.run_stage(stage)["metrics"]
        row = {"stage": stage, "peak_memory_gb": m.get("peak_memory_gb"),
               "models_mb": m.get("memory/models_bytes", 0.0) / 1e6}
        if stage == "dpo":
            row.update(unit="pairs/s", rate=m.get("train_pairs_per_s"), tokens_per_s=m.get("train_tokens_per_s"))
        else:
            row.update(unit="prompts/s", rate=m.get("prompts_per_s"), tokens_per_s=m.get("generation_tokens_per_s"),
                       generation_s=m.get("generation_s"), training_s=m.get("training_s"))
        self.R.setdefault("alignment", []).append(row)

    def memory_plan(self) -> None:
        """The memory plan (``rlhf_tasks.plan``) of each stage's config beside the peak the
        stage measured (``peak_memory_gb``: torch.cuda.max_memory_allocated; none on CPU)."""
        from rlhf_tasks.config import PipelineConfig
        from rlhf_tasks.plan import make_plan, model_configs

        cfg = PipelineConfig.load(self.run_dir / "config.yaml")
        plan = make_plan(cfg, model_configs(cfg), fixes=False)
        stages = self.R.get("stages", {})
        self.R["memory_plan"] = [{"stage": s, "phase": p.peak_phase, "planned_gb": p.peak / 1e9,
                                  "measured_gb": stages.get(s, {}).get("metrics", {}).get("peak_memory_gb")}
                                 for s, p in plan.stages.items()]

    # -- the whole run ----------------------------------------------------------------

    def run(self) -> int:
        self.part("environment", self.environment)
        self.part("matmul_peak", self.matmul_peak)
        self.part("generation", self.generation, min_s=60)
        self.part("models", self.models)
        self.part("data", self.data, needs=("models",))
        self.part("sft", self.sft, needs=("data",), min_s=60)
        self.part("sft_baseline", lambda: self.baseline("sft"), needs=("sft",), min_s=40)
        self.part("reward", self.reward, needs=("sft",), min_s=45)
        self.part("reward_baseline", lambda: self.baseline("reward"), needs=("reward",), min_s=25)
        self.part("ppo", self.ppo, needs=("sft", "reward"), min_s=60)
        self.part("grpo", lambda: self.alignment("grpo"), needs=("sft", "reward"), min_s=60)
        self.part("dpo", lambda: self.alignment("dpo"), needs=("sft",), min_s=45)
        self.part("memory_plan", self.memory_plan, needs=("sft",))
        self.R["targets"] = targets(self.R)
        self.save()
        self.update_benchmarks()
        return 1 if self.R["errors"] else 0

    def update_benchmarks(self) -> None:
        """GPU numbers only from the full mode on a GPU; the CPU section only from --tiny on CPU."""
        full_gpu = self.R["mode"] == "full" and self.device.type == "cuda"
        update = self.a.update_benchmarks if self.a.update_benchmarks is not None else full_gpu
        if not update:
            return
        if full_gpu:
            section = "gpu"
        elif self.R["mode"] == "tiny" and self.device.type == "cpu":
            section = "cpu"
        else:
            print("[suite] BENCHMARKS.md not updated: only the full mode on a GPU or --tiny on CPU write it", flush=True)
            return
        path = Path(self.a.benchmarks)
        replace_section(path, section, render_markdown(self.R))
        self.R["benchmarks_updated"] = f"{path} ({section} section)"
        self.save()
        print(f"[suite] wrote the {section} section of {path}", flush=True)



def write_synthetic_data(tok, p: Plan, path: Path, seed: int = 1234) -> dict:
    """``p.rows`` preference rows (prompt, chosen, rejected) as JSON lines, made of words of
    the bundled samples, whose token lengths follow the plan's seed-like distributions.
    Returns the lengths as the stages will see them."""
    import numpy as np

    from rlhf_tasks.data.tokenizer import sample_texts

    words = sorted({w for text in sample_texts() for w in text.split() if ":" not in w})
    cost = np.array([len(x) for x in tok([" " + w for w in words], add_special_tokens=False)["input_ids"]])
    rng = np.random.default_rng(seed)

    def length(dist) -> int:
        median, sigma, lo, hi = dist
        return int(np.clip(round(median * np.exp(sigma * rng.standard_normal())), lo, hi))

    def text(n_tokens: int) -> str:
        out, used = [], 0
        while used < n_tokens:
            i = int(rng.integers(len(words)))
            out.append(words[i])
            used += int(cost[i])
        return " ".join(out)

    rows = []
    for _ in range(p.rows):
        prompt = "\n\nHuman: " + text(max(length(p.prompt_len) - 6, 1)) + "\n\nAssistant:"  # ~6 template tokens
        rows.append({"prompt": prompt, "chosen": " " + text(length(p.answer_len)),
                     "rejected": " " + text(length(p.answer_len))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pl = np.array([len(x) for x in tok([r["prompt"] for r in rows])["input_ids"]])
    al = np.array([len(x) + 1 for x in tok([r["chosen"] for r in rows], add_special_tokens=False)["input_ids"]])
    total = np.minimum(pl + al, p.max_seq_len)  # what SFT trains on: answers cut to fit, EOS kept
    return {"path": str(path), "data_split": p.data_split, "mean_prompt_tokens": float(pl.mean()),
            "max_prompt_tokens": int(pl.max()), "mean_answer_tokens": float(al.mean()),
            "mean_sequence_tokens": float(total.mean()), "max_sequence_tokens": int(total.max()),
            "max_seq_len": p.max_seq_len, "max_prompt_seq_len": p.max_prompt_seq_len}


# -- reporting ------------------------------------------------------------------------

def targets(R: dict) -> list[dict]:
    """The issue's targets (H100, bf16, OPT architectures); judged only in the full mode on a GPU."""
    judged = R.get("mode") == "full" and R.get("device") == "cuda"
    gen = [g for g in R.get("generation", []) if g["key"] != "hf-baseline"]
    hf = next((g for g in R.get("generation", []) if g["key"] == "hf-baseline"), None)
    best_gen = max(gen, key=lambda g: g["new_tokens_per_s"], default=None)
    sft = [t for t in R.get("training", []) if t["stage"] == "SFT"]
    ours_sft = next((t for t in sft if t["implementation"].startswith("ours")), None)
    plain_sft = next((t for t in sft if not t["implementation"].startswith("ours")), None)
    ppo = R.get("ppo") or {}
    rows = [
        {"target": "rollout generation OPT-1.3B, batch 32, 256 + 256", "goal": TARGETS["generation"],
         "unit": "new tokens/s", "measured": best_gen and best_gen["new_tokens_per_s"],
         "how": best_gen and best_gen["implementation"],
         "baseline": f"HF generate() {hf['new_tokens_per_s']:,.0f} in this run" if hf else "",
         "reference": f"HF ~{REFERENCE['hf_generate_b32']} (shared/gpu/README.md)"},
        {"target": "PPO, seed models and lengths", "goal": TARGETS["ppo"], "unit": "prompts/s",
         "measured": ppo.get("prompts_per_s"), "how": f"batch {ppo.get('prompts_per_iteration')}" if ppo else None,
         "baseline": "", "reference": f"DeepSpeed-Chat ~{REFERENCE['dschat_ppo_prompts_per_s']} (shared/gpu/README.md)"},
        {"target": "SFT OPT-1.3B", "goal": TARGETS["sft"], "unit": "real tokens/s",
         "measured": ours_sft and ours_sft["tokens_per_s"], "how": "our sft stage",
         "baseline": f"plain HF + torch {plain_sft['tokens_per_s']:,.0f} in this run" if plain_sft and plain_sft["tokens_per_s"] else "",
         "reference": f"DeepSpeed-Chat bf16 ~{REFERENCE['dschat_sft_bf16_real_tokens_per_s']:,} (shared/gpu/README.md)"},
    ]
    for r in rows:
        r["met"] = (r["measured"] >= r["goal"]) if judged and r["measured"] is not None else None
    return rows


def _n(x, digits: int = 0) -> str:
    """Thousands separators; small values (tiny mode, CPU) keep 3 significant digits instead of showing 0."""
    if x is None:
        return "-"
    if x and abs(x) < 10 ** (1 - digits):
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mem(x) -> str:
    return "-" if x is None else f"{x:.1f} GB"


def render_markdown(R: dict) -> str:
    tiny = R.get("mode") == "tiny"
    v = R.get("versions", {})
    gpu = R.get("gpu") or {}
    where = (f"{gpu['name']} ({gpu['memory_gb']} GB)" if gpu else
             f"CPU only ({R.get('cpu_count')} cores: {R.get('cpu') or 'unknown'})")
    lines = []
    title = (f"Tiny mode on {'CPU' if R.get('device') == 'cpu' else where}: a smoke test of the suite, not performance "
             "numbers" if tiny else f"GPU suite: {where}")
    lines += [f"### {title}", ""]
    lines += [f"- Where: {where}; {R.get('date', '?')}; commit `{R.get('git_commit') or '?'}`",
              f"- Command: `{R.get('command', '?')}`",
              "- Versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "cuda", "transformers", "deepspeed",
                                                                 "peft", "datasets") if v.get(k))]
    mp = R.get("matmul_peak")
    if mp:
        lines.append(f"- Matmul peak measured in this run: **{_n(mp['tflops'], 1)} TFLOP/s** ({mp['how']}); "
                     "MFU = model TFLOP/s / this peak; model FLOPs per token `6 * params + 12 * layers * hidden * seq` "
                     "(training), `2 * params` (generation)")
    mo = R.get("models")
    if mo:
        lines.append(f"- Models: random init (no download), actor {LABEL.get(mo['actor']['arch'], mo['actor']['arch'])} "
                     f"({mo['actor']['params'] / 1e6:,.1f}M params), reward model and critic "
                     f"{LABEL.get(mo['reward']['arch'], mo['reward']['arch'])} ({mo['reward']['params'] / 1e6:,.1f}M); "
                     f"vocabulary {mo['model_vocab']:,} (DeepSpeed-Chat's baseline used 8,192), of which the tokenizer "
                     f"trained on the bundled samples uses {mo['tokenizer_vocab']:,}")
    d = R.get("data")
    if d:
        lines.append(f"- Data: {d['rows']:,} synthetic preference rows (words of the bundled samples), prompt "
                     f"mean {d['mean_prompt_tokens']:.0f} / max {d['max_prompt_tokens']} tokens, prompt + answer mean "
                     f"{d['mean_sequence_tokens']:.0f} / max {d['max_sequence_tokens']} tokens (cap {d['max_seq_len']}); "
                     f"phase split {d['data_split']}; batches padded to their longest row, never to the cap")
    lines.append("")
    if R.get("training"):
        lines += ["| step | implementation | model | batch | real tokens/s | model TFLOP/s | MFU | peak memory |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for t in R["training"]:
            lines.append(f"| {t['stage']} | {t['implementation']} | {LABEL.get(t['model'], t['model'])} | {t['batch']} | "
                         f"{_n(t['tokens_per_s'])} | {_n(t['model_tflops'], 1)} | {_pct(t['mfu'])} | "
                         f"{_mem(t['peak_memory_gb'])} |")
        lines.append("")
    if R.get("generation"):
        g0 = R["generation"][0]
        lines += [f"Rollout generation: {LABEL.get(g0['model'], g0['model'])} (vocabulary {g0['vocab']:,}), batch "
                  f"{g0['batch']}, prompt {g0['prompt_len']} + {g0['max_new_tokens']} new tokens, sampling "
                  "(temperature 1), one timed call after a warm-up:", "",
                  "| implementation | new tokens/s | seconds | warm-up call s | model TFLOP/s | MFU |",
                  "|---|---:|---:|---:|---:|---:|"]
        peak = (mp or {}).get("tflops")
        for g in R["generation"]:
            lines.append(f"| {g['implementation']} | {_n(g['new_tokens_per_s'])} | {_n(g['seconds'], 2)} | "
                         f"{_n(g['warmup_s'], 2)} | {_n(g['model_tflops'], 2)} | "
                         f"{_pct(g['model_tflops'] / peak if peak else None)} |")
        lines.append("")
    ppo = R.get("ppo")
    if ppo:
        lines += [f"PPO: `rlhf_tasks ppo` stage, actor {LABEL.get(ppo['actor'], ppo['actor'])}, critic and reward "
                  f"{LABEL.get(ppo['critic'], ppo['critic'])}, {ppo['recipe']}, generation backend "
                  f"{ppo['generation_backend']}; {ppo['prompts_per_iteration']} prompts per iteration, training "
                  f"micro-batch {ppo['training_micro_batch']}; mean over {ppo['timed_iterations']} "
                  f"iteration{'s' if ppo['timed_iterations'] != 1 else ''} after the first:", "",
                  "| prompts/s | generation s/iter | scoring s/iter | training s/iter | generated tokens/s | "
                  "mean answer tokens | peak memory |",
                  "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {_n(ppo['prompts_per_s'], 2)} | {_n(ppo['generation_s'], 2)} | {_n(ppo['scoring_s'], 2)} | "
                  f"{_n(ppo['training_s'], 2)} | {_n(ppo['generation_tokens_per_s'])} | "
                  f"{_n(ppo['mean_answer_tokens'])} | {_mem(ppo['peak_memory_gb'])} |", ""]
    if R.get("alignment"):
        lines += ["GRPO (PPO's rollouts per iteration: a quarter of the prompts x 4 answers, no critic) and DPO "
                  "(the reward model's batch and steps, no rollouts) in the same run:", "",
                  "| stage | throughput | tokens/s (generated or trained) | generation s/iter | training s/iter | "
                  "models held | peak memory |", "|---|---:|---:|---:|---:|---:|---:|"]
        for a in R["alignment"]:
            lines.append(f"| {a['stage']} | {_n(a['rate'], 2)} {a['unit']} | {_n(a['tokens_per_s'])} | "
                         f"{_n(a.get('generation_s'), 2)} | {_n(a.get('training_s'), 2)} | {_n(a['models_mb'], 1)} MB | "
                         f"{_mem(a['peak_memory_gb'])} |")
        lines.append("")
    if R.get("memory_plan"):
        lines += ["Memory plan (`python -m rlhf_tasks plan`, from the stages' config) against the peak each stage "
                  "measured (`torch.cuda.max_memory_allocated`; none on CPU):", "",
                  "| stage | planned peak phase | planned | measured | plan error |", "|---|---|---:|---:|---:|"]
        for m in R["memory_plan"]:
            err = m["planned_gb"] / m["measured_gb"] - 1 if m["measured_gb"] else None
            lines.append(f"| {m['stage']} | {m['phase']} | {_mem(m['planned_gb'])} | {_mem(m['measured_gb'])} | "
                         f"{'-' if err is None else f'{err:+.1%}'} |")
        lines.append("")
    if R.get("targets") and not tiny:
        lines += ["| target (H100, bf16) | goal | measured | met | in this run | reference |", "|---|---:|---:|---|---|---|"]
        for t in R["targets"]:
            met = {True: "yes", False: "**no**", None: "not judged"}[t["met"]]
            lines.append(f"| {t['target']} | {t['goal']:,} {t['unit']} | {_n(t['measured'], 1)} | {met} | "
                         f"{t['baseline'] or '-'} | {t['reference']} |")
        lines.append("")
    if tiny:
        lines += ["Tiny models on a shared CPU: these figures only show that every part runs; the targets apply to "
                  "the full mode on an H100.", ""]
    for what, items in (("Skipped", R.get("skipped")), ("Errors", R.get("errors"))):
        if items:
            lines += [f"{what}:", *[f"- {x}" for x in items], ""]
    lines.append(f"Suite wall-clock: {_n(R.get('elapsed_s'))} s.")
    return "\n".join(lines) + "\n"


def replace_section(path: Path, section: str, body: str) -> None:
    begin, end = MARKERS[section]
    text = path.read_text()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{path} has no {begin} ... {end} section")
    path.write_text(text[:i + len(begin)] + "\n" + body.rstrip() + "\n" + text[j:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results.json, results.md and logs/ go here ($OUT on the device)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and a few steps (CPU smoke run)")
    ap.add_argument("--work", help="model/run/data directory (default: a temporary directory, removed at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--update-benchmarks", dest="update_benchmarks", action="store_true", default=None,
                    help="rewrite this mode's section of BENCHMARKS.md (default: only the full mode on a GPU)")
    ap.add_argument("--no-update-benchmarks", dest="update_benchmarks", action="store_false")
    ap.add_argument("--benchmarks", default=str(REPO / "BENCHMARKS.md"), help="the BENCHMARKS.md to update")
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting parts after this (default: the mode's)")
    ap.add_argument("--ppo-backend", default="static", help="ppo.generation_backend for the PPO stage, where it exists")
    ap.add_argument("--skip", action="append", choices=["generation", "sft_baseline", "reward_baseline", "ppo"],
                    help="leave a part out (repeatable)")
    for name in ("sft_steps", "rm_steps", "ppo_iterations", "ppo_batch", "rows"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, help=f"override the mode's {name}")
    a = ap.parse_args(argv)
    plan = TINY if a.tiny else FULL
    plan = dataclasses.replace(plan, **{k: getattr(a, k) for k in ("sft_steps", "rm_steps", "ppo_iterations",
                                                                   "ppo_batch", "rows") if getattr(a, k)})
    if not a.tiny and not torch.cuda.is_available():
        print("error: the full suite needs a CUDA GPU; on CPU run it with --tiny", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not (a.tiny and os.environ.get("RLHF_DEVICE") == "cpu") \
        else torch.device("cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    suite = Suite(a, plan, device)
    try:
        rc = suite.run()
    finally:
        if not a.work and not a.keep_work:  # ~10 GB of checkpoints in the full mode
            shutil.rmtree(suite.work, ignore_errors=True)
    print(render_markdown(suite.R), flush=True)
    print(f"[suite] results in {suite.out}" + (f" (work files in {suite.work})" if a.work or a.keep_work else ""),
          flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
