"""KTO: the loss against numbers worked out by hand (arXiv:2402.01306, eq. 8; the arithmetic is
in the comments), its reference point and held-out accuracy, the unpaired answers it learns
from (the dataset's pairs, the answers people judged both bad), their batches, its settings
and its row of the algorithm table. The stage itself learning on tiny-cpu: tests/test_alignment.py."""

from __future__ import annotations

import json
import math
from itertools import islice
from types import SimpleNamespace

import datasets
import pytest
import torch

from rlhf_tasks.algorithms.maths.preference import kto_loss, mean_log_ratio, reward_auc
from rlhf_tasks.config import ALGORITHMS, ConfigError, PipelineConfig
from rlhf_tasks.data import KTOCollator, build_phase_dataset
from rlhf_tasks.data.tokenize import tokenize_unpaired
from rlhf_tasks.data.unpaired import from_pairs, load_store_rows, mismatched
from rlhf_tasks.feedback import labels as L
from rlhf_tasks.feedback.store import write_batch
from tests.test_dpo import Bigram
from tests.test_feedback import PROMPT, answered, req


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- the loss -------------------------------------------------------------------------------------

# A desirable answer: policy -3, reference -4, log-ratio r = +1. An undesirable one: policy -5,
# reference -4, r = -1. The mismatched pairs' mean log-ratio KL = 0.5, so z0 = 0.5.
POLICY, REF, DESIRABLE = t(-3.0, -5.0), t(-4.0, -4.0), t(1.0, 0.0)


def test_kto_loss_by_hand():
    # beta 2, lambda_D 1, lambda_U 1.5:
    #   desirable:   1 x (1 - sigmoid(2 x (1 - 0.5)))    = 1 - sigmoid(1) = sigmoid(-1) = 0.2689414
    #   undesirable: 1.5 x (1 - sigmoid(2 x (0.5 + 1))) = 1.5 x sigmoid(-3) = 1.5 x 0.0474259 = 0.0711388
    # mean over the two answers: 0.1700401; implicit rewards beta x r = +2, -2.
    loss, m = kto_loss(POLICY, REF, DESIRABLE, t(0.5), beta=2.0, desirable_weight=1.0, undesirable_weight=1.5)
    assert loss.item() == pytest.approx((sigmoid(-1) + 1.5 * sigmoid(-3)) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.1700401, abs=1e-7)
    assert m["rewards"].tolist() == [2.0, -2.0] and m["z0"].item() == 0.5


def test_the_reference_point_is_clamped_at_zero_and_detached():
    # KL -2 (the policy likes mismatched answers less than the reference does): z0 = max(0, -2) = 0,
    # and each loss is 1 - sigmoid(2 x 1) = sigmoid(-2) = 0.1192029.
    loss, m = kto_loss(POLICY, REF, DESIRABLE, t(-2.0), beta=2.0)
    assert m["z0"].item() == 0.0 and loss.item() == pytest.approx(sigmoid(-2), abs=1e-12)
    policy, kl = POLICY.clone().requires_grad_(True), t(0.5).requires_grad_(True)
    loss, _ = kto_loss(policy, REF, DESIRABLE, kl, beta=2.0, undesirable_weight=1.5)
    loss.backward()
    # d/dpolicy of lambda (1 - sigmoid(x)), x = beta (r - z0) or beta (z0 - r), over 2 answers:
    #   desirable:   -1 x 2 x sigmoid(1) sigmoid(-1) / 2 = -0.1966119
    #   undesirable: +1.5 x 2 x sigmoid(3) sigmoid(-3) / 2 = +0.0677650
    assert policy.grad.tolist() == pytest.approx([-sigmoid(1) * sigmoid(-1), 1.5 * sigmoid(3) * sigmoid(-3)], abs=1e-12)
    assert kl.grad is None  # a baseline, not a target: no gradient reaches the mismatched pairs


def test_at_the_reference_every_loss_is_half_its_weight():
    g = torch.Generator().manual_seed(0)
    logps = -10 * torch.rand(8, generator=g, dtype=torch.float64)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1])
    loss, m = kto_loss(logps, logps.clone(), desirable, t(0.0), beta=0.1, desirable_weight=2.0, undesirable_weight=1.0)
    assert loss.item() == pytest.approx((4 * 2.0 / 2 + 4 * 1.0 / 2) / 8, abs=1e-12)  # mean of lambda_y / 2
    assert (m["rewards"] == 0).all()
    with pytest.raises(ValueError, match="beta"):
        kto_loss(logps, logps, desirable, t(0.0), beta=0.0)
    with pytest.raises(ValueError, match="desirable_weight"):
        kto_loss(logps, logps, desirable, t(0.0), beta=0.1, desirable_weight=0.0)


