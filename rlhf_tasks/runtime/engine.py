"""DeepSpeed: device choice, process group, config, engine initialisation.

Every stage builds its engines here, so the ZeRO / dtype / offload rules live in one
place. On CPU DeepSpeed runs with its CPU accelerator and the gloo backend: the tests
exercise the real engine (optimizer step, gradient accumulation, checkpoints), not a
stand-in.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..config import EngineConfig
from .ranks import free_port

_ARCH_RE = re.compile(r"^(\d+\.\d+)[a-z]?(\+PTX)?$")


def normalise_cuda_arch_list(env: dict[str, str] | None = None) -> str | None:
    """Rewrite ``TORCH_CUDA_ARCH_LIST`` entries such as ``9.0a`` to ``9.0``.

    CUDA images for Hopper set ``9.0a`` (the arch-specific target); DeepSpeed's op
    builder parses each entry as ``int`` after removing the dot and crashes
    (``invalid literal for int() with base 10: '0a'``) when it JIT-builds FusedAdam or
    CPUAdam. ``9.0`` builds the same kernels DeepSpeed uses. Returns the new value.
    """
    env = os.environ if env is None else env
    value = env.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return value
    out = []
    for entry in re.split(r"[;\s,]+", value.strip()):
        m = _ARCH_RE.match(entry)
        out.append(m.group(1) + (m.group(2) or "") if m else entry)
    new = ";".join(e for e in out if e)
    env["TORCH_CUDA_ARCH_LIST"] = new
    return new


def prepare_environment() -> str | None:
    """Set what DeepSpeed reads from the environment when it is imported or JIT-builds an
    op. Called before the first ``import deepspeed`` of a process (:func:`init_distributed`,
    where every stage starts, and prepare's DeepSpeed check); idempotent. Returns the
    normalised ``TORCH_CUDA_ARCH_LIST``."""
    arch = normalise_cuda_arch_list()
    # DeepSpeed JIT-builds ops (on CPU: its shared-memory allreduce) into torch's extension
    # cache. One cache per environment: two virtualenvs sharing ~/.cache would rebuild the op
    # in turn, each time behind a lock file that a killed process leaves behind for good.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    # ... and builds with the first `ninja` on PATH. Two ninja versions (this environment's,
    # a dependency of deepspeed, and the system's) each read the other's build log as stale:
    # stages started by Airflow (venv first on PATH) and from a shell rebuilt an op in turn
    # (on CPU its allreduce, 20-40 s; on a GPU FusedAdam & co., minutes of nvcc). This
    # environment's ninja, whoever started the process.
    env_bin = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(env_bin, "ninja")):
        path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != env_bin]
        os.environ["PATH"] = os.pathsep.join([env_bin, *path])
    # Tests and the embedded default run on CPU: tell DeepSpeed so instead of letting it
    # probe for accelerators (and warn) in every process.
    if os.environ.get("RLHF_DEVICE") == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return arch


def resolve_device(device: str) -> torch.device:
    """``auto`` → the local CUDA device when there is one, else CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but torch.cuda.is_available() is False: no GPU or a CPU build of torch")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def init_distributed(device: torch.device, timeout_minutes: float | None = None) -> tuple[int, int]:
    """Join (or, for a single process, create) the process group. Returns (rank, world).

    ``timeout_minutes``: how long a collective may wait for the other ranks before gloo or
    NCCL give up (torch's default is 30 min for NCCL and gloo alike); the stage's watchdog
    (runtime/watchdog.py) names the phase and rank a little before that."""
    prepare_environment()
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # started by plain python, not by the deepspeed launcher
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if device.type == "cpu":
            _no_shared_memory_allreduce()
            _cpu_threads_per_rank()
        kw = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False, **kw)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size()


def _no_shared_memory_allreduce() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory allreduce (a C++ op: 20-40 s on an
    idle 2-core machine, over 2 minutes on a loaded one, and a compiler needed) whenever it
    makes a process group. The op serves only ``inference_all_reduce``, which DeepSpeed's
    tensor-parallel inference (AutoTP) calls and no stage here does: ZeRO's collectives go
    through torch.distributed (gloo) either way. So no CPU group builds it: DeepSpeed's own
    path for a platform without the op (tests/test_engine.py)."""
    # By module name: the package's attribute `deepspeed.comm.torch` is torch itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _cpu_threads_per_rank() -> None:
    """Several CPU ranks on one host share its cores: each takes its share (torch would
    start one thread per core in every rank, and OpenMP's busy waiting makes oversubscribed
    threads far slower than fewer). An explicit ``OMP_NUM_THREADS`` wins."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


@dataclass(frozen=True)
class Batching:
    """How a trained model is fed: the stage's settings, not the model's (PPO's actor and
    critic share one)."""

    micro_batch_size: int  # the stage's per_device_train_batch_size
    gradient_accumulation_steps: int
    dtype: str
    total_steps: int  # optimizer steps, for the LR schedule


