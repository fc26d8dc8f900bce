"""Tokenise each phase's rows, and build (and cache) a phase's whole dataset.

Prompt and answer are tokenised separately: the prompt with the tokenizer's special
tokens (a BOS where the tokenizer adds one), the answer without, then EOS appended. So
tokenizers with and without an automatic BOS both give ``[BOS?] prompt answer EOS``, and
the prompt length in tokens is known exactly, which prompt masking needs.

Under a chat template (``render``, data/chat.py) the prompt is the rendered conversation up to
the assistant's header, tokenised without adding special tokens (the template writes them),
and the answer is the bare assistant text: the same ``prompt answer EOS`` shape.

Prompts too long for their budget are dropped (and counted); answers are cut on the
right to fit ``max_seq_len``, keeping the EOS, which the reward model reads its score at.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets

from .chat import Renderer
from .formats import HUMAN
from .loading import SHOW_BAD_ROWS, DatasetSpec, ValidationReport, load_pairs, resolve_spec
from .split import blend, parse_data_split
from .unpaired import from_pairs, load_store_rows

Kind = Literal["sft", "pairs", "prompts", "unpaired"]
IGNORE_INDEX = -100  # label of positions the loss skips (prompt, padding)
CACHE_FORMAT = 1  # bump when the cached columns or their meaning change
# Columns each tokenisation adds; "drop" (why a row goes, "" to keep it) is removed again.
SFT_COLUMNS = ("input_ids", "labels", "length", "drop")
PAIR_COLUMNS = ("chosen_input_ids", "rejected_input_ids", "chosen_prompt_len", "length", "drop")
PROMPT_COLUMNS = ("prompt_input_ids", "length", "drop")
UNPAIRED_COLUMNS = ("input_ids", "prompt_len", "desirable", "length", "drop")


def _encode(tok, prompts: list[str], answers: list[list[str]],
            render: Renderer | None = None) -> tuple[list[list[int]], list[list[list[int]]]]:
    if render is None or not render.template:
        p = tok(prompts, add_special_tokens=True)["input_ids"]
        a = [tok(texts, add_special_tokens=False)["input_ids"] for texts in answers]
        return p, a
    # A chat template: the prompt rendered with the generation prompt (its special tokens
    # written by the template), the answer bare; the EOS appended later ends the turn.
    bare = [tok([render.answer(t) for t in texts], add_special_tokens=False)["input_ids"] for texts in answers]
    return render.encode_prompts(prompts), bare


def _fit_answer(ids: list[int], room: int, eos_id: int) -> list[int]:
    """``ids`` cut to ``room - 1`` tokens, then EOS: at most ``room`` tokens."""
    return ids[: room - 1] + [eos_id]


def _finish(ds: datasets.Dataset, name: str, stage: str, split: str) -> tuple[datasets.Dataset, ValidationReport]:
    """Drop rows whose ``drop`` reason is set; count them by reason."""
    reasons = ds["drop"]
    bad = [i for i, r in enumerate(reasons) if r]
    report = ValidationReport(name, split, len(ds), len(ds) - len(bad), dict(Counter(reasons[i] for i in bad)),
                              bad[:SHOW_BAD_ROWS], stage=stage)
    if bad:
        ds = ds.select([i for i, r in enumerate(reasons) if not r])
    return ds.remove_columns("drop"), report


def _map(ds: datasets.Dataset, fn: Callable[[dict[str, list]], dict[str, list]], keep: Sequence[str],
         new: Sequence[str], desc: str) -> datasets.Dataset:
    """``ds.map(fn)`` keeping the ``keep`` columns; ``fn`` adds the ``new`` ones."""
    drop = [c for c in ds.column_names if c not in keep]
    if len(ds) == 0:
        # map never calls fn on zero rows, so the new columns would be missing: a phase
        # with a zero share must still come back with its usual columns.
        return datasets.Dataset.from_dict({c: [] for c in [*(c for c in ds.column_names if c in keep), *new]})
    return ds.map(fn, batched=True, remove_columns=drop, desc=desc)


def _check_tok(tok) -> None:
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no eos_token: answers could never end")


def tokenize_sft(ds: datasets.Dataset, tok, max_seq_len: int, train_on_prompt: bool = False, *,
                 name: str = "sft", split: str = "train", render: Renderer | None = None) -> tuple[datasets.Dataset, ValidationReport]:
    """prompt + chosen -> ``input_ids``, ``labels`` (IGNORE_INDEX on the prompt unless
    ``train_on_prompt``), ``length``. A prompt that leaves no room for one answer token and
    EOS is dropped. Under a chat template the prompt is the rendered conversation up to the
    assistant's header, so the labels cover the assistant's answer and its end-of-turn only."""
    _check_tok(tok)

    def fn(batch: dict[str, list]) -> dict[str, list]:
        prompts, (answers,) = _encode(tok, batch["prompt"], [batch["chosen"]], render)
        out: dict[str, list] = {c: [] for c in SFT_COLUMNS}
        for p, a in zip(prompts, answers, strict=True):
            room = max_seq_len - len(p)
            drop = f"prompt over {max_seq_len - 2} tokens" if room < 2 else ""
            ids, labels = [], []
            if not drop:
                ids = p + _fit_answer(a, room, tok.eos_token_id)
                labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(p) + ids[len(p):]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["drop"].append(drop)
        return out

    return _finish(_map(ds, fn, ("source",), SFT_COLUMNS, f"tokenising SFT rows [{split}]"), name, "sft", split)


def tokenize_pairs(ds: datasets.Dataset, tok, max_seq_len: int, *, name: str = "pairs",
                   split: str = "train", render: Renderer | None = None) -> tuple[datasets.Dataset, ValidationReport]:
    """prompt + chosen / prompt + rejected -> ``chosen_input_ids``, ``rejected_input_ids``,
    ``chosen_prompt_len``, ``length`` (the longer of the two). Pairs that truncation makes
    identical teach nothing and are dropped too."""
    _check_tok(tok)

    def fn(batch: dict[str, list]) -> dict[str, list]:
        prompts, (chosen, rejected) = _encode(tok, batch["prompt"], [batch["chosen"], batch["rejected"]], render)
        out: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
        for p, c, r in zip(prompts, chosen, rejected, strict=True):
            room = max_seq_len - len(p)
            c_ids = p + _fit_answer(c, room, tok.eos_token_id) if room >= 2 else []
            r_ids = p + _fit_answer(r, room, tok.eos_token_id) if room >= 2 else []
            drop = (f"prompt over {max_seq_len - 2} tokens" if room < 2
                    else "identical after truncation" if c_ids == r_ids else "")
            out["chosen_input_ids"].append(c_ids)
            out["rejected_input_ids"].append(r_ids)
            out["chosen_prompt_len"].append(len(p))
            out["length"].append(max(len(c_ids), len(r_ids)))
            out["drop"].append(drop)
        return out

    return _finish(_map(ds, fn, ("source",), PAIR_COLUMNS, f"tokenising pairs [{split}]"), name, "pairs", split)


def tokenize_prompts(ds: datasets.Dataset, tok, max_prompt_seq_len: int, *, name: str = "prompts",
                     split: str = "train", render: Renderer | None = None) -> tuple[datasets.Dataset, ValidationReport]:
    """prompt -> ``prompt_input_ids``, ``length``; the ``prompt`` and ``chosen`` texts are
    kept for reference (evaluation tables). Prompts over the limit are dropped: PPO
    generates ``max_seq_len - max_prompt_seq_len`` tokens after them."""
    _check_tok(tok)

    def fn(batch: dict[str, list]) -> dict[str, list]:
        ids = (render.encode_prompts(batch["prompt"]) if render is not None and render.template
               else tok(batch["prompt"], add_special_tokens=True)["input_ids"])
        return {"prompt_input_ids": ids, "length": [len(x) for x in ids],
                "drop": [f"prompt over {max_prompt_seq_len} tokens" if len(x) > max_prompt_seq_len else ""
                         for x in ids]}

    return _finish(_map(ds, fn, ("source", "prompt", "chosen"), PROMPT_COLUMNS, f"tokenising prompts [{split}]"),
                   name, "prompts", split)


def tokenize_unpaired(ds: datasets.Dataset, tok, max_seq_len: int, *, name: str = "unpaired",
                      split: str = "train",
                      render: Renderer | None = None) -> tuple[datasets.Dataset, ValidationReport]:
    """prompt + completion -> ``input_ids`` ([BOS?] prompt answer EOS, the answer cut to fit
    ``max_seq_len``), ``prompt_len``, ``desirable`` (1/0), ``length``; a prompt that leaves no
    room for one answer token and EOS is dropped."""
    _check_tok(tok)

    def fn(batch: dict[str, list]) -> dict[str, list]:
        prompts, (answers,) = _encode(tok, batch["prompt"], [batch["completion"]], render)
        out: dict[str, list] = {c: [] for c in UNPAIRED_COLUMNS}
        for p, a, good in zip(prompts, answers, batch["desirable"], strict=True):
            room = max_seq_len - len(p)
            ids = p + _fit_answer(a, room, tok.eos_token_id) if room >= 2 else []
            for key, value in zip(UNPAIRED_COLUMNS, (ids, len(p), int(good), len(ids),
                                                     "" if room >= 2 else f"prompt over {max_seq_len - 2} tokens"),
                                  strict=True):
                out[key].append(value)
        return out

    return _finish(_map(ds, fn, ("source",), UNPAIRED_COLUMNS, f"tokenising unpaired answers [{split}]"), name,
                   "unpaired", split)


# -- a phase's dataset, cached -----------------------------------------------------------

def _files_fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime) of every file under a local dataset: an edit invalidates the cache."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path) if p != path else p.name), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]


def tokenizer_fingerprint(tok) -> dict[str, Any]:
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
    probe = "\n\nHuman: Hello there!\n\nAssistant: Hi."
    return {"name_or_path": str(tok.name_or_path), "class": type(tok).__name__, "vocab_size": len(tok),
            "vocab_sha256": hashlib.sha256(vocab).hexdigest(), "eos": tok.eos_token_id,
            # Whether (and which) BOS/EOS the tokenizer adds changes every sequence.
            "probe": tok(probe, add_special_tokens=True)["input_ids"]}


def cache_key(specs: Sequence[DatasetSpec], tok, **settings: Any) -> str:
    inputs = {
        "format": CACHE_FORMAT,
        "datasets": [{"schema": s.schema, "location": s.location,
                      "files": _files_fingerprint(Path(s.location)) if s.is_local else None} for s in specs],
        "tokenizer": tokenizer_fingerprint(tok),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def build_phase_dataset(specs: Sequence[str], tok, *, kind: Kind, phase: int, split: Literal["train", "eval"],
                        data_split: str | Sequence[float], seed: int, max_seq_len: int, max_prompt_seq_len: int,
                        cache_dir: Path | None, train_on_prompt: bool = False,
                        hf_cache_dir: str | Path | None = None, render: Renderer | None = None) -> tuple[datasets.Dataset, list[ValidationReport]]:
    """Load every spec, take its ``phase`` share of ``split``, blend, tokenise as ``kind``.

    With ``cache_dir`` the result is saved under ``cache_dir/<sha256 of every input>/``
    (written to a temporary directory, then renamed into place, so a reader never sees a
    half-written one and concurrent builders do not clash) and reused from there.
    """
    if kind not in ("sft", "pairs", "prompts", "unpaired"):
        raise ValueError(f"kind={kind!r}: expected 'sft', 'pairs', 'prompts' or 'unpaired'")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    parse_data_split(data_split)
    resolved = [resolve_spec(s) for s in specs]
    if not resolved:
        raise ValueError("build_phase_dataset needs at least one dataset spec")
    settings = {"kind": kind, "phase": phase, "split": split, "data_split": str(data_split), "seed": seed,
                "max_seq_len": max_seq_len, "max_prompt_seq_len": max_prompt_seq_len,
                "train_on_prompt": bool(train_on_prompt) and kind == "sft"}
    if render is not None and render.template:  # only then: an untemplated run keeps its cache key
        settings["chat_template"] = render.tok.chat_template
    target = Path(cache_dir) / cache_key(resolved, tok, **settings) if cache_dir is not None else None
    if target is not None and (target / "reports.json").is_file():
        reports = [ValidationReport(**r) for r in json.loads((target / "reports.json").read_text())]
        return datasets.load_from_disk(str(target / "dataset")), reports

    reports: list[ValidationReport] = []
    shares = []
    for s in resolved:
        pairs, load_reports = load_pairs(s, seed, hf_cache_dir)
        reports += [r for r in load_reports if (r.split == "train") == (split == "train")]
        shares.append((s.name, pairs[split]))
    rows = blend(shares, data_split, phase, seed)
    name = ",".join(s.name for s in resolved)
    if kind == "sft":
        ds, report = tokenize_sft(rows, tok, max_seq_len, train_on_prompt, name=name, split=split, render=render)
    elif kind == "pairs":
        ds, report = tokenize_pairs(rows, tok, max_seq_len, name=name, split=split, render=render)
    elif kind == "unpaired":
        ds, report = tokenize_unpaired(_unpaired_rows(rows, resolved, seed, split, reports), tok, max_seq_len,
                                       name=name, split=split, render=render)
    else:
        ds, report = tokenize_prompts(rows, tok, max_prompt_seq_len, name=name, split=split, render=render)
    reports.append(report)
    if target is None:
        return ds, reports
    return _save_atomic(ds, reports, target), reports


def _unpaired_rows(pairs: datasets.Dataset, specs: Sequence[DatasetSpec], seed: int, split: str,
                   reports: list[ValidationReport]) -> datasets.Dataset:
    """The phase's pairs as unpaired rows, then the unpaired rows kept in the preference
    stores among ``specs`` (their ``split`` share; each store's report joins ``reports``)."""
    parts = [from_pairs(pairs)]
    for spec in specs:
        if spec.schema == HUMAN:
            store, report = load_store_rows(spec, seed)
            reports.append(report)
            parts.append(store[split])
    return datasets.concatenate_datasets(parts)


def _save_atomic(ds: datasets.Dataset, reports: list[ValidationReport], target: Path) -> datasets.Dataset:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name[:16]}-", dir=target.parent))
    try:
        # An empty dataset needs one (empty) shard, or load_from_disk finds nothing to read.
        ds.save_to_disk(str(tmp / "dataset"), num_shards=None if len(ds) else 1)
        # Written last: its presence marks a complete entry.
        (tmp / "reports.json").write_text(json.dumps([r.as_dict() for r in reports], indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "reports.json").is_file():
                raise
            # Another process finished the same entry first: theirs is identical, use it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target / "dataset"))