def test_mean_log_ratio_over_answers_and_ranks():
    # (-1 - -2) + (-3 - -1) + (0.5 - 0) = 1 - 2 + 0.5 = -0.5, over 3 answers: -1/6.
    policy, ref = t(-1.0, -3.0, 0.5), t(-2.0, -1.0, 0.0)
    assert mean_log_ratio(policy, ref).item() == pytest.approx(-1 / 6, abs=1e-7)
    # Two ranks holding the same answers: sums and counts both double, the mean stays.
    assert mean_log_ratio(policy, ref, lambda x: 2 * x).item() == pytest.approx(-1 / 6, abs=1e-7)
    assert mean_log_ratio(t(), t()).item() == 0.0


def test_reward_auc_by_hand():
    # Desirable rewards 3, 2 against undesirable 1, 1: all 4 comparisons right.
    assert reward_auc(t(3.0, 1.0, 2.0, 1.0), t(1, 0, 1, 0)).item() == 1.0
    # Desirable 1, 2 against undesirable 1, 0: (1 vs 1) a tie, 1/2; the other three right: 3.5 / 4.
    assert reward_auc(t(1.0, 1.0, 2.0, 0.0), t(1, 0, 1, 0)).item() == 0.875
    assert reward_auc(t(0.0, 0.0, 0.0), t(1, 0, 1)).item() == 0.5  # the untrained policy: chance
    assert reward_auc(t(1.0, 2.0), t(1, 1)).item() == 0.5  # one kind only: nothing to rank
    g = torch.Generator().manual_seed(1)
    r, d = torch.randint(0, 5, (40,), generator=g).double(), torch.randint(0, 2, (40,), generator=g)
    good, bad = r[d.bool()], r[~d.bool()]
    brute = ((good[:, None] > bad[None]).double() + 0.5 * (good[:, None] == bad[None]).double()).mean()
    assert reward_auc(r, d).item() == pytest.approx(brute.item(), abs=1e-12)


# --- unpaired answers ------------------------------------------------------------------------------

def test_pairs_become_a_desirable_and_an_undesirable_answer():
    pairs = datasets.Dataset.from_dict({"prompt": ["P1", "P2"], "chosen": [" a", " b"], "rejected": [" x", " y"],
                                        "source": ["s1", "s2"]})
    rows = from_pairs(pairs)
    assert rows["prompt"] == ["P1", "P1", "P2", "P2"] and rows["completion"] == [" a", " x", " b", " y"]
    assert rows["desirable"] == [True, False, True, False] and rows["source"] == ["s1", "s1", "s2", "s2"]


@pytest.fixture(scope="module")
def tok():
    from rlhf_tasks.data.tokenizer import sample_texts, train_tiny_tokenizer

    return train_tiny_tokenizer(islice(sample_texts(), 3000), vocab_size=600)


def test_tokenised_unpaired_answers(tok):
    rows = datasets.Dataset.from_dict({"prompt": [PROMPT, PROMPT + " x" * 200], "completion": [" Paris.", " No."],
                                       "desirable": [True, False], "source": ["s", "s"]})
    ds, report = tokenize_unpaired(rows, tok, max_seq_len=64)
    p, a = tok(PROMPT)["input_ids"], tok(" Paris.", add_special_tokens=False)["input_ids"]
    assert ds["input_ids"] == [p + a + [tok.eos_token_id]] and ds["prompt_len"] == [len(p)]
    assert ds["desirable"] == [1] and ds["length"] == [len(p) + len(a) + 1]
    assert report.dropped == {"prompt over 62 tokens": 1}


def test_mismatched_pairs_give_each_prompt_another_prompts_answer():
    # Rows of two pairs: prompts [1, 1] and [2, 2, 2]; answers end with EOS 0.
    ids = [[1, 1, 5, 0], [1, 1, 6, 0], [2, 2, 2, 7, 7, 0], [2, 2, 2, 8, 0]]
    lens = [2, 2, 3, 3]
    out, out_lens = mismatched(ids, lens, seed=0, max_seq_len=6, eos_id=0)
    assert out_lens == lens and out == mismatched(ids, lens, seed=0, max_seq_len=6, eos_id=0)[0]
    for row, k, own in zip(out, out_lens, ids, strict=True):
        assert row[:k] == own[:k]  # the row's own prompt
        assert row[k:] in ([8, 0], [5, 0], [6, 0], [7, 0]) and row[k:] != own[k:]  # another prompt's answer
        assert len(row) <= 6 and row[-1] == 0  # cut to fit, EOS kept
    assert out[0][2:] in ([7, 0], [8, 0])  # prompt [1, 1] never gets its own pair's answers


