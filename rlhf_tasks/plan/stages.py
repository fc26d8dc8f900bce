"""Each stage's peak memory per GPU, assembled from traced steps (:mod:`.trace`) and
DeepSpeed's layout (:mod:`.states`).

A stage's memory has a resident part (the trained models' states, the frozen models,
DeepSpeed's buffers) and, on top, one transient part per phase: the training step's
activations and gradients, or, in the RL step, the rollout's KV cache, the no-grad
scoring pass of the four models, the actor update and the critic update, which run one
after the other. The stage's peak is its largest phase; ``parts`` split that phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import ALGORITHMS
from .states import Engine, deepspeed_buffers, frozen_weights, kv_cache, model_states
from .trace import StepSpec, Traced, arch_numbers, trace

GB = 1e9  # decimal, as the stages' measured peak_memory_gb (torch.cuda.max_memory_allocated / 1e9)
PARTS = ("weights", "gradients", "optimizer_states", "master_weights", "activations", "kv_cache",
         "frozen_models", "deepspeed_buffers")


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

    def to_json(self) -> dict[str, Any]:
        return {"peak_gb": round(self.peak / GB, 3), "peak_phase": self.peak_phase,
                "parts": {k: round(v / GB, 3) for k, v in self.parts.items()},
                "phases": {p: round(sum(v.values()) / GB, 3) for p, v in self.phases.items()},
                "traced": self.traced, **({"notes": self.notes} if self.notes else {})}


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
                    dropout=s.dropout if training else None)


def trained_parts(cfg, t: Trained, traced: Traced) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(resident, training, optimizer step) bytes of one trained model.

    Resident: its DeepSpeed states. Training (on top): the activations and the gradients in
    the training dtype; without ZeRO-2 and with one micro-batch per step, the gradients at
    the traced peak are the ones that coexist with the activations, otherwise the whole
    (partitioned) set is resident. Optimizer step (on top, activations freed): all the
    gradients, and for fp16 without ZeRO the fp32 gradient copy, which DeepSpeed's
    FP16_Optimizer builds only for the step (BF16_Optimizer and ZeRO keep theirs)."""
    e = Engine(t.dtype, t.section.zero_stage, t.section.offload, world_size(cfg))
    s = model_states(traced.counts, e)
    dynamic = e.zero_stage < 2 and t.gradient_accumulation_steps == 1
    step_fp32 = e.dtype == "fp16" and e.zero_stage == 0
    resident = {"weights": s["weights"],
                "gradients": (0 if step_fp32 else s["grads_fp32"]) + (0 if dynamic else s["grads"]),
                "master_weights": s["master_fp32"], "optimizer_states": s["adam_fp32"],
                "deepspeed_buffers": deepspeed_buffers(e) + s["working_set"]}
    training = {"activations": traced.activations, "gradients": min(traced.grads, s["grads"]) if dynamic else 0}
    step = {"gradients": (s["grads"] if dynamic else 0) + (s["grads_fp32"] if step_fp32 else 0)}
    return resident, training, step


def _add(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def supervised(cfg, configs: dict, stage: str) -> StagePlan:
    """SFT (causal-LM loss on the actor) or RM (pairwise loss: chosen and rejected rows
    stacked, so twice the micro-batch in sequences)."""
    sec = getattr(cfg, stage)
    t = Trained("actor" if stage == "sft" else "rm", sec, sec.dtype, "lm" if stage == "sft" else "reward",
                sec.per_device_train_batch_size * (1 if stage == "sft" else 2), sec.gradient_accumulation_steps)
    tr = trace(t.model, configs[t.model], _spec(cfg, t))
    resident, training, step = trained_parts(cfg, t, tr)
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
    if not ALGORITHMS[alg].rollouts:
        actor = Trained("actor", actor_sec, dtype, "policy", ALGORITHMS[alg].sequences_per_example * micro, gas)
        tr = trace("actor", configs["actor"], _spec(cfg, actor))
        resident, training, step = trained_parts(cfg, actor, tr)
        phases = {"policy_update": _add(resident, training), "optimizer_step": _add(resident, step)}
        if sec.trains_with_reward_model():  # an offline algorithm's RM makes its data: dpo/kto answers generated
            phases["pair_generation"] = _pair_generation(cfg, configs, sec, actor, dtype)
        return StagePlan(alg, phases, traced=tr.traced)
    rollout = sec.per_device_generation_batch_size * sec.answers_per_prompt
    actor = Trained("actor", actor_sec, dtype, "policy", micro, gas)
    a_tr = trace("actor", configs["actor"], _spec(cfg, actor))
    a_res, a_trans, a_step = trained_parts(cfg, actor, a_tr)
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
        c_tr = trace("rm", configs["rm"], _spec(cfg, critic))
        c_res, c_trans, c_step = trained_parts(cfg, critic, c_tr)
        resident = _add(resident, c_res)
        traced = traced and c_tr.traced
        reward_zero3 = reward_zero3 or critic_sec.zero_stage == 3
        phases.update(critic_update=c_trans, critic_step=c_step)
    if cfg.needs_reward_model():  # a verifier's reward loads no reward model
        frozen += frozen_weights(rm_counts, dtype, reward_zero3, False, world)
    resident["frozen_models"] = frozen
    phases.update(actor_update=a_trans, actor_step=a_step)
    arch = arch_numbers(configs["actor"])
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
