"""Unpaired answers for KTO: a prompt, one answer, and whether it is desirable.

Two sources:

- the preference pairs of a phase: each pair gives its chosen answer as a desirable row and
  its rejected answer as an undesirable one (KTO needs no pairing, it learns from both);
- the labelled answers no pair can hold, kept by the labelling DAG beside the store's pairs
  (``<store>/unpaired/<dag run id>.jsonl``, rlhf_tasks/feedback/store.py): today both answers
  of a pair judged *Both bad*, two undesirable rows. They are read with a ``human`` dataset
  spec (the store's directory), all of them KTO's (no other phase can use them), a seeded
  tenth held out.

Tokenised (rlhf_tasks/data/tokenize.py): ``input_ids`` (prompt then answer then EOS),
``prompt_len``, ``desirable`` (1 or 0), ``length``. KTO's reference point is estimated on
mismatched pairs: :func:`mismatched` gives each row's prompt another row's answer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from .loading import MAX_BAD_FRACTION, SHOW_BAD_ROWS, DatasetSpec, DataValidationError, ValidationReport
from .split import split_indices

UNPAIRED_DIR = "unpaired"  # under a preference store directory; not a *.jsonl of the store itself
ROW_FEATURES = datasets.Features({"prompt": datasets.Value("string"), "completion": datasets.Value("string"),
                                  "desirable": datasets.Value("bool"), "source": datasets.Value("string")})


def from_pairs(pairs: datasets.Dataset) -> datasets.Dataset:
    """prompt/chosen/rejected(/source) rows -> two unpaired rows each, chosen (desirable)
    then rejected, in the pairs' order."""
    n = len(pairs)
    source = pairs["source"] if "source" in pairs.column_names else [""] * n
    prompts, chosen, rejected = pairs["prompt"], pairs["chosen"], pairs["rejected"]
    return datasets.Dataset.from_dict({
        "prompt": [p for p in prompts for _ in (0, 1)],
        "completion": [a for pair in zip(chosen, rejected, strict=True) for a in pair],
        "desirable": [d for _ in range(n) for d in (True, False)],
        "source": [s for s in source for _ in (0, 1)],
    }, features=ROW_FEATURES)


def from_token_pairs(pairs: datasets.Dataset) -> datasets.Dataset:
    """Tokenised pairs (``chosen_input_ids``, ``rejected_input_ids``, ``chosen_prompt_len``;
    the two share their prompt) -> tokenised unpaired rows, chosen (desirable) then rejected."""
    chosen, rejected, prompt_len = pairs["chosen_input_ids"], pairs["rejected_input_ids"], pairs["chosen_prompt_len"]
    ids = [a for pair in zip(chosen, rejected, strict=True) for a in pair]
    return datasets.Dataset.from_dict({"input_ids": ids, "prompt_len": [k for k in prompt_len for _ in (0, 1)],
                                       "desirable": [d for _ in prompt_len for d in (1, 0)],
                                       "length": [len(x) for x in ids]})


def store_batches(store: str | Path) -> list[Path]:
    """The unpaired batches kept beside a preference store's pairs, by name."""
    where = Path(store) / UNPAIRED_DIR
    return sorted(p for p in where.glob("*.jsonl") if p.is_file() and p.stat().st_size > 0)


def _check(row: object) -> str:
    """Why a stored row is unusable ("" when it is fine)."""
    if not isinstance(row, dict):
        return "not an object"
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"empty {key}"
    return "" if isinstance(row.get("desirable"), bool) else "desirable is not true/false"


def load_store_rows(spec: DatasetSpec, seed: int, own_eval_fraction: float = 0.1
                    ) -> tuple[dict[str, datasets.Dataset], ValidationReport]:
    """A ``human`` spec's unpaired rows: ``{"train", "eval"}`` (a seeded tenth held out) and
    what was dropped; a store with more bad rows than good is refused, naming its files."""
    files = store_batches(spec.location)
    rows, reasons = [], []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            reasons.append(_check(row) if row is not None else "not JSON")
            rows.append(row)
    bad = [i for i, r in enumerate(reasons) if r]
    report = ValidationReport(f"{spec.name} ({UNPAIRED_DIR})", "train", len(rows), len(rows) - len(bad),
                              dict(Counter(reasons[i] for i in bad)), bad[:SHOW_BAD_ROWS], stage="unpaired")
    if rows and len(bad) > MAX_BAD_FRACTION * len(rows):
        why = ", ".join(f"{k}: {v}" for k, v in sorted(report.dropped.items()))
        raise DataValidationError(f"dataset {spec.name!r}: {len(bad)} of {len(rows)} unpaired rows in "
                                  f"{[str(f) for f in files]} are malformed ({why}); first bad rows: {report.bad_rows}")
    good = [r for r, why in zip(rows, reasons, strict=True) if not why]
    ds = datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in good],
                                     "completion": [" " + r["completion"].lstrip() for r in good],
                                     "desirable": [r["desirable"] for r in good], "source": [spec.name] * len(good)},
                                    features=ROW_FEATURES)
    keep, hold = split_indices(len(ds), [1 - own_eval_fraction, own_eval_fraction], seed)
    return {"train": ds.select(keep), "eval": ds.select(hold)}, report


def mismatched(input_ids: list[list[int]], prompt_lens: list[int], seed: int, max_seq_len: int,
               eos_id: int) -> tuple[list[list[int]], list[int]]:
    """Each row's prompt with another row's answer (``input_ids``, ``prompt_len`` of the
    mismatched rows): KTO's KL reference point is the policy's log-ratio to the reference on
    answers that do not belong to their prompt. The partner is the next row of a seeded
    shuffle whose prompt differs (the rows of one pair share a prompt), cut to fit
    ``max_seq_len`` keeping EOS. Fewer than two distinct prompts: every row its own partner."""
    n = len(input_ids)
    order = np.random.default_rng(seed).permutation(n).tolist()
    prompts = [tuple(ids[:k]) for ids, k in zip(input_ids, prompt_lens, strict=True)]
    out_ids, out_lens = [], []
    for pos, i in enumerate(order):
        j = next((order[(pos + step) % n] for step in range(1, min(n, 8)) if prompts[order[(pos + step) % n]]
                  != prompts[i]), order[(pos + 1) % n])
        answer = input_ids[j][prompt_lens[j]:]
        room = max_seq_len - prompt_lens[i]
        if len(answer) > room:
            answer = answer[:room - 1] + [eos_id]
        out_ids.append(list(prompts[i]) + answer)
        out_lens.append(prompt_lens[i])
    back = np.argsort(order)  # row i's mismatched pair at position i
    return [out_ids[k] for k in back], [out_lens[k] for k in back]
