"""DPO: the maths against numbers worked out by hand (the arithmetic is in the comments),
its batches and settings, and (slow) a real tiny-cpu DPO stage that learns the held-out
preferences and resumes mid-stage to the same result."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf_tasks.algorithms.dpo import pair_log_probs
from rlhf_tasks.algorithms.dpo_pairs import best_and_worst, pair_rows
from rlhf_tasks.algorithms.maths.preference import answer_log_probs, chosen_nll, dpo_loss, reward_accuracy
from rlhf_tasks.algorithms.rl.generation import Rollout
from rlhf_tasks.algorithms.rl.models import model_bytes
from rlhf_tasks.config import ConfigError, PipelineConfig
from rlhf_tasks.data import DPOCollator
from rlhf_tasks.storage import RunDir
from tests.runs import fork_run, result_of, run_cli

LOG2 = math.log(2.0)
# log(1 + e^-1): -log sigmoid(1)
SOFTPLUS_M1 = 0.31326168751822286


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# --- the loss -----------------------------------------------------------------------------------

# One pair: policy chosen -3, rejected -5; reference -4 and -4.
# chosen ratio = -3 - -4 = 1, rejected ratio = -5 - -4 = -1, margin h = 1 - (-1) = 2.
PAIR = (t(-3.0), t(-5.0), t(-4.0), t(-4.0))


def test_sigmoid_loss_by_hand():
    # beta 0.5: beta h = 1 -> -log sigmoid(1) = log(1 + e^-1); rewards 0.5 x (1, -1).
    loss, chosen, rejected = dpo_loss(*PAIR, beta=0.5)
    assert loss.item() == pytest.approx(SOFTPLUS_M1, abs=1e-12)
    assert chosen.tolist() == [0.5] and rejected.tolist() == [-0.5]


def test_rpo_term_is_the_chosen_answers_per_token_nll():
    # Answers of 4 and 2 tokens with summed log-probs -2 and -3: NLL per token 0.5 and 1.5.
    assert chosen_nll(torch.tensor([-2.0, -3.0]), torch.tensor([4, 2])).item() == pytest.approx(1.0)
    assert chosen_nll(torch.tensor([0.0]), torch.tensor([0])).item() == 0.0  # an empty answer adds nothing


def test_label_smoothing_by_hand():
    # eps 0.2: 0.8 log(1 + e^-1) + 0.2 log(1 + e^1), and log(1 + e) = 1 + log(1 + e^-1),
    # so the loss is log(1 + e^-1) + 0.2.
    loss, _, _ = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.2)
    assert loss.item() == pytest.approx(SOFTPLUS_M1 + 0.2, abs=1e-12)


def test_ipo_loss_by_hand():
    # (h - 1/(2 beta))^2: beta 0.5 -> (2 - 1)^2 = 1; beta 0.25 -> (2 - 2)^2 = 0; beta 1 -> 1.5^2.
    assert dpo_loss(*PAIR, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0, abs=1e-12)
    assert dpo_loss(*PAIR, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(0.0, abs=1e-12)
    assert dpo_loss(*PAIR, beta=1.0, loss_type="ipo")[0].item() == pytest.approx(2.25, abs=1e-12)


def test_batch_loss_is_the_mean_of_pairs():
    # The pair above (loss log(1 + e^-1) at beta 0.5) and one with no margin (log 2).
    loss, chosen, rejected = dpo_loss(t(-3.0, -2.0), t(-5.0, -7.0), t(-4.0, -1.0), t(-4.0, -6.0), beta=0.5)
    assert loss.item() == pytest.approx((SOFTPLUS_M1 + LOG2) / 2, abs=1e-12)
    assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.5, -0.5]


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_loss_at_policy_equal_to_reference_is_log_2(eps):
    g = torch.Generator().manual_seed(0)
    c, r = -10 * torch.rand(16, generator=g, dtype=torch.float64), -10 * torch.rand(16, generator=g, dtype=torch.float64)
    loss, chosen, rejected = dpo_loss(c, r, c.clone(), r.clone(), beta=0.1, label_smoothing=eps)
    assert loss.item() == pytest.approx(LOG2, abs=1e-12)
    assert chosen.abs().max().item() == 0 and rejected.abs().max().item() == 0
    # IPO at no margin: (0 - 1/(2 beta))^2 = 25 at beta 0.1
    assert dpo_loss(c, r, c, r, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(25.0, abs=1e-9)


def test_gradient_pushes_chosen_up_and_rejected_down():
    # d/dpc [-log sigmoid(beta h)] = -beta sigmoid(-beta h): at h = 0, -beta / 2 (and +beta/2
    # for the rejected answer). IPO at h = 0: d/dh (h - 1/(2 beta))^2 = -1/beta.
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    dpo_loss(pc, pr, t(-2.0).float(), t(-3.0).float(), beta=0.4)[0].backward()
    assert pc.grad.item() == pytest.approx(-0.2) and pr.grad.item() == pytest.approx(0.2)
    pc.grad, pr.grad = None, None
    dpo_loss(pc, pr, t(-2.0).float(), t(-3.0).float(), beta=0.4, loss_type="ipo")[0].backward()
    assert pc.grad.item() == pytest.approx(-2.5) and pr.grad.item() == pytest.approx(2.5)


def test_rewards_are_detached():
    pc = torch.tensor([-1.0], requires_grad=True)
    _, chosen, rejected = dpo_loss(pc, t(-2.0).float(), t(-1.5).float(), t(-2.0).float(), beta=0.1)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*PAIR, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*PAIR, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="sigmoid only"):
        dpo_loss(*PAIR, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_answer_log_probs_sum_and_mean_over_the_answer_only():
    # Row 0: prompt, 2 answer tokens (-2, -3), padding holding NaN. Row 1: 3 answer tokens.
    tokens = t([-1.0, -2.0, -3.0, float("nan")], [-0.5, -1.0, -2.0, -3.0])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    assert answer_log_probs(tokens, mask).tolist() == [-5.0, -6.0]
    assert answer_log_probs(tokens, mask, average=True).tolist() == [-2.5, -2.0]


def test_reward_accuracy_counts_a_tie_half():
    assert reward_accuracy(t(1.0, 0.0, 2.0, -1.0), t(0.0, 0.0, 3.0, -2.0)).item() == pytest.approx(0.625)


# --- batches, the policy's log-probs, memory ------------------------------------------------------

ROWS = [  # prompt [5, 6], answers of 2 and 1 tokens (EOS 2 included)
    {"chosen_input_ids": [5, 6, 7, 2], "rejected_input_ids": [5, 6, 2], "chosen_prompt_len": 2, "length": 4,
     "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5},
    {"chosen_input_ids": [5, 2], "rejected_input_ids": [5, 8, 9, 2], "chosen_prompt_len": 1, "length": 4,
     "ref_chosen_logps": -0.5, "ref_rejected_logps": -4.0},
]


def test_dpo_collator_masks_the_answers_and_carries_the_reference():
    b = DPOCollator(pad_id=0)(ROWS)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2], [5, 2, 0, 0], [5, 6, 2, 0], [5, 8, 9, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["answer_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1]]
    assert b["ref_log_probs"].tolist() == [-1.5, -0.5, -2.5, -4.0]
    assert "ref_log_probs" not in DPOCollator(pad_id=0)([{k: v for k, v in r.items() if "ref" not in k} for r in ROWS])


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits depend on the current token only."""

    def __init__(self, vocab: int = 10):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)))
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))

    def forward(self, input_ids, attention_mask, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_pair_log_probs_are_the_answer_tokens_log_probs():
    model = Bigram()
    b = DPOCollator(pad_id=0)(ROWS)
    got = pair_log_probs(model, b, average=False)
    logp = torch.log_softmax(model.table.detach(), -1)  # logp[a, b]: next token b after a
    want = [logp[6, 7] + logp[7, 2], logp[5, 2], logp[6, 2], logp[5, 8] + logp[8, 9] + logp[9, 2]]
    assert torch.allclose(got, torch.stack(want), atol=1e-6)
    mean = pair_log_probs(model, b, average=True)
    assert torch.allclose(mean, torch.stack(want) / torch.tensor([2.0, 1.0, 1.0, 3.0]), atol=1e-6)


def test_fresh_lora_adapters_leave_the_reference_unchanged(tiny_model_dir):
    """Under LoRA the reference pass runs on the model the adapters were just added to:
    peft starts them at 0, so its log-probs are the SFT model's, and no copy is needed."""
    import datasets

    from rlhf_tasks.algorithms.dpo import reference_log_probs
    from rlhf_tasks.runtime.lora import apply_lora
    from rlhf_tasks.runtime.models import load_causal_lm

    ds = datasets.Dataset.from_list([{k: v for k, v in r.items() if "ref" not in k} for r in ROWS])
    model = load_causal_lm(str(tiny_model_dir))
    plain_bytes = model_bytes(model)
    before = reference_log_probs(model, ds, DPOCollator(pad_id=0), 2, torch.device("cpu"), average=False)
    model = apply_lora(model, 4)
    after = reference_log_probs(model, ds, DPOCollator(pad_id=0), 1, torch.device("cpu"), average=False)
    assert before.shape == (2, 2) and (before < 0).all()
    assert torch.allclose(before, after, atol=1e-5), (before, after)
    assert 0 < model_bytes(model) - plain_bytes < 0.2 * plain_bytes  # the adapters only


# --- generated pairs: each prompt's best answer against its worst ---------------------------------

def _rollout(rows: list[list[int]], prompt_len: int, pad: int = 0) -> Rollout:
    """Left-padded prompts then answers (pad 0 on both sides), masks as generate() makes them."""
    seqs = torch.tensor(rows)
    mask = (seqs != pad).long()
    return Rollout(sequences=seqs, attention_mask=mask, action_mask=mask[:, 1:], prompt_len=prompt_len)


def test_best_and_worst_index_rows_of_each_prompts_group():
    # Two prompts, three answers each: rewards (1, 3, 2) and (0, -1, 5).
    best, worst = best_and_worst(torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0, 5.0]), 3)
    assert best.tolist() == [1, 5] and worst.tolist() == [0, 4]


