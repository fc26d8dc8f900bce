"""Evaluate: the SFT actor and the aligned actor answer the same held-out prompts.

The aligned actor is the output of the run's ``algorithm`` (a row of the algorithm table); its
metrics carry one name whichever algorithm made it (``eval/aligned_reward``,
``eval/aligned_win_rate``, ``eval/kl_aligned_sft``, ``eval/aligned_answer_length``).
Reported: average reward of each (the run's reward source as RL trains on it: the frozen
RM's score, the verifier's 1/0, or both weighted, clipped), the gain and its standard error,
the win rate, KL of the aligned actor to the SFT actor on the aligned actor's own answers
(summed over answer tokens, averaged over answers), answer lengths, and a side-by-side
sample table. Beside the reward, the ground truth: the verifier's accuracy of each actor on
the held-out prompts it can check, overall and per category (``eval/sft_accuracy``,
``eval/aligned_accuracy``, ``eval/accuracy_gain`` and its standard error,
``eval/aligned_accuracy_<category>``), so a run whose reward rises while its accuracy does
not is visible. With a verifier as the only reward source the held-out prompts are the
checkable ones, and no reward model is loaded.
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
from ..algorithms.rl.rewards import questions, verified
from ..algorithms.verifiers import Verifier, checkable, load_verifier
from ..data import PromptCollator
from ..data.chat import last_user_text, renderer
from ..data.phases import ppo_prompts
from ..runtime import loop
from ..runtime.engine import torch_dtype
from ..runtime.models import RewardModel, load_causal_lm, load_tokenizer
from ..runtime.stage import StageContext, stage
from ..runtime.watchdog import beat, phase
from ..storage import atomic_file, storage_root, write_json

log = logging.getLogger("rlhf_tasks")


class Judge:
    """The run's reward of an answer, as RL trains on it (without shaping terms): the reward
    model's score, the verifier's 1/0, or both weighted, clipped."""

    def __init__(self, cfg, reward_model, verifier: Verifier, tok):
        self.r, self.rm, self.verifier, self.tok = cfg.reward, reward_model, verifier, tok
        self.render = renderer(tok, cfg.model.chat_template)

    def __call__(self, ro, answers: list[str]) -> torch.Tensor:
        r, clip = self.r, self.r.clip_reward_value
        if r.source == "rm":
            return self.rm.score(ro.sequences, ro.attention_mask).float().clamp(-clip, clip).cpu()
        asked = questions(self.tok, self.render, ro.sequences, ro.prompt_len)
        total = r.verifier_coef * verified(self.verifier(asked, answers))
        if r.source == "both":
            total = total + r.rm_coef * self.rm.score(ro.sequences, ro.attention_mask).float().cpu()
        return total.clamp(-clip, clip)


@torch.no_grad()
def answer_and_score(actor, judge: Judge, batches, gen: GenerationSettings, tok, device, seed: int):
    """Generate for every prompt batch; return per-answer rewards, lengths, texts, rollouts."""
    torch.manual_seed(seed)  # both actors draw the same random stream
    rewards, lengths, texts, rollouts = [], [], [], []
    for b in batches:
        ro = generate(actor, b["input_ids"].to(device), b["attention_mask"].to(device), gen, tok.eos_token_id,
                      tok.pad_token_id)
        answers = tok.batch_decode(ro.sequences[:, ro.prompt_len:], skip_special_tokens=True)
        rewards.append(judge(ro, answers))
        lengths.append(ro.answer_lengths.cpu())
        texts += answers
        rollouts.append(ro)
        beat()
    if not rollouts:  # a rank with no batch (fewer batches than ranks)
        return torch.zeros(0), torch.zeros(0), texts, rollouts
    return torch.cat(rewards), torch.cat(lengths).float(), texts, rollouts


def accuracy(verifier: Verifier, prompts: list[str], sft: list[str], aligned: list[str]) -> tuple[dict, list]:
    """The verifier's accuracy of both actors on the prompts it can check (``prompts`` in the
    data's DeepSpeed-Chat text), overall and per category, with the gain's standard error
    (paired: the same prompts). Also each prompt's (category, sft right, aligned right) for
    the sample table."""
    asked = [last_user_text(p) for p in prompts]
    cats = [verifier.category(q) for q in asked]
    right_sft, right_aligned = verifier(asked, sft), verifier(asked, aligned)
    rows = list(zip(cats, right_sft, right_aligned, strict=True))
    checked = [(c, a, b) for c, a, b in rows if c is not None and a is not None and b is not None]
    if not checked:
        return {}, rows
    a, b = torch.tensor([x[1] for x in checked]), torch.tensor([x[2] for x in checked])
    out = {"sft_accuracy": a.mean().item(), "aligned_accuracy": b.mean().item(),
           "accuracy_gain": (b - a).mean().item(),
           "accuracy_gain_se": ((b - a).std() / len(a) ** 0.5).item() if len(a) > 1 else float("nan"),
           "checkable_prompts": len(checked)}
    for cat in sorted({c for c, _, _ in checked}):
        ca = torch.tensor([x[1] for x in checked if x[0] == cat])
        cb = torch.tensor([x[2] for x in checked if x[0] == cat])
        out.update({f"sft_accuracy_{cat}": ca.mean().item(), f"aligned_accuracy_{cat}": cb.mean().item(),
                    f"prompts_{cat}": len(ca)})
    return out, rows


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


def sft_answers(ctx: StageContext, sft, judge: Judge, batches, gen: GenerationSettings, tok, identity: tuple):
    """SFT's rewards, lengths and texts on the held-out prompts (``batches``: this rank's
    share), gathered from every rank. They depend only on the SFT and reward models, the
    prompts, the sampling settings, the seed and the ranks, not on the aligned actor:
    evaluating a second algorithm trained from the same SFT (bench/algorithms.py) reads
    them back from the storage's cache instead of generating them again."""
    cfg, e = ctx.cfg, ctx.cfg.evaluate
    clip = cfg.reward.clip_reward_value
    sft_dir, rm_dir, n_prompts, sizes = identity
    ranks = [ctx.world_size] if ctx.world_size > 1 else []  # each rank samples its own stream
    reward = [] if cfg.reward.source == "rm" else [cfg.reward.model_dump(mode="json"), cfg.model.chat_template]
    key = hashlib.sha256(json.dumps([_fingerprint(sft_dir), _fingerprint(rm_dir), n_prompts, *reward,
                                     cfg.data.model_dump(mode="json"), e.prompts, clip, dataclasses.asdict(gen),
                                     cfg.seed, e.per_device_batch_size, e.dtype, cfg.model.attn_implementation,
                                     str(ctx.device), *ranks]).encode()).hexdigest()[:16]
    cached = storage_root() / "cache" / "evaluate" / f"sft-{key}.pt"
    if cached.is_file():
        got = torch.load(cached)
        log.info("evaluate: SFT's answers to the %d prompts read back from %s", n_prompts, cached)
        return got["rewards"], got["lengths"], got["texts"]
    rewards, lengths, texts, _ = answer_and_score(sft, judge, batches, gen, tok, ctx.device, cfg.seed + ctx.rank)
    full = gather_rows(ctx, sizes, rewards=rewards.tolist(), lengths=lengths.tolist(), texts=texts)
    rewards, lengths, texts = torch.tensor(full["rewards"]), torch.tensor(full["lengths"]), full["texts"]
    if ctx.is_main:
        with atomic_file(cached) as tmp:
            torch.save({"rewards": rewards, "lengths": lengths, "texts": texts}, tmp)
    return rewards, lengths, texts


