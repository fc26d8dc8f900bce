"""How a conversation becomes model text: DeepSpeed-Chat's ``\\n\\nHuman: ...\\n\\nAssistant:``
turns, the format the seed datasets are written in and every model without a chat template
is trained on."""

from __future__ import annotations

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


def format_turn(history: str, user_text: str) -> str:
    """``history`` plus one user turn, ending where the assistant's answer starts."""
    return f"{history}{HUMAN}{user_text.strip()}{ASSISTANT}"
