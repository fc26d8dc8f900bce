"""One reader per dataset schema: a raw row in, ``(prompt, chosen, rejected)`` out.

The convention every later step relies on: the prompt ends with ``"Assistant:"`` and each
answer starts with exactly one space, so ``prompt + answer`` is the text the model sees and
the answer tokenises the same way alone as after the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Triple = tuple[str, str, str]
ASSISTANT_TURN = "\n\nAssistant:"


class RowError(ValueError):
    """A reader's reason to drop one row (counted in the validation report)."""


def answer(text: str) -> str:
    """Exactly one leading space: ``"Paris."``, ``" Paris."`` and ``"  Paris."`` all read ``" Paris."``."""
    return " " + text.lstrip()


def after_last_assistant(text: str) -> str:
    """The text after the last ``"Assistant:"`` (all of it when there is none)."""
    return text.rsplit("Assistant:", 1)[-1]


def _hh(row: Mapping[str, str]) -> Triple:
    # Dahoas/rm-static, Dahoas/full-hh-rlhf: already "\n\nHuman: ...\n\nAssistant:" + " answer".
    return row["prompt"], answer(row["chosen"]), answer(row["rejected"])


def _instruct(row: Mapping[str, str]) -> Triple:
    # Dahoas/synthetic-instruct-gptj-pairwise: a bare instruction and bare answers.
    return " Human: " + row["prompt"] + " Assistant:", answer(row["chosen"]), answer(row["rejected"])


def _yitingxie(row: Mapping[str, str]) -> Triple:
    # yitingxie/rlhf-reward-datasets: the prompt stops before "Assistant:", and the
    # answers carry it ("Assistant: Paris.").
    return (row["prompt"] + "Assistant:", answer(after_last_assistant(row["chosen"])),
            answer(after_last_assistant(row["rejected"])))


def split_transcript(text: str) -> tuple[str, str]:
    """A whole ``"\n\nHuman: ...\n\nAssistant: ..."`` conversation -> (prompt, last answer):
    the prompt is everything up to and including the last ``"\n\nAssistant:"``."""
    i = text.rfind(ASSISTANT_TURN)
    if i < 0:
        raise RowError("no '\\n\\nAssistant:' turn")
    cut = i + len(ASSISTANT_TURN)
    return text[:cut], text[cut:]


def _transcripts(row: Mapping[str, str]) -> Triple:
    # Anthropic/hh-rlhf: only two whole conversations that differ in their last answer.
    prompt, chosen = split_transcript(row["chosen"])
    other, rejected = split_transcript(row["rejected"])
    if other != prompt:
        raise RowError("chosen and rejected differ before the last answer")
    return prompt, answer(chosen), answer(rejected)


def _generic(row: Mapping[str, str]) -> Triple:
    return row["prompt"], answer(row["chosen"]), answer(row["rejected"])


@dataclass(frozen=True)
class Schema:
    """How to read one dataset.

    ``eval_splits``: the names of its held-out split, first found wins; empty means the
    dataset has only a train split and the reader makes its own seeded 9:1 split, as
    DeepSpeed-Chat does.
    """

    name: str
    read: Callable[[Mapping[str, Any]], Triple]
    eval_splits: tuple[str, ...]
    columns: tuple[str, ...] = ("prompt", "chosen", "rejected")
    own_eval_fraction: float = 0.1


GENERIC = "local"
TRANSCRIPTS = "Anthropic/hh-rlhf"
HUMAN = "human"  # the preference store people fill (rlhf_tasks/feedback/store.py)

SCHEMAS: dict[str, Schema] = {
    "Dahoas/rm-static": Schema("Dahoas/rm-static", _hh, ("test",)),
    "Dahoas/full-hh-rlhf": Schema("Dahoas/full-hh-rlhf", _hh, ("test",)),
    "Dahoas/synthetic-instruct-gptj-pairwise": Schema("Dahoas/synthetic-instruct-gptj-pairwise", _instruct, ()),
    "yitingxie/rlhf-reward-datasets": Schema("yitingxie/rlhf-reward-datasets", _yitingxie, ("test",)),
    TRANSCRIPTS: Schema(TRANSCRIPTS, _transcripts, ("test",), columns=("chosen", "rejected")),
    GENERIC: Schema(GENERIC, _generic, ("test", "validation", "eval")),
    # Every labelled batch is training data; the reader holds out its own seeded 10%.
    HUMAN: Schema(HUMAN, _generic, ()),
}

# The four datasets of the reference recipe, by hub id (each has a bundled sample).
SEED_DATASETS: tuple[str, ...] = ("Dahoas/rm-static", "Dahoas/full-hh-rlhf", "Dahoas/synthetic-instruct-gptj-pairwise",
                                  "yitingxie/rlhf-reward-datasets")
# Every hub id with a reader: the seed datasets and the raw Anthropic HH transcripts.
HUB_DATASETS: tuple[str, ...] = tuple(k for k in SCHEMAS if k not in (GENERIC, HUMAN))


def check_row(schema: Schema, row: Mapping[str, Any]) -> str:
    """Why ``row`` is unusable ("" when it is fine): the first missing, non-string or
    empty field, checked on the raw row before normalising."""
    for col in schema.columns:
        value = row.get(col)
        if value is None:
            return f"missing {col}"
        if not isinstance(value, str):
            return f"non-string {col}"
        if not value.strip():
            return f"empty {col}"
    return ""


def normalise(schema: Schema, row: Mapping[str, Any]) -> tuple[Triple | None, str]:
    """``(triple, "")`` for a usable row, ``(None, reason)`` otherwise."""
    if reason := check_row(schema, row):
        return None, reason
    try:
        prompt, chosen, rejected = schema.read(row)
    except RowError as e:
        return None, str(e)
    for col, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            return None, f"empty {col}"
    if chosen == rejected:
        return None, "chosen == rejected"
    return (prompt, chosen, rejected), ""
