"""The checkpoint helper shared by the SFT/RM loop and PPO (``rlhf_tasks.runtime.checkpoint``), with
stand-in engines: the on-disk layout, pruning, resume (half-written checkpoints removed,
state and wall-clock restored, resume.json) and the RNG restore."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_tasks.runtime.checkpoint import Checkpointer
from rlhf_tasks.runtime.stage import StageContext
from rlhf_tasks.storage import MARKER, RunDir


class FakeEngine:
    """What Checkpointer uses of a DeepSpeed engine: save/load_checkpoint(dir, tag)."""

    def __init__(self, weight: float):
        self.weight = weight

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": self.weight, **client_state}, d / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag):
        d = Path(load_dir) / tag
        state = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)
        self.weight = state.pop("weight")
        return str(d), state


class FakeCfg:
    def save(self, path):
        Path(path).write_text("name: test\n")


class Tags:
    def __init__(self):
        self.tags = {}

    def set_tags(self, tags):
        self.tags.update(tags)


def _ctx(tmp_path, name="ppo") -> StageContext:
    return StageContext(name=name, cfg=FakeCfg(), run=RunDir(tmp_path / "run"), device=torch.device("cpu"), rank=0,
                        world_size=1, tracker=Tags(), prefix=name)


def test_save_prune_and_resume_two_engines(tmp_path):
    ctx = _ctx(tmp_path)
    ckpt = Checkpointer(ctx, {"actor": FakeEngine(1.0), "critic": FakeEngine(2.0)}, every=2, keep=2,
                        step_key="iteration", unit="iteration")
    assert ckpt.resume() is None and not ckpt.due(3) and ckpt.due(4)
    for step in (2, 4, 6):
        torch.manual_seed(step)
        ckpt.save(step, {"history": {"reward": [(step, 0.5)]}, "kl_coef": 0.1})
    expected = torch.rand(3)  # what the run draws next, after the last checkpoint
    root = ctx.run.checkpoints("ppo")
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6"]  # pruned to keep=2
    for f in ("actor/mp_rank_00_model_states.pt", "critic/mp_rank_00_model_states.pt", "config.yaml", MARKER):
        assert (root / "step-6" / f).is_file(), f
    assert json.loads((root / "step-6" / MARKER).read_text())["iteration"] == 6
    (root / ".step-8.partial" / "actor").mkdir(parents=True)  # left by a kill inside a write

    ctx2 = _ctx(tmp_path)
    engines = {"actor": FakeEngine(0.0), "critic": FakeEngine(0.0)}
    again = Checkpointer(ctx2, engines, every=2, keep=2, step_key="iteration", unit="iteration")
    torch.manual_seed(1234)
    state = again.resume()
    assert not (root / ".step-8.partial").exists()
    assert (engines["actor"].weight, engines["critic"].weight) == (1.0, 2.0)
    assert state["iteration"] == 6 and state["kl_coef"] == 0.1 and state["history"] == {"reward": [(6, 0.5)]}
    assert ctx2.previous_elapsed_s == state["elapsed_s"] > 0
    assert json.loads((ctx2.stage_dir / "resume.json").read_text())["resumed_from_step"] == 6
    assert ctx2.tracker.tags == {"rlhf.resumed_from_step": "6"}
    again.restore_rng()
    assert torch.equal(torch.rand(3), expected)
    state_after = torch.get_rng_state()
    again.restore_rng()  # once only
    assert torch.equal(torch.get_rng_state(), state_after)


def test_one_engine_is_saved_in_the_step_directory_itself(tmp_path):
    ctx = _ctx(tmp_path, "sft")
    ckpt = Checkpointer(ctx, {"": FakeEngine(3.0)}, every=0, keep=1)
    assert not ckpt.due(5)  # every=0: never
    ckpt.save(5, {"epoch": 0, "micro_done": 10, "history": {}})
    step = ctx.run.checkpoints("sft") / "step-5"
    assert (step / "mp_rank_00_model_states.pt").is_file() and (step / MARKER).is_file()
    state = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["global_step"] == 5 and state["micro_done"] == 10 and "rng" in state
    engine = FakeEngine(0.0)
    assert Checkpointer(_ctx(tmp_path, "sft"), {"": engine}, every=0, keep=1).resume()["global_step"] == 5
    assert engine.weight == 3.0
