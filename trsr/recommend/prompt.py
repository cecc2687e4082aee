"""The recommender prompt (paper section 4.3, Figure 8) and its length guard.

Five parts, in this order, as one user chat message followed by the answer:

    <instruction: answer Yes or No; news/shopping/generic wording>

    [Preference summary]
    <long-term interests: the hierarchical or recurrent summary>

    [Recent items]
    1. <item>            (the K most recent history items, oldest first; K = 3 by
    2. <item>             default, K = 0 leaves the section out)

    [Candidate item]
    <candidate>
    <chat template closing + assistant header> <answer: Yes | No>

The text the model sees is `render_chat(tokenizer, [user message])` followed by the
answer word and the template's end of turn (training), or by nothing (scoring: the
next-token log-probabilities of the two answer words are read there). A tokenizer
without a chat template gets the message text followed by "\\n\\n### Assistant:\\n".

Everything the candidates of one ranking list share comes first, so a list is one
prefix (the rendered text up to the candidate) and one suffix per candidate (candidate
text + the template's closing + assistant header); prefix + suffix is exactly the full
rendered prompt, and the engine computes the prefix once.

Variants:
    hierarchical, recurrent  that summary + the K most recent items
    summary_only             the (hierarchical, unless configured) summary, K = 0
    tallrec                  no summary; as many of the most recent raw history items
                             as fit the length budget (the TALLRec-style baseline)

Length guard (`PromptBuilder.fit`): the prompt plus the answer and end of turn must fit
`max_length` tokens. When it does not, in this order: the summary loses words from
its end (down to `summary_min_words`), the oldest recent items are dropped (down to
one), the remaining item's attribute caps shrink (to 24 characters), the last item is
dropped and the summary shortened further (to nothing). The instruction, the section
headers, the candidate and the answer marker are never cut; a candidate that does not
fit on its own raises `PromptTooLongError`. Ids never appear, only attribute values.

K larger than a user's history: the prompt shows the items that exist. The experiment
can rule it out up front: `RecommendPromptConfig.check_min_history(min_history)`
raises a ConfigError when K exceeds the protocol's min_history (the score job calls it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from trsr.data.text import ELLIPSIS, MIN_CHARS, SHRINK, clean, render_item, scaled_caps
from trsr.domains import DOMAIN_WORDS
from trsr.errors import ConfigError
from trsr.llm.chat import render_chat, user_message
from trsr.llm.engine import PromptTooLongError
from trsr.llm.tokenizer import encode_prompt
from trsr.recommend.config import RecommendPromptConfig

Attributes = Sequence[Mapping[str, str]]

# Private-use characters: never in cleaned item text, never touched by a chat template.
SENTINEL = "\ue000candidate\ue001"
NO_TEMPLATE_ANSWER_MARKER = "\n\n### Assistant:\n"

SUMMARY_HEADER = "[Preference summary]"
ITEMS_HEADER = "[Recent items]"
CANDIDATE_HEADER = "[Candidate item]"

def instruction(config: RecommendPromptConfig) -> str:
    d = DOMAIN_WORDS[config.domain]
    if config.has_summary and config.has_items:
        text = (
            f"Given a summary of a user's {d['preferences']} and the {d['nouns']} they "
            f"{d['past']} most recently (oldest first), predict whether the user will "
            f"{d['verb']} the candidate {d['noun']}. The summary captures long-term "
            f"interests and the recent {d['nouns']} short-term interests; consider both."
        )
    elif config.has_summary:
        text = (
            f"Given a summary of a user's {d['preferences']}, predict whether the user will "
            f"{d['verb']} the candidate {d['noun']}. The summary captures the user's "
            "long-term interests."
        )
    else:
        text = (
            f"Given the {d['nouns']} a user {d['past']} most recently (oldest first), "
            f"predict whether the user will {d['verb']} the candidate {d['noun']}."
        )
    return f"{text} Answer with '{config.yes}' or '{config.no}' only."


# ------------------------------------------------------------------------ tokens


def answer_token_ids(tokenizer, yes: str, no: str) -> tuple[int, int]:
    """The single token ids of the answer words (as `Engine.yes_no_token_ids`)."""
    ids = []
    for role, word in (("yes", yes), ("no", no)):
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ConfigError(
                f"{role} answer word {word!r} is {len(pieces)} tokens "
                f"{tokenizer.convert_ids_to_tokens(pieces)}; it must be exactly one token"
            )
        ids.append(int(pieces[0]))
    if ids[0] == ids[1]:
        raise ConfigError(f"yes {yes!r} and no {no!r} are the same token ({ids[0]})")
    return ids[0], ids[1]


# ------------------------------------------------------------------------ builder


@dataclass
class ListPrompt:
    """One ranking list's prompts: a shared prefix and one suffix per candidate."""

    prefix: str  # rendered chat text up to where the candidate starts
    suffixes: list[str]  # candidate text + template closing + assistant header
    tokens: list[int]  # tokens of each full prompt (prefix + suffix), see _count_all
    history_items: int  # history items shown
    items_dropped: int  # items K (or tallrec) asked for that the guard dropped
    summary_words_cut: int  # words cut from the end of the summary
    caps_shortened: bool  # recent items' attribute caps shrunk by the guard


