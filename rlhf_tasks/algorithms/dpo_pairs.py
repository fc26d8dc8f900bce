"""On-policy preference pairs for DPO (``dpo.pairs: generated``), and for KTO
(``kto.answers: generated``: each pair's answers, one desirable, one undesirable).

The SFT actor answers the third phase's training prompts ``candidates`` times each (the
running stage's section: ``dpo.candidates``, ``kto.candidates``; sampled with the ``sampling``
section's settings, as evaluate samples), the run's reward (the frozen reward model, the
verifier or both: ``reward.source``) plus the reward terms the RL steps optimise scores every
answer, and each prompt's best answer becomes ``chosen``, its worst ``rejected`` (a prompt
whose answers all score the same gives no pair). This is one round of iterative DPO with
RM-ranked self-generated pairs (Xiong et al. 2024, "Iterative Preference Learning from
Human Feedback"; Llama 3's post-training): DPO then learns what the reward model prefers
among answers the policy actually gives, where the dataset's pairs were written by others.

Generation happens once, before the reference pass; the reward model is freed before
training, so only the policy is on the device while it trains. The pairs are saved in the
stage directory under a key of the settings that made them, so a resumed attempt trains
on exactly the same pairs (sampling on a GPU is not bit-reproducible).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time

import datasets
import torch
from torch.utils.data import DataLoader

from ..data import PromptCollator
from ..data.chat import renderer
from ..data.phases import ppo_prompts
from ..runtime.stage import StageContext, stage_seed
from ..runtime.watchdog import beat
from ..storage import atomic_dir
from .rl.generation import GenerationSettings, Rollout, generate
from .rl.models import load_reward_model
from .rl.rewards import RewardTerms

log = logging.getLogger("rlhf_tasks")
COLUMNS = ("chosen_input_ids", "rejected_input_ids", "chosen_prompt_len", "length", "chosen_reward",
           "rejected_reward")


def best_and_worst(rewards: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*k,) rewards, each prompt's k answers contiguous -> (B,) row index of each prompt's
    best answer and of its worst (the first of equals)."""
    r = rewards.view(-1, k)
    offset = torch.arange(r.shape[0], device=r.device) * k
    return r.argmax(-1) + offset, r.argmin(-1) + offset


def unpadded(ro: Rollout, i: int) -> tuple[list[int], int]:
    """Row ``i`` of a rollout without padding on either side, and its prompt's length."""
    keep = ro.attention_mask[i].bool()
    return ro.sequences[i][keep].tolist(), int(keep[:ro.prompt_len].sum())


def pair_rows(ro: Rollout, rewards: torch.Tensor, k: int) -> dict[str, list]:
    """Each prompt's best and worst answer as one DPO row; prompts whose answers all score
    the same, or whose best and worst are the same text, teach nothing and are skipped."""
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for b, w in zip(*(t.tolist() for t in best_and_worst(rewards, k)), strict=True):
        (chosen, prompt_len), (rejected, _) = unpadded(ro, b), unpadded(ro, w)
        if rewards[b] <= rewards[w] or chosen == rejected:
            continue
        for key, value in zip(COLUMNS, (chosen, rejected, prompt_len, max(len(chosen), len(rejected)),
                                        float(rewards[b]), float(rewards[w])), strict=True):
            rows[key].append(value)
    return rows


