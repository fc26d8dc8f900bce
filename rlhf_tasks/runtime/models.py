"""Actor, reward/critic models, LoRA, and the built-in tiny default.

Everything loads through Hugging Face's own ``from_pretrained`` – from a hub id or a
local directory – including the tiny default, which is built once from a config and a
tokenizer trained on the bundled data, then saved with ``save_pretrained``.
"""

from __future__ import annotations

import fcntl
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..storage import atomic_dir, storage_root
from .lora import apply_lora, merge_lora

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
VALUE_HEAD_FILE = "value_head.safetensors"
REWARD_MODEL_FILE = "reward_model.json"

# The tiny default: ~1M parameters, big enough to learn the bundled data's preference
# signal in a couple of CPU minutes, small enough that a PPO iteration takes ~1 s.
TINY_OPT = {
    "hidden_size": 128,
    "word_embed_proj_dim": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "ffn_dim": 512,
    "max_position_embeddings": 512,
    "vocab_size": 2048,
}
# tiny-cpu's reward model (and so PPO's critic): 2 blocks, 64 wide, the actor's tokenizer.
# On tiny-cpu's pairs it reaches the held-out accuracy of a tiny-opt reward model (0.89)
# at a quarter of its compute per token; the reward model is trained for three epochs and
# scores every rollout, so its size is most of the pipeline's time (README, "Measured").
TINY_RM = {**TINY_OPT, "hidden_size": 64, "word_embed_proj_dim": 64, "num_hidden_layers": 2, "ffn_dim": 256}
BUILTINS = {"tiny-opt": TINY_OPT, "tiny-rm": TINY_RM}

_DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "hidden_dropout_prob",
                 "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop")


# -- resolving names ----------------------------------------------------------------

def resolve_model_path(name: str) -> str:
    """A hub id or local path is returned as is; ``builtin:<name>`` is built on first use
    under ``$RLHF_STORAGE/models/<name>`` and its directory returned."""
    if not name.startswith(BUILTIN_PREFIX):
        return str(Path(name).resolve()) if Path(name).exists() else name
    which = name.removeprefix(BUILTIN_PREFIX)
    if which not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}: builtin:tiny-opt or builtin:tiny-rm")
    # tiny-rm scores the actor's token ids: it is built with tiny-opt's own tokenizer.
    tokenizer = None if which == "tiny-opt" else resolve_model_path(BUILTIN_PREFIX + "tiny-opt")
    target = storage_root() / "models" / which
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # SFT and RM may start side by side: one builds, the other waits on the lock.
        with open(target.parent / f".{which}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").is_file():
                build_tiny_opt(target, arch=BUILTINS[which], tokenizer=tokenizer)
    return str(target)


def build_tiny_opt(target: Path, seed: int = 0, arch: dict | None = None, tokenizer: str | None = None) -> None:
    """Save a random-init OPT model of ``arch`` (default :data:`TINY_OPT`) with a BPE
    tokenizer trained on the bundled samples, or the one saved in ``tokenizer``."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from ..data.tokenizer import sample_texts, train_tiny_tokenizer

    arch = arch or TINY_OPT
    log.info("building the tiny model %s", target)
    tok = (AutoTokenizer.from_pretrained(tokenizer) if tokenizer
           else train_tiny_tokenizer(sample_texts(), vocab_size=TINY_OPT["vocab_size"]))
    cfg = OPTConfig(
        **{**arch, "vocab_size": len(tok)},
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = OPTForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


# -- loading ------------------------------------------------------------------------

def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding is masked out everywhere (attention_mask, label -100), so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name!r} has no eos_token: answers could never end")
    return tok


def _set_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in _DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, dropout)


def _load_config(path: str, dropout: float | None, trust_remote_code: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    _set_dropout(config, dropout)
    return config


def _attention_unsupported(e: BaseException) -> bool:
    """transformers' refusal of an attention kernel: a ValueError for an architecture
    without sdpa/flash support (Bloom has no sdpa), an ImportError when flash-attn is missing."""
    return isinstance(e, (ValueError, ImportError)) and "attention" in str(e).lower()


def from_pretrained_with_attention(auto_cls, path: str, attn_implementation: str = "sdpa", **kwargs) -> nn.Module:
    """``auto_cls.from_pretrained`` with the configured attention kernel, or eager attention
    (with a warning) when this architecture cannot use it. Every model load goes through here."""
    try:
        return auto_cls.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
    except (ValueError, ImportError) as e:
        if attn_implementation == "eager" or not _attention_unsupported(e):
            raise
        log.warning("%s: attn_implementation=%s is not available for this model (%s); falling back to eager attention",
                    path, attn_implementation, str(e).splitlines()[0][:200])
    return auto_cls.from_pretrained(path, attn_implementation="eager", **kwargs)


def load_causal_lm(name: str, *, dtype: torch.dtype = torch.float32, dropout: float | None = None,
                   trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                   gradient_checkpointing: bool = False) -> nn.Module:
    """The actor (or the frozen reference): a causal LM from a hub id or directory."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    model = from_pretrained_with_attention(
        AutoModelForCausalLM, path, attn_implementation, config=_load_config(path, dropout, trust_remote_code),
        dtype=dtype, trust_remote_code=trust_remote_code,
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


