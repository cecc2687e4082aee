"""Output checks for generated summaries: empty, degenerate, over-length.

A generation is flagged when it is empty, repeats itself (most of its word 4-grams
occur more than once), echoes the prompt (most of its 4-grams are copied from the
prompt) or is over-length: it stopped at the token limit with no complete sentence
to cut at. Text that ran past the limit after complete sentences is cut after the
last one and accepted (counted as `trimmed`): small models rarely stop on their own.
Flagged generations are retried once; what is still flagged is kept and its problem
is written to the user's `status` column.
"""

from __future__ import annotations

import re

EMPTY = "empty"
REPETITIVE = "repetitive"
ECHO = "echo"
OVER_LENGTH = "over_length"
PROBLEMS = (EMPTY, REPETITIVE, ECHO, OVER_LENGTH)

MIN_WORDS_FOR_SHAPE = 8
MAX_REPEATED_FRACTION = 0.5
MAX_ECHOED_FRACTION = 0.6


def _grams(words: list[str], n: int = 4) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def check_generation(text: str, prompt: str, finish_reason: str) -> str | None:
    """The first problem of a generation, or None when it looks like a summary."""
    if not text or not text.strip():
        return EMPTY
    words = _words(text)
    if len(words) >= MIN_WORDS_FOR_SHAPE:
        grams = _grams(words)
        repeated = 1.0 - len(set(grams)) / len(grams)
        if repeated > MAX_REPEATED_FRACTION:
            return REPETITIVE
        prompt_grams = set(_grams(_words(prompt)))
        echoed = sum(g in prompt_grams for g in grams) / len(grams)
        if echoed > MAX_ECHOED_FRACTION:
            return ECHO
    if finish_reason == "length":
        trimmed = trim_to_sentence(text)
        if not re.search(r"[.!?]$", trimmed) or len(_words(trimmed)) < MIN_WORDS_FOR_SHAPE:
            return OVER_LENGTH
    return None


def trim_to_sentence(text: str) -> str:
    """Cut an over-length generation after its last complete sentence, if it has one."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    if ends and ends[-1] >= len(text) * 0.3:
        return text[: ends[-1]]
    return text
