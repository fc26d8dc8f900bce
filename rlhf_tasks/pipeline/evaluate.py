"""Evaluate: the SFT actor and the aligned actor answer the same held-out prompts.

The aligned actor is the output of the run's ``algorithm`` (a row of the algorithm table); its
metrics carry one name whichever algorithm made it (``eval/aligned_reward``,
``eval/aligned_win_rate``, ``eval/kl_aligned_sft``, ``eval/aligned_answer_length``).
Reported: average reward of each (the frozen RM's score, clipped as in RL training), the
gain and its standard error, the win rate, KL of the aligned actor to the SFT actor on the
aligned actor's own answers (summed over answer tokens, averaged over answers), answer
lengths, and a side-by-side sample table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..algorithms.rl.generation import GenerationSettings, generate
from ..algorithms.rl.models import actor_log_probs
from ..data import PromptCollator
from ..data.phases import ppo_prompts
from ..runtime import loop
from ..runtime.engine import torch_dtype
from ..runtime.models import RewardModel, load_causal_lm, load_tokenizer
from ..runtime.stage import StageContext, stage
from ..runtime.watchdog import beat, phase
from ..storage import atomic_file, storage_root, write_json

log = logging.getLogger("rlhf_tasks")


@torch.no_grad()
def answer_and_score(actor, reward, batches, gen: GenerationSettings, tok, device, clip: float, seed: int):
    """Generate for every prompt batch; return per-answer rewards, lengths, texts, rollouts."""
    torch.manual_seed(seed)  # both actors draw the same random stream
    rewards, lengths, texts, rollouts = [], [], [], []
    for b in batches:
        ro = generate(actor, b["input_ids"].to(device), b["attention_mask"].to(device), gen, tok.eos_token_id,
                      tok.pad_token_id)
        rewards.append(reward.score(ro.sequences, ro.attention_mask).float().clamp(-clip, clip).cpu())
        lengths.append(ro.answer_lengths.cpu())
        texts += tok.batch_decode(ro.sequences[:, ro.prompt_len:], skip_special_tokens=True)
        rollouts.append(ro)
        beat()
    if not rollouts:  # a rank with no batch (fewer batches than ranks)
        return torch.zeros(0), torch.zeros(0), texts, rollouts
    return torch.cat(rewards), torch.cat(lengths).float(), texts, rollouts


def _fingerprint(model_dir: Path) -> list:
    """What identifies a saved model without reading its weights: each weight file's name,
    size and modification time (kept by copies that preserve metadata, e.g. shutil.copytree)."""
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in model_dir.glob("*.safetensors"))


def unshard(parts: list[list], sizes: list[int], world: int) -> list:
    """Rows back in prompt order: ``parts[r]`` holds rank r's rows, those of batches r,
    r + world, ... in turn; ``sizes`` the rows of every batch."""
    out, at = [], [0] * world
    for j, n in enumerate(sizes):
        r = j % world
        out += parts[r][at[r]:at[r] + n]
        at[r] += n
    return out


def gather_rows(ctx: StageContext, sizes: list[int], **rows: list) -> dict[str, list]:
    """Every rank's rows of each named column, in prompt order, on every rank (one
    ``all_gather_object``; the columns are numbers and texts, a few per prompt)."""
    if ctx.world_size == 1:
        return rows
    import torch.distributed as dist

    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, rows)
    return {k: unshard([p[k] for p in parts], sizes, ctx.world_size) for k in rows}


def sft_answers(ctx: StageContext, sft, reward, batches, gen: GenerationSettings, tok, identity: tuple):
    """SFT's rewards, lengths and texts on the held-out prompts (``batches``: this rank's
    share), gathered from every rank. They depend only on the SFT and reward models, the
    prompts, the sampling settings, the seed and the ranks, not on the aligned actor:
    evaluating a second algorithm trained from the same SFT (bench/algorithms.py) reads
    them back from the storage's cache instead of generating them again."""
    cfg, e = ctx.cfg, ctx.cfg.evaluate
    clip = cfg.reward.clip_reward_value
    sft_dir, rm_dir, n_prompts, sizes = identity
    ranks = [ctx.world_size] if ctx.world_size > 1 else []  # each rank samples its own stream
    key = hashlib.sha256(json.dumps([_fingerprint(sft_dir), _fingerprint(rm_dir), n_prompts,
                                     cfg.data.model_dump(mode="json"), e.prompts, clip, dataclasses.asdict(gen),
                                     cfg.seed, e.per_device_batch_size, e.dtype, cfg.model.attn_implementation,
                                     str(ctx.device), *ranks]).encode()).hexdigest()[:16]
    cached = storage_root() / "cache" / "evaluate" / f"sft-{key}.pt"
    if cached.is_file():
        got = torch.load(cached)
        log.info("evaluate: SFT's answers to the %d prompts read back from %s", n_prompts, cached)
        return got["rewards"], got["lengths"], got["texts"]
    rewards, lengths, texts, _ = answer_and_score(sft, reward, batches, gen, tok, ctx.device, clip,
                                                  cfg.seed + ctx.rank)
    full = gather_rows(ctx, sizes, rewards=rewards.tolist(), lengths=lengths.tolist(), texts=texts)
    rewards, lengths, texts = torch.tensor(full["rewards"]), torch.tensor(full["lengths"]), full["texts"]
    if ctx.is_main:
        with atomic_file(cached) as tmp:
            torch.save({"rewards": rewards, "lengths": lengths, "texts": texts}, tmp)
    return rewards, lengths, texts