class RewardModel(nn.Module):
    """LM backbone + a scalar head: one value per token, shape (B, T).

    The sequence's reward is the value at its last non-padding token (the EOS that
    ends the answer); as the PPO critic, every answer token's value is used.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        cfg = backbone.config
        hidden = getattr(cfg, "word_embed_proj_dim", None) or cfg.hidden_size  # OPT projects out to this
        self.v_head = nn.Linear(hidden, 1, bias=False)
        self.config = cfg

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = positions_from_mask(attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)  # (B, T)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) reward of each sequence."""
        return read_score(self(input_ids, attention_mask), attention_mask)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        if state_dict is None:
            state_dict = self.state_dict()
        backbone_sd = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(path, state_dict=backbone_sd)
        save_file({"weight": state_dict["v_head.weight"].detach().contiguous().cpu()}, str(path / VALUE_HEAD_FILE))
        (path / REWARD_MODEL_FILE).write_text(json.dumps({"type": "reward_model", "head": "v_head", "bias": False}))

    @classmethod
    def from_pretrained(cls, name: str, *, dtype: torch.dtype = torch.float32, dropout: float | None = None,
                        trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> RewardModel:
        """From a saved reward model, or from any LM checkpoint (the head starts at zero,
        so an untrained RM scores every answer 0 rather than noise)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = resolve_model_path(name)
        backbone = from_pretrained_with_attention(
            AutoModel, path, attn_implementation, config=_load_config(path, dropout, trust_remote_code), dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        model = cls(backbone)
        model.v_head.to(dtype)  # the backbone is in it already (under ZeRO-3, in the engine's: see engine.py)
        head = Path(path) / VALUE_HEAD_FILE
        if head.is_file():
            model.v_head.weight.data.copy_(load_file(str(head))["weight"].to(dtype))
        else:
            nn.init.zeros_(model.v_head.weight)
        return model


def load_trainable(name: str, section, dtype: str, world_size: int, *, kind: str = "causal_lm",
                   trust_remote_code: bool = False, attn_implementation: str = "sdpa") -> nn.Module:
    """A model to train (the SFT actor, the reward model, the RL actor and critic, the DPO
    policy), loaded the one way every stage does: under ZeRO-3 partitioned as it loads
    (``deepspeed.zero.Init`` with the engine's own settings), in fp32 (the engine casts it to
    ``dtype``), its dropout as ``section.dropout`` says, gradient checkpointing and LoRA
    adapters as ``section`` says. ``kind``: ``causal_lm`` or ``reward`` (a scalar-head
    :class:`RewardModel`, whose backbone gets the adapters). ``engine.initialize`` makes
    the DeepSpeed engine of it."""
    from .engine import loading_config, partitioned_loading

    kw = dict(dtype=torch.float32, dropout=section.dropout, trust_remote_code=trust_remote_code,
              attn_implementation=attn_implementation)
    with partitioned_loading(loading_config(section, dtype, world_size)):
        if kind == "reward":
            model = RewardModel.from_pretrained(name, **kw)
            if section.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif kind == "causal_lm":
            model = load_causal_lm(name, gradient_checkpointing=section.gradient_checkpointing, **kw)
        else:
            raise ValueError(f"kind={kind!r}: causal_lm or reward")
    if section.lora_dim:
        adapt = dict(alpha=section.lora_alpha, only_optimize_lora=section.only_optimize_lora)
        if kind == "reward":
            model.backbone = apply_lora(model.backbone, section.lora_dim, section.lora_module_name, **adapt)
        else:
            model = apply_lora(model, section.lora_dim, section.lora_module_name, **adapt)
    return model


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token, so left-padded prompts get
    the same positions as unpadded ones. (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last non-padding token; works for left and right padding."""
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (idx * attention_mask.long()).argmax(-1)


def read_score(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) values -> (B,) value at each row's last non-padding token."""
    return values.gather(-1, last_token_index(attention_mask).unsqueeze(-1)).squeeze(-1)


def unwrap_for_saving(model: nn.Module) -> nn.Module:
    """Merge LoRA wherever it sits (the actor itself, or a reward model's backbone)."""
    if isinstance(model, RewardModel):
        model.backbone = merge_lora(model.backbone)
        return model
    return merge_lora(model)
