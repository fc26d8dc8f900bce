"""Tokenising SFT rows, RM pairs and PPO prompts; tokenizers with and without a BOS; the cache."""

from __future__ import annotations

import copy
import json
from itertools import islice

import datasets
import pytest
from tokenizers.processors import TemplateProcessing

from rlhf_tasks.data import IGNORE_INDEX, build_phase_dataset, tokenize_pairs, tokenize_prompts, tokenize_sft
from rlhf_tasks.data import tokenize as tokenize_module
from rlhf_tasks.data.tokenizer import sample_texts, train_tiny_tokenizer

PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"
CHOSEN = " Sure! The capital of France is Paris."
REJECTED = " That is a stupid question."


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(islice(sample_texts(), 3000), vocab_size=600)


@pytest.fixture(scope="module")
def bos_tok(tok):
    t = copy.deepcopy(tok)
    t.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.bos_token_id)])
    assert t("hi")["input_ids"][0] == t.bos_token_id
    return t


def rows(n: int = 1, prompt: str = PROMPT, chosen: str = CHOSEN, rejected: str = REJECTED) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [prompt] * n, "chosen": [chosen] * n, "rejected": [rejected] * n,
                                       "source": ["test"] * n})


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tiny_tokenizer_has_the_special_tokens_and_no_auto_bos(tok, tmp_path):
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tok("Hello")["input_ids"] == enc(tok, "Hello")
    assert tok.decode(tok(PROMPT + CHOSEN)["input_ids"]) == PROMPT + CHOSEN  # byte-level: lossless
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"] and again.pad_token_id == tok.pad_token_id


def test_tiny_tokenizer_is_deterministic(tok):
    again = train_tiny_tokenizer(islice(sample_texts(), 3000), vocab_size=600)
    assert again.get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("with_bos", [False, True])
def test_sft_masks_the_prompt(tok, bos_tok, with_bos):
    t = bos_tok if with_bos else tok
    out, report = tokenize_sft(rows(), t, max_seq_len=128)
    r = out[0]
    prompt_ids = ([t.bos_token_id] if with_bos else []) + enc(t, PROMPT)
    assert r["input_ids"] == prompt_ids + enc(t, CHOSEN) + [t.eos_token_id]
    assert r["labels"] == [IGNORE_INDEX] * len(prompt_ids) + enc(t, CHOSEN) + [t.eos_token_id]
    assert r["length"] == len(r["input_ids"]) and out.column_names == ["source", "input_ids", "labels", "length"]
    assert (report.total, report.kept, report.stage) == (1, 1, "sft")


def test_sft_train_on_prompt(tok):
    out, _ = tokenize_sft(rows(), tok, max_seq_len=128, train_on_prompt=True)
    assert out[0]["labels"] == out[0]["input_ids"]


def test_answers_are_cut_on_the_right_keeping_eos(tok):
    n_prompt = len(enc(tok, PROMPT))
    limit = n_prompt + 4
    out, _ = tokenize_sft(rows(), tok, max_seq_len=limit)
    ids = out[0]["input_ids"]
    assert len(ids) == limit and ids[-1] == tok.eos_token_id
    assert ids[n_prompt:-1] == enc(tok, CHOSEN)[:3]


def test_too_long_prompts_are_dropped_and_counted(tok):
    long_prompt = "\n\nHuman:" + " very" * 200 + " long?\n\nAssistant:"
    ds = datasets.concatenate_datasets([rows(3), rows(2, prompt=long_prompt)])
    sft, r_sft = tokenize_sft(ds, tok, max_seq_len=64)
    pairs, r_pairs = tokenize_pairs(ds, tok, max_seq_len=64)
    prompts, r_prompts = tokenize_prompts(ds, tok, max_prompt_seq_len=32)
    assert len(sft) == len(pairs) == len(prompts) == 3
    assert r_sft.dropped == {"prompt over 62 tokens": 2} and r_sft.bad_rows == [3, 4]
    assert r_pairs.dropped == {"prompt over 62 tokens": 2}
    assert r_prompts.dropped == {"prompt over 32 tokens": 2} and r_prompts.kept == 3


@pytest.mark.parametrize("with_bos", [False, True])
def test_pairs(tok, bos_tok, with_bos):
    t = bos_tok if with_bos else tok
    out, _ = tokenize_pairs(rows(), t, max_seq_len=128)
    r = out[0]
    prompt_ids = ([t.bos_token_id] if with_bos else []) + enc(t, PROMPT)
    assert r["chosen_input_ids"] == prompt_ids + enc(t, CHOSEN) + [t.eos_token_id]
    assert r["rejected_input_ids"] == prompt_ids + enc(t, REJECTED) + [t.eos_token_id]
    assert r["chosen_prompt_len"] == len(prompt_ids)
    assert r["length"] == max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))


