"""Output checks for generated summaries: empty, degenerate, over-length.

A generation is flagged when it is empty, repeats itself (most of its word 4-grams
occur more than once), echoes the prompt (most of its 4-grams are copied from the
template's own wording, or it copies out the numbered item list; naming item titles
or reusing an earlier summary's phrases in a sentence is what a summary may do) or is
over-length: it stopped at the token limit and no sentence or clause boundary leaves
a usable text. Text that ran past the limit is cut after its last complete sentence,
or, with none, at its last clause boundary (",", ";", ":") and closed with a period;
both are accepted and counted as `trimmed` (small models rarely stop on their own).
Flagged generations are retried once; a user's status is the problem of the
generation that became its final summary (problems of intermediate levels or steps
are recorded with those intermediates, not in the status).
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
# A cut keeps at least this share of the generated text.
MIN_KEPT_AT_SENTENCE = 0.3
MIN_KEPT_AT_CLAUSE = 0.5


def _grams(words: list[str], n: int = 4) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def instruction_grams(*templates: str) -> frozenset:
    """The word 4-grams of templates' own wording (placeholders removed, each piece
    between placeholders on its own so no 4-gram spans inserted text)."""
    grams: set = set()
    for template in templates:
        for piece in re.split(r"\{\w+\}", template):
            grams.update(_grams(_words(piece)))
    return frozenset(grams)


# Numbered lines or "Name: value; Name:" runs: the prompt's item list copied out (the
# rendering of trsr.summarize.segment.render_items), not a description of the user.
_LISTING = re.compile(r"(?m)^\s*\d+\.\s|\b\d+\.\s+\S[^.;\n]*;\s*\d+\.|\w+: [^;\n]+; \w+:")


_LIST_NUMBER = re.compile(r"(?:^|\n|[:;]\s)\s*\d{1,2}\.$")


def is_listing(text: str) -> bool:
    return bool(_LISTING.search(text))


def check_generation(text: str, instructions: frozenset, finish_reason: str) -> str | None:
    """The first problem of a generation, or None when it looks like a summary.
    `instructions`: instruction_grams() of the prompt templates."""
    if not text or not text.strip():
        return EMPTY
    words = _words(text)
    if len(words) >= MIN_WORDS_FOR_SHAPE:
        grams = _grams(words)
        repeated = 1.0 - len(set(grams)) / len(grams)
        if repeated > MAX_REPEATED_FRACTION:
            return REPETITIVE
        echoed = sum(g in instructions for g in grams) / len(grams)
        if echoed > MAX_ECHOED_FRACTION:
            return ECHO
    if is_listing(text):
        return ECHO
    if finish_reason == "length":
        cut = end_on_sentence(text)
        if cut is None or len(_words(cut)) < MIN_WORDS_FOR_SHAPE:
            return OVER_LENGTH
    return None


def end_on_sentence(text: str) -> str | None:
    """A generation cut at the token limit, ended on a sentence: after its last complete
    sentence, else at its last clause boundary closed with a period; None when neither
    keeps enough of the text."""
    text = text.strip()
    # A list number ("1." at a line start or after ": " / "; ") ends no sentence.
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text) if not _LIST_NUMBER.search(text, 0, m.end())]
    if ends and ends[-1] >= len(text) * MIN_KEPT_AT_SENTENCE:
        return text[: ends[-1]]
    clauses = [m.start() for m in re.finditer(r"[,;:](?=\s)", text)]
    if clauses and clauses[-1] >= len(text) * MIN_KEPT_AT_CLAUSE:
        return text[: clauses[-1]].rstrip() + "."
    return None


def trim_to_sentence(text: str) -> str:
    """end_on_sentence(text), or the text as it is when it cannot be cut."""
    return end_on_sentence(text) or text.strip()
