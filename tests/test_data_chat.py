"""Chat rendering (rlhf_tasks/data/chat.py): DeepSpeed-Chat text parsed into turns, prompts
rendered through a tokenizer's chat template with SFT labels on the assistant's tokens only,
and a tokenizer without a template keeping today's data bit for bit."""

from __future__ import annotations

import copy
from itertools import islice

import datasets
import pytest

from rlhf_tasks.data import IGNORE_INDEX, tokenize_pairs, tokenize_prompts, tokenize_sft
from rlhf_tasks.data.chat import format_turn, last_user_text, parse_turns, renderer
from rlhf_tasks.data.formats import SCHEMAS
from rlhf_tasks.data.samples.generate import SAMPLES, sample_rows
from rlhf_tasks.data.tokenizer import sample_texts, train_tiny_tokenizer

# ChatML, as SmolLM2-Instruct's template writes it (with its default system prompt).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer(islice(sample_texts(), 3000), vocab_size=600)


@pytest.fixture(scope="module")
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.eos_token = "<|im_end|>"  # the turn's end is the answer's end, as in SmolLM2's tokenizer
    t.chat_template = CHATML
    return t


@pytest.mark.parametrize("text, turns", [
    ("\n\nHuman: What is 2 plus 2?\n\nAssistant:", [("user", "What is 2 plus 2?")]),
    ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Thanks! What colour is snow?\n\nAssistant:",
     [("user", "Hi"), ("assistant", "Hello!"), ("user", "Thanks! What colour is snow?")]),
    (" Human: What colour is snow? Assistant:", [("user", "What colour is snow?")]),  # the synthetic instruct schema
    ("Be brief.\n\nHuman: Hi\n\nAssistant:", [("system", "Be brief."), ("user", "Hi")]),
    ("What is 2 plus 2?", [("user", "What is 2 plus 2?")]),  # a bare question
])
def test_deepspeed_chat_text_parses_into_turns(text, turns):
    assert [(m["role"], m["content"]) for m in parse_turns(text)] == turns
    assert last_user_text(text) == turns[-1][1]


def test_every_seed_schema_parses_into_turns_that_end_with_the_user():
    for spec in SAMPLES:
        for row in sample_rows(spec)["train"][:50]:
            prompt, _, _ = SCHEMAS[spec.hub_id].read(row)
            messages = parse_turns(prompt)
            assert messages[-1]["role"] == "user" and messages[-1]["content"]
            assert all(m["content"] and "Human:" not in m["content"] for m in messages), prompt


def _sample_rows(n: int = 64) -> datasets.Dataset:
    rows = [SCHEMAS[s.hub_id].read(r) for s in SAMPLES for r in sample_rows(s)["train"][:n // len(SAMPLES)]]
    return datasets.Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                                       "rejected": [r[2] for r in rows], "source": ["test"] * len(rows)})


def test_a_tokenizer_without_a_template_keeps_todays_tokens_bit_for_bit(tok):
    ds = _sample_rows()
    render = renderer(tok, "auto")
    assert not render.template and render.prompt(ds[0]["prompt"]) == ds[0]["prompt"]
    for fn, args in ((tokenize_sft, (128,)), (tokenize_pairs, (128,)), (tokenize_prompts, (96,))):
        before, _ = fn(ds, tok, *args)
        after, _ = fn(ds, tok, *args, render=render)
        assert before.to_dict() == after.to_dict()
    # ... which is the prompt tokenised with the tokenizer's special tokens, the answer alone, EOS.
    sft, _ = tokenize_sft(ds, tok, 128, render=render)
    row = ds[0]
    expected = tok(row["prompt"])["input_ids"] + tok(row["chosen"], add_special_tokens=False)["input_ids"]
    assert sft[0]["input_ids"] == expected + [tok.eos_token_id]


def test_a_chat_template_renders_prompts_and_labels_only_the_assistants_answer(chat_tok):
    ds = _sample_rows(8).select([0])
    prompt, chosen = ds[0]["prompt"], ds[0]["chosen"]
    render = renderer(chat_tok)
    assert render.template and not render.add_special_tokens
    rendered = chat_tok.apply_chat_template(parse_turns(prompt), tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n") and render.prompt(prompt) == rendered
    sft, _ = tokenize_sft(ds, chat_tok, 256, render=render)
    ids, labels = sft[0]["input_ids"], sft[0]["labels"]
    prompt_ids = chat_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and set(labels[:len(prompt_ids)]) == {IGNORE_INDEX}
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert chat_tok.decode(trained) == chosen.strip() + "<|im_end|>"
    # The reward model scores the same rendered conversation; generation starts after the header.
    pairs, _ = tokenize_pairs(ds, chat_tok, 256, render=render)
    assert pairs[0]["chosen_input_ids"] == ids and pairs[0]["chosen_prompt_len"] == len(prompt_ids)
    prompts, _ = tokenize_prompts(ds, chat_tok, 200, render=render)
    assert prompts[0]["prompt_input_ids"] == prompt_ids


def test_the_user_turn_is_found_again_in_a_decoded_rendering(chat_tok, tok):
    text = "\n\nHuman: What is 2 plus 2?\n\nAssistant: 4.\n\nHuman: Thanks! How do I save money?\n\nAssistant:"
    render = renderer(chat_tok)
    ids = [chat_tok.pad_token_id] * 3 + chat_tok(render.prompt(text), add_special_tokens=False)["input_ids"]
    assert render.user_text(chat_tok.decode(ids, skip_special_tokens=False)) == "Thanks! How do I save money?"
    assert renderer(tok).user_text(text) == "Thanks! How do I save money?"


def test_chat_history_keeps_the_deepspeed_chat_format_without_a_template(tok, chat_tok):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "What is 2 plus 2?"}]
    assert renderer(tok).messages(turns) == format_turn(f"{format_turn('', 'Hi')} Hello!", "What is 2 plus 2?")
    assert renderer(chat_tok).messages(turns).endswith("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n"
                                                       "<|im_start|>assistant\n")


def test_never_and_always_override_the_tokenizer(tok, chat_tok):
    assert not renderer(chat_tok, "never").template
    with pytest.raises(ValueError, match="model.chat_template=always"):
        renderer(tok, "always")