def test_pairs_made_identical_by_truncation_are_dropped(tok):
    ds = rows(chosen=" Paris is the capital.", rejected=" Paris is the worst.")
    limit = len(enc(tok, PROMPT)) + 2  # room for one answer token and EOS: both become " Paris</s>"
    out, report = tokenize_pairs(ds, tok, max_seq_len=limit)
    assert len(out) == 0 and report.dropped == {"identical after truncation": 1}


@pytest.mark.parametrize("with_bos", [False, True])
def test_prompts_keep_texts(tok, bos_tok, with_bos):
    t = bos_tok if with_bos else tok
    out, _ = tokenize_prompts(rows(), t, max_prompt_seq_len=64)
    r = out[0]
    assert r["prompt_input_ids"] == ([t.bos_token_id] if with_bos else []) + enc(t, PROMPT)
    assert r["length"] == len(r["prompt_input_ids"]) and r["chosen"] == CHOSEN and r["prompt"] == PROMPT


# -- build_phase_dataset ------------------------------------------------------------------

def build(tok, tmp_path, specs, **kw):
    args = dict(kind="sft", phase=1, split="train", data_split="2,4,4", seed=0, max_seq_len=128,
                max_prompt_seq_len=96, cache_dir=tmp_path / "cache", hf_cache_dir=tmp_path / "hf")
    return build_phase_dataset(specs, tok, **{**args, **kw})


@pytest.fixture
def local_file(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"\n\nHuman: Q{i}?\n\nAssistant:", "chosen": f"A{i}.",
                                     "rejected": "No."}) + "\n" for i in range(100)))
    return f


@pytest.mark.parametrize("kind, columns", [
    ("sft", ["source", "input_ids", "labels", "length"]),
    ("pairs", ["source", "chosen_input_ids", "rejected_input_ids", "chosen_prompt_len", "length"]),
    ("prompts", ["prompt", "chosen", "source", "prompt_input_ids", "length"]),
])
def test_build_each_kind(tok, tmp_path, local_file, kind, columns):
    specs = ["sample:Dahoas/synthetic-instruct-gptj-pairwise", str(local_file)]
    train, reports = build(tok, tmp_path, specs, kind=kind, phase=2)
    assert train.column_names == columns
    # synthetic: 2250 train rows x 0.4; local: 90 train rows x 0.4
    assert len(train) == 900 + 36
    assert set(train["source"]) == set(specs)
    assert [r.stage for r in reports] == ["load", "load", kind]
    held_out, eval_reports = build(tok, tmp_path, specs, kind=kind, phase=2, split="eval")
    assert len(held_out) == 100 + 4
    assert [r.stage for r in eval_reports] == [kind]  # neither has its own test split


def test_build_reuses_the_cache(tok, bos_tok, tmp_path, local_file, monkeypatch):
    first, reports = build(tok, tmp_path, [str(local_file)])
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "reports.json").is_file()

    def no_loading(*a, **k):
        raise AssertionError("the cached dataset should have been reused")

    monkeypatch.setattr(tokenize_module, "load_pairs", no_loading)
    again, again_reports = build(tok, tmp_path, [str(local_file)])
    assert again["input_ids"] == first["input_ids"] and [str(r) for r in again_reports] == [str(r) for r in reports]
    monkeypatch.undo()

    build(tok, tmp_path, [str(local_file)], max_seq_len=64)  # another setting
    build(bos_tok, tmp_path, [str(local_file)])  # another tokenizer
    local_file.write_text(local_file.read_text() + json.dumps({"prompt": "P", "chosen": "x", "rejected": "y"}) + "\n")
    build(tok, tmp_path, [str(local_file)])  # the data changed
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 4 and not any(n.startswith(".") for n in names)  # no temporary dirs left


def test_a_zero_share_gives_an_empty_dataset_with_the_columns(tok, tmp_path, local_file):
    for kind, column in (("sft", "input_ids"), ("pairs", "chosen_input_ids"), ("prompts", "prompt_input_ids")):
        ds, reports = build(tok, tmp_path, [str(local_file)], kind=kind, phase=3, data_split="10,0,0")
        assert len(ds) == 0 and column in ds.column_names and ds["length"] == []
        assert (reports[-1].total, reports[-1].kept) == (0, 0)


def test_build_validates_its_arguments(tok, tmp_path, local_file):
    with pytest.raises(ValueError, match="kind"):
        build(tok, tmp_path, [str(local_file)], kind="dpo")
    with pytest.raises(ValueError, match="data_split"):
        build(tok, tmp_path, [str(local_file)], data_split="1,2")
