"""Hand formulas for what one process cannot trace: how DeepSpeed lays model states out
across GPUs, its buffers, the generation KV cache, and a fallback for activations.

Why formulas here: ZeRO partitions parameters, gradients and optimizer states over
``world_size`` processes and allocates its own flat buffers inside ``deepspeed.initialize``;
a single traced process never sees either. The byte counts follow DeepSpeed 0.19's code
(``runtime/zero/stage_1_and_2.py``, ``stage3.py``, ``runtime/bf16_optimizer.py``,
``runtime/fp16/fused_optimizer.py``) and its own estimators
(``estimate_zero2_model_states_mem_needs``: 2 bytes of fp16 weights + 18/N bytes per
parameter; ``estimate_zero3_model_states_mem_needs``: 18/N + 4 x the largest layer), which
tests/test_plan.py checks these against. All sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# DeepSpeed's defaults (runtime/zero/config.py) and what rlhf_tasks/engine.py sets.
REDUCE_BUCKET_ELEMENTS = 500_000_000  # reduce_bucket_size: one staging buffer of this many elements
PREFETCH_BUCKET_ELEMENTS = 30_000_000  # engine._zero_section: stage3_prefetch_bucket_size
ADAM_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq per trained parameter
FP32 = 4


@dataclass(frozen=True)
class Counts:
    """Parameter counts of one model: all of them, the trained ones, and the largest
    single module's own parameters (what ZeRO-3 gathers whole at once)."""

    total: int
    trainable: int
    largest_layer: int


@dataclass(frozen=True)
class Engine:
    """The settings of one trained model that decide where its states live."""

    dtype: str  # fp32 | fp16 | bf16
    zero_stage: int
    offload: bool
    world_size: int