def _zero_section(o: EngineConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": o.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if o.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if o.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if o.zero_stage == 3:
        # Small parameters stay resident: gathering each LayerNorm separately costs more
        # in launch latency than the memory it saves.
        zero.update(stage3_param_persistence_threshold=10_000, stage3_prefetch_bucket_size=30_000_000)
    return zero


def _precision(dtype: str) -> dict[str, Any]:
    return {"fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1},
            "bf16": {"enabled": dtype == "bf16"}}


def deepspeed_config(o: EngineConfig, b: Batching, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for one engine."""
    return {
        "train_micro_batch_size_per_gpu": b.micro_batch_size,
        "gradient_accumulation_steps": b.gradient_accumulation_steps,
        "train_batch_size": b.micro_batch_size * b.gradient_accumulation_steps * world_size,
        "gradient_clipping": o.max_grad_norm,
        "zero_optimization": _zero_section(o),
        **_precision(b.dtype),
        "steps_per_print": 10**9,  # our own logging; DeepSpeed's would sync every step
        "wall_clock_breakdown": False,
    }


def loading_config(o: EngineConfig, dtype: str, world_size: int) -> dict[str, Any]:
    """The config a trained model is loaded under (:func:`partitioned_loading`): what
    ``deepspeed.zero.Init`` reads of it – ZeRO stage, parameter offload, dtype – is what
    :func:`initialize` will use; the batch sizes do not matter before training."""
    return deepspeed_config(o, Batching(1, 1, dtype, 1), world_size)


def inference_config(dtype: str, offload: bool, world_size: int) -> dict[str, Any]:
    """The config of a frozen model under ZeRO-3 (PPO's reference and reward models), its
    parameters offloaded to CPU when ``offload``."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}} if offload else {"stage": 3},
        "fp16": {"enabled": dtype == "fp16"},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 10**9,
    }


@contextlib.contextmanager
def partitioned_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under a ZeRO-3 ``ds_config``, models loaded inside are partitioned as they load:
    transformers' ``from_pretrained`` sees the :class:`HfDeepSpeedConfig` and builds the
    weights under ``deepspeed.zero.Init``, so no rank ever holds the whole model (a 66B
    model would otherwise be read whole into every rank's memory). Otherwise a no-op."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    prepare_environment()
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del alive


def _unpartitioned_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed casts nothing of a model built under ``zero.Init``: the parameters added
    after loading (LoRA adapters, the reward model's value head) must already be in the
    engine's dtype when it partitions them."""
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return
    for p in params:
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (as DeepSpeed-Chat and nanoGPT do).

    A parameter's own shape: under ZeRO-3 ``p`` holds an empty 1-D placeholder and its shape
    is ``ds_shape`` (by ``p.ndim`` every weight would look like a bias, and nothing decayed)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, o: EngineConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, o.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: check lora_dim / only_optimize_lora")
    if o.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.learning_rate, betas=o.adam_betas)
    # torch's fused AdamW: one kernel for all parameters, no JIT build (DeepSpeed's
    # FusedAdam costs ~50 s of compilation on a fresh worker and is no faster).
    return torch.optim.AdamW(groups, lr=o.learning_rate, betas=o.adam_betas, fused=device.type == "cuda")


def initialize(model: torch.nn.Module, o: EngineConfig, b: Batching, device: torch.device, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine with its optimizer and LR schedule: ``o`` is
    the model's config section as the user wrote it (``sft``, ``rm``, ``ppo.actor``, ``ppo.critic``)."""
    import deepspeed
    from transformers import get_scheduler

    _unpartitioned_to(model, torch_dtype(b.dtype))
    optimizer = build_optimizer(model, o, device)
    scheduler = get_scheduler(o.lr_scheduler_type, optimizer, num_warmup_steps=o.num_warmup_steps,
                              num_training_steps=max(b.total_steps, 1))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(o, b, world_size))
    if world_size == 1 and o.zero_stage == 0:
        # One process without ZeRO: DeepSpeed would still all-reduce every gradient after each
        # backward, a collective over a group of one that changes nothing (6% of a tiny-cpu RM step).
        engine.enable_backward_allreduce = False
    if world_size == 1 and b.dtype == "fp32" and o.zero_stage == 0 and o.max_grad_norm:
        # fp32 without ZeRO clips with DeepSpeed's clip_grad_norm_, which all-reduces the norm
        # over the data-parallel group, a group of one here: the same arithmetic without the
        # collective (engine.step() calls this instance attribute). Mixed precision and ZeRO
        # clip their own flat buffers.
        params = [p for p in model.parameters() if p.requires_grad]
        engine.clip_fp32_gradients = lambda: clip_like_deepspeed(params, o.max_grad_norm)
    return engine


@torch.no_grad()
def clip_like_deepspeed(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """DeepSpeed 0.19's ``clip_grad_norm_`` for one process, operation for operation (the same
    gradients to the bit): the 2-norm of the per-tensor 2-norms, then every gradient times
    min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack([g.detach().float().norm(2.0) for g in grads]).pow(2.0).sum().float().pow(1.0 / 2.0)
    coef = torch.min(torch.tensor([1.0]), torch.tensor([float(max_norm)]) / (total * 1.0 / 1.0 + 1e-6))
    torch._foreach_mul_(grads, coef.to(grads[0].device)[0])
    return total


def inference_engine(model: torch.nn.Module, dtype: str, offload: bool, world_size: int):
    """A frozen model (reference, reward) partitioned across GPUs by ZeRO-3, or offloaded
    to CPU; load it under ``partitioned_loading(inference_config(...))`` with the same
    arguments."""
    import deepspeed

    _unpartitioned_to(model, torch_dtype(dtype))
    engine, *_ = deepspeed.initialize(model=model, config=inference_config(dtype, offload, world_size))
    engine.eval()
    return engine