def test_generated_pairs_become_unpaired_answers():
    from rlhf_tasks.data.unpaired import from_token_pairs

    pairs = datasets.Dataset.from_dict({"chosen_input_ids": [[7, 8, 6]], "rejected_input_ids": [[7, 8, 5, 2]],
                                        "chosen_prompt_len": [2], "length": [4]})
    rows = from_token_pairs(pairs)
    assert rows["input_ids"] == [[7, 8, 6], [7, 8, 5, 2]] and rows["prompt_len"] == [2, 2]
    assert rows["desirable"] == [1, 0] and rows["length"] == [3, 4]


def store_with_labels(tmp_path):
    """A preference store after one labelling batch: one pair preferred, one judged both bad."""
    store = tmp_path / "preferences" / "human"
    good, bad = req("p/0"), req("p/1", answers=("Berlin.", "Rome."))
    labs = [L.label_from_response(good, answered(good, L.PREFER_A)),
            L.label_from_response(bad, answered(bad, L.BOTH_BAD, "bob"))]
    write_batch(L.preference_rows(labs, "run1"), {"labelled": 1}, "run1", store,
                unpaired=L.unpaired_rows(labs, "run1"))
    return store


def test_both_bad_answers_are_kept_as_undesirable_rows_the_pairs_reader_never_sees(tmp_path):
    store = store_with_labels(tmp_path)
    assert sorted(p.name for p in store.iterdir()) == ["run1.jsonl", "unpaired"]
    rows = [json.loads(line) for line in (store / "unpaired" / "run1.jsonl").read_text().splitlines()]
    assert [(r["completion"], r["desirable"], r["model"], r["labeller"]) for r in rows] == [
        (" Berlin.", False, "champion v1", "bob"), (" Rome.", False, "candidate v2", "bob")]
    assert rows[0]["pair_id"] == "p/1" and rows[0]["choice"] == "Both bad" and rows[0]["dag_run_id"] == "run1"
    from rlhf_tasks.data.loading import load_pairs

    pairs, _ = load_pairs(f"human:{store}", seed=0)  # every algorithm's reader: the one pair
    assert len(pairs["train"]) + len(pairs["eval"]) == 1


def test_the_store_rows_are_kto_answers(tmp_path, tok):
    store = store_with_labels(tmp_path)
    with open(store / "unpaired" / "run2.jsonl", "w") as f:  # 18 more, and one malformed
        for i in range(18):
            f.write(json.dumps({"prompt": f"\n\nHuman: Q{i}?\n\nAssistant:", "completion": "Meh.", "desirable": False})
                    + "\n")
        f.write(json.dumps({"prompt": "P", "completion": "", "desirable": False}) + "\n")
    from rlhf_tasks.data.loading import resolve_spec

    split, report = load_store_rows(resolve_spec(f"human:{store}"), seed=0)
    assert (len(split["train"]), len(split["eval"])) == (18, 2)  # 20 good rows, a tenth held out
    assert report.dropped == {"empty completion": 1} and set(split["train"]["desirable"]) == {False}
    args = dict(kind="unpaired", phase=3, data_split="0,0,1", seed=0, max_seq_len=128, max_prompt_seq_len=96,
                cache_dir=tmp_path / "cache")
    train, reports = build_phase_dataset([f"human:{store}"], tok, split="train", **args)
    held_out, _ = build_phase_dataset([f"human:{store}"], tok, split="eval", **args)
    # The one pair (2 answers, in train or held out) and the 20 stored answers, split 18 / 2.
    assert len(train) + len(held_out) == 2 + 20 and sum(train["desirable"]) + sum(held_out["desirable"]) == 1
    assert [r.stage for r in reports][-2:] == ["unpaired", "unpaired"]
    (store / "unpaired" / "run3.jsonl").write_text("not json\n" * 30)
    with pytest.raises(ValueError, match=r"31 of 51 unpaired rows .* \(empty completion: 1, not JSON: 30\)"):
        build_phase_dataset([f"human:{store}"], tok, split="train", **args)


