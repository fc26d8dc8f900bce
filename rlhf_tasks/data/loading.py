"""Dataset specs -> validated (prompt, chosen, rejected) train/eval splits.

A spec string is one of:

- ``Dahoas/rm-static``                 a seed dataset from the Hugging Face hub
- ``Dahoas/rm-static=/data/rm-static`` the same schema read from a local directory or file
- ``sample:Dahoas/rm-static``          the bundled sample in that schema (no network)
- ``Anthropic/hh-rlhf``                raw HH transcripts: only ``chosen``/``rejected`` whole
                                       conversations, the prompt is what precedes the last
                                       ``"\n\nAssistant:"`` (also ``Anthropic/hh-rlhf=<dir or file>``)
- ``human`` (``human:``, ``human:<dir>``) the pairs people labelled (``rlhf_label_preferences``): every
                                       ``*.jsonl`` batch of ``$RLHF_STORAGE/preferences/human/``
                                       (or of ``<dir>``), one source, provenance columns ignored
                                       (``human`` is the YAML-safe spelling: a bare ``human:`` in a
                                       YAML list reads as a mapping)
- ``/data/prefs.jsonl`` (or .json, .parquet, .csv, a directory)
                                       prompt/chosen/rejected columns, used as they are; a
                                       file with only chosen/rejected is read as HH transcripts

Loading goes through the real ``datasets.load_dataset``. Unusable rows are dropped and
counted in a :class:`ValidationReport`; a split that is mostly unusable stops the run with
a :class:`DataValidationError` instead of training on the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from ..storage import storage_root
from .formats import GENERIC, HUB_DATASETS, HUMAN, SCHEMAS, SEED_DATASETS, TRANSCRIPTS, Schema, normalise
from .split import split_indices

log = logging.getLogger("rlhf_tasks")

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLE_PREFIX = "sample:"
HUMAN_PREFIX = "human:"
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PAIR_FEATURES = datasets.Features({c: datasets.Value("string") for c in ("prompt", "chosen", "rejected")})
MAX_BAD_FRACTION = 0.5
SHOW_BAD_ROWS = 5


class DataValidationError(ValueError):
    """A dataset too broken to train on (a ValueError: the CLI reports it as a usage error)."""


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved spec: which schema reads it, from where (hub id or local path)."""

    schema: str
    location: str
    is_local: bool
    spec: str = ""  # the string it was resolved from, for messages

    @property
    def name(self) -> str:
        return self.spec or self.location


@dataclass
class ValidationReport:
    """What one split (or one tokenisation step) kept and dropped, and why."""

    spec: str
    split: str
    total: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    bad_rows: list[int] = field(default_factory=list)  # first few dropped row indices
    stage: str = "load"  # "load" or the tokenisation that dropped them ("sft", "pairs", "prompts")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        rows = f" (first bad rows {self.bad_rows})" if self.bad_rows else ""
        return (f"{self.spec} [{self.split}, {self.stage}]: kept {self.kept}/{self.total}, "
                f"dropped {self.total - self.kept} ({why}){rows}")


def _usage(spec: str, problem: str) -> str:
    hubs = ", ".join(HUB_DATASETS)
    return (f"dataset {spec!r}: {problem}. Supported: a hub id ({hubs}); <hub id>=<local dir or file>; "
            f"sample:<hub id> (bundled sample of {', '.join(SEED_DATASETS)}); human: (the labelled pairs of the "
            f"preference store) or human:<dir>; or a local "
            f".json/.jsonl/.parquet/.csv file or directory with prompt/chosen/rejected columns "
            f"(or only chosen/rejected HH transcripts)")


def _unknown_hub_id(hub_id: str) -> str:
    close = difflib.get_close_matches(hub_id, HUB_DATASETS, n=1)
    return f"unknown hub id {hub_id!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or Path(s).suffix.lower() in BUILDERS


def _local(spec: str, location: str, schema: str) -> DatasetSpec:
    path = Path(location).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {spec!r}: {path} does not exist")
    if path.is_file() and path.suffix.lower() not in BUILDERS:
        raise ValueError(_usage(spec, f"{path} is not a {'/'.join(BUILDERS)} file"))
    return DatasetSpec(schema, str(path.resolve()), True, spec)


