"""Chat rendering shared by engines and the CPU-only stages.

Both engine backends and the prompt-fitting stages render a user message with the
tokenizer's chat template here (and count it with trsr.llm.tokenizer), so every
component counts the same tokens the model sees. A tokenizer without a chat template
gets the plain message text.
"""

from __future__ import annotations

from typing import Sequence

Message = dict[str, str]


def user_message(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def render_chat(tokenizer, messages: Sequence[Message] | str) -> str:
    """The exact text the model receives for `messages` (a plain string passes through)."""
    if isinstance(messages, str):
        return messages
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)

