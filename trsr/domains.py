"""The words of a catalogue's domain, for every prompt trsr writes (one vocabulary).

The summarizer's templates (trsr.summarize.prompts) and the recommender's instruction
(trsr.recommend.prompt) both take their nouns and verbs from DOMAIN_WORDS, and one
setting picks the domain: `summarize.domain` and `score.prompt.domain` are the same
field, so an experiment checks they agree (trsr.experiment).

Keys:
    what             the summarizer's opening: what the listed items are
    interests        what a summary describes (summarizer)
    preferences      what a summary describes (recommender instruction)
    items            the items, short (summarizer: "describe the articles one by one")
    noun, nouns      one item / items (recommender)
    past, verb       what the user did with past items / may do with the candidate
"""

from __future__ import annotations

from typing import Literal

Domain = Literal["news", "shopping", "generic"]

DOMAIN_WORDS: dict[str, dict[str, str]] = {
    "news": dict(
        what="news articles this user read",
        interests="news reading interests",
        preferences="news reading preferences",
        items="articles",
        noun="news article",
        nouns="news articles",
        past="read",
        verb="click on",
    ),
    "shopping": dict(
        what="products this user bought",
        interests="shopping preferences",
        preferences="shopping preferences",
        items="products",
        noun="product",
        nouns="products",
        past="bought",
        verb="buy",
    ),
    "generic": dict(
        what="items this user interacted with",
        interests="preferences",
        preferences="preferences",
        items="items",
        noun="item",
        nouns="items",
        past="interacted with",
        verb="interact with",
    ),
}
DOMAINS = tuple(DOMAIN_WORDS)
