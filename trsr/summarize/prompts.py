"""Summarization prompt templates: block summary, hierarchical merge, recurrent update.

Our own wording, following the structure of the paper's Figures 3, 4, 6 and 7. Each
template is a user message (the engine applies the model's chat template) with
placeholders: {items} (numbered item lines), {summaries} (numbered summaries) and
{summary} (the previous summary). Presets exist for news, shopping and a generic
domain; any template can be replaced from a YAML file with keys block/merge/update.

The templates ask for two to four sentences whatever generation.max_new_tokens is:
measured on the demo's blocks with SmolLM2-135M at 40 tokens, asking instead for "one
or two sentences, at most 24 words" made the model copy the item list out in half of
them (48 of 96 usable, against 94 of 96 with this wording and the cut at a sentence
or clause boundary that trsr.summarize.checks applies to text that hits the limit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from trsr.domains import DOMAIN_WORDS, DOMAINS
from trsr.errors import ConfigError

REQUIRED = {"block": ("{items}",), "merge": ("{summaries}",), "update": ("{summary}", "{items}")}

STYLES = ("free_form", "attributes")


def _preset(domain: str, style: str = "free_form") -> dict[str, str]:
    if style == "attributes":
        return _attributes_preset(domain)
    d = DOMAIN_WORDS[domain]
    return {
        "block": (
            f"Here are {d['what']}, oldest first.\n\n"
            "{items}\n\n"
            f"In two to four sentences, describe this user's {d['interests']}: the topics, "
            f"kinds of {d['items']} and details they seem to care about. Describe the user; "
            f"do not list the {d['items']} one by one."
        ),
        "merge": (
            f"Here are summaries of one user's {d['interests']}, each covering a later "
            "period than the one before.\n\n"
            "{summaries}\n\n"
            f"Combine them into one concise summary (two to four sentences) of the user's "
            f"overall {d['interests']}: keep what recurs, mention recent shifts, and write "
            "in the same style as the summaries above."
        ),
        "update": (
            f"Here is a summary of a user's {d['interests']} so far.\n\n"
            "Summary: {summary}\n\n"
            f"Then the user had these {d['items']}, oldest first:\n\n"
            "{items}\n\n"
            f"Write an updated concise summary (two to four sentences) of the user's "
            f"{d['interests']} that takes both into account: keep lasting interests, add new "
            "ones, note any change, and describe the user as a whole in the style of the "
            "previous summary."
        ),
    }


def _attributes_preset(domain: str) -> dict[str, str]:
    """Ask a small model for what it can do faithfully: name what recurs in the items
    (kinds, series, brands, platforms, themes) in the items' own words, rather than
    describe a person in free prose (which a 135M model fills with places, brands and
    styles found nowhere in the history; see trsr.evaluate.summary_probe)."""
    d = DOMAIN_WORDS[domain]
    keep = (
        f"Use the words of the {d['items']} (series, brands, platforms, genres, topics); "
        "add nothing that is not in them"
    )
    return {
        "block": (
            f"Here are {d['what']}, oldest first.\n\n"
            "{items}\n\n"
            f"In one or two sentences, say which kinds of {d['items']}, series, brands, platforms "
            f"and themes this user's {d['interests']} keep returning to. {keep}."
        ),
        "merge": (
            f"Here are notes on one user's {d['interests']}, each covering a later period "
            "than the one before.\n\n"
            "{summaries}\n\n"
            f"Combine them into one note of one or two sentences that names the kinds of "
            f"{d['items']}, series, brands, platforms and themes that recur, the most frequent "
            f"first. {keep}."
        ),
        "update": (
            f"Here is a note on a user's {d['interests']} so far.\n\n"
            "Note: {summary}\n\n"
            f"Then the user had these {d['items']}, oldest first:\n\n"
            "{items}\n\n"
            f"Rewrite the note in one or two sentences so that it names the kinds of "
            f"{d['items']}, series, brands, platforms and themes that recur in both, the most "
            f"frequent first. {keep}."
        ),
    }


@dataclass(frozen=True)
class PromptSet:
    block: str
    merge: str
    update: str

    @property
    def hash(self) -> str:
        blob = "\x1e".join((self.block, self.merge, self.update))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def block_prompt(self, items: str) -> str:
        return self.block.replace("{items}", items)

    def merge_prompt(self, summaries: list[str]) -> str:
        return self.merge.replace("{summaries}", numbered(summaries, blank_line=True))

    def update_prompt(self, summary: str, items: str) -> str:
        return self.update.replace("{summary}", summary).replace("{items}", items)


def numbered(lines: list[str], blank_line: bool = False) -> str:
    separator = "\n\n" if blank_line else "\n"
    return separator.join(f"{k}. {line}" for k, line in enumerate(lines, start=1))


def load_prompts(domain: str, override_file: str | None = None, style: str = "free_form") -> PromptSet:
    """The preset for `domain` and `style`, with templates replaced from `override_file`
    if given."""
    if domain not in DOMAIN_WORDS:
        raise ConfigError(f"summarize.domain: unknown domain {domain!r}; one of {DOMAINS}")
    if style not in STYLES:
        raise ConfigError(f"summarize.style: unknown style {style!r}; one of {STYLES}")
    templates = _preset(domain, style)
    if override_file:
        path = Path(override_file)
        if not path.is_file():
            raise ConfigError(f"{path}: prompt template file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        unknown = set(data) - set(REQUIRED)
        if unknown:
            raise ConfigError(f"{path}: unknown template(s) {sorted(unknown)}; allowed {sorted(REQUIRED)}")
        templates.update({k: str(v) for k, v in data.items()})
    for name, placeholders in REQUIRED.items():
        for placeholder in placeholders:
            if placeholder not in templates[name]:
                origin = override_file or f"preset {domain}"
                raise ConfigError(f"{origin}: template {name!r} lacks the placeholder {placeholder}")
    return PromptSet(**templates)