def test_pair_rows_strip_padding_and_skip_pairs_that_teach_nothing():
    # Prompt of width 3 (the first prompt has one pad on the left), answers of width 2.
    ro = _rollout([[0, 7, 8, 5, 2], [0, 7, 8, 6, 0],     # prompt 1: answers (5, 2) and (6)
                   [9, 9, 9, 4, 0], [9, 9, 9, 3, 0],     # prompt 2: equal rewards
                   [9, 8, 7, 4, 0], [9, 8, 7, 4, 0]], 3)  # prompt 3: the same answer twice
    rows = pair_rows(ro, torch.tensor([1.0, 2.0, 0.5, 0.5, 1.0, 0.0]), 2)
    assert rows["chosen_input_ids"] == [[7, 8, 6]] and rows["rejected_input_ids"] == [[7, 8, 5, 2]]
    assert rows["chosen_prompt_len"] == [2] and rows["length"] == [4]
    assert rows["chosen_reward"] == [2.0] and rows["rejected_reward"] == [1.0]


def test_generated_pairs_batch_like_the_dataset_pairs():
    # The collator's answer mask starts after the (unpadded) prompt, for chosen and rejected alike.
    ro = _rollout([[0, 7, 8, 5, 2], [0, 7, 8, 6, 0]], 3)
    rows = pair_rows(ro, torch.tensor([0.0, 1.0]), 2)
    batch = DPOCollator(0)([{k: v[0] for k, v in rows.items()}])
    assert batch["answer_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]


# --- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, field, allowed", [
    ("dpo.beta=0", "dpo.beta", "> 0"),
    ("dpo.beta=-1", "dpo.beta", "> 0"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing", "[0, 0.5)"),
    ("dpo.label_smoothing=-0.1", "dpo.label_smoothing", "[0, 0.5)"),
    ("dpo.loss_type=hinge", "dpo.loss_type", "'sigmoid', 'ipo'"),
    ("algorithm=ddpo", "algorithm", "'ppo', 'grpo', 'rloo', 'dpo'"),
    ("dpo.pairs=mixed", "dpo.pairs", "'dataset', 'generated'"),
    ("dpo.candidates=1", "dpo.candidates", "an integer in [2, 64]"),
])
def test_bad_settings_name_the_field(override, field, allowed):
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load("tiny-cpu", [override])
    assert f"{field}=" in str(e.value) and allowed in str(e.value), str(e.value)