# Where people's labels are kept (the feedback package writes them, the ``human`` spec reads them).
HUMAN_STORE = Path("preferences") / "human"


def human_store_dir(root: Path | None = None) -> Path:
    return (root or storage_root()) / HUMAN_STORE


def with_human_store(datasets: list[str]) -> list[str]:
    """``datasets`` plus the store (``human``) unless a ``human`` spec is already there:
    a retraining run started by a labelling batch trains on the labels."""
    specs = list(datasets)
    named = any(s.strip() == HUMAN or s.strip().startswith(HUMAN_PREFIX) for s in specs)
    return specs if named else [*specs, HUMAN]


def human_batches(location: str | Path) -> list[Path]:
    """The labelled batches of a preference store directory, by name."""
    return sorted(p for p in Path(location).glob("*.jsonl") if p.is_file() and p.stat().st_size > 0)


def _human(spec: str) -> DatasetSpec:
    where = spec.removeprefix(HUMAN).removeprefix(":").strip()
    path = Path(where).expanduser() if where else human_store_dir()
    if not human_batches(path):
        raise FileNotFoundError(f"dataset {spec!r}: {path} holds no labelled batch (*.jsonl) yet: run the "
                                "rlhf_label_preferences DAG and answer some pairs first")
    return DatasetSpec(HUMAN, str(path.resolve()), True, spec)


def resolve_spec(spec: str) -> DatasetSpec:
    """Parse a dataset spec string (module docstring); local paths must exist."""
    spec = spec.strip()
    if spec == HUMAN or spec.startswith(HUMAN_PREFIX):
        return _human(spec)
    if spec.startswith(SAMPLE_PREFIX):
        hub_id = spec.removeprefix(SAMPLE_PREFIX)
        if hub_id not in SEED_DATASETS:
            raise ValueError(_usage(spec, f"there is no bundled sample of {hub_id!r}"))
        return _local(spec, str(SAMPLES_DIR / hub_id), hub_id)
    head, sep, tail = spec.partition("=")
    if sep and head in HUB_DATASETS:
        if not tail:
            raise ValueError(_usage(spec, "no location after '='"))
        return _local(spec, tail, head)
    if spec in HUB_DATASETS:
        return DatasetSpec(spec, spec, False, spec)
    if sep and not Path(spec).expanduser().exists() and not _looks_like_path(head):
        # <hub id>=<location> with a hub id we have no reader for: say so, whether or not
        # the location exists (it is not the problem).
        raise ValueError(_usage(spec, _unknown_hub_id(head)))
    if Path(spec).expanduser().exists() or _looks_like_path(spec):
        return _local(spec, spec, GENERIC)
    raise ValueError(_usage(spec, "not a supported hub id nor an existing local path"))


def _load_raw(ds_spec: DatasetSpec, cache_dir: str | Path | None) -> datasets.DatasetDict:
    kw: dict[str, Any] = {"cache_dir": str(cache_dir) if cache_dir else None}
    path = Path(ds_spec.location)
    try:
        if not ds_spec.is_local:
            return datasets.load_dataset(ds_spec.location, **kw)
        if ds_spec.schema == HUMAN:
            # Named explicitly: a batch named after a run id with "test" in it stays training data.
            files = [str(p) for p in human_batches(path)]
            return datasets.load_dataset("json", data_files={"train": files}, **kw)
        if path.is_file():
            return datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path), **kw)
        return datasets.load_dataset(str(path), **kw)
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as e:
        # Unparseable files (mixed column types, broken json) surface here: name the file.
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise DataValidationError(f"dataset {ds_spec.name!r}: cannot read {ds_spec.location}: "
                                  f"{type(e).__name__}: {e}{cause}") from e


def _normalise_batch(batch: dict[str, list], schema: Schema) -> dict[str, list]:
    n = len(next(iter(batch.values())))
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "reason": []}
    for i in range(n):
        triple, reason = normalise(schema, {k: v[i] for k, v in batch.items()})
        prompt, chosen, rejected = triple or ("", "", "")
        out["prompt"].append(prompt)
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
        out["reason"].append(reason)
    return out


