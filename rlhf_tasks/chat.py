"""Talk to a trained actor: ``python -m rlhf_tasks chat --path runs/<id>/ppo/final``.

The conversation is kept in the training format (``\\n\\nHuman: ...\\n\\nAssistant: ...``)
and fed back whole each turn. ``--prompt`` answers once and exits (scripts, tests).
Repetition is suppressed with ``no_repeat_ngram_size`` (default 5, as the seed guide
recommends).
"""

from __future__ import annotations

import sys

import torch

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


def format_turn(history: str, user_text: str) -> str:
    return f"{history}{HUMAN}{user_text.strip()}{ASSISTANT}"


class Chat:
    def __init__(self, path: str, device: str = "auto", max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, no_repeat_ngram_size: int = 5):
        from .engine import resolve_device
        from .models import load_causal_lm, load_tokenizer

        self.device = resolve_device(device)
        self.tok = load_tokenizer(path)
        self.model = load_causal_lm(path).to(self.device).eval()
        self.gen = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                        no_repeat_ngram_size=no_repeat_ngram_size, pad_token_id=self.tok.pad_token_id,
                        eos_token_id=self.tok.eos_token_id)
        if temperature > 0:
            self.gen.update(temperature=temperature, top_p=top_p)
        self.history = ""

    @torch.no_grad()
    def ask(self, text: str) -> str:
        prompt = format_turn(self.history, text)
        ids = self.tok(prompt, return_tensors="pt").to(self.device)
        out = self.model.generate(**ids, **self.gen)
        answer = self.tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        # A model may run on into the next turn: keep only its own answer.
        answer = answer.split("Human:")[0].strip()
        self.history = f"{prompt} {answer}"
        return answer


def main(args) -> int:
    chat = Chat(args.path, args.device, args.max_new_tokens, args.temperature, args.top_p, args.no_repeat_ngram_size)
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
            chat.history = ""
            continue
        if text.strip():
            print(f"Assistant: {chat.ask(text)}", flush=True)