@stage("evaluate")
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    cfg, run_dir = ctx.cfg, ctx.run
    e, clip = cfg.evaluate, cfg.reward.clip_reward_value
    algo = cfg.algorithm
    sft_dir, aligned_dir, rm_dir = run_dir.final("sft"), run_dir.final(algo), run_dir.final("rm")
    for name, d in (("sft", sft_dir), (algo, aligned_dir), ("rm", rm_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"evaluate needs the {name} stage's output {d}")
    tok = load_tokenizer(str(sft_dir), cfg.model.trust_remote_code)
    prompts, _ = ppo_prompts(cfg, tok, "eval")
    prompts = loop.cap_eval(prompts, e.prompts, cfg.seed)
    dtype = torch_dtype(e.dtype)
    kw = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
              attn_implementation=cfg.model.attn_implementation)
    sft = load_causal_lm(str(sft_dir), **kw).to(ctx.device).eval()
    aligned = load_causal_lm(str(aligned_dir), **kw).to(ctx.device).eval()
    reward = RewardModel.from_pretrained(str(rm_dir), **kw).to(ctx.device).eval()
    gen = GenerationSettings.from_config(cfg)
    batches = list(DataLoader(prompts, batch_size=e.per_device_batch_size,
                              collate_fn=PromptCollator(tok.pad_token_id)))
    # Each rank answers every world-th batch (its own random stream); the rows are gathered.
    sizes, mine = [len(b["input_ids"]) for b in batches], batches[ctx.rank::ctx.world_size]
    log.info("evaluate: rank %d of %d answered %d of the %d prompts", ctx.rank, ctx.world_size,
             sum(len(b["input_ids"]) for b in mine), len(prompts))
    with phase("generation"):
        r_sft, len_sft, txt_sft = sft_answers(ctx, sft, reward, mine, gen, tok,
                                              (sft_dir, rm_dir, len(prompts), sizes))
        r_ppo, len_ppo, txt_ppo, ro_ppo = answer_and_score(aligned, reward, mine, gen, tok, ctx.device, clip,
                                                           cfg.seed + ctx.rank)
    kls = []
    with torch.no_grad(), phase("scoring"):
        for ro in ro_ppo:
            lp = actor_log_probs(aligned, ro.sequences, ro.attention_mask, ro.action_mask)
            lq = actor_log_probs(sft, ro.sequences, ro.attention_mask, ro.action_mask)
            kls.append(((lp - lq) * ro.action_mask).sum(-1).cpu())
    kl = torch.cat(kls) if kls else torch.zeros(0)
    with phase("gathering"):
        full = gather_rows(ctx, sizes, rewards=r_ppo.tolist(), lengths=len_ppo.tolist(), texts=txt_ppo,
                           kl=kl.tolist())
    r_ppo, len_ppo, txt_ppo, kl = (torch.tensor(full["rewards"]), torch.tensor(full["lengths"]), full["texts"],
                                   torch.tensor(full["kl"]))
    metrics = {
        "sft_reward": r_sft.mean().item(), "aligned_reward": r_ppo.mean().item(),
        "reward_gain": (r_ppo.mean() - r_sft.mean()).item(),
        # Standard error of the difference of the two means: the gain is luck unless it is
        # several times this.
        "reward_gain_se": ((r_ppo.var() + r_sft.var()) / len(r_ppo)).sqrt().item(),
        "aligned_win_rate": ((r_ppo > r_sft).float() + 0.5 * (r_ppo == r_sft).float()).mean().item(),
        "kl_aligned_sft": kl.mean().item(),
        "sft_answer_length": len_sft.mean().item(), "aligned_answer_length": len_ppo.mean().item(),
        "prompts": len(prompts),
    }
    log.info("evaluate: average reward SFT %.3f -> %s %.3f (KL %.3f) on %d held-out prompts", metrics["sft_reward"],
             algo, metrics["aligned_reward"], metrics["kl_aligned_sft"], len(prompts))
    prompt_texts = tok.batch_decode([r["prompt_input_ids"] for r in prompts], skip_special_tokens=True)
    rows = [{"prompt": pr, "sft_answer": a, "sft_reward": round(float(ra), 3), f"{algo}_answer": b,
             f"{algo}_reward": round(float(rb), 3)}
            for pr, a, ra, b, rb in zip(prompt_texts, txt_sft, r_sft, txt_ppo, r_ppo, strict=True)]
    ctx.log_metrics(metrics, 0)
    out = ctx.stage_dir
    if ctx.is_main:  # every rank holds the gathered rows; one writes them
        write_json(out / "samples.json", rows)
        write_json(out / "metrics.json", metrics)
        if ctx.tracker.run_id:
            ctx.tracker.log_table(rows, f"samples/sft_vs_{algo}.json")
    return aligned_dir, metrics