def validate(raw: datasets.Dataset, ds_spec: DatasetSpec, split: str) -> tuple[datasets.Dataset, ValidationReport]:
    """Normalise every row; drop and count the unusable ones; raise when most are."""
    schema = SCHEMAS[ds_spec.schema]
    missing = [c for c in schema.columns if c not in raw.column_names]
    if missing:
        raise DataValidationError(f"dataset {ds_spec.name!r} ({ds_spec.location}), split {split!r}: no column(s) "
                                  f"{missing}; the {schema.name} schema needs {list(schema.columns)}, found "
                                  f"{raw.column_names}")
    features = datasets.Features({**PAIR_FEATURES, "reason": datasets.Value("string")})
    # Only the needed columns go in: other columns may hold anything (nested, binary).
    normed = raw.select_columns(list(schema.columns)).map(
        _normalise_batch, batched=True, fn_kwargs={"schema": schema}, remove_columns=list(schema.columns),
        features=features, desc=f"validating {ds_spec.name} [{split}]")
    reasons = normed["reason"]
    bad = [i for i, r in enumerate(reasons) if r]
    report = ValidationReport(ds_spec.name, split, len(normed), len(normed) - len(bad),
                              dict(Counter(reasons[i] for i in bad)), bad[:SHOW_BAD_ROWS])
    if len(normed) and len(bad) > MAX_BAD_FRACTION * len(normed):
        raise DataValidationError(f"dataset {ds_spec.name!r} ({ds_spec.location}), split {split!r}: "
                                  f"{len(bad)} of {len(normed)} rows are malformed "
                                  f"({', '.join(f'{k}: {v}' for k, v in sorted(report.dropped.items()))}); "
                                  f"first bad rows: {report.bad_rows}")
    if bad:
        log.warning("data: %s", report)
        normed = normed.select([i for i, r in enumerate(reasons) if not r])
    return normed.remove_columns("reason"), report


def _detect_transcripts(ds_spec: DatasetSpec, columns: list[str]) -> DatasetSpec:
    """A local file whose only columns are chosen and rejected is read as raw HH transcripts
    (the layout of Anthropic/hh-rlhf). Any other column set keeps the generic reader, whose
    error names a missing prompt column."""
    if ds_spec.schema == GENERIC and set(columns) == {"chosen", "rejected"}:
        log.info("data: %s has only chosen/rejected columns: reading them as %s transcripts", ds_spec.name,
                 TRANSCRIPTS)
        return dataclasses.replace(ds_spec, schema=TRANSCRIPTS)
    return ds_spec


def load_pairs(spec: str | DatasetSpec, seed: int, cache_dir: str | Path | None = None
               ) -> tuple[dict[str, datasets.Dataset], list[ValidationReport]]:
    """``({"train": ds, "eval": ds}, reports)``: normalised prompt/chosen/rejected rows.

    A schema without a held-out split gets a seeded 9:1 split of its (validated) train
    rows. ``cache_dir`` is the ``datasets`` cache (default: ``HF_DATASETS_CACHE``).
    """
    ds_spec = spec if isinstance(spec, DatasetSpec) else resolve_spec(spec)
    raw = _load_raw(ds_spec, cache_dir)
    if "train" not in raw:
        raise DataValidationError(f"dataset {ds_spec.name!r} ({ds_spec.location}) has no train split, "
                                  f"only {list(raw)}")
    ds_spec = _detect_transcripts(ds_spec, raw["train"].column_names)
    schema = SCHEMAS[ds_spec.schema]
    train, train_report = validate(raw["train"], ds_spec, "train")
    if train_report.kept == 0:
        raise DataValidationError(f"dataset {ds_spec.name!r} ({ds_spec.location}): no usable training rows "
                                  f"({train_report})")
    reports = [train_report]
    eval_name = next((s for s in schema.eval_splits if s in raw), None)
    if eval_name is not None:
        held_out, eval_report = validate(raw[eval_name], ds_spec, eval_name)
        reports.append(eval_report)
    else:
        if schema.eval_splits:
            log.info("data: %s has no %s split; holding out %.0f%% of train", ds_spec.name,
                     "/".join(schema.eval_splits), 100 * schema.own_eval_fraction)
        f = schema.own_eval_fraction
        keep, hold = split_indices(len(train), [1 - f, f], seed)
        train, held_out = train.select(keep), train.select(hold)
    return {"train": train, "eval": held_out}, reports
