"""Each stage's peak memory per GPU, assembled from traced steps (:mod:`.trace`) and
DeepSpeed's layout (:mod:`.states`).

A stage's memory has a resident part (the trained models' states, the frozen models,
PPO's EMA copy, DeepSpeed's buffers) and, on top, one transient part per phase: the
training step's activations and gradients, the optimizer step's gradient buffers, or, in
the RL step, the rollout's KV cache, the no-grad scoring pass of the four models, the
actor update (and its mixed-in SFT loss) and the critic update, which run one after the
other. The stage's peak is its largest phase; ``parts`` split that phase.

What the GPU must hold is more than the tensors alive at one moment
(``torch.cuda.max_memory_allocated``): PyTorch's caching allocator keeps the blocks the
backward freed, and an optimizer step that allocates new gradient buffers (fp16/bf16 at
ZeRO-0, :func:`~.states.flat_fp32_step`) takes fresh memory beside them. That cache is
the part ``allocator_cache``; ``allocated`` is the peak without it, what a CPU step's
profiler measures (bench/plan_accuracy.py sets both against measured peaks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..algorithms.maths.tokens import LOGITS_CHUNK_BYTES
from ..config import ALGORITHMS
from .states import (
    FP32,
    Engine,
    deepspeed_buffers,
    eager_attention_reserve,
    flat_fp32_step,
    frozen_weights,
    kv_cache,
    model_states,
    reusable_logits_blocks,
)
from .trace import StepSpec, Traced, arch_numbers, trace

GB = 1e9  # decimal, as the stages' measured peak_memory_gb (torch.cuda.max_memory_allocated / 1e9)
PARTS = ("weights", "gradients", "optimizer_states", "master_weights", "activations", "kv_cache",
         "frozen_models", "ema", "deepspeed_buffers", "allocator_cache")


@dataclass
class StagePlan:
    stage: str
    phases: dict[str, dict[str, int]]  # phase -> bytes by part
    traced: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def parts(self) -> dict[str, int]:
        return {k: self.phases[self.peak_phase].get(k, 0) for k in PARTS}

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def allocated(self) -> int:
        """The largest phase without the allocator's cache: the tensors alive at once."""
        return max(sum(v for k, v in p.items() if k != "allocator_cache") for p in self.phases.values())

    def to_json(self) -> dict[str, Any]:
        return {"peak_gb": round(self.peak / GB, 3), "peak_phase": self.peak_phase,
                "parts": {k: round(v / GB, 3) for k, v in self.parts.items()},
                "phases": {p: round(sum(v.values()) / GB, 3) for p, v in self.phases.items()},
                "allocated_gb": round(self.allocated / GB, 3), "traced": self.traced,
                **({"notes": self.notes} if self.notes else {})}


@dataclass(frozen=True)
class Trained:
    """One trained model of a stage: its config section (an EngineConfig), its precision,
    its step kind and micro-batch (in sequences)."""

    model: str  # "actor" | "rm": whose config.json
    section: Any
    dtype: str
    kind: str
    batch: int
    gradient_accumulation_steps: int = 1


def world_size(cfg) -> int:
    """The ranks ZeRO partitions over: GPUs, or CPU processes with ``device: cpu``."""
    r = cfg.resources
    return (r.cpu_processes if cfg.device == "cpu" else r.num_gpus) * r.num_nodes


def _spec(cfg, t: Trained, kind: str | None = None, batch: int | None = None, seq: int | None = None) -> StepSpec:
    """The traced step of ``t`` (``kind`` given: a no-grad forward of it, traced without
    LoRA, whose adapters' (B, T, r) intermediates are freed layer by layer there, so that
    a LoRA change re-traces only the training step)."""
    s = t.section
    training = kind is None
    return StepSpec(kind=kind or t.kind, batch=batch or t.batch, seq_len=seq or cfg.data.max_seq_len, dtype=t.dtype,
                    checkpointing=s.gradient_checkpointing and training, lora_dim=s.lora_dim if training else 0,
                    lora_module_name=s.lora_module_name if training else "auto",
                    only_lora=s.only_optimize_lora and training, attn=cfg.model.attn_implementation,
                    dropout=s.dropout if training else None,
                    # ZeRO-3 partitions the LM head, which the chunked path cannot read (algorithms/lm_head.py)
                    logits="whole" if s.zero_stage == 3 else "chunked")


