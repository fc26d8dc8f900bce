"""Talk to a trained actor: ``python -m rlhf_tasks chat --path runs/<id>/ppo/final``.

The conversation is kept as turns and fed back whole each turn, rendered as the model was
trained (rlhf_tasks/data/chat.py): through its tokenizer's chat template when it has one,
else in DeepSpeed-Chat's ``\\n\\nHuman: ...\\n\\nAssistant: ...`` text. ``--prompt`` answers once and exits (scripts, tests).
Repetition is suppressed with ``no_repeat_ngram_size`` (default 5, as the seed guide
recommends).

The model loads as its run trained it: the run's saved config (``config.yaml`` in the
``final/`` directory, else in the run directory two levels up) gives the attention kernel
(eager where the architecture has no sdpa), ``trust_remote_code``, the dtype (fp32 on
CPU) and the answer length; ``--dtype``/``--attn-implementation``/``--max-new-tokens``
override it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from ..data.chat import renderer

DEFAULT_MAX_NEW_TOKENS = 64
log = logging.getLogger("rlhf_tasks")


def saved_run_config(path: str):
    """The PipelineConfig a model directory was trained with, or None (a hub id, a plain
    save_pretrained directory, or an unreadable config: then the built-in defaults)."""
    from ..config import ConfigError, PipelineConfig
    from ..storage import CONFIG_FILE

    p = Path(path)
    for candidate in (p / CONFIG_FILE, p.parent.parent / CONFIG_FILE):
        if p.is_dir() and candidate.is_file():
            try:
                return PipelineConfig.load(candidate)
            except (ConfigError, OSError) as e:
                log.warning("chat: ignoring %s (%s); using the default settings", candidate, e)
                return None
    return None


class Chat:
    def __init__(self, path: str, device: str = "auto", max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, no_repeat_ngram_size: int = 5, dtype: str | None = None,
                 attn_implementation: str | None = None):
        from ..runtime.engine import resolve_device, torch_dtype
        from ..runtime.models import load_causal_lm, load_tokenizer

        self.device = resolve_device(device)
        cfg = saved_run_config(path)
        trust = cfg.model.trust_remote_code if cfg else False
        attn = attn_implementation or (cfg.model.attn_implementation if cfg else "sdpa")
        if dtype is None:
            # The precision the run evaluated its actors in, on a GPU; fp32 on CPU, where half
            # precision is slow or missing.
            dtype = cfg.evaluate.dtype if cfg and self.device.type == "cuda" else "fp32"
        if max_new_tokens is None:
            max_new_tokens = (cfg.data.max_seq_len - cfg.data.max_prompt_seq_len) if cfg else DEFAULT_MAX_NEW_TOKENS
        self.settings = {"dtype": dtype, "attn_implementation": attn, "max_new_tokens": max_new_tokens,
                         "run_config": cfg is not None}
        self.tok = load_tokenizer(path, trust)
        self.model = load_causal_lm(path, dtype=torch_dtype(dtype), trust_remote_code=trust,
                                    attn_implementation=attn).to(self.device).eval()
        self.gen = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                        no_repeat_ngram_size=no_repeat_ngram_size, pad_token_id=self.tok.pad_token_id,
                        eos_token_id=self.tok.eos_token_id)
        if temperature > 0:
            self.gen.update(temperature=temperature, top_p=top_p)
        self.render = renderer(self.tok, cfg.model.chat_template if cfg else "auto")
        self.history: list[dict[str, str]] = []

    @torch.no_grad()
    def ask(self, text: str) -> str:
        turns = [*self.history, {"role": "user", "content": text.strip()}]
        prompt = self.render.messages(turns)
        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=self.render.add_special_tokens).to(self.device)
        out = self.model.generate(**ids, **self.gen)
        answer = self.tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        # A model may run on into the next turn: keep only its own answer.
        answer = answer.split("Human:")[0].strip()
        self.history = [*turns, {"role": "assistant", "content": answer}]
        return answer


def main(args) -> int:
    chat = Chat(args.path, args.device, args.max_new_tokens, args.temperature, args.top_p, args.no_repeat_ngram_size,
                dtype=args.dtype, attn_implementation=args.attn_implementation)
    if args.prompt is not None:
        print(chat.ask(args.prompt))
        return 0
    print("Type a message; 'clear' starts over, 'quit' or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            text = input("Human: ")
        except EOFError:
            return 0
        if text.strip().lower() in ("quit", "exit"):
            return 0
        if text.strip().lower() == "clear":
            chat.history = []
            continue
        if text.strip():
            print(f"Assistant: {chat.ask(text)}", flush=True)