def model_states(c: Counts, e: Engine) -> dict[str, int]:
    """Per-GPU bytes of a trained model's states under DeepSpeed.

    Keys: ``weights`` (in the training dtype), ``grads`` (gradients in the training dtype),
    ``grads_fp32`` (the fp32 gradient copy the mixed-precision optimizer steps on),
    ``master_fp32`` (fp32 master weights), ``adam_fp32`` (momentum and variance) and
    ``working_set`` (ZeRO-3: the largest layer's parameters and gradients gathered whole,
    DeepSpeed's ``4 x largest_layer_params``).

    ZeRO-1 partitions the fp32 states over the N processes, ZeRO-2 the gradients too,
    ZeRO-3 the weights too; offload moves the fp32 states (and at stage 3 the weights) to
    the CPU. fp32 training without ZeRO is a plain torch optimizer: no master copy. The
    frozen parameters of a LoRA model count in ``weights`` only."""
    b, n, s = DTYPE_BYTES[e.dtype], e.world_size, e.zero_stage
    mixed = e.dtype != "fp32"
    fp32_div = n if s >= 1 else 1  # ZeRO-1+ partitions everything fp32
    out = {"weights": c.total * b, "grads": c.trainable * b, "grads_fp32": 0, "master_fp32": 0,
           "adam_fp32": c.trainable * ADAM_STATE_BYTES // fp32_div, "working_set": 0}
    if mixed or s >= 1:
        # Mixed precision keeps fp32 masters and steps on fp32 gradients; ZeRO-1+ builds its
        # fp32 partition (a copy) even for an fp32 model.
        out["master_fp32"] = c.trainable * FP32 // fp32_div
        out["grads_fp32"] = c.trainable * FP32 // fp32_div
    if s >= 2:
        out["grads"] = c.trainable * b // n
    if s == 3:
        out["weights"] = c.total * b // n
        out["working_set"] = 4 * c.largest_layer  # DeepSpeed's own term: fp16 params + grads of one layer
    if e.offload:
        out.update(grads_fp32=0, master_fp32=0, adam_fp32=0)
        if s >= 2:
            out["grads"] = 0  # reduced straight into the CPU partition
        if s == 3:
            out["weights"] = 0
    return out


def deepspeed_buffers(e: Engine) -> int:
    """DeepSpeed's staging buffers for gradient reduction, per GPU.

    ZeRO-1/2 (``contiguous_gradients``): one ``reduce_bucket_size`` buffer in the training
    dtype, two with ``overlap_comm`` (our engine sets both), allocated at the first
    backward whatever the model size; ZeRO-3: one reduce buffer plus the parameter
    prefetch bucket. ZeRO-0 has none."""
    b = DTYPE_BYTES[e.dtype]
    if e.zero_stage in (1, 2):
        return 2 * REDUCE_BUCKET_ELEMENTS * b
    if e.zero_stage == 3:
        return (REDUCE_BUCKET_ELEMENTS + PREFETCH_BUCKET_ELEMENTS) * b
    return 0


def frozen_weights(c: Counts, dtype: str, zero3: bool, offload: bool, world_size: int) -> int:
    """A frozen model (PPO's reference and reward model) in ``dtype``: whole on every GPU,
    partitioned by a ZeRO-3 inference engine, or offloaded (then only its gathered layer)."""
    b = DTYPE_BYTES[dtype]
    if offload:
        return c.largest_layer * b  # one gathered layer's weights
    if zero3:
        return c.total * b // world_size + c.largest_layer * b
    return c.total * b


def flat_fp32_step(e: Engine) -> bool:
    """Whether the optimizer step flattens fp32 copies of the gradients: DeepSpeed's
    ``FP16_Optimizer``, which fp16 at ZeRO-0 gets, and bf16 at ZeRO-0 too (DeepSpeed 0.19
    picks it for bf16 whenever ``data_types.grad_accum_dtype`` is unset, as in our
    engine; ``BF16_Optimizer`` only with an fp32 accumulation dtype). Its ``step`` makes
    each gradient's fp32 copy, then concatenates them into one flat fp32 buffer
    (``_flatten_dense_tensors([p.grad.to(fp32) ...])``): 8 bytes a trained parameter at
    once, on top of the half-precision gradients, which it frees only afterwards."""
    return e.dtype != "fp32" and e.zero_stage == 0 and not e.offload


def eager_attention_reserve(arch: dict, batch: int, seq_len: int, dtype: str) -> int:
    """What eager attention costs on a GPU beyond the tensors a trace sees it keep.

    A trace of eager attention keeps, per layer, the softmax's fp32 output and its
    half-precision copy (``B x heads x T x T`` each): 6 bytes a score in 16-bit training.
    On the H100 (../shared/gpu/README.md: OPT-1.3B, bf16, batch 8 x 512) eager took 21.1 GB
    more than sdpa, twice those 9.7 GB: the backward's score-size temporaries (the fp32
    gradient of the softmax and its half-precision casts, one set per layer) held by the
    caching allocator. This is that second share, the same 6 bytes a score again, per layer;
    a fitted allowance, not a traced tensor (BENCHMARKS.md, "Memory plan")."""
    scores = batch * arch["heads"] * seq_len * seq_len
    return arch["layers"] * scores * (FP32 + DTYPE_BYTES[dtype])


def reusable_logits_blocks(vocab: int, batch: int, seq_len: int, whole: bool, chunk_bytes: int) -> int:
    """The cached blocks an optimizer step's new gradient buffers can take over.

    The caching allocator serves a request from a freed block at least as large. The
    backward frees per-layer activations, each smaller than a parameter's fp32 gradient
    copy, and the loss's logits: with the whole logits, three ``B x T x V`` fp32 blocks (the
    upcast, the log-softmax, its gradient), large enough to take the step's copies; with
    the chunked head (algorithms/lm_head.py), three chunks of ``chunk_bytes``."""
    return 3 * (batch * seq_len * vocab * FP32 if whole else chunk_bytes)


def kv_cache(arch: dict, batch: int, seq_len: int, dtype: str) -> int:
    """The rollout's KV cache: keys and values of every layer for ``batch`` rows of
    ``seq_len`` tokens (the static decode backend preallocates exactly this; HF's dynamic
    cache grows to it). Grouped-query attention stores ``num_key_value_heads`` heads."""
    head_dim = arch["head_dim"]
    return 2 * arch["layers"] * batch * seq_len * arch["kv_heads"] * head_dim * DTYPE_BYTES[dtype]


def fallback_counts(arch: dict, lora_dim: int, only_lora: bool) -> Counts:
    """Parameters of a decoder from its config numbers, for an architecture that cannot be
    traced: per layer 4 h^2 (attention) + 2 h ffn (MLP) + 4 h (norms, biases), plus the
    token and position embeddings (the LM head tied to the token embedding)."""
    h, f, layers, v = arch["hidden"], arch["ffn"], arch["layers"], arch["vocab"]
    per_layer = 4 * h * h + 2 * h * f + 4 * h
    base = layers * per_layer + v * h + arch["positions"] * h
    lora = layers * lora_dim * (4 * 2 * h + 2 * (h + f)) if lora_dim else 0
    return Counts(total=base + lora, trainable=lora if only_lora else base + lora, largest_layer=max(v * h, h * f))


def fallback_activations(arch: dict, batch: int, seq_len: int, dtype: str, checkpointing: bool,
                         eager: bool) -> int:
    """Activations of one training step when the model cannot be traced (Korthikanti et
    al. 2022, "Reducing Activation Recomputation in Large Transformer Models": a layer
    keeps ``s b h (34 + 5 a s / h)`` bytes in 16-bit, the ``5 a s / h`` term only for
    attention that materialises the score matrix, i.e. eager), plus the logits over the
    vocabulary in the dtype and in fp32 for the loss. Under gradient checkpointing each
    layer keeps only its input and one layer is recomputed at a time."""
    h, a, layers, v = arch["hidden"], arch["heads"], arch["layers"], arch["vocab"]
    scale = DTYPE_BYTES[dtype] / 2
    per_layer = batch * seq_len * h * (34 + (5 * a * seq_len / h if eager else 0)) * scale
    logits = batch * seq_len * v * (DTYPE_BYTES[dtype] + 2 * FP32)
    if checkpointing:
        return int(layers * batch * seq_len * h * DTYPE_BYTES[dtype] + per_layer + logits)
    return int(layers * per_layer + logits)