def reward_metrics(r_sft: torch.Tensor, r_ppo: torch.Tensor, len_sft: torch.Tensor, len_ppo: torch.Tensor,
                   kl: torch.Tensor, prompts: int) -> dict[str, float]:
    """The run's reward of both actors on the same held-out prompts, and what sets them apart."""
    return {
        "sft_reward": r_sft.mean().item(), "aligned_reward": r_ppo.mean().item(),
        "reward_gain": (r_ppo.mean() - r_sft.mean()).item(),
        # Standard error of the difference of the two means: the gain is luck unless it is
        # several times this.
        "reward_gain_se": ((r_ppo.var() + r_sft.var()) / len(r_ppo)).sqrt().item(),
        "aligned_win_rate": ((r_ppo > r_sft).float() + 0.5 * (r_ppo == r_sft).float()).mean().item(),
        "kl_aligned_sft": kl.mean().item(),
        "sft_answer_length": len_sft.mean().item(), "aligned_answer_length": len_ppo.mean().item(),
        "prompts": prompts,
    }


@stage("evaluate")
def run(ctx: StageContext) -> tuple[Path, dict[str, float]]:
    cfg, run_dir = ctx.cfg, ctx.run
    e = cfg.evaluate
    algo = cfg.algorithm
    sft_dir, aligned_dir, rm_dir = run_dir.final("sft"), run_dir.final(algo), run_dir.final("rm")
    for name, d in (("sft", sft_dir), (algo, aligned_dir), *((("rm", rm_dir),) if cfg.needs_reward_model() else ())):
        if not d.is_dir():
            raise FileNotFoundError(f"evaluate needs the {name} stage's output {d}")
    tok = load_tokenizer(str(sft_dir), cfg.model.trust_remote_code)
    verifier = load_verifier(cfg.reward.verifier)
    prompts, _ = ppo_prompts(cfg, tok, "eval")
    if cfg.reward.source == "verifier":
        prompts = checkable(prompts, verifier)
    prompts = loop.cap_eval(prompts, e.prompts, cfg.seed)
    dtype = torch_dtype(e.dtype)
    kw = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
              attn_implementation=cfg.model.attn_implementation)
    sft = load_causal_lm(str(sft_dir), **kw).to(ctx.device).eval()
    aligned = load_causal_lm(str(aligned_dir), **kw).to(ctx.device).eval()
    reward = (RewardModel.from_pretrained(str(rm_dir), **kw).to(ctx.device).eval() if cfg.needs_reward_model()
              else None)
    judge = Judge(cfg, reward, verifier, tok)
    gen = GenerationSettings.from_config(cfg)
    batches = list(DataLoader(prompts, batch_size=e.per_device_batch_size,
                              collate_fn=PromptCollator(tok.pad_token_id)))
    # Each rank answers every world-th batch (its own random stream); the rows are gathered.
    sizes, mine = [len(b["input_ids"]) for b in batches], batches[ctx.rank::ctx.world_size]
    log.info("evaluate: rank %d of %d answered %d of the %d prompts", ctx.rank, ctx.world_size,
             sum(len(b["input_ids"]) for b in mine), len(prompts))
    with phase("generation"):
        r_sft, len_sft, txt_sft = sft_answers(ctx, sft, judge, mine, gen, tok, (sft_dir, rm_dir, len(prompts), sizes))
        r_ppo, len_ppo, txt_ppo, ro_ppo = answer_and_score(aligned, judge, mine, gen, tok, ctx.device,
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
    metrics = reward_metrics(r_sft, r_ppo, len_sft, len_ppo, kl, len(prompts))
    acc, verdicts = accuracy(verifier, list(prompts["prompt"]), txt_sft, txt_ppo)
    metrics.update(acc)
    log.info("evaluate: average reward SFT %.3f -> %s %.3f (KL %.3f) on %d held-out prompts", metrics["sft_reward"],
             algo, metrics["aligned_reward"], metrics["kl_aligned_sft"], len(prompts))
    if acc:
        log.info("evaluate: verifier accuracy SFT %.3f -> %s %.3f (gain %.3f +- %.3f) on %d checkable prompts",
                 acc["sft_accuracy"], algo, acc["aligned_accuracy"], acc["accuracy_gain"], acc["accuracy_gain_se"],
                 acc["checkable_prompts"])
    # The prompts as the actors saw them: a chat template's rendering with its special tokens.
    shown = tok.batch_decode([r["prompt_input_ids"] for r in prompts],
                             skip_special_tokens=not renderer(tok, cfg.model.chat_template).template)
    rows = [{"prompt": pr, "question": last_user_text(q), "sft_answer": a, "sft_reward": round(float(ra), 3),
             f"{algo}_answer": b, f"{algo}_reward": round(float(rb), 3),
             "category": v[0], "sft_correct": v[1], f"{algo}_correct": v[2]}
            for pr, q, a, ra, b, rb, v in zip(shown, prompts["prompt"], txt_sft, r_sft, txt_ppo, r_ppo, verdicts,
                                               strict=True)]
    ctx.log_metrics(metrics, 0)
    out = ctx.stage_dir
    if ctx.is_main:  # every rank holds the gathered rows; one writes them
        write_json(out / "samples.json", rows)
        write_json(out / "metrics.json", metrics)
        if ctx.tracker.run_id:
            ctx.tracker.log_table(rows, f"samples/sft_vs_{algo}.json")
    return aligned_dir, metrics