def test_rules_across_dpo_fields():
    with pytest.raises(ConfigError, match=r"dpo\.label_smoothing=0\.1 is invalid: .*sigmoid only"):
        PipelineConfig.load("tiny-cpu", ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"])
    assert PipelineConfig.load("tiny-cpu", ["dpo.zero_stage=3"]).dpo.zero_stage == 3  # tests/test_ranks.py runs it
    with pytest.raises(ConfigError, match=r"dpo\.dtype='fp16' is invalid"):
        PipelineConfig.load("tiny-cpu", ["dpo.dtype=fp16"])
    cfg = PipelineConfig.load("tiny-cpu", ["algorithm=dpo", "dpo.loss_type=ipo", "dpo.beta=0.5"])
    assert (cfg.algorithm, cfg.dpo.loss_type, cfg.dpo.beta) == ("dpo", "ipo", 0.5)
    assert PipelineConfig().dpo.learning_rate == 5e-7 and PipelineConfig().dpo.dropout == 0.0


# --- the stage: bad inputs refused before training ----------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_tasks", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, named", [
    ("dpo.beta=0", "dpo.beta=0"),
    ("dpo.label_smoothing=0.6", "dpo.label_smoothing=0.6"),
    ("dpo.loss_type=hinge", "dpo.loss_type='hinge'"),
])
def test_cli_refuses_bad_settings_before_training(storage, tmp_path, override, named):
    run = tmp_path / "run"
    proc = _cli("dpo", "--preset", "tiny-cpu", "--set", override, "--output", str(run))
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]
    assert not (run / "dpo").exists()


def test_cli_refuses_a_run_without_sft(storage, tmp_path):
    run = tmp_path / "run"
    proc = _cli("dpo", "--preset", "tiny-cpu", "--output", str(run))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dpo needs the sft stage's output" in proc.stderr and str(run / "sft" / "final") in proc.stderr
    assert not (run / "dpo").exists()


