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
