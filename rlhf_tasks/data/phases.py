"""The tokenised share of each phase: SFT rows (phase 1), RM pairs (phase 2), PPO
prompts (phase 3) or, for DPO, phase 3's whole pairs, for KTO its unpaired answers, cached
on shared storage so that every stage and retry reuses them."""

from __future__ import annotations

from pathlib import Path

from ..config import PipelineConfig
from ..storage import storage_root
from . import build_phase_dataset
from .chat import renderer


def cache_dir() -> Path:
    return storage_root() / "cache" / "tokenized"


def _load(cfg: PipelineConfig, tok, split: str, kind: str, phase: int):
    d = cfg.data
    return build_phase_dataset(
        d.datasets, tok, kind=kind, phase=phase, split=split, data_split=d.data_split, seed=cfg.seed,
        max_seq_len=d.max_seq_len, max_prompt_seq_len=d.max_prompt_seq_len, cache_dir=cache_dir(),
        train_on_prompt=cfg.sft.train_on_prompt, render=renderer(tok, cfg.model.chat_template),
    )


def sft_rows(cfg: PipelineConfig, tok, split: str):
    return _load(cfg, tok, split, "sft", 1)


def rm_pairs(cfg: PipelineConfig, tok, split: str):
    return _load(cfg, tok, split, "pairs", 2)


def ppo_prompts(cfg: PipelineConfig, tok, split: str):
    return _load(cfg, tok, split, "prompts", 3)


def dpo_pairs(cfg: PipelineConfig, tok, split: str):
    """The third phase's pairs: DPO learns from the preferences whose prompts PPO samples."""
    return _load(cfg, tok, split, "pairs", 3)


def kto_rows(cfg: PipelineConfig, tok, split: str):
    """The third phase's pairs as unpaired answers (chosen desirable, rejected undesirable),
    plus the unpaired answers people labelled (a ``human`` spec's "both bad" answers)."""
    return _load(cfg, tok, split, "unpaired", 3)