# --- the stage: it learns, it resumes --------------------------------------------------------------

# One dataset (its third phase: 1200 training and 160 held-out pairs), a short SFT and a short
# DPO run with a checkpoint every 10 steps and a log line every step (the kill test reads them).
DPO_STEPS, DPO_INTERVAL = 30, 10
SHORT = ["algorithm=dpo", "dpo.pairs=dataset", "data.datasets=[sample:Dahoas/rm-static]", "data.max_eval_samples=160", "tracking.system_metrics=false",
         "sft.epochs=1", "sft.log_every_steps=20", "dpo.num_warmup_steps=0", "dpo.learning_rate=3e-4",
         f"dpo.max_steps={DPO_STEPS}", f"dpo.checkpoint_every_steps={DPO_INTERVAL}", "dpo.log_every_steps=1"]


@pytest.fixture(scope="module")
def sft_run(storage, tiny_model_dir, tmp_path_factory) -> RunDir:
    """A run directory with a short SFT finished and the DPO settings above in its config:
    DPO needs no reward model, and this SFT costs far less than the session's trained run
    (the whole pipeline through Airflow) when the DPO tests run alone."""
    run = RunDir(tmp_path_factory.mktemp("dpo-sft"))
    result_of(run_cli("sft", "--preset", "tiny-cpu", "--output", str(run.path), "--set", *SHORT))
    return run


@pytest.fixture(scope="module")
def dpo_run(sft_run, tmp_path_factory) -> tuple[RunDir, dict]:
    """DPO uninterrupted, from the short SFT."""
    run = fork_run(sft_run, tmp_path_factory.mktemp("dpo"), stages=("sft",))
    return run, result_of(run_cli("dpo", "--output", str(run.path)))


@pytest.mark.slow
def test_dpo_learns_the_held_out_preferences(dpo_run):
    run, result = dpo_run
    m = result["metrics"]
    assert m["reward_accuracy_before"] == 0.5 and m["eval_margin_before"] == 0.0  # the policy is the reference
    assert m["reward_accuracy"] >= 0.7, m
    assert m["eval_margin"] > 0.3 and m["eval_chosen_reward"] > m["eval_rejected_reward"], m
    assert m["eval_loss"] < math.log(2) - 0.05, m
    assert m["global_step"] == DPO_STEPS and m["train_pairs"] > 1000 and m["eval_pairs"] == 160
    # Only the policy on the device: its parameters and buffers, ~1M fp32 parameters.
    assert 3.5e6 < m["memory/policy_bytes"] < 6e6 and m["memory/models_bytes"] == m["memory/policy_bytes"], m
    assert m["train_s_per_pair"] > 0 and m["reference_s"] > 0
    final = run.final("dpo")
    for f in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml", "metrics.json"):
        assert (final / f).is_file(), f
    assert json.loads((final / "metrics.json").read_text())["reward_accuracy"] == m["reward_accuracy"]
    before, after = load_file(str(run.final("sft") / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-3


@pytest.mark.slow
def test_dpo_killed_mid_stage_resumes_to_the_same_result(dpo_run, sft_run, tmp_path):
    """SIGKILL between two checkpoints, then run again: it resumes from the newest one and
    ends where the uninterrupted run did (the reference pass is recomputed from the SFT
    weights, the RNG state comes from the checkpoint)."""
    from tests.faults.helpers import StageProc, complete_steps

    ref_run, ref = dpo_run
    run = fork_run(sft_run, tmp_path, stages=("sft",))
    with StageProc("dpo", run.path) as first:
        assert first.wait_step(DPO_INTERVAL + 5), first.tail()
        first.kill()
    assert complete_steps(run, "dpo") == [DPO_INTERVAL] and not run.final("dpo").exists()
    with StageProc("dpo", run.path) as second:
        result = second.result()
    assert second.resumed_from() == DPO_INTERVAL, second.tail()
    got, want = result["metrics"], ref["metrics"]
    for k in ("reward_accuracy", "eval_margin", "eval_loss", "eval_chosen_reward"):
        assert got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-5), (k, got[k], want[k])
    a, b = load_file(str(run.final("dpo") / "model.safetensors")), load_file(str(ref_run.final("dpo") / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def test_cli_refuses_generated_pairs_without_a_reward_model(storage, tmp_path):
    run = tmp_path / "run"
    (run / "sft" / "final").mkdir(parents=True)  # an SFT output, no RM: refused before anything loads
    proc = _cli("dpo", "--preset", "tiny-cpu", "--set", "dpo.pairs=generated", "--output", str(run))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dpo needs the rm stage's output" in proc.stderr and str(run / "rm" / "final") in proc.stderr
