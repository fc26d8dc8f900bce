"""Verifiers: rules that say whether an answer is right, the reward a recipe can use instead
of (or beside) a learned reward model, and the ground truth evaluate reports beside it.

A verifier is ``f(questions, answers) -> list[float | None]``: 1.0 right, 0.0 wrong, None
when it cannot check the question. A question is the conversation's last user turn (earlier
turns may ask other things; rlhf_tasks/data/chat.py finds it in DeepSpeed-Chat text and in a
chat template's rendering alike). Built in: ``world``, the bundled sample world's checkable
questions (rlhf_tasks/data/samples/generate.py): additions, capitals, colours, opposites and
animal sounds (the last one asked in the turn: "Thanks! What is 3 plus 4?" is an addition).
The answer must state the right answer and no rival:

- addition: the numbers the answer states (digits or the words zero..eighteen), less one
  occurrence of each operand, must be non-empty and all equal the sum ("6 plus 6 is 12" is
  right, "the answer is 6" and "12 or 13" are not);
- capital / colour / opposite / sound: the expected word (whole word, any case; a sound also
  as "quacks"), and no other word of the same kind (a colour answer naming two colours is
  wrong; the opposite's own question word does not count).

An operator-installed verifier, ``module:function`` with the same signature, is Python run
on the worker: gated by ``RLHF_ALLOW_REWARD_FUNCTION`` as ``reward.function`` is.
"""

from __future__ import annotations

import importlib
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import ConfigError
from ..data.samples.generate import CAPITALS, COLOURS, NUMBER_WORDS, OPPOSITES, SOUNDS

BUILTIN = "world"
CATEGORIES = ("addition", "capital", "colour", "opposite", "sound")
CUSTOM = "custom"  # the category of everything an operator's verifier checks


@dataclass(frozen=True)
class Question:
    category: str
    subject: str  # what is asked about ("France", "6+6", "a duck", "hot", "the sky")
    expected: str


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_ASK = [
    ("capital", re.compile(rf"capital of ({_alternation(CAPITALS)})\b", re.I)),
    ("colour", re.compile(rf"colou?r (?:is|of) ({_alternation(COLOURS)})\b", re.I)),
    ("opposite", re.compile(rf"opposite of (?:the word )?({_alternation(OPPOSITES)})\b", re.I)),
    ("sound", re.compile(rf"(?:sound does|what does|the sound) ({_alternation(SOUNDS)}) (?:make|say|makes)\b", re.I)),
    ("addition", re.compile(r"\b(\d+) ?(?:plus|\+) ?(\d+)\b|\badd (\d+) and (\d+)\b", re.I)),
]
_WORD_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}
_NUMBER = re.compile(rf"\b(\d+|{_alternation(NUMBER_WORDS)})\b", re.I)


def _question(category: str, m: re.Match) -> Question:
    if category == "addition":
        a, b = (int(x) for x in (m.group(1, 2) if m.group(1) else m.group(3, 4)))
        return Question(category, f"{a}+{b}", str(a + b))
    key = m.group(1).lower()
    table = {"capital": CAPITALS, "colour": COLOURS, "opposite": OPPOSITES, "sound": SOUNDS}[category]
    subject = next(k for k in table if k.lower() == key)
    return Question(category, subject, table[subject])


def world_question(prompt: str) -> Question | None:
    """The last checkable question of the bundled world in ``prompt`` (a user turn), or None."""
    best: tuple[int, str, re.Match] | None = None
    for category, pattern in _ASK:
        for m in pattern.finditer(prompt):
            if best is None or m.start() > best[0]:
                best = (m.start(), category, m)
    return None if best is None else _question(best[1], best[2])


