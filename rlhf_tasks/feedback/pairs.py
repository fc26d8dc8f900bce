"""Answer pairs to label: which prompts, which models, two answers per prompt.

Prompts are the held-out prompts of the configured datasets (the same rows evaluation
uses, never trained on) or a user's file: ``.txt`` (one prompt per line) or
``.json``/``.jsonl`` (a ``prompt`` field per row). A bare question is put in the
training format (``\\n\\nHuman: ...\\n\\nAssistant:``); a model with a chat template is
given it rendered through the template, as it was trained.

Models are a registry reference (the ``champion`` alias, a version, ``newest``,
``run:<id>``; rlhf_tasks/tracking/registry.py) or a model directory / ``builtin:tiny-opt``.
Two models answer each prompt once; one model (``compare_with=self``, or when both
references name the same version) answers twice with sampling. A pair whose two
answers are the same text is dropped, never asked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PipelineConfig
from ..data.chat import format_turn, renderer
from .labels import LabelRequest, shown_order

log = logging.getLogger("rlhf_tasks")
SELF = "self"


class LabellingInputError(ValueError):
    """A labelling request the DAG refuses before anything is generated or asked."""


@dataclass(frozen=True)
class ModelRef:
    label: str  # what labellers and the store see: "rlhf-actor v3 (champion)" or the directory
    path: str
    version: str | None = None


def read_prompt_file(path: str | Path) -> list[str]:
    """A user's prompts; refused (LabellingInputError naming the file) when it is
    missing, of another type, or holds no prompt."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LabellingInputError(f"prompt file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".txt":
        raw = text.splitlines()
    elif p.suffix.lower() in (".json", ".jsonl"):
        rows = json.loads(text) if p.suffix.lower() == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise LabellingInputError(f"prompt file {p}: expected a list of objects with a 'prompt' field")
        raw = [str(r.get("prompt") or "") for r in rows]
    else:
        raise LabellingInputError(f"prompt file {p}: use .txt (one prompt per line), .json or .jsonl")
    prompts = [as_prompt(x) for x in raw if x.strip()]
    if not prompts:
        raise LabellingInputError(f"prompt file {p} holds no prompt (it is empty or every line is blank)")
    return prompts


def as_prompt(text: str) -> str:
    """A prompt in the training format; one already in it is kept as it is."""
    return text if text.rstrip().endswith("Assistant:") else format_turn("", text)


def held_out_prompts(cfg: PipelineConfig) -> list[str]:
    """The distinct held-out prompts of the configured datasets, in a seeded order."""
    import numpy as np

    from ..data import load_pairs

    prompts: list[str] = []
    for spec in cfg.data.datasets:
        prompts += load_pairs(spec, cfg.seed)[0]["eval"]["prompt"]
    unique = list(dict.fromkeys(prompts))
    order = np.random.default_rng(cfg.seed).permutation(len(unique))
    return [unique[i] for i in order]


def resolve_model(ref: str, cfg: PipelineConfig, tracking_uri: str | None, cache: Path) -> ModelRef:
    """A model directory, ``builtin:...``, or a registry reference -> a local directory."""
    from ..runtime.gguf import is_gguf_spec
    from ..runtime.models import BUILTIN_PREFIX, resolve_model_path

    if ref.startswith(BUILTIN_PREFIX) or is_gguf_spec(ref) or Path(ref).expanduser().is_dir():
        return ModelRef(ref, resolve_model_path(ref))
    if not tracking_uri:
        raise LabellingInputError(f"model {ref!r} is a registry reference but no MLflow server is configured "
                                  "(MLFLOW_TRACKING_URI); give a model directory instead")
    from ..tracking.registry import download_version, resolve_version

    name = cfg.tracking.registered_model
    try:
        v = resolve_version(tracking_uri, name, ref)
    except LookupError as e:
        raise LabellingInputError(f"model {ref!r}: {e}") from None
    path = download_version(tracking_uri, v["source"], cache / name / f"v{v['version']}")
    return ModelRef(f"{name} v{v['version']} ({ref})", str(path), v["version"])


