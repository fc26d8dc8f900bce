"""Labelling logic without Airflow: the order shown, the Markdown, rows, counts, agreement,
the store, the prompt file, the assignment of labellers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from rlhf_tasks.feedback import labels as L
from rlhf_tasks.feedback.pairs import LabellingInputError, as_prompt, assign, read_prompt_file
from rlhf_tasks.feedback.store import read_batch, summary_path, write_batch

PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"


def req(pair_id="run/0000", order=(0, 1), answers=("Paris.", "Lyon."), users=()):
    return L.LabelRequest(pair_id, PROMPT, answers, ("champion v1", "candidate v2"), order, users)


def answered(r, choice, who="alice", at="2026-12-01T09:00:00+00:00"):
    return {"chosen_options": [choice], "responded_by_user": {"id": who, "name": who}, "responded_at": at}


def test_shown_order_is_seeded_per_pair_and_roughly_balanced():
    orders = [L.shown_order(f"run/{i:04d}", seed=7) for i in range(400)]
    assert orders == [L.shown_order(f"run/{i:04d}", seed=7) for i in range(400)]  # reproducible
    assert set(orders) == {(0, 1), (1, 0)}
    flipped = sum(o == (1, 0) for o in orders)
    assert 160 < flipped < 240  # 400 fair coins: mean 200, sd 10
    assert [L.shown_order(f"run/{i:04d}", seed=8) for i in range(400)] != orders


def test_markdown_shows_prompt_and_both_answers_in_blocks_in_the_order_shown():
    subject, body = L.render_request(req(order=(1, 0)), 2, 5)
    assert subject.startswith("Which answer is better? (3/5) What is the capital of France?")
    a, b = body.index("### Answer A"), body.index("### Answer B")
    assert body.index("Lyon.") > a and body.index("Lyon.") < b  # answer 1 is shown as A
    assert body.index("Paris.") > b
    assert "```text\nLyon.\n```" in body and "|" not in body  # blocks, not table cells


def test_an_answer_with_backticks_cannot_close_its_block():
    nasty = "x ``` **bold** ````` y"
    block = L.fence(nasty)
    assert block.startswith("``````text\n") and block.endswith("\n``````")
    assert L.fence("  ") == "```text\n(empty answer)\n```"


def test_rows_follow_the_order_shown():
    r = req(order=(1, 0))  # A = candidate's "Lyon.", B = champion's "Paris."
    labs = [L.label_from_response(r, answered(r, L.PREFER_B), map_index=3)]
    (row,) = L.preference_rows(labs, "manual__2026")
    assert (row["prompt"], row["chosen"], row["rejected"]) == (PROMPT, " Paris.", " Lyon.")
    assert (row["chosen_model"], row["rejected_model"]) == ("champion v1", "candidate v2")
    assert (row["shown_a"], row["shown_b"], row["choice"]) == ("candidate v2", "champion v1", "B better")
    assert (row["labeller"], row["dag_run_id"], row["task_id"], row["map_index"]) == ("alice", "manual__2026", "label", 3)
    assert row["labelled_at"] == "2026-12-01T09:00:00+00:00"


def test_ties_both_bad_skips_and_timeouts_are_counted_not_written():
    rs = [req(f"p/{i}") for i in range(7)]
    responses = [answered(rs[0], L.PREFER_A), answered(rs[1], L.PREFER_B, "bob"), answered(rs[2], L.TIE),
                 answered(rs[3], L.BOTH_BAD, "bob"), answered(rs[4], L.SKIP),
                 # Airflow's timeout default: chosen Skip, nobody responded
                 {"chosen_options": ["Skip"], "responded_by_user": None,
                  "responded_at": datetime(2026, 12, 1, tzinfo=UTC)},
                 None]  # the task failed: no return value
    labs = [L.label_from_response(r, x) for r, x in zip(rs, responses, strict=True)]
    assert len(L.preference_rows(labs, "run")) == 2
    assert L.batch_counts(labs) == {"requests": 7, "labelled": 2, "ties": 1, "both_bad": 1, "skipped": 1,
                                    "unanswered": 2, "per_labeller": {"alice": 3, "bob": 2}}


def test_agreement_is_order_independent():
    # Pair 1: alice sees A = model 0, bob sees A = model 1; both prefer model 0: agree.
    # Pair 2: alice prefers model 0, bob calls it a tie: disagree. Pair 3: carol skips: not judged twice.
    labs = [
        L.label_from_response(req("p1", (0, 1)), answered(None, L.PREFER_A, "alice")),
        L.label_from_response(req("p1", (1, 0)), answered(None, L.PREFER_B, "bob")),
        L.label_from_response(req("p2"), answered(None, L.PREFER_A, "alice")),
        L.label_from_response(req("p2"), answered(None, L.TIE, "bob")),
        L.label_from_response(req("p3"), answered(None, L.PREFER_A, "alice")),
        L.label_from_response(req("p3"), answered(None, L.SKIP, "carol")),
    ]
    assert L.agreement(labs) == {"pairs_judged_twice": 2, "comparisons": 2, "agreement": 0.5}
    # Three people on one pair: 3 comparisons, 2 of 3 agree on model 1 -> 1 agreeing comparison.
    three = [L.label_from_response(req("q"), answered(None, c, w))
             for c, w in ((L.PREFER_B, "a"), (L.PREFER_B, "b"), (L.PREFER_A, "c"))]
    assert L.agreement(three)["agreement"] == pytest.approx(1 / 3)
    assert L.agreement(labs[:1])["agreement"] is None


def test_an_answer_outside_the_options_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        L.label_from_response(req(), answered(None, "Approve"))


def test_store_writes_rows_and_summary_atomically(tmp_path):
    store = tmp_path / "preferences" / "human"
    r = req()
    rows = L.preference_rows([L.label_from_response(r, answered(r, L.PREFER_A))], "manual__2026-12-01T09:00:00+00:00")
    path = write_batch(rows, {"labelled": 1}, "manual__2026-12-01T09:00:00+00:00", store)
    assert path == store / "manual__2026-12-01T09_00_00_00_00.jsonl"
    assert read_batch(path) == rows
    assert json.loads(summary_path(store, path.stem).read_text()) == {"labelled": 1}
    assert [p.name for p in store.iterdir()] == [path.name]  # no temporary file left, no summary in the store
    assert write_batch([], {"labelled": 0}, "other", store) is None
    assert not (store / "other.jsonl").exists()


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("What is 2+2?\n\n  \nName a colour.\n")
    assert read_prompt_file(tmp_path / "p.txt") == [as_prompt("What is 2+2?"), as_prompt("Name a colour.")]
    assert as_prompt("Name a colour.") == "\n\nHuman: Name a colour.\n\nAssistant:"
    assert as_prompt(PROMPT) == PROMPT
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")
    assert read_prompt_file(tmp_path / "p.jsonl") == [as_prompt("Hi")]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(LabellingInputError, match="empty.txt holds no prompt"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(LabellingInputError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


def test_copies_of_a_pair_go_to_different_labellers():
    out = assign([req("p0"), req("p1"), req("p2")], ["alice", "bob", "carol"], 2)
    assert [(r.pair_id, r.assigned_users) for r in out] == [
        ("p0", ("alice",)), ("p0", ("bob",)), ("p1", ("bob",)), ("p1", ("carol",)), ("p2", ("carol",)),
        ("p2", ("alice",))]
    assert [r.assigned_users for r in assign([req()], [], 1)] == [()]
    with pytest.raises(LabellingInputError, match="needs that many different labellers"):
        assign([req()], ["alice", "alice"], 2)
    with pytest.raises(LabellingInputError, match="name the labellers"):
        assign([req()], [], 2)


def test_a_retraining_run_after_labelling_adds_the_store_once():
    from rlhf_tasks.feedback.store import with_human_store

    assert with_human_store(["sample:Dahoas/rm-static"]) == ["sample:Dahoas/rm-static", "human"]
    assert with_human_store(["a", "human:/data/prefs"]) == ["a", "human:/data/prefs"]
    assert with_human_store(["a", "human"]) == ["a", "human"]
