"""What PPO adds to the RL loop (DeepSpeed-Chat's step 3 options): an exponential moving
average of the actor's weights (``ppo.enable_ema``) and the SFT loss mixed into the actor's
update (``ppo.unsupervised_coef``). The critic, GAE and the adaptive KL controller are
settings of the one loop (loop.py, maths/)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from ...config import PipelineConfig
from ...data import SFTCollator
from ...data.collate import LengthGroupedBatchSampler
from ...data.phases import sft_rows
from ...runtime.lora import plain_state_dict
from ...runtime.stage import StageContext


class EMA:
    """Exponential moving average of the actor's weights (DeepSpeed-Chat's --enable_ema),
    kept as the plain model's weights (:func:`plain_state_dict`: with LoRA, each adapted
    layer's effective weight), so that ``final/ema/`` loads as the model it is. One fp32
    copy of the actor per rank: the config refuses it under ZeRO-3."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        copies: dict[int, torch.Tensor] = {}  # tied weights (lm_head, embeddings) stay one tensor
        self.shadow = {k: copies.setdefault(v.data_ptr(), v.detach().float().clone())
                       for k, v in plain_state_dict(model).items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        done: set[int] = set()
        for k, v in plain_state_dict(model).items():
            if (t := self.shadow.get(k)) is not None and id(t) not in done:
                done.add(id(t))
                t.lerp_(v.float(), 1 - self.decay)


def unsupervised_batches(cfg: PipelineConfig, tok, ctx: StageContext) -> Iterator[dict[str, torch.Tensor]]:
    """Endless SFT batches for the mixed-in language-modelling loss (ppo.unsupervised_coef)."""
    ds, _ = sft_rows(cfg, tok, "train")
    collate = SFTCollator(tok.pad_token_id)
    batch = getattr(cfg, ctx.name).per_device_train_batch_size
    epoch = 0
    while True:
        s = LengthGroupedBatchSampler(ds["length"], batch, seed=cfg.seed + 1, rank=ctx.rank,
                                      world_size=ctx.world_size)
        s.set_epoch(epoch)
        for b in DataLoader(ds, batch_sampler=list(s), collate_fn=collate):
            yield {k: v.to(ctx.device) for k, v in b.items()}
        epoch += 1
