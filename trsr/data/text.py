"""Item text: how an item's attributes become one line of prompt text.

"Category: sports; SubCategory: football_nfl; Title: ..." -- one line per item, so
newlines and tabs inside values are folded into spaces (the authors' code broke on
them), and ids never appear (only attribute values). Per-attribute character caps
shorten long values (descriptions) with an ellipsis instead of dropping the item.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

_WHITESPACE = re.compile(r"\s+")
ELLIPSIS = "..."
# How every length guard shortens item texts (summarizer blocks, recommender prompts):
# all attribute caps scaled down together, each round keeping SHRINK of the previous
# caps, none below MIN_CHARS.
SHRINK = 0.6
MIN_CHARS = 24


def clean(value: str) -> str:
    return _WHITESPACE.sub(" ", value).strip()


def shorten(value: str, max_chars: int | None) -> str:
    if max_chars is None or len(value) <= max_chars:
        return value
    cut = value[: max(0, max_chars - len(ELLIPSIS))]
    # Prefer cutting at a word boundary when one is close.
    space = cut.rfind(" ")
    if space > len(cut) * 0.6:
        cut = cut[:space]
    return cut.rstrip() + ELLIPSIS


def render_item(
    attributes: Iterable[Mapping[str, str]],
    max_chars: Mapping[str, int] | None = None,
    separator: str = "; ",
) -> str:
    """One line of text from an item's ordered (name, value) attributes."""
    parts = []
    for attribute in attributes:
        value = clean(attribute["value"] or "")
        if not value:
            continue
        limit = (max_chars or {}).get(attribute["name"])
        parts.append(f"{attribute['name']}: {shorten(value, limit)}")
    return separator.join(parts)


def scaled_caps(
    names, default_chars: int, per_attribute: Mapping[str, int], scale: float, min_chars: int = MIN_CHARS
) -> dict[str, int]:
    """Per-attribute character caps (per_attribute, else default_chars) times `scale`,
    never below `min_chars`: the shrink rule of every length guard."""
    return {name: max(min_chars, int(per_attribute.get(name, default_chars) * scale)) for name in names}