def _key(ctx: StageContext, n_prompts: int) -> str:
    """What the pairs depend on: the prompts, how they were answered and scored, the seed."""
    cfg, d = ctx.cfg, getattr(ctx.cfg, ctx.name)
    parts = {"data": cfg.data.model_dump(mode="json"), "sampling": cfg.sampling.model_dump(mode="json"),
             "reward": cfg.reward.model_dump(mode="json"),
             "k": d.candidates, "n": n_prompts, "seed": stage_seed(ctx.name, cfg), "world": ctx.world_size}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def _answer_and_rank(ctx: StageContext, model, tok, prompts, gen: GenerationSettings) -> dict[str, list]:
    """This rank's share of the prompt batches, answered, scored and paired."""
    cfg, d = ctx.cfg, getattr(ctx.cfg, ctx.name)
    k, clip = d.candidates, cfg.reward.clip_reward_value
    # Under ZeRO-3 the reward model is partitioned like the policy: both forward passes are
    # collectives, so every rank answers and scores as many batches (the padding ones dropped).
    # A verifier's reward loads none.
    reward = load_reward_model(ctx, cfg, d.dtype, zero3=d.zero_stage == 3) if cfg.needs_reward_model() else None
    terms = RewardTerms(cfg.reward, gen.max_new_tokens, tok, renderer(tok, cfg.model.chat_template))
    per_batch = max(1, d.per_device_eval_batch_size // k)  # prompts per batch: k answers each
    batches = list(DataLoader(prompts, batch_size=per_batch, collate_fn=PromptCollator(tok.pad_token_id)))
    rounds = -(-len(batches) // ctx.world_size)
    mine = [(b, True) for b in batches[ctx.rank::ctx.world_size]]
    mine += [(batches[0], False)] * (rounds - len(mine)) if batches else []
    torch.manual_seed(stage_seed(ctx.name, cfg) + ctx.rank)
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for i, (b, real) in enumerate(mine):
        ids, mask = (b[n].to(ctx.device).repeat_interleave(k, 0) for n in ("input_ids", "attention_mask"))
        ro = generate(model, ids, mask, gen, tok.eos_token_id, tok.pad_token_id)
        scores = reward.score(ro.sequences, ro.attention_mask).float().clamp(-clip, clip) if reward else None
        beat()
        if not real:
            continue
        total, _ = terms.total(scores, ro.sequences, ro.action_mask, ro.prompt_len)
        for key, values in pair_rows(ro, total.cpu(), k).items():
            rows[key] += values
        if (i + 1) % max(1, len(mine) // 5) == 0 or i + 1 == len(mine):
            log.info("%s: generated pairs: batch %d/%d, %d pairs", ctx.name, i + 1, len(mine), len(rows["length"]))
    del reward
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _gather(rows: dict[str, list], world: int) -> dict[str, list]:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return rows
    parts: list = [None] * world
    dist.all_gather_object(parts, rows)
    return {c: [v for p in parts for v in p[c]] for c in COLUMNS}


def generated_pairs(ctx: StageContext, model, tok) -> tuple[datasets.Dataset, dict[str, float]]:
    """The training pairs of ``dpo.pairs: generated`` (made once, then read back), and
    what they look like: how many, the mean reward of the chosen and rejected answers."""
    cfg, d = ctx.cfg, getattr(ctx.cfg, ctx.name)
    prompts, _ = ppo_prompts(cfg, tok, "train")
    if d.generated_prompts and len(prompts) > d.generated_prompts:
        prompts = prompts.shuffle(seed=stage_seed(ctx.name, cfg)).select(range(d.generated_prompts))
    where = ctx.stage_dir / f"generated_pairs-{_key(ctx, len(prompts))}"
    t0 = time.perf_counter()
    if (where / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(where))
        log.info("%s: %d generated pairs read back from %s", ctx.name, len(ds), where)
    else:
        gen = GenerationSettings.from_config(cfg)
        log.info("%s: generating %d answers to each of %d prompts, ranked by the reward model", ctx.name,
                 d.candidates, len(prompts))
        ds = datasets.Dataset.from_dict(_gather(_answer_and_rank(ctx, model, tok, prompts, gen), ctx.world_size))
        if ctx.is_main:
            with atomic_dir(where) as tmp:  # a reader never sees half a dataset; a full disk says so
                ds.save_to_disk(str(tmp))
    if len(ds) == 0:
        raise ValueError(f"{ctx.name}: no generated pair had two answers that scored differently (of "
                         f"{len(prompts)} prompts): raise {ctx.name}.candidates or sampling.temperature")
    chosen, rejected = (sum(ds[c]) / len(ds) for c in ("chosen_reward", "rejected_reward"))
    metrics = {"generated_pairs": len(ds), "generated_chosen_reward": chosen, "generated_rejected_reward": rejected,
               "generate_s": time.perf_counter() - t0}
    log.info("%s: %d generated pairs, reward of chosen %.3f vs rejected %.3f", ctx.name, len(ds), chosen, rejected)
    return ds, metrics
