"""History -> blocks of N items, rendered as numbered lines that fit the model.

The paper cuts a history into blocks of 5 items so that each summarization prompt
fits the model. `fit_prompt` is the token-budget guard: when a prompt is too long,
long attribute values are shortened (all caps scaled down together, never below
`min_chars`) until it fits; items are never dropped. If even the shortest rendering
does not fit, `PromptTooLong` is raised and the caller marks the user.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from trsr.data.text import MIN_CHARS, SHRINK, render_item, scaled_caps
from trsr.summarize.prompts import numbered

Attributes = Sequence[Mapping[str, str]]


class PromptTooLong(ValueError):
    def __init__(self, tokens: int, budget: int):
        super().__init__(f"prompt needs {tokens} tokens even with the shortest item texts; budget {budget}")
        self.tokens = tokens
        self.budget = budget


def blocks_of(items: Sequence, size: int) -> list[list]:
    """Consecutive chunks of `size` (oldest first); the last one may be shorter."""
    if size < 1:
        raise ValueError("block size must be >= 1")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def render_items(items: Sequence[Attributes], caps: Mapping[str, int] | None) -> str:
    return numbered([render_item(attributes, caps) for attributes in items])


def fit_prompt(
    build: Callable[[Mapping[str, int]], str],
    count_tokens: Callable[[str], int],
    budget: int,
    attribute_names: set[str],
    default_chars: int,
    per_attribute: Mapping[str, int] | None = None,
    min_chars: int = MIN_CHARS,
) -> tuple[str, int, dict[str, int], bool]:
    """The prompt built with the largest caps that fit `budget` tokens.

    Returns (prompt, tokens, caps, shortened). `build(caps)` renders the prompt with the
    given per-attribute character caps; `count_tokens` counts what the model sees.
    """
    per_attribute = per_attribute or {}
    scale = 1.0
    shortened = False
    while True:
        caps = scaled_caps(attribute_names, default_chars, per_attribute, scale, min_chars)
        prompt = build(caps)
        tokens = count_tokens(prompt)
        if tokens <= budget:
            return prompt, tokens, caps, shortened
        if all(cap <= min_chars for cap in caps.values()):
            raise PromptTooLong(tokens, budget)
        scale *= SHRINK
        shortened = True
