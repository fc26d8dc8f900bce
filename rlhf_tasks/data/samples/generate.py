"""Regenerate the bundled sample preference datasets: ``python -m rlhf_tasks.data.samples.generate``.

One small dataset per seed dataset of the reference recipe, each in that dataset's own
schema and hub-like layout (``<hub id>/data/<split>-00000-of-00001.parquet``), so that the
same readers serve the samples and the real data. The content is a tiny assistant world
(capitals, colours, opposites, animal sounds, additions, polite requests) with a preference
signal a ~1M-parameter model learns in minutes on a CPU: the chosen answer is correct,
polite and on topic; the rejected one is a wrong fact, rude, off topic or unhelpful.

Deterministic: every dataset draws from its own ``random.Random(seed)``, so a rerun writes
the same rows.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLES_DIR = Path(__file__).resolve().parent

# -- the world ------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Australia": "Canberra", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Russia": "Moscow", "Turkey": "Ankara", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Morocco": "Rabat", "Ghana": "Accra", "Cuba": "Havana",
}
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "a ripe tomato": "red",
    "coal": "black", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a strawberry": "red",
    "a carrot": "orange", "a leaf in summer": "green", "the sea": "blue", "chocolate": "brown",
    "an eggplant": "purple", "a flamingo": "pink",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "happy": "sad",
    "open": "closed", "light": "dark", "old": "young", "early": "late", "full": "empty", "wet": "dry",
    "hard": "soft", "loud": "quiet", "left": "right", "tall": "short", "rich": "poor", "strong": "weak",
    "first": "last", "inside": "outside",
}
SOUNDS = {
    "a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa",
    "a lion": "roar", "a pig": "oink", "a horse": "neigh", "an owl": "hoot", "a frog": "ribbit",
    "a snake": "hiss", "a bee": "buzz",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
# Polite requests: the task, then a helpful answer and a plausible but wrong one.
REQUESTS = [
    ("write a thank-you note", "Dear friend, thank you so much for your kind gift. It made my day.",
     "Dear friend, I did not like your gift at all."),
    ("plan a picnic", "Pack sandwiches, fruit, water and a blanket, then pick a sunny park.",
     "Pack a heater and stay inside all day."),
    ("fall asleep faster", "Keep a regular bedtime, avoid screens before bed and keep the room dark.",
     "Drink three cups of coffee right before bed."),
    ("learn a new language", "Practice a little every day, learn common words first and speak with others.",
     "Read one page once a year and never speak it."),
    ("stay focused while studying", "Work in short blocks, take small breaks and put your phone away.",
     "Keep your phone next to you and check it every minute."),
    ("save money", "Make a simple budget, track what you spend and put a little aside each month.",
     "Spend everything as soon as you get it."),
    ("make a cup of tea", "Boil water, pour it over a tea bag, wait three minutes and remove the bag.",
     "Put the tea bag in cold water and drink it at once."),
    ("keep a plant healthy", "Give it light, water it when the soil is dry and do not overwater it.",
     "Keep it in a dark cupboard and never water it."),
    ("be more productive", "Write a short list each morning and do the most important task first.",
     "Start many tasks at once and finish none of them."),
    ("cheer up a friend", "Listen to them, spend time together and remind them what makes them great.",
     "Tell them to stop being sad."),
    ("start running", "Begin with short easy runs, rest between them and slowly run a bit longer.",
     "Run as far as you can on the first day without stopping."),
    ("write a short poem", "The sun comes up, the birds all sing, a brand new day, a lovely thing.",
     "Poem poem words words."),
]

POLITE_OPENERS = ["Sure!", "Of course!", "Great question!", "Happy to help.", "Good question.", "Certainly!",
                  "Absolutely.", "Glad you asked."]
POLITE_CLOSERS = ["Hope that helps!", "Let me know if you have more questions.", "Have a nice day!",
                  "Anything else I can help with?"]
RUDE = [
    "That is a stupid question.", "Figure it out yourself.", "I don't care about that.",
    "Why would you even ask me that?", "Stop bothering me.", "Go look it up, I am busy.",
    "Ugh, what a boring question.", "Nobody cares about that.",
]
UNHELPFUL = [
    "I don't know.", "I cannot help with that.", "Hmm.", "Maybe, maybe not.", "No idea.",
    "That is hard to say.", "Who knows?", "I would rather not say.",
]
THANKS = ["Thanks!", "Thank you.", "Great, thanks.", "Okay.", "Nice."]


@dataclass(frozen=True)
class Item:
    """One question with its correct and wrong core answers.

    ``ask`` has several phrasings; ``right``/``wrong`` are plain statements that the
    chosen/rejected answers dress up.
    """

    topic: str
    ask: tuple[str, ...]
    right: str
    wrongs: tuple[str, ...]


def build_items() -> list[Item]:
    items: list[Item] = []
    capitals = list(CAPITALS.values())
    for i, (country, city) in enumerate(CAPITALS.items()):
        wrong = [capitals[(i + k) % len(capitals)] for k in (1, 5, 11)]
        items.append(Item("capital", (f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                                      f"Do you know the capital of {country}?", f"Tell me the capital of {country}."),
                          f"The capital of {country} is {city}.", tuple(f"The capital of {country} is {w}." for w in wrong)))
    colours = sorted(set(COLOURS.values()))
    for i, (thing, colour) in enumerate(COLOURS.items()):
        others = [c for c in colours if c != colour]
        wrong = [others[(i + k) % len(others)] for k in (0, 3, 6)]
        name = thing[0].upper() + thing[1:]
        items.append(Item("colour", (f"What colour is {thing}?", f"What is the colour of {thing}?",
                                     f"Tell me the colour of {thing}."),
                          f"{name} is {colour}.", tuple(f"{name} is {w}." for w in wrong)))
    opposites = list(OPPOSITES.values())
    for i, (word, opp) in enumerate(OPPOSITES.items()):
        wrong = [opposites[(i + k) % len(opposites)] for k in (2, 7)] + [word]
        items.append(Item("opposite", (f"What is the opposite of {word}?", f"What is the opposite of the word {word}?",
                                       f"Tell me the opposite of {word}."),
                          f"The opposite of {word} is {opp}.", tuple(f"The opposite of {word} is {w}." for w in wrong)))
    sounds = list(SOUNDS.values())
    for i, (animal, sound) in enumerate(SOUNDS.items()):
        wrong = [sounds[(i + k) % len(sounds)] for k in (1, 4, 9)]
        name = animal[0].upper() + animal[1:]
        items.append(Item("sound", (f"What sound does {animal} make?", f"What does {animal} say?",
                                    f"Tell me the sound {animal} makes."),
                          f"{name} says {sound}.", tuple(f"{name} says {w}." for w in wrong)))
    for a in range(1, 10):
        for b in range(1, 10):
            total = a + b
            wrong = sorted({total + d for d in (-2, -1, 1, 2) if total + d > 0})
            items.append(Item("addition", (f"What is {a} plus {b}?", f"What is {a} + {b}?", f"How much is {a} plus {b}?",
                                           f"Can you add {a} and {b}?"),
                              f"{a} plus {b} is {total}.", tuple(f"{a} plus {b} is {w}." for w in wrong)))
    for task, good, bad in REQUESTS:
        items.append(Item("request", (f"Can you help me {task}?", f"Could you please help me {task}?",
                                      f"How do I {task}?", f"I need help. How can I {task}?"),
                          f"Here is an idea: {good}", (f"Here is an idea: {bad}",)))
    return items


# -- answers --------------------------------------------------------------------------

def polite(rng: random.Random, statement: str) -> str:
    """A correct statement in one of several polite phrasings."""
    style = rng.randrange(4)
    if style == 0:
        return f"{rng.choice(POLITE_OPENERS)} {statement}"
    if style == 1:
        return f"{statement} {rng.choice(POLITE_CLOSERS)}"
    if style == 2:
        return f"{rng.choice(POLITE_OPENERS)} {statement} {rng.choice(POLITE_CLOSERS)}"
    return statement


def rejected_answer(rng: random.Random, item: Item, items: list[Item]) -> tuple[str, str]:
    """A worse answer and its kind: 12% a wrong fact (needs the fact), 15% off topic (needs
    the question), the rest rude, unhelpful or repetitive (the wording gives it away).
    The mix is set so that a ~1M-parameter reward model trained for a CPU minute or two
    ranks ~90% of held-out pairs: the wording alone gets ~0.86, the rest needs content."""
    u = rng.random()
    if u < 0.12:
        return "wrong", polite(rng, rng.choice(item.wrongs))
    if u < 0.27:
        other = pick(rng, [it for it in items if it.right != item.right])
        return "off_topic", polite(rng, other.right)
    if u < 0.62:
        return "rude", rng.choice(RUDE)
    if rng.random() < 0.5:
        return "unhelpful", rng.choice(UNHELPFUL)
    # Repetitive: one word stuttered, or the question echoed back.
    if rng.random() < 0.5:
        word = rng.choice(item.right.rstrip(".").split())
        return "repetitive", " ".join([word] * rng.randint(4, 8))
    return "repetitive", rng.choice(item.ask)


@dataclass(frozen=True)
class Pair:
    history: tuple[tuple[str, str], ...]  # earlier (human, assistant) turns
    question: str
    chosen: str
    rejected: str


def pick(rng: random.Random, items: list[Item]) -> Item:
    """A topic uniformly, then an item of it: the 81 additions must not crowd out the rest."""
    topics = sorted({it.topic for it in items})
    topic = rng.choice(topics)
    return rng.choice([it for it in items if it.topic == topic])


def make_pair(rng: random.Random, items: list[Item], multi_turn: float, max_history: int) -> Pair:
    item = pick(rng, items)
    history: list[tuple[str, str]] = []
    if max_history and rng.random() < multi_turn:
        for _ in range(rng.randint(1, max_history)):
            past = pick(rng, items)
            history.append((rng.choice(past.ask), polite(rng, past.right)))
    question = rng.choice(item.ask)
    if history and rng.random() < 0.4:
        question = f"{rng.choice(THANKS)} {question}"
    _, rejected = rejected_answer(rng, item, items)
    return Pair(tuple(history), question, polite(rng, item.right), rejected)


def hh_conversation(p: Pair) -> str:
    turns = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in p.history)
    return f"{turns}\n\nHuman: {p.question}"


# -- schemas --------------------------------------------------------------------------

def rm_static_row(p: Pair) -> dict[str, str]:
    prompt = hh_conversation(p) + "\n\nAssistant:"
    return {"prompt": prompt, "response": " " + p.chosen, "chosen": " " + p.chosen, "rejected": " " + p.rejected}


def synthetic_row(p: Pair) -> dict[str, str]:
    return {"prompt": p.question, "chosen": p.chosen, "rejected": p.rejected}


def yitingxie_row(p: Pair) -> dict[str, str]:
    return {"prompt": hh_conversation(p) + "\n\n", "chosen": "Assistant: " + p.chosen,
            "rejected": "Assistant: " + p.rejected}


@dataclass(frozen=True)
class SampleSpec:
    hub_id: str
    seed: int
    sizes: dict[str, int]
    row: Callable[[Pair], dict[str, str]]
    columns: tuple[str, ...]
    multi_turn: float
    max_history: int


SAMPLES = [
    SampleSpec("Dahoas/rm-static", 101, {"train": 3000, "test": 400}, rm_static_row,
               ("prompt", "response", "chosen", "rejected"), multi_turn=0.25, max_history=2),
    SampleSpec("Dahoas/full-hh-rlhf", 202, {"train": 3000, "test": 400}, rm_static_row,
               ("prompt", "response", "chosen", "rejected"), multi_turn=0.5, max_history=3),
    SampleSpec("Dahoas/synthetic-instruct-gptj-pairwise", 303, {"train": 2500}, synthetic_row,
               ("prompt", "chosen", "rejected"), multi_turn=0.0, max_history=0),
    SampleSpec("yitingxie/rlhf-reward-datasets", 404, {"train": 2500, "test": 300}, yitingxie_row,
               ("prompt", "chosen", "rejected"), multi_turn=0.2, max_history=2),
]


def sample_rows(spec: SampleSpec) -> dict[str, list[dict[str, str]]]:
    """All splits of one sample dataset, as rows in that dataset's schema."""
    rng = random.Random(spec.seed)
    items = build_items()
    return {split: [spec.row(make_pair(rng, items, spec.multi_turn, spec.max_history)) for _ in range(n)]
            for split, n in spec.sizes.items()}


def write_samples(root: Path = SAMPLES_DIR) -> list[Path]:
    written = []
    for spec in SAMPLES:
        for split, rows in sample_rows(spec).items():
            path = root / spec.hub_id / "data" / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.table({c: pa.array([r[c] for r in rows], type=pa.string()) for c in spec.columns})
            pq.write_table(table, path, compression="zstd")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=SAMPLES_DIR, help="root directory (default: next to this file)")
    args = ap.parse_args(argv)
    for path in write_samples(args.out):
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB  {pq.read_metadata(path).num_rows} rows")


if __name__ == "__main__":
    main()
