"""One way to load a tokenizer, encode a prompt and count tokens.

Every component that tokenizes (both engine backends, the summarizer's block fitting,
the recommender's prompt guard, training, statistics) goes through these, so a count
made on a CPU actor is the count the model sees:

    load_tokenizer(ref)         the model's tokenizer (offline references resolved); a
                                missing pad token is the end-of-sequence token
    encode_prompt(tok, text)    the ids of a whole prompt: special tokens added unless
                                the text already starts with the BOS token (as a chat
                                template writes it), so BOS is never doubled
    count_prompt_tokens(...)    len(encode_prompt) per text: what a prompt costs
    count_text_tokens(...)      tokens of text pieces without special tokens (statistics,
                                the length of a part inside a prompt)
    token_counter(ref)          `.count(texts)` for the dataset statistics: a model's
                                count_text_tokens, or whitespace words
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=8)
def load_tokenizer(model_ref: str):
    """The tokenizer of `model_ref` (a built-in name, a folder or a GGUF file), loaded once
    per process. Callers must not change it (it is shared)."""
    from transformers import AutoTokenizer

    from trsr.llm.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(model_ref))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids the model sees for a whole prompt or a scoring prefix."""
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def count_prompt_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens the model sees for each text sent as a whole prompt."""
    return [len(encode_prompt(tokenizer, text)) for text in texts]


def count_text_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens of each text on its own, without special tokens."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


# ------------------------------------------------------------- statistics (Table 1)


class WhitespaceTokenizer:
    """Counts whitespace-separated words: a model-free stand-in for statistics."""

    name = "whitespace"

    def count(self, texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]


class HFTokenizerCounter:
    def __init__(self, ref: str):
        self.name = ref
        self._tokenizer = load_tokenizer(ref)

    def count(self, texts: list[str]) -> list[int]:
        return count_text_tokens(self._tokenizer, texts)


def token_counter(ref: str):
    """An object with `.count(texts) -> list[int]` for statistics."""
    if ref == "whitespace":
        return WhitespaceTokenizer()
    return HFTokenizerCounter(ref)
