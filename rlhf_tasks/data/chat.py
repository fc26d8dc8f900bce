"""How a conversation becomes model text.

Two renderings, one decision (:func:`renderer`):

- DeepSpeed-Chat's ``\\n\\nHuman: ...\\n\\nAssistant:`` turns, the format the seed datasets
  are written in and every model without a chat template is trained on. Text in this format
  is used as it is, so such models see exactly what they always did.
- The tokenizer's chat template (every current instruct model is trained on its own): the
  DeepSpeed-Chat text is parsed into turns (:func:`parse_turns`), rendered with the
  generation prompt, and the answer is the bare assistant text followed by the tokenizer's
  EOS (for ChatML templates, ``<|im_end|>``, the token the template closes a turn with).

The data keeps DeepSpeed-Chat text everywhere (datasets, the preference store, evaluation
tables); only the step that tokenises renders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"
ChatTemplateMode = Literal["auto", "always", "never"]

# A turn marker: "\n\nHuman:" / "\n\nAssistant:", or at the very start (the synthetic
# instruct schema's " Human: ... Assistant:" has single spaces, see formats._instruct).
_MARKER = re.compile(r"(?:\n\n|^\s*|\s(?=Assistant:$))(Human|Assistant):")


def format_turn(history: str, user_text: str) -> str:
    """``history`` plus one user turn, ending where the assistant's answer starts."""
    return f"{history}{HUMAN}{user_text.strip()}{ASSISTANT}"


def parse_turns(text: str) -> list[dict[str, str]]:
    """DeepSpeed-Chat prompt text -> chat messages (``{"role", "content"}``), ending with the
    last user turn; the empty ``Assistant:`` the prompt ends with is where the answer goes.
    Text before the first turn (a preamble) becomes a system message; text with no turn
    markers at all is one user message."""
    parts = _MARKER.split(text)
    if len(parts) == 1:
        return [{"role": "user", "content": text.strip()}]
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for who, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if who == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:  # two turns of one side in a row: one message
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content.strip()}"
        else:
            messages.append({"role": role, "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def last_user_text(text: str) -> str:
    """The last user turn of DeepSpeed-Chat text: the question a verifier checks (earlier
    turns may hold other questions)."""
    users = [m["content"] for m in parse_turns(text) if m["role"] == "user"]
    return users[-1] if users else text.strip()


_SENTINEL = "\u2063rlhf-user-text\u2063"


@dataclass(frozen=True)
class Renderer:
    """Text in the data's DeepSpeed-Chat format -> what the model is given.

    ``template`` False: the text as it is, tokenised with the tokenizer's special tokens
    (today's format, bit for bit). True: the tokenizer's chat template, which writes the
    special tokens itself (so none are added when tokenising)."""

    tok: object
    template: bool

    @property
    def add_special_tokens(self) -> bool:
        return not self.template

    def prompt(self, text: str) -> str:
        if not self.template:
            return text
        return self.tok.apply_chat_template(parse_turns(text), tokenize=False, add_generation_prompt=True)

    def messages(self, messages: list[dict[str, str]]) -> str:
        """A conversation kept as messages (chat's history) -> prompt text."""
        if not self.template:
            text = ""
            for m in messages:
                text = format_turn(text, m["content"]) if m["role"] == "user" else f"{text} {m['content']}"
            return text
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def answer(self, text: str) -> str:
        """An answer as the data has it (one leading space, see formats.answer): as it is
        after DeepSpeed-Chat's ``Assistant:``, stripped after a template's assistant header."""
        return text.strip() if self.template else text

    @cached_property
    def _user_frame(self) -> tuple[str, str]:
        """(what opens a user turn, what follows the last one up to the answer), read off the
        template by rendering a sentinel message: ("user\\n", "<|im_end|>\\n<|im_start|>assistant\\n")
        for ChatML."""
        probe = self.tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
        head, _, tail = probe.partition(_SENTINEL)
        at = head.rfind("user")
        return (head[at:] if at >= 0 else head), tail

    def user_text(self, prompt: str) -> str:
        """The last user turn of a prompt as the model was given it (decoded with its special
        tokens): what a verifier checks. DeepSpeed-Chat text: after the last ``Human:``."""
        if not self.template:
            return last_user_text(prompt)
        header, tail = self._user_frame
        start = prompt.rfind(header)
        text = prompt[start + len(header):] if start >= 0 and header else prompt
        return (text[:len(text) - len(tail)] if tail and text.endswith(tail) else text).strip()

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        return self.tok([self.prompt(t) for t in texts], add_special_tokens=self.add_special_tokens)["input_ids"]


def has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def renderer(tok, mode: ChatTemplateMode = "auto") -> Renderer:
    """The rendering for ``tok`` under the config's ``model.chat_template``: ``auto`` uses
    the tokenizer's template when it has one, ``always`` requires one, ``never`` keeps
    DeepSpeed-Chat text."""
    if mode == "always" and not has_template(tok):
        raise ValueError(f"model.chat_template=always: the tokenizer {getattr(tok, 'name_or_path', tok)!r} has no "
                         "chat template; use auto or never")
    return Renderer(tok, mode != "never" and has_template(tok))
