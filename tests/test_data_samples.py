"""The bundled samples: regenerated identically, small, and with a learnable preference."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from rlhf_tasks.data import SAMPLES_DIR, SEED_DATASETS
from rlhf_tasks.data.samples.generate import SAMPLES, write_samples

SCHEMA_COLUMNS = {
    "Dahoas/rm-static": ["prompt", "response", "chosen", "rejected"],
    "Dahoas/full-hh-rlhf": ["prompt", "response", "chosen", "rejected"],
    "Dahoas/synthetic-instruct-gptj-pairwise": ["prompt", "chosen", "rejected"],
    "yitingxie/rlhf-reward-datasets": ["prompt", "chosen", "rejected"],
}


def read(root, hub_id: str, split: str) -> list[dict[str, str]]:
    return pq.read_table(root / hub_id / "data" / f"{split}-00000-of-00001.parquet").to_pylist()


def test_generator_reproduces_the_committed_files(tmp_path):
    write_samples(tmp_path)
    for spec in SAMPLES:
        for split in spec.sizes:
            assert read(tmp_path, spec.hub_id, split) == read(SAMPLES_DIR, spec.hub_id, split), (spec.hub_id, split)


def test_layout_sizes_and_schemas():
    assert sorted(s.hub_id for s in SAMPLES) == sorted(SEED_DATASETS)
    files = sorted(SAMPLES_DIR.glob("*/*/data/*.parquet"))
    assert sum(f.stat().st_size for f in files) < 3 * 2**20
    found = {(f.parents[1].relative_to(SAMPLES_DIR).as_posix(), f.name.split("-")[0]) for f in files}
    assert found == {(s.hub_id, split) for s in SAMPLES for split in s.sizes}
    assert "test" not in next(s for s in SAMPLES if s.hub_id == "Dahoas/synthetic-instruct-gptj-pairwise").sizes
    for spec in SAMPLES:
        for split, n in spec.sizes.items():
            table = pq.read_table(SAMPLES_DIR / spec.hub_id / "data" / f"{split}-00000-of-00001.parquet")
            assert table.num_rows == n and table.column_names == SCHEMA_COLUMNS[spec.hub_id]


def test_each_schema_looks_like_the_original():
    for row in read(SAMPLES_DIR, "Dahoas/rm-static", "train")[:100]:
        assert row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith("\n\nAssistant:")
        assert row["chosen"].startswith(" ") and row["response"] == row["chosen"]
    multi = [r for r in read(SAMPLES_DIR, "Dahoas/full-hh-rlhf", "train") if r["prompt"].count("Human:") > 1]
    assert len(multi) > 1000  # full-hh-rlhf is the more multi-turn one
    for row in read(SAMPLES_DIR, "Dahoas/synthetic-instruct-gptj-pairwise", "train")[:100]:
        assert "Human:" not in row["prompt"] and not row["chosen"].startswith(" ")
    for row in read(SAMPLES_DIR, "yitingxie/rlhf-reward-datasets", "train")[:100]:
        assert row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith("\n\n")
        assert not row["prompt"].endswith("Assistant:\n\n")
        assert row["chosen"].startswith("Assistant: ") and row["rejected"].startswith("Assistant: ")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+|[!?.]", text.lower())


@pytest.mark.parametrize("hub_id", ["Dahoas/rm-static", "yitingxie/rlhf-reward-datasets"])
def test_preference_is_learnable_from_words(hub_id):
    """A bag-of-words linear scorer of the answer alone, fitted with the pairwise logistic
    loss, ranks the rude/unhelpful half right; the off-topic and wrong-fact pairs need the
    question and the facts, which is what leaves room for a reward model to do better."""
    train, test = read(SAMPLES_DIR, hub_id, "train"), read(SAMPLES_DIR, hub_id, "test")
    vocab = {w: i for i, (w, _) in enumerate(Counter(w for r in train for w in words(r["chosen"] + r["rejected"]))
                                                .most_common(800))}

    def featurise(rows, col):
        x = np.zeros((len(rows), len(vocab)))
        for i, r in enumerate(rows):
            for w in words(r[col]):
                if w in vocab:
                    x[i, vocab[w]] += 1
        return x

    d_train = featurise(train, "chosen") - featurise(train, "rejected")  # (N, V)
    w = np.zeros(len(vocab))
    for _ in range(300):  # gradient descent on -log sigmoid(w . (x_chosen - x_rejected))
        margin = d_train @ w
        w += 0.5 * d_train.T @ (1 / (1 + np.exp(margin))) / len(train)
    accuracy = float(((featurise(test, "chosen") - featurise(test, "rejected")) @ w > 0).mean())
    assert 0.7 < accuracy < 0.9, accuracy


def test_tiny_tokenizer_is_the_same_in_a_fresh_process():
    """The default model's vocabulary must not depend on the process (hash seeds, threads)."""
    code = ("import hashlib, json; from rlhf_tasks.data.tokenizer import sample_texts, train_tiny_tokenizer; "
            "t = train_tiny_tokenizer(sample_texts()); "
            "print(hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    digests = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(digests) == 1
