"""Chat rendering and token counting shared by engines and the CPU-only stages.

Both engine backends and the prompt-fitting stage render a user message with the
tokenizer's chat template here, so every component counts the same tokens the model
sees. A tokenizer without a chat template gets the plain message text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

Message = dict[str, str]


@lru_cache(maxsize=8)
def load_tokenizer(model_ref: str):
    from transformers import AutoTokenizer

    from trsr.llm.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(model_ref))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def user_message(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def render_chat(tokenizer, messages: Sequence[Message] | str) -> str:
    """The exact text the model receives for `messages` (a plain string passes through)."""
    if isinstance(messages, str):
        return messages
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


def count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]
