"""Dataset specs and schema readers on files written here in each schema, plus the bundled samples."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_tasks.data import (
    SAMPLES_DIR,
    SEED_DATASETS,
    DatasetSpec,
    DataValidationError,
    load_pairs,
    resolve_spec,
)
from rlhf_tasks.data.formats import SCHEMAS, normalise

QUESTIONS = [f"What is {a} plus {b}?" for a in range(1, 6) for b in range(1, 5)]  # 20 rows


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def hf_cache(tmp_path):
    return tmp_path / "hf-cache"


def hh_rows(n: int = 20) -> list[dict[str, str]]:
    return [{"prompt": f"\n\nHuman: {q}\n\nAssistant:", "response": f" Sure! It is {i}.",
             "chosen": f" Sure! It is {i}.", "rejected": " Go away."} for i, q in enumerate(QUESTIONS[:n])]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- specs --------------------------------------------------------------------------------

def test_resolve_every_form(tmp_path):
    f = tmp_path / "prefs.jsonl"
    write_jsonl(f, hh_rows(2))
    assert resolve_spec("Dahoas/rm-static") == DatasetSpec("Dahoas/rm-static", "Dahoas/rm-static", False,
                                                           "Dahoas/rm-static")
    s = resolve_spec(f"yitingxie/rlhf-reward-datasets={tmp_path}")
    assert (s.schema, s.location, s.is_local) == ("yitingxie/rlhf-reward-datasets", str(tmp_path), True)
    s = resolve_spec("sample:Dahoas/full-hh-rlhf")
    assert s.schema == "Dahoas/full-hh-rlhf" and s.location == str(SAMPLES_DIR / "Dahoas/full-hh-rlhf")
    assert resolve_spec(str(f)).schema == "local"
    assert resolve_spec(str(tmp_path)).schema == "local"


@pytest.mark.parametrize("spec, error", [
    ("someone/unknown-prefs", ValueError),
    ("sample:someone/unknown-prefs", ValueError),
    ("Dahoas/rm-static=", ValueError),
    ("/no/such/prefs.jsonl", FileNotFoundError),
    ("Dahoas/rm-static=/no/such/dir", FileNotFoundError),
])
def test_bad_specs_are_refused(spec, error):
    with pytest.raises(error) as e:
        resolve_spec(spec)
    assert spec.split("=")[0] in str(e.value)
    if error is ValueError:
        assert all(name in str(e.value) for name in SEED_DATASETS) and "sample:" in str(e.value)


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "prefs.txt"
    f.write_text("hello")
    with pytest.raises(ValueError, match="prefs.txt"):
        resolve_spec(str(f))


# -- each seed schema, written locally in its own format ---------------------------------

def test_rm_static_dir_with_test_split(tmp_path, hf_cache):
    d = tmp_path / "rm-static"
    write_parquet(d / "data" / "train-00000-of-00001.parquet", hh_rows(20))
    write_parquet(d / "data" / "test-00000-of-00001.parquet", hh_rows(5))
    splits, reports = load_pairs(f"Dahoas/rm-static={d}", seed=0, cache_dir=hf_cache)
    assert (len(splits["train"]), len(splits["eval"])) == (20, 5)
    assert splits["train"].column_names == ["prompt", "chosen", "rejected"]
    assert splits["train"][0] == {"prompt": "\n\nHuman: What is 1 plus 1?\n\nAssistant:",
                                  "chosen": " Sure! It is 0.", "rejected": " Go away."}
    assert [(r.split, r.total, r.kept) for r in reports] == [("train", 20, 20), ("test", 5, 5)]


def test_full_hh_single_file_gets_its_own_split(tmp_path, hf_cache):
    f = tmp_path / "hh.jsonl"
    write_jsonl(f, hh_rows(20))
    splits, _ = load_pairs(f"Dahoas/full-hh-rlhf={f}", seed=0, cache_dir=hf_cache)
    assert (len(splits["train"]), len(splits["eval"])) == (18, 2)
    both = set(splits["train"]["prompt"]) | set(splits["eval"]["prompt"])
    assert len(both) == 20


def test_synthetic_instruct_is_wrapped_and_split_9_to_1(tmp_path, hf_cache):
    rows = [{"prompt": q, "chosen": f"It is {i}.", "rejected": "No."} for i, q in enumerate(QUESTIONS)]
    write_jsonl(tmp_path / "syn" / "train.jsonl", rows)
    splits, reports = load_pairs(f"Dahoas/synthetic-instruct-gptj-pairwise={tmp_path / 'syn'}", seed=3,
                                 cache_dir=hf_cache)
    assert (len(splits["train"]), len(splits["eval"])) == (18, 2)
    row = next(r for r in splits["train"] if r["prompt"] == " Human: What is 1 plus 1? Assistant:")
    assert row == {"prompt": " Human: What is 1 plus 1? Assistant:", "chosen": " It is 0.", "rejected": " No."}
    again, _ = load_pairs(f"Dahoas/synthetic-instruct-gptj-pairwise={tmp_path / 'syn'}", seed=3, cache_dir=hf_cache)
    assert again["eval"]["prompt"] == splits["eval"]["prompt"]  # the own split is deterministic
    assert [r.split for r in reports] == ["train"]


def test_yitingxie_csv_dir(tmp_path, hf_cache):
    import csv

    d = tmp_path / "yx"
    d.mkdir()
    for split, n in (("train", 20), ("test", 4)):
        with open(d / f"{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, ["prompt", "chosen", "rejected"])
            w.writeheader()
            for i, q in enumerate(QUESTIONS[:n]):
                w.writerow({"prompt": f"\n\nHuman: {q}\n\n", "chosen": f"Assistant: It is {i}.",
                            "rejected": "Assistant: Who cares."})
    splits, _ = load_pairs(f"yitingxie/rlhf-reward-datasets={d}", seed=0, cache_dir=hf_cache)
    assert (len(splits["train"]), len(splits["eval"])) == (20, 4)
    assert splits["eval"][0] == {"prompt": "\n\nHuman: What is 1 plus 1?\n\nAssistant:", "chosen": " It is 0.",
                                 "rejected": " Who cares."}


def test_yitingxie_reader_takes_text_after_last_assistant():
    row = {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\n",
           "chosen": "Human: x Assistant: y Assistant: Goodbye!", "rejected": "Rude."}
    triple, reason = normalise(SCHEMAS["yitingxie/rlhf-reward-datasets"], row)
    assert reason == ""
    assert triple == ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:", " Goodbye!", " Rude.")


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv"])
def test_generic_files(tmp_path, hf_cache, suffix):
    rows = [{"prompt": "Q: hi? A:", "chosen": "hello", "rejected": "  go away", "extra": 1}] * 10
    f = tmp_path / f"prefs.{suffix}"
    if suffix == "jsonl":
        write_jsonl(f, rows)
    elif suffix == "json":
        f.write_text(json.dumps(rows))
    elif suffix == "parquet":
        write_parquet(f, rows)
    else:
        f.write_text("prompt,chosen,rejected,extra\n" + "".join(f'"{r["prompt"]}",{r["chosen"]},{r["rejected"]},1\n'
                                                                 for r in rows))
    splits, _ = load_pairs(str(f), seed=0, cache_dir=hf_cache)
    assert len(splits["train"]) + len(splits["eval"]) == 10
    assert splits["train"][0] == {"prompt": "Q: hi? A:", "chosen": " hello", "rejected": " go away"}


def test_generic_dir_uses_its_test_split(tmp_path, hf_cache):
    rows = [{"prompt": "P", "chosen": " a", "rejected": " b"}]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows * 8)
    write_jsonl(tmp_path / "d" / "test.jsonl", rows * 3)
    splits, _ = load_pairs(str(tmp_path / "d"), seed=0, cache_dir=hf_cache)
    assert (len(splits["train"]), len(splits["eval"])) == (8, 3)


# -- raw HH transcripts (Anthropic/hh-rlhf) -------------------------------------------------

def transcript_rows(n: int = 20) -> list[dict[str, str]]:
    """Anthropic/hh-rlhf's layout: two whole conversations, equal up to the last answer
    (a second turn on odd rows, so the prompt holds an earlier Assistant answer)."""
    rows = []
    for i, q in enumerate(QUESTIONS[:n]):
        head = f"\n\nHuman: {q}\n\nAssistant:"
        if i % 2:
            head += " Let me think.\n\nHuman: Go on.\n\nAssistant:"
        rows.append({"chosen": head + f" It is {i}.", "rejected": head + " Go away."})
    return rows


def test_hh_transcripts_split_at_the_last_assistant_turn(tmp_path, hf_cache):
    d = tmp_path / "hh-rlhf"
    write_jsonl(d / "train.jsonl", transcript_rows(20))
    write_jsonl(d / "test.jsonl", transcript_rows(4))
    assert resolve_spec(f"Anthropic/hh-rlhf={d}").schema == "Anthropic/hh-rlhf"
    assert resolve_spec("Anthropic/hh-rlhf") == DatasetSpec("Anthropic/hh-rlhf", "Anthropic/hh-rlhf", False,
                                                            "Anthropic/hh-rlhf")
    splits, reports = load_pairs(f"Anthropic/hh-rlhf={d}", seed=0, cache_dir=hf_cache)
    assert (len(splits["train"]), len(splits["eval"])) == (20, 4)
    assert [(r.split, r.kept) for r in reports] == [("train", 20), ("test", 4)]
    assert splits["eval"][0] == {"prompt": "\n\nHuman: What is 1 plus 1?\n\nAssistant:", "chosen": " It is 0.",
                                 "rejected": " Go away."}
    assert splits["eval"][1] == {
        "prompt": "\n\nHuman: What is 1 plus 2?\n\nAssistant: Let me think.\n\nHuman: Go on.\n\nAssistant:",
        "chosen": " It is 1.", "rejected": " Go away."}


def test_hh_transcripts_that_do_not_share_the_prompt_are_dropped_and_counted(tmp_path, hf_cache):
    rows = transcript_rows(12)
    rows[2]["rejected"] = rows[2]["rejected"].replace("What is", "Who is")  # another conversation
    rows[5]["chosen"] = "\n\nHuman: no answer turn at all"
    f = tmp_path / "hh.jsonl"
    write_jsonl(f, rows)
    splits, [report] = load_pairs(f"Anthropic/hh-rlhf={f}", seed=0, cache_dir=hf_cache)
    assert (report.total, report.kept) == (12, 10)
    assert report.dropped == {"chosen and rejected differ before the last answer": 1,
                              "no '\\n\\nAssistant:' turn": 1}
    assert report.bad_rows == [2, 5]
    assert len(splits["train"]) + len(splits["eval"]) == 10


def test_local_file_with_only_chosen_rejected_is_read_as_transcripts(tmp_path, hf_cache):
    f = tmp_path / "hh.jsonl"
    write_jsonl(f, transcript_rows(10))
    assert resolve_spec(str(f)).schema == "local"
    splits, _ = load_pairs(str(f), seed=0, cache_dir=hf_cache)
    rows = list(splits["train"]) + list(splits["eval"])
    assert len(rows) == 10 and all(r["prompt"].endswith("\n\nAssistant:") for r in rows)
    assert {r["rejected"] for r in rows} == {" Go away."}


def test_unknown_hub_id_with_an_existing_file_names_the_hub_id(tmp_path):
    """``Unknown/hub-id=/existing/file.jsonl``: the file is there; the hub id is the
    problem, and the message lists the supported ones."""
    f = tmp_path / "prefs.jsonl"
    write_jsonl(f, hh_rows(2))
    for spec, hint in ((f"Unknown/hub-id={f}", ""), (f"Anthropic/hh-rhlf={f}", "did you mean 'Anthropic/hh-rlhf'")):
        with pytest.raises(ValueError) as e:
            resolve_spec(spec)
        msg = str(e.value)
        assert not isinstance(e.value, FileNotFoundError) and "does not exist" not in msg
        assert f"unknown hub id {spec.split('=')[0]!r}" in msg and hint in msg
        assert all(name in msg for name in (*SEED_DATASETS, "Anthropic/hh-rlhf"))


# -- validation -------------------------------------------------------------------------

def test_bad_rows_are_dropped_and_counted(tmp_path, hf_cache):
    good = [{"prompt": "P", "chosen": f" a{i}", "rejected": " b"} for i in range(10)]
    bad = [{"prompt": "P", "chosen": "", "rejected": " b"},
           {"prompt": "P", "chosen": " same", "rejected": "same"},
           {"prompt": None, "chosen": " a", "rejected": " b"},
           {"prompt": "P", "chosen": " a"},
           {"prompt": "P", "chosen": " a", "rejected": 7}]
    f = tmp_path / "prefs.jsonl"
    write_jsonl(f, good[:3] + bad + good[3:])
    splits, [report] = load_pairs(str(f), seed=0, cache_dir=hf_cache)
    assert len(splits["train"]) + len(splits["eval"]) == 10
    assert (report.total, report.kept) == (15, 10)
    assert report.dropped == {"empty chosen": 1, "chosen == rejected": 1, "missing prompt": 1,
                              "missing rejected": 1, "non-string rejected": 1}
    assert report.bad_rows == [3, 4, 5, 6, 7]
    assert "kept 10/15" in str(report) and report.as_dict()["dropped"]["empty chosen"] == 1


def test_mostly_malformed_file_names_file_reasons_and_rows(tmp_path, hf_cache):
    f = tmp_path / "prefs.jsonl"
    write_jsonl(f, [{"prompt": "Q", "chosen": "", "rejected": 3}] * 20 + [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataValidationError) as e:
        load_pairs(str(f), seed=0, cache_dir=hf_cache)
    msg = str(e.value)
    assert str(f) in msg and "20 of 21" in msg and "empty chosen: 20" in msg and "[0, 1, 2, 3, 4]" in msg
    assert isinstance(e.value, ValueError)  # the CLI turns ValueErrors into exit code 2


def test_missing_column_and_unreadable_file(tmp_path, hf_cache):
    f = tmp_path / "prefs.jsonl"
    write_jsonl(f, [{"question": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataValidationError, match=r"no column\(s\) \['prompt'\]"):
        load_pairs(str(f), seed=0, cache_dir=hf_cache)
    g = tmp_path / "broken.jsonl"
    g.write_text("{not json\n")
    with pytest.raises(DataValidationError, match="broken.jsonl"):
        load_pairs(str(g), seed=0, cache_dir=hf_cache)


def test_hub_id_offline_does_not_reach_the_network(hf_cache):
    """A hub spec goes to load_dataset(<hub id>); offline and uncached, that fails fast."""
    with pytest.raises(Exception):  # noqa: B017 – datasets raises ConnectionError or its own types
        load_pairs("Dahoas/rm-static", seed=0, cache_dir=hf_cache)


# -- the bundled samples ------------------------------------------------------------------

EXPECTED_SIZES = {
    "Dahoas/rm-static": (3000, 400),
    "Dahoas/full-hh-rlhf": (3000, 400),
    "Dahoas/synthetic-instruct-gptj-pairwise": (2250, 250),
    "yitingxie/rlhf-reward-datasets": (2500, 300),
}


@pytest.mark.parametrize("hub_id", SEED_DATASETS)
def test_bundled_samples_load_in_the_convention(hub_id, hf_cache):
    splits, reports = load_pairs(f"sample:{hub_id}", seed=1234, cache_dir=hf_cache)
    assert (len(splits["train"]), len(splits["eval"])) == EXPECTED_SIZES[hub_id]
    assert all(r.kept == r.total for r in reports)
    for split in splits.values():
        for row in split.select(range(200)):
            assert row["prompt"].endswith("Assistant:")
            assert row["chosen"].startswith(" ") and not row["chosen"].startswith("  ")
            assert row["rejected"].startswith(" ") and row["chosen"] != row["rejected"]
            assert "Human:" in row["prompt"]