def trained_parts(cfg, t: Trained, traced: Traced, spec: StepSpec | None = None,
                  arch: dict | None = None) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(resident, training, optimizer step) bytes of one trained model.

    Resident: its DeepSpeed states. Training (on top): the activations and the gradients in
    the training dtype; without ZeRO-2 and with one micro-batch per step, the gradients at
    the traced peak are the ones that coexist with the activations, otherwise the whole
    (partitioned) set is resident; with eager attention, its allowance
    (:func:`~.states.eager_attention_reserve`). Optimizer step (on top, activations freed):
    all the gradients and, for DeepSpeed's FP16_Optimizer (fp16 and bf16 at ZeRO-0), each
    gradient's fp32 copy and their flat concatenation, allocated beside the allocator's
    cache of what the training phase freed (BF16_Optimizer and ZeRO keep resident buffers)."""
    e = Engine(t.dtype, t.section.zero_stage, t.section.offload, world_size(cfg))
    s = model_states(traced.counts, e)
    dynamic = e.zero_stage < 2 and t.gradient_accumulation_steps == 1
    flat = flat_fp32_step(e)
    resident = {"weights": s["weights"],
                "gradients": (0 if flat else s["grads_fp32"]) + (0 if dynamic else s["grads"]),
                "master_weights": s["master_fp32"], "optimizer_states": s["adam_fp32"],
                "deepspeed_buffers": deepspeed_buffers(e) + s["working_set"]}
    eager, reusable = 0, 0
    if spec is not None and arch is not None:
        if spec.attn == "eager":
            eager = eager_attention_reserve(arch, spec.batch, spec.seq_len, t.dtype)
        if spec.kind in ("lm", "policy"):
            reusable = reusable_logits_blocks(arch["vocab"], spec.batch, spec.seq_len, spec.logits == "whole",
                                              LOGITS_CHUNK_BYTES)
    training = {"activations": traced.activations, "gradients": min(traced.grads, s["grads"]) if dynamic else 0,
                "allocator_cache": eager}
    step = {"gradients": (s["grads"] if dynamic else 0) + (2 * s["grads_fp32"] if flat else 0)}
    if flat:  # what the backward freed stays cached beside the new buffers, but for the blocks they reuse
        step["allocator_cache"] = max(0, traced.activations + eager - min(reusable, step["gradients"]))
    return resident, training, step


def _add(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def supervised(cfg, configs: dict, stage: str, logits: str | None = None) -> StagePlan:
    """SFT (causal-LM loss on the actor) or RM (pairwise loss: chosen and rejected rows
    stacked, so twice the micro-batch in sequences). ``logits``: the stage's own LM-head
    path unless given ("whole": transformers' labels= loss, as a plain loop computes it)."""
    sec = getattr(cfg, stage)
    t = Trained("actor" if stage == "sft" else "rm", sec, sec.dtype, "lm" if stage == "sft" else "reward",
                sec.per_device_train_batch_size * (1 if stage == "sft" else 2), sec.gradient_accumulation_steps)
    spec = _spec(cfg, t)
    if logits is not None:
        spec = dataclasses.replace(spec, logits=logits)
    tr = trace(t.model, configs[t.model], spec)
    resident, training, step = trained_parts(cfg, t, tr, spec, arch_numbers(configs[t.model]))
    return StagePlan(stage, {"training": _add(resident, training), "optimizer_step": _add(resident, step)},
                     traced=tr.traced)


def rl_sections(cfg, alg: str) -> tuple[Any, Any, str]:
    """(the algorithm's section, the actor's EngineConfig, the actor's config path): the
    offline algorithms' section is itself the policy's engine."""
    sec = getattr(cfg, alg)
    if hasattr(sec, "actor"):
        return sec, sec.actor, f"{alg}.actor"
    return sec, sec, alg


def rl(cfg, configs: dict, alg: str) -> StagePlan:
    """Step 3 by the table's row: an RL algorithm holds its actor, a frozen reference and
    reward model, and a critic when its section has one (PPO), and samples
    ``answers_per_prompt`` answers per prompt; an offline one trains the policy on its
    examples' sequences (DPO: chosen + rejected rows, KTO: one answer), its reference
    log-probs precomputed, so neither the reference nor the reward model is resident."""
    sec, actor_sec, _ = rl_sections(cfg, alg)
    dtype, world = sec.dtype, world_size(cfg)
    micro, gas = sec.per_device_train_batch_size, sec.gradient_accumulation_steps
    arch = arch_numbers(configs["actor"])
    if not ALGORITHMS[alg].rollouts:
        actor = Trained("actor", actor_sec, dtype, "policy", ALGORITHMS[alg].sequences_per_example * micro, gas)
        spec = _spec(cfg, actor)
        tr = trace("actor", configs["actor"], spec)
        resident, training, step = trained_parts(cfg, actor, tr, spec, arch)
        phases = {"policy_update": _add(resident, training), "optimizer_step": _add(resident, step)}
        if sec.trains_with_reward_model():  # an offline algorithm's RM makes its data: dpo/kto answers generated
            phases["pair_generation"] = _pair_generation(cfg, configs, sec, actor, dtype)
        return StagePlan(alg, phases, traced=tr.traced)
    rollout = sec.per_device_generation_batch_size * sec.answers_per_prompt
    actor = Trained("actor", actor_sec, dtype, "policy", micro, gas)
    a_spec = _spec(cfg, actor)
    a_tr = trace("actor", configs["actor"], a_spec)
    a_res, a_trans, a_step = trained_parts(cfg, actor, a_tr, a_spec, arch)
    traced = a_tr.traced
    base_actor = trace("actor", configs["actor"], StepSpec("forward_lm", 1, 8, dtype)).counts
    rm_counts = trace("rm", configs["rm"], StepSpec("forward_value", 1, 8, dtype)).counts
    offload_ref = sec.offload_reference_model
    # LoRA training only the adapters: the reference is the actor with its adapters off (rl/models.py).
    shared_ref = bool(actor_sec.lora_dim) and actor_sec.only_optimize_lora
    frozen = 0 if shared_ref else frozen_weights(base_actor, dtype, offload_ref or actor_sec.zero_stage == 3,
                                                 offload_ref, world)
    resident = dict(a_res)
    phases: dict[str, dict[str, int]] = {}
    reward_zero3 = actor_sec.zero_stage == 3
    if (critic_sec := sec.critic_section) is not None:
        critic = Trained("rm", critic_sec, dtype, "value", micro, gas)
        c_spec = _spec(cfg, critic)
        c_tr = trace("rm", configs["rm"], c_spec)
        c_res, c_trans, c_step = trained_parts(cfg, critic, c_tr, c_spec, arch_numbers(configs["rm"]))
        resident = _add(resident, c_res)
        traced = traced and c_tr.traced
        reward_zero3 = reward_zero3 or critic_sec.zero_stage == 3
        phases.update(critic_update=c_trans, critic_step=c_step)
    if cfg.needs_reward_model():  # a verifier's reward loads no reward model
        frozen += frozen_weights(rm_counts, dtype, reward_zero3, False, world)
    resident["frozen_models"] = frozen
    if getattr(sec, "enable_ema", False):  # rl/ppo.py: an fp32 copy of the actor's (merged) weights
        resident["ema"] = FP32 * base_actor.total
    phases.update(actor_update=a_trans, actor_step=a_step)
    if getattr(sec, "unsupervised_coef", 0):  # the SFT loss mixed in: an lm step of the actor after each update
        lm = Trained("actor", actor_sec, dtype, "lm", micro, gas)
        lm_spec = _spec(cfg, lm)
        phases["actor_unsupervised"] = trained_parts(cfg, lm, trace("actor", configs["actor"], lm_spec), lm_spec,
                                                     arch)[1]
    prefill = trace("actor", configs["actor"], _spec(cfg, actor, "forward_lm", rollout, cfg.data.max_prompt_seq_len))
    phases["generation"] = {"kv_cache": kv_cache(arch, rollout, cfg.data.max_seq_len, dtype),
                            "activations": prefill.activations}
    score_lm = trace("actor", configs["actor"], _spec(cfg, actor, "forward_lm", rollout))
    score_v = trace("rm", configs["rm"], StepSpec("forward_value", rollout, cfg.data.max_seq_len, dtype,
                                                  attn=cfg.model.attn_implementation))
    phases["scoring"] = {"activations": max(score_lm.activations, score_v.activations)}
    return StagePlan(alg, {k: _add(resident, v) for k, v in phases.items()}, traced=traced)


def _pair_generation(cfg, configs: dict, sec, actor: Trained, dtype: str) -> dict[str, int]:
    """dpo.pairs=generated (kto.answers=generated), before the engine exists: the loaded
    policy and the reward model whole, the KV cache of one batch of answers (dpo_pairs.py:
    per_device_eval_batch_size // candidates prompts x candidates) and the larger of their
    forward passes."""
    answers = max(1, sec.per_device_eval_batch_size // sec.candidates) * sec.candidates
    world = world_size(cfg)
    policy = trace("actor", configs["actor"], StepSpec("forward_lm", 1, 8, dtype)).counts
    rm = trace("rm", configs["rm"], StepSpec("forward_value", 1, 8, dtype)).counts
    prefill = trace("actor", configs["actor"], _spec(cfg, actor, "forward_lm", answers, cfg.data.max_prompt_seq_len))
    score = trace("rm", configs["rm"], StepSpec("forward_value", answers, cfg.data.max_seq_len, dtype,
                                                attn=cfg.model.attn_implementation))
    return {"weights": frozen_weights(policy, dtype, False, False, world),
            "frozen_models": frozen_weights(rm, dtype, False, False, world) if cfg.needs_reward_model() else 0,
            "kv_cache": kv_cache(arch_numbers(configs["actor"]), answers, cfg.data.max_seq_len, dtype),
            "activations": max(prefill.activations, score.activations)}


def stage_names(cfg) -> list[str]:
    return ["sft", *(["rm"] if cfg.needs_reward_model() else []), cfg.algorithm]


def plan_stage(cfg, configs: dict, stage: str) -> StagePlan:
    return supervised(cfg, configs, stage) if stage in ("sft", "rm") else rl(cfg, configs, stage)