def _plain(text: str) -> str:
    """Lower case, accents dropped ("Brasília" reads "brasilia")."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()


def _numbers(text: str) -> list[int]:
    return [int(x) if x.isdigit() else _WORD_NUMBERS[x.lower()] for x in _NUMBER.findall(text)]


def _words_found(text: str, vocabulary: set[str], plural: bool = False) -> set[str]:
    suffix = r"(?:e?s)?" if plural else ""
    return {w for w in vocabulary if re.search(rf"\b{re.escape(_plain(w))}{suffix}\b", text)}


def world_correct(q: Question, answer: str) -> bool:
    """Whether ``answer`` states ``q``'s expected answer and no rival (module docstring)."""
    text = _plain(answer)
    if q.category == "addition":
        rest = _numbers(text)
        for operand in (int(x) for x in q.subject.split("+")):
            if operand in rest:
                rest.remove(operand)
        return bool(rest) and all(n == int(q.expected) for n in rest)
    if q.category == "capital":
        return _words_found(text, set(CAPITALS.values())) == {q.expected}
    if q.category == "colour":
        return _words_found(text, set(COLOURS.values())) == {q.expected}
    if q.category == "opposite":
        return _words_found(text, set(OPPOSITES) | set(OPPOSITES.values())) - {q.subject} == {q.expected}
    return _words_found(text, set(SOUNDS.values()), plural=True) == {q.expected}


def world(prompts: Sequence[str], answers: Sequence[str]) -> list[float | None]:
    """The built-in verifier: 1.0 / 0.0 per answer, None where the prompt is not checkable."""
    out: list[float | None] = []
    for p, a in zip(prompts, answers, strict=True):
        q = world_question(p)
        out.append(None if q is None else float(world_correct(q, a)))
    return out


@dataclass(frozen=True)
class Verifier:
    """A loaded verifier: ``check(questions, answers)`` and each question's ``category``."""

    name: str
    check: Callable[[list[str], list[str]], list[float | None]]

    def category(self, prompt: str) -> str | None:
        if self.name == BUILTIN:
            q = world_question(prompt)
            return None if q is None else q.category
        return CUSTOM if self.check([prompt], [""])[0] is not None else None

    def __call__(self, prompts: list[str], answers: list[str]) -> list[float | None]:
        values = list(self.check(prompts, answers))
        if len(values) != len(answers):
            raise ValueError(f"verifier {self.name} returned {len(values)} values for {len(answers)} answers")
        return [None if v is None else float(v) for v in values]


ALLOW_REWARD_FUNCTION_ENV = "RLHF_ALLOW_REWARD_FUNCTION"


def function_allowed() -> bool:
    return os.environ.get(ALLOW_REWARD_FUNCTION_ENV, "").strip().lower() in ("1", "true", "yes")


def load_function(spec: str, field: str = "reward.function") -> Callable[[list[str], list[str]], list[float]]:
    """Import ``module:function``; refused (ConfigError, exit 2) without the worker's consent."""
    if not function_allowed():
        raise ConfigError(f"{field}={spec!r} is refused on this worker: a reward function is Python code run on "
                          f"the worker, which needs the operator's consent ({ALLOW_REWARD_FUNCTION_ENV}=1 in the "
                          "worker's environment)")
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{field}={spec!r} is invalid: cannot import it on this worker ({e})") from None
    if not callable(fn):
        raise ConfigError(f"{field}={spec!r} is invalid: {module}.{name} is not callable")
    return fn


def load_verifier(spec: str) -> Verifier:
    """``world`` or an operator's ``module:function`` (refused without the worker's consent)."""
    if spec == BUILTIN:
        return Verifier(BUILTIN, world)
    return Verifier(spec, load_function(spec, field="reward.verifier"))


def checkable(prompts, verifier: Verifier):
    """The rows of a prompts dataset (a ``prompt`` column of DeepSpeed-Chat text) whose last
    user turn ``verifier`` can check."""
    from ..data.chat import last_user_text

    keep = [i for i, p in enumerate(prompts["prompt"]) if verifier.category(last_user_text(p)) is not None]
    return prompts.select(keep)