def make_pairs(prompts: list[str], models: tuple[ModelRef, ModelRef], *, max_new_tokens: int, seed: int,
               run_id: str, temperature: float = 1.0, device: str = "cpu") -> tuple[list[LabelRequest], int]:
    """Two sampled answers per prompt (``models[0]`` then ``models[1]``) -> the requests,
    and how many pairs were dropped because their answers were identical."""
    answers = [_answer(m, prompts, max_new_tokens, temperature, seed + i, device) for i, m in enumerate(models)]
    requests, identical = [], 0
    for i, (prompt, a, b) in enumerate(zip(prompts, *answers, strict=True)):
        if a.strip() == b.strip():
            identical += 1
            continue
        pair_id = f"{run_id}/{i:04d}"
        requests.append(LabelRequest(pair_id, prompt, (a, b), (models[0].label, models[1].label),
                                     shown_order(pair_id, seed)))
    log.info("labelling: %d pairs from %d prompts (%d dropped: identical answers)", len(requests), len(prompts),
             identical)
    return requests, identical


def _answer(model: ModelRef, prompts: list[str], max_new_tokens: int, temperature: float, seed: int,
            device: str, batch_size: int = 16) -> list[str]:
    import torch

    from ..algorithms.rl.generation import GenerationSettings, generate
    from ..runtime.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model.path)
    lm = load_causal_lm(model.path).to(device).eval()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, do_sample=True,
                                  no_repeat_ngram_size=3)
    torch.manual_seed(seed)
    texts: list[str] = []
    tok.padding_side = "left"  # generation appends on the right: every prompt ends at the same column
    # Rendered as the model was trained: its chat template when it has one (data/chat.py).
    render = renderer(tok)
    for start in range(0, len(prompts), batch_size):
        enc = tok([render.prompt(p) for p in prompts[start:start + batch_size]], return_tensors="pt", padding=True,
                  add_special_tokens=render.add_special_tokens)
        ro = generate(lm, enc["input_ids"].to(device), enc["attention_mask"].to(device), settings,
                      tok.eos_token_id, tok.pad_token_id)
        texts += tok.batch_decode(ro.sequences[:, ro.prompt_len:], skip_special_tokens=True)
    # A model may run on into the next turn: keep only its own answer (as chat does).
    return [t.split("Human:")[0].strip() for t in texts]


def assign(requests: list[LabelRequest], labellers: list[str], labels_per_pair: int) -> list[LabelRequest]:
    """One request per (pair, copy): with labellers named, copy k of pair i goes to
    labeller (i + k) mod n, so the copies of a pair go to different people; without, any
    user allowed on the DAG may answer. Refused when there are fewer labellers than copies."""
    if labels_per_pair < 1:
        raise LabellingInputError(f"labels_per_pair={labels_per_pair}: at least 1")
    if labellers and len(set(labellers)) < labels_per_pair:
        raise LabellingInputError(f"labels_per_pair={labels_per_pair} needs that many different labellers, got "
                                  f"{sorted(set(labellers))}")
    if not labellers and labels_per_pair > 1:
        raise LabellingInputError(f"labels_per_pair={labels_per_pair}: name the labellers, so that two different "
                                  "people judge each pair")
    people = list(dict.fromkeys(labellers))
    out = []
    for i, req in enumerate(requests):
        for k in range(labels_per_pair):
            users = (people[(i + k) % len(people)],) if people else ()
            out.append(LabelRequest(req.pair_id, req.prompt, req.answers, req.models, req.order, users))
    return out


def request_summary(requests: list[LabelRequest], models: tuple[ModelRef, ModelRef], identical: int,
                    prompts: int) -> dict[str, Any]:
    return {"pairs": len({r.pair_id for r in requests}), "requests": len(requests), "prompts": prompts,
            "dropped_identical": identical, "models": [m.label for m in models]}
