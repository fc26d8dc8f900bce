"""Datasets for the three phases: spec strings -> validated preference pairs -> each
phase's disjoint share -> tokenised rows -> length-grouped, batch-padded tensors.

- formats:   one reader per dataset schema -> (prompt, chosen, rejected)
- loading:   spec strings, ``datasets.load_dataset``, row validation and its report
- split:     DeepSpeed-Chat's ``data_split`` phase shares, blending several datasets
- tokenize:  SFT rows, RM pairs, PPO prompts, KTO's unpaired answers; a phase's dataset cached on disk
- unpaired:  pairs as unpaired answers, the preference store's unpaired rows, mismatched pairs (KTO)
- collate:   collators and the length-grouped batch sampler
- tokenizer: the tiny default model's BPE tokenizer, trained on the bundled samples
"""

from __future__ import annotations

from .collate import (
    DPOCollator,
    KTOCollator,
    LengthGroupedBatchSampler,
    PairCollator,
    PromptCollator,
    SFTCollator,
)
from .formats import GENERIC, HUB_DATASETS, SCHEMAS, SEED_DATASETS, Schema
from .loading import (
    SAMPLES_DIR,
    DatasetSpec,
    DataValidationError,
    ValidationReport,
    load_pairs,
    resolve_spec,
)
from .split import blend, parse_data_split, phase_indices
from .tokenize import IGNORE_INDEX, build_phase_dataset, tokenize_pairs, tokenize_prompts, tokenize_sft

__all__ = [
    "GENERIC", "HUB_DATASETS", "IGNORE_INDEX", "SAMPLES_DIR", "SCHEMAS", "SEED_DATASETS",
    "DPOCollator", "DataValidationError", "KTOCollator", "DatasetSpec", "LengthGroupedBatchSampler", "PairCollator", "PromptCollator",
    "SFTCollator", "Schema", "ValidationReport",
    "blend", "build_phase_dataset", "load_pairs", "parse_data_split", "phase_indices", "resolve_spec",
    "tokenize_pairs", "tokenize_prompts", "tokenize_sft",
]
