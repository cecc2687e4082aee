"""Output checks for generated summaries: empty, degenerate, over-length.

A generation is flagged when it is empty, repeats itself (most of its word 4-grams
occur more than once), echoes the prompt (most of its 4-grams are copied from the
template's own wording, or it copies out the numbered item list; naming item titles
or reusing an earlier summary's phrases in a sentence is what a summary may do) or is
over-length: it stopped at the token limit and no sentence or clause boundary leaves
a usable text; or, with `summarize.generation.min_shared_words` > 0, ungrounded: it
shares fewer content words than that with what its prompt gave it (the items of its
block, the summaries it merges, the summary it updates and the new items). Measured on
amazon-games-6k with SmolLM2-135M: 10% of block summaries share no content word with
their five titles (persona text, food, fashion: "I'm an AI designed to assist...").

Text that ran past the limit is cut after its last complete sentence,
or, with none, at its last clause boundary (",", ";", ":") and closed with a period;
both are accepted and counted as `trimmed` (small models rarely stop on their own).
Flagged generations are retried once; a user's status is the problem of the
generation that became its final summary (problems of intermediate levels or steps
are recorded with those intermediates, not in the status). A node still flagged after
its retry is left out of its hierarchical merge when the group has a clean one, and a
flagged recurrent update does not replace a clean summary so far
(trsr.summarize.stages).
"""

from __future__ import annotations

import re

EMPTY = "empty"
REPETITIVE = "repetitive"
ECHO = "echo"
OVER_LENGTH = "over_length"
UNGROUNDED = "ungrounded"
PROBLEMS = (EMPTY, REPETITIVE, ECHO, OVER_LENGTH, UNGROUNDED)

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


# Words that say nothing about what a user had: function words and the vocabulary of
# any description of a person's interests. Kept short on purpose: a word missing here
# only makes the grounding check more lenient.
_GENERIC = frozenset(
    """
    about above after again against also although among another anything around away because been
    before being below between both but came come comes could does doing down during each either
    else enjoy enjoys enjoyed enjoying even ever every fond from further have having here however
    interest interested interests into itself just keen like likes liked liking loves loved loving
    many more most much must need needs often only other others over particular particularly prefer
    prefers preference preferences quite rather really same seem seems seemed several should show
    shows since some something such than that their them themselves then there these they thing
    things this those though through under until upon user users very want wants well were what
    when where whether which while who whom whose will with within without would your various
    including include includes especially overall general generally appreciate
    appreciates recent recently mostly likely value values focus focused focuses
    """.split()
)


def content_stems(text: str) -> set[str]:
    """The content words of a text, crudely stemmed: letters only, at least four long,
    not generic (`_GENERIC`), a plural "s" dropped, cut to five letters (so "strategy"
    and "strategies", "puzzle" and "puzzles" meet). Enough to tell a text about these
    items from one about something else; not a linguistic stemmer."""
    stems = set()
    for word in re.findall(r"[a-z]+", text.lower()):
        if len(word) < 4 or word in _GENERIC:
            continue
        if word.endswith("s") and len(word) > 4:
            word = word[:-1]
        stems.add(word[:5])
    return stems


def shared_content(text: str, source: str) -> int:
    """How many content stems `text` shares with `source`."""
    return len(content_stems(text) & content_stems(source))


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


def check_generation(
    text: str, instructions: frozenset, finish_reason: str, source: str | None = None, min_shared: int = 0
) -> str | None:
    """The first problem of a generation, or None when it looks like a summary.
    `instructions`: instruction_grams() of the prompt templates. `source`: what the
    prompt inserted into its template (the items, earlier summaries); with
    `min_shared` > 0 a text sharing fewer content stems with it is UNGROUNDED."""
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
        text = cut
    if min_shared > 0 and source is not None and shared_content(text, source) < min_shared:
        return UNGROUNDED
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