def test_kto_batches():
    rows = [{"input_ids": [5, 6, 7, 2], "prompt_len": 2, "desirable": 1, "ref_logps": -1.5},
            {"input_ids": [5, 2], "prompt_len": 1, "desirable": 0, "ref_logps": -0.5}]
    b = KTOCollator(pad_id=0)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2], [5, 2, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["answer_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert b["desirable"].tolist() == [1.0, 0.0] and b["ref_log_probs"].tolist() == [-1.5, -0.5]
    assert set(KTOCollator(0)([{"input_ids": [1, 2], "prompt_len": 1}])) == {"input_ids", "attention_mask",
                                                                            "answer_mask"}


# --- the stage's parts -----------------------------------------------------------------------------

class Counting(Bigram):
    """Bigram counting its forward passes: under ZeRO-3 each is a collective, so every rank
    must run as many."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return super().forward(*args, **kwargs)


def test_the_reference_pass_runs_as_many_forward_passes_on_every_rank():
    from rlhf_tasks.algorithms.kto import answer_table

    # 5 rows in batches of 2: 3 batches, rank 0 scores batches 0 and 2, rank 1 batch 1 and a
    # padding pass (its result dropped). No process group here: each rank's table is its part,
    # and the two parts add up to the one-process table.
    rows = datasets.Dataset.from_list([{"input_ids": [5] + [6 + i % 3] * (i + 1) + [2], "prompt_len": 1,
                                        "length": i + 3} for i in range(5)])
    collate, cpu = KTOCollator(0), torch.device("cpu")
    whole = answer_table(Bigram(), rows, collate, 2, cpu)
    parts, calls = [], []
    for rank in (0, 1):
        model = Counting()
        parts.append(answer_table(model, rows, collate, 2, cpu, rank=rank, world=2))
        calls.append(model.calls)
    assert calls == [2, 2] and whole.shape == (5,) and (whole < 0).all()
    assert torch.allclose(parts[0] + parts[1], whole) and (parts[1] == 0).sum() == 3  # rank 1: 1 batch of 2 real


def test_the_reference_point_costs_every_rank_the_same_forward_passes():
    from rlhf_tasks.algorithms.kto import ReferencePoint

    rows = [{"input_ids": [5, 6 + i % 3, 2], "prompt_len": 1, "ref_logps": -1.0} for i in range(3)]
    calls = set()
    for rank in (0, 1):
        for step in (0, 1, 5):  # the walk (3 pairs) runs out and cycles: still 8 pairs, 4 batches of 2
            ctx = SimpleNamespace(name="kto", cfg=PipelineConfig.load("tiny-cpu"), device=torch.device("cpu"),
                                  rank=rank, world_size=2)
            model = Counting()
            ReferencePoint(ctx, rows, KTOCollator(0), per_step=8, micro=2)(SimpleNamespace(module=model,
                                                                                           global_steps=step))
            calls.add(model.calls)
    assert calls == {4}


def test_the_reference_point_is_estimated_once_per_step_over_its_pairs():
    from rlhf_tasks.algorithms.dpo import pair_log_probs
    from rlhf_tasks.algorithms.kto import ReferencePoint

    rows = [{"input_ids": [5, 6 + i % 3, 2], "prompt_len": 1, "ref_logps": -float(i)} for i in range(10)]
    ctx = SimpleNamespace(name="kto", cfg=PipelineConfig.load("tiny-cpu"), device=torch.device("cpu"), rank=1,
                          world_size=2)
    point = ReferencePoint(ctx, rows, KTOCollator(0), per_step=4, micro=3)
    model, collate = Bigram(), KTOCollator(0)
    engine = SimpleNamespace(module=model, global_steps=3)
    # Step 3 on rank 1 of 2: the walk's rows (3 x 2 + 1) x 4 = 28 .. 31, cycling over 10: 8, 9, 0, 1.
    chosen = [point.walk[k % 10] for k in range(28, 32)]
    batch = collate([rows[j] for j in chosen])
    want = (pair_log_probs(model, batch, False).double() - batch["ref_log_probs"].double()).mean()
    assert point(engine).item() == pytest.approx(want.item(), abs=1e-5)
    point.ds = None  # the same step again (its next micro-batch): no second estimate
    assert point(engine).item() == pytest.approx(want.item(), abs=1e-5)


def test_kl_pool_is_what_the_steps_draw():
    from rlhf_tasks.algorithms.kto import kl_pool

    k = PipelineConfig.load("tiny-cpu", ["kto.per_device_train_batch_size=16", "kto.max_steps=10"]).kto
    assert kl_pool(1000, k, world=1) == 160  # 10 steps x 16
    assert kl_pool(1000, k, world=2) == 320
    assert kl_pool(100, k, world=1) == 100  # at most one per row
    k = PipelineConfig.load("tiny-cpu", ["kto.per_device_train_batch_size=16", "kto.max_steps=0", "kto.epochs=1"]).kto
    assert kl_pool(1000, k, world=1) == 1000  # a whole epoch: 63 micro-batches, 1008 rows drawn


# --- settings, the table --------------------------------------------------------------------------

@pytest.mark.parametrize("override, field, allowed", [
    ("kto.beta=0", "kto.beta", "> 0"),
    ("kto.desirable_weight=0", "kto.desirable_weight", "> 0"),
    ("kto.undesirable_weight=-1", "kto.undesirable_weight", "> 0"),
    ("kto.dtype=fp16", "kto.dtype", "fp16 needs a GPU"),
])
def test_bad_settings_name_the_field(override, field, allowed):
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load("tiny-cpu", [override])
    assert f"{field}=" in str(e.value) and allowed in str(e.value), str(e.value)


def test_kto_is_a_row_of_the_table():
    from rlhf_tasks.pipeline.preflight import stage_inputs
    from rlhf_tasks.plan.stages import rl

    a = ALGORITHMS["kto"]
    assert (a.learns_from, a.holds, a.rollouts, a.sequences_per_example) == ("answers", ("policy",), False, 1)
    assert ALGORITHMS["dpo"].sequences_per_example == 2
    cfg = PipelineConfig.load("tiny-cpu", {"algorithm": "kto", "kto.answers": "dataset"})
    assert stage_inputs("kto", cfg) == ("sft",) and stage_inputs("evaluate", cfg) == ("sft", "rm", "kto")
    assert set(cfg.engines()) == {"sft", "rm", "kto"}
    assert PipelineConfig.load("tiny-cpu", ["kto.zero_stage=3"]).kto.zero_stage == 3  # like every stage
    # Its own answers ranked by the reward model: the RM is an input, and the plan has the generation phase.
    generated = PipelineConfig.load("tiny-cpu", {"algorithm": "kto", "kto.answers": "generated"})
    assert stage_inputs("kto", generated) == ("sft", "rm")
    assert rl.__doc__ and "KTO" in rl.__doc__


def test_the_memory_plan_reads_the_row(storage):
    from rlhf_tasks.plan import model_configs
    from rlhf_tasks.plan.stages import plan_stage

    same = {"per_device_train_batch_size": 16, "dtype": "fp32"}
    cfg = PipelineConfig.load("tiny-cpu", {"algorithm": "kto", "kto.answers": "dataset", "dpo.pairs": "dataset",
                                           **{f"{a}.{k}": v for a in ("dpo", "kto") for k, v in same.items()}})
    configs = model_configs(cfg)
    kto, dpo = plan_stage(cfg, configs, "kto"), plan_stage(cfg, configs, "dpo")
    # A KTO example is one sequence, a DPO pair two: the same batch holds half the activations.
    assert 0 < kto.phases["policy_update"]["activations"] < dpo.phases["policy_update"]["activations"]
    assert "pair_generation" not in kto.phases and "pair_generation" not in dpo.phases
    generated = PipelineConfig.load("tiny-cpu", {"algorithm": "kto"})  # tiny-cpu's: kto.answers=generated
    assert "pair_generation" in plan_stage(generated, configs, "kto").phases


@pytest.mark.parametrize("stage, overrides, reads", [
    ("kto", ["kto.answers=generated"], True),
    ("kto", ["kto.answers=dataset"], False),
    ("kto", ["kto.answers=generated", "reward.source=verifier"], False),
    ("dpo", ["dpo.pairs=generated"], True),
    ("dpo", ["dpo.pairs=dataset"], False),
])
def test_an_offline_stage_run_by_name_reads_the_reward_model_by_its_own_section(stage, overrides, reads):
    """The ranks matrix runs every stage in one run directory whose algorithm is ppo: whether
    kto or dpo needs the rm stage first is its own section's answer, not ppo's."""
    from rlhf_tasks.algorithms.rl.models import reads_reward_model

    cfg = PipelineConfig.load("tiny-cpu", ["algorithm=ppo", *overrides])
    assert reads_reward_model(SimpleNamespace(cfg=cfg, name=stage)) is reads
