"""The champion-approval request and decision logic, without Airflow or MLflow; and the
``human:`` dataset spec that feeds people's labels to training."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from rlhf_tasks.config import ConfigError, PipelineConfig
from rlhf_tasks.data import HUB_DATASETS, load_pairs, resolve_spec
from rlhf_tasks.feedback import labels as L
from rlhf_tasks.feedback.store import write_batch
from rlhf_tasks.pipeline import approval

CANDIDATE = {"aligned_reward": 2.5, "sft_reward": 1.25, "kl_aligned_sft": 3.0, "aligned_win_rate": 0.75, "cost_usd": 0.5}
CHAMPION = {"version": "4", "tags": {"eval/aligned_reward": "2.0", "eval/kl_aligned_sft": "1.5",
                                     "eval/aligned_win_rate": "0.625",
                                     "cost/usd": "0.25"}}


def test_request_compares_candidate_champion_and_sft():
    samples = [{"prompt": "P1", "ppo_answer": "cand ```answer```", "ppo_reward": 0.5, "sft_answer": "sft", "sft_reward": 0.1}
               ] * 5
    subject, body = approval.render("7", "rlhf-actor", CANDIDATE, CHAMPION, samples, 30)
    assert subject == "Promote rlhf-actor version 7 to champion? (now: version 4)"
    assert "| average reward (held-out) | 2.500 | 2.000 | 1.250 |" in body
    assert "| KL to SFT per answer (nats) | 3.000 | 1.500 | 0.000 |" in body
    assert "| win rate against SFT | 0.750 | 0.625 | 0.500 |" in body
    assert "| cost (USD) | 0.500 | 0.250 | – |" in body
    assert body.count("### Sample") == approval.SAMPLES_SHOWN  # a few, not all
    assert "````text\ncand ```answer```\n````" in body  # answers in blocks that cannot be closed early
    assert "30 minutes" in body


def test_request_without_a_champion_yet():
    subject, body = approval.render("1", "m", CANDIDATE, None, [], 1440)
    assert subject == "Promote m version 1 to champion?"
    assert "| average reward (held-out) | 2.500 | – | 1.250 |" in body and "none yet" in body


@pytest.mark.parametrize("response, expected", [
    ({"chosen_options": ["Promote"], "responded_by_user": {"id": "ann", "name": "ann"},
      "responded_at": datetime(2026, 12, 1, 9, 30, tzinfo=UTC)}, ("promoted", "ann", "2026-12-01T09:30:00+00:00")),
    ({"chosen_options": ["Reject"], "responded_by_user": {"id": "ann", "name": "ann"}, "responded_at": "t"},
     ("rejected", "ann", "t")),
    # The scheduler's timeout sweep answers with the default (Reject) and no respondent.
    ({"chosen_options": ["Reject"], "responded_by_user": None, "responded_at": "t"}, ("timed_out", None, "t")),
    (None, ("timed_out", None, None)),
])
def test_decisions(response, expected):
    assert approval.decision_of(response) == expected


def test_report_section_says_who_decided_and_when():
    assert "version 3 became champion" in approval.champion_section({"approval": "auto", "version": "3",
                                                                      "promoted": True})
    pending = approval.champion_section({"approval": "pending", "version": "3", "champion_version": "None"})
    assert "awaits a person's decision" in pending and "stays unset" in pending
    done = approval.champion_section({"approval": "rejected", "version": "3", "decided_by": "ann",
                                      "decided_at": "2026-12-01T09:30:00", "champion_version": "2"})
    assert done == ("\n## Champion\n\nApproval `rejected`: version 3: **rejected** by ann at 2026-12-01T09:30:00; "
                    "champion: version 2.\n")


def test_approval_settings_default_to_automatic():
    t = PipelineConfig.load("tiny-cpu").tracking
    assert (t.champion_approval, t.approval_timeout_minutes) == ("auto", 1440.0)
    with pytest.raises(ConfigError, match="champion_approval"):
        PipelineConfig.load("tiny-cpu", ["tracking.champion_approval=maybe"])
    with pytest.raises(ConfigError, match="approval_timeout_minutes"):
        PipelineConfig.load("tiny-cpu", ["tracking.approval_timeout_minutes=0"])


def _batch(store, run_id: str, n: int) -> None:
    reqs = [L.LabelRequest(f"{run_id}/{i}", f"\n\nHuman: q{i}?\n\nAssistant:", (f"good {i}", f"bad {i}"), ("m0", "m1"),
                           (0, 1)) for i in range(n)]
    labs = [L.label_from_response(r, {"chosen_options": ["A better"], "responded_by_user": {"id": "ann"},
                                      "responded_at": "t"}) for r in reqs]
    write_batch(L.preference_rows(labs, run_id), {}, run_id, store)


def test_human_spec_reads_every_batch_as_training_rows(tmp_path):
    store = tmp_path / "preferences" / "human"
    _batch(store, "scheduled__a", 6)
    _batch(store, "e2e_test_eval", 4)  # "test"/"eval" in a run id must not make it a held-out split
    spec = resolve_spec(f"human:{store}")
    assert (spec.schema, spec.location) == ("human", str(store))
    splits, reports = load_pairs(spec, seed=0)
    assert len(splits["train"]) + len(splits["eval"]) == 10 and reports[0].total == 10
    assert splits["train"].column_names == ["prompt", "chosen", "rejected"]  # provenance stays in the store
    assert all(c.startswith(" good") for c in list(splits["train"]["chosen"]) + list(splits["eval"]["chosen"]))
    assert "human" not in HUB_DATASETS


def test_human_spec_defaults_to_the_store_and_refuses_an_empty_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_STORAGE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no labelled batch .* run the rlhf_label_preferences DAG"):
        resolve_spec("human:")
    _batch(tmp_path / "preferences" / "human", "r", 2)
    assert resolve_spec("human:").location == str(tmp_path / "preferences" / "human")
    # The YAML-safe spelling: `- human:` in a YAML list is a mapping, `- human` a string.
    assert resolve_spec("human") == resolve_spec("human:").__class__("human", str(tmp_path / "preferences" / "human"),
                                                                      True, "human")
    assert PipelineConfig.load("tiny-cpu", ["data.datasets=[sample:Dahoas/rm-static, human]"]).data.datasets[1] == "human"
    assert json.loads((tmp_path / "preferences" / "human" / "r.jsonl").read_text().splitlines()[0])["labeller"] == "ann"