class PromptBuilder:
    """Renders, fits and splits recommender prompts for one tokenizer."""

    def __init__(self, config: RecommendPromptConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.k = config.k
        self.instruction = instruction(config)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.yes_id, self.no_id = answer_token_ids(tokenizer, config.yes, config.no)
        self.end_of_turn = self._end_of_turn()
        self.reserve = self._check_answer_tokens()
        # The prompt alone (no answer, no end of turn) must fit this many tokens.
        self.budget = config.max_length - self.reserve
        if self.budget < 8:
            raise ConfigError(f"prompt max_length={config.max_length} leaves no room for a prompt")

    # -- parts -----------------------------------------------------------------------
    def answer(self, label: int | bool) -> str:
        return self.config.yes if label else self.config.no

    def item_text(self, attributes: Attributes, scale: float = 1.0) -> str:
        """One item line (ids never appear) with the configured caps times `scale`."""
        return render_item(attributes, self._caps(attributes, scale))

    def _caps(self, attributes: Attributes, scale: float) -> dict[str, int]:
        names = [attribute["name"] for attribute in attributes]
        return scaled_caps(names, self.config.item_max_chars, self.config.attribute_max_chars, scale)

    def user_prefix(self, summary: str | None, recent_items: Sequence[Attributes], scale: float = 1.0) -> str:
        """The user message before the candidate text: instruction, summary, items.

        `recent_items` are shown as given (oldest first); no selection, no guard.
        """
        parts = [self.instruction]
        if self.config.has_summary:
            parts.append(f"{SUMMARY_HEADER}\n{clean(summary or '')}")
        elif summary:
            raise ValueError(f"variant {self.config.variant} takes no summary")
        if self.config.has_items:
            lines = [f"{n}. {self.item_text(item, scale)}" for n, item in enumerate(recent_items, start=1)]
            parts.append(ITEMS_HEADER + "\n" + "\n".join(lines))
        elif recent_items:
            raise ValueError(f"recent_items=0 ({self.config.variant}): no items go in the prompt")
        parts.append(CANDIDATE_HEADER + "\n")
        return "\n\n".join(parts)

    def render(self, user_prefix: str) -> tuple[str, str]:
        """(rendered text up to the candidate, rendered text after it)."""
        rendered = render_chat(self.tokenizer, user_message(user_prefix + SENTINEL))
        if rendered.count(SENTINEL) != 1:
            raise ConfigError("the chat template does not keep the user message intact")
        head, tail = rendered.split(SENTINEL)
        if not self.has_template:
            tail += NO_TEMPLATE_ANSWER_MARKER
        return head, tail

    def full(self, summary: str | None, recent_items: Sequence[Attributes], candidate: Attributes) -> tuple[str, str]:
        """(prefix_text, suffix_text) of one prompt as given (no guard); joined, the
        full rendered prompt the answer follows."""
        head, tail = self.render(self.user_prefix(summary, recent_items))
        return head, self.item_text(candidate) + tail

    # -- guarded -----------------------------------------------------------------------
    def count(self, text: str) -> int:
        return len(encode_prompt(self.tokenizer, text))

    def select(self, history: Sequence[Attributes]) -> list[Attributes]:
        """The history items the variant asks for (oldest first)."""
        if self.k is None:
            return list(history)
        return list(history[-self.k :]) if self.k > 0 else []

    def fit(
        self, summary: str | None, history: Sequence[Attributes], candidates: Sequence[Attributes]
    ) -> ListPrompt:
        """The prompts of one ranking list, fitted to the length budget.

        `history` is the user's whole history (oldest first); the K most recent items
        (all for tallrec) are shown, fewer if the guard must drop some. The user part
        is fitted for the longest candidate, so all candidates share it.
        """
        if not candidates:
            raise ValueError("a ranking list needs at least one candidate")
        words = clean(summary or "").split() if self.config.has_summary else []
        if summary and not self.config.has_summary:
            raise ValueError(f"variant {self.config.variant} takes no summary")
        selected = self.select(history)
        texts = [self.item_text(candidate) for candidate in candidates]
        alone = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        longest_index = max(range(len(texts)), key=alone.__getitem__)
        longest = texts[longest_index]

        budget = self.budget
        for _ in range(4):  # a retry only when a boundary tokenizes longer for another candidate
            n_words, n_items, scale = self._search(words, selected, longest, budget)
            head, tail = self.render(self._user_prefix(words, n_words, selected, n_items, scale))
            suffixes = [text + tail for text in texts]
            tokens = self._count_all(head, suffixes, longest_index)
            over = max(tokens) - self.budget
            if over <= 0:
                return ListPrompt(
                    prefix=head,
                    suffixes=suffixes,
                    tokens=tokens,
                    history_items=n_items,
                    items_dropped=len(selected) - n_items,
                    summary_words_cut=len(words) - n_words,
                    caps_shortened=scale < 1.0,
                )
            budget -= over
        raise PromptTooLongError(f"could not fit the prompt into {self.budget} tokens")

    def training_text(
        self, summary: str | None, history: Sequence[Attributes], candidate: Attributes, label: int | bool
    ) -> str:
        """The full (guarded) prompt + the answer word + the template's end of turn."""
        return self.training_example(summary, history, candidate, label)[0]

    def training_example(
        self, summary: str | None, history: Sequence[Attributes], candidate: Attributes, label: int | bool
    ) -> tuple[str, int, int]:
        """(training text, where its answer starts, history items shown): the one way a
        training text is made (the training-texts stage writes these)."""
        prompt = self.fit(summary, history, [candidate])
        prompt_text = prompt.prefix + prompt.suffixes[0]
        return prompt_text + self.answer(label) + self.end_of_turn, len(prompt_text), prompt.history_items

    def _user_prefix(self, words, n_words, selected, n_items, scale) -> str:
        summary = " ".join(words[:n_words])
        if n_words < len(words) and n_words:
            summary += ELLIPSIS
        items = selected[len(selected) - n_items :] if n_items else []
        return self.user_prefix(summary, items, scale)

    def _search(self, words, selected, longest: str, budget: int) -> tuple[int, int, float]:
        """(summary words kept, recent items kept, cap scale) in the guard's order."""

        def fits(n_words: int, n_items: int, scale: float = 1.0) -> bool:
            head, tail = self.render(self._user_prefix(words, n_words, selected, n_items, scale))
            return self.count(head + longest + tail) <= budget

        total_words, total_items = len(words), len(selected)
        floor = min(self.config.summary_min_words, total_words)
        if fits(total_words, total_items):
            return total_words, total_items, 1.0
        # 1. cut the summary from its end, down to summary_min_words
        if fits(floor, total_items):
            return _largest(floor, total_words, lambda n: fits(n, total_items)), total_items, 1.0
        # 2. drop the oldest recent items, down to one (words freed go back to the summary)
        if total_items > 1 and fits(floor, 1):
            n_items = _largest(1, total_items, lambda n: fits(floor, n))
            return _largest(floor, total_words, lambda n: fits(n, n_items)), n_items, 1.0
        # 3. shrink the attribute caps of the one remaining item
        if total_items >= 1:
            scale = 1.0
            while True:
                scale *= SHRINK
                if fits(floor, 1, scale):
                    return _largest(floor, total_words, lambda n: fits(n, 1, scale)), 1, scale
                if self._at_min_caps(selected[-1], scale):
                    break
        # 4. no items; the summary as long as fits (possibly empty)
        if fits(0, 0):
            return _largest(0, total_words, lambda n: fits(n, 0)), 0, 1.0
        head, tail = self.render(self._user_prefix(words, 0, selected, 0, 1.0))
        tokens = self.count(head + longest + tail)
        raise PromptTooLongError(
            f"the candidate alone does not fit: instruction + headers + candidate take {tokens} "
            f"tokens, the budget is {budget} (max_length={self.config.max_length} minus "
            f"{self.reserve} for the answer and end of turn); raise max_length or lower "
            "item_max_chars / attribute_max_chars"
        )

    def _at_min_caps(self, attributes: Attributes, scale: float) -> bool:
        return all(cap <= MIN_CHARS for cap in self._caps(attributes, scale).values())

    def _count_all(self, prefix: str, suffixes: list[str], longest: int) -> list[int]:
        """Tokens of each prefix + suffix. Counted as prefix tokens + suffix tokens when
        that sum is exact for the longest suffix (the boundary does not merge tokens, as
        with byte-level BPE after the newline); otherwise every joined text is encoded."""
        base = self.count(prefix)
        alone = [len(ids) for ids in self.tokenizer(suffixes, add_special_tokens=False)["input_ids"]]
        if self.count(prefix + suffixes[longest]) == base + alone[longest]:
            return [base + n for n in alone]
        return [self.count(prefix + suffix) for suffix in suffixes]

    # -- answer words ------------------------------------------------------------------
    def _end_of_turn(self) -> str:
        """What the chat template writes after the assistant's answer."""
        eos = self.tokenizer.eos_token or ""
        if not self.has_template:
            return eos
        messages = user_message("probe")
        generation = render_chat(self.tokenizer, messages)
        answer = self.config.yes
        try:
            conversation = self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": answer}], tokenize=False
            )
        except Exception:  # templates that refuse an assistant turn: fall back to EOS
            return eos
        if conversation.startswith(generation + answer):
            return conversation[len(generation) + len(answer) :]
        return eos

    def _check_answer_tokens(self) -> int:
        """Each answer word is the single next token after the assistant header (the
        token scoring reads is the token training teaches); returns the tokens the
        answer and end of turn add."""
        head, tail = self.render(self.user_prefix(None, []))
        prompt = head + "probe" + tail
        base = encode_prompt(self.tokenizer, prompt)
        reserve = 1
        for word, token in ((self.config.yes, self.yes_id), (self.config.no, self.no_id)):
            ids = encode_prompt(self.tokenizer, prompt + word)
            if ids[: len(base)] != base or ids[len(base) :] != [token]:
                pieces = self.tokenizer.convert_ids_to_tokens(ids[len(base) - 1 :])
                raise ConfigError(
                    f"answer word {word!r} after the prompt's assistant header tokenizes as "
                    f"{pieces}, not as the single token {token}; pick answer words that are one "
                    "token there (e.g. ' Yes'/' No' when the header ends without whitespace)"
                )
            reserve = max(reserve, len(encode_prompt(self.tokenizer, prompt + word + self.end_of_turn)) - len(base))
        return reserve


def _largest(low: int, high: int, ok: Callable[[int], bool]) -> int:
    """The largest n in [low, high] with ok(n), given ok(low) and ok monotone (true, then false)."""
    while low < high:
        middle = (low + high + 1) // 2
        if ok(middle):
            low = middle
        else:
            high = middle - 1
    return low
