"""The recommender prompt: parts, prefix/suffix split, length guard, variants, answer tokens."""

import copy

import pytest

from trsr.errors import ConfigError
from trsr.llm.chat import render_chat, user_message
from trsr.llm.engine import PromptTooLongError
from trsr.recommend.config import ScoreConfig
from trsr.recommend.prompt import (
    CANDIDATE_HEADER,
    ITEMS_HEADER,
    SUMMARY_HEADER,
    PromptBuilder,
)
from trsr.llm.tokenizer import encode_prompt, load_tokenizer
from trsr.recommend.config import RecommendPromptConfig


@pytest.fixture(scope="module")
def tokenizer():
    # The tokenizer of the tiny test model (SmolLM2's, ChatML template).
    return load_tokenizer("smollm2-135m-instruct")


def item(n, words=6, **extra):
    attributes = [
        {"name": "category", "value": f"topic{n % 3}"},
        {"name": "title", "value": " ".join(f"w{n}x{k}" for k in range(words))},
    ]
    attributes += [{"name": k, "value": v} for k, v in extra.items()]
    return attributes


def builder(tokenizer, **config):
    return PromptBuilder(RecommendPromptConfig(**config), tokenizer)


SUMMARY = "The user reads about football and local politics, and lately about cooking."


def test_parts_in_order_and_prefix_plus_suffix_is_the_rendered_prompt(tokenizer):
    b = builder(tokenizer, domain="shopping")
    history = [item(n) for n in range(6)]
    prompt = b.fit(SUMMARY, history, [item(100), item(101)])
    assert prompt.history_items == 3 and prompt.items_dropped == 0
    assert prompt.summary_words_cut == 0 and not prompt.caps_shortened
    for candidate, suffix in zip([item(100), item(101)], prompt.suffixes):
        text = prompt.prefix + suffix
        candidate_text = b.item_text(candidate)
        # Exactly render_chat of the user message; the candidate starts the suffix.
        user = b.user_prefix(SUMMARY, history[-3:]) + candidate_text
        assert text == render_chat(tokenizer, user_message(user))
        assert suffix.startswith(candidate_text)
        assert text.endswith("<|im_start|>assistant\n")
        assert b.full(SUMMARY, history[-3:], candidate) == (prompt.prefix, suffix)
    text = prompt.prefix + prompt.suffixes[0]
    order = [
        text.index("predict whether the user will buy"),
        text.index(SUMMARY_HEADER),
        text.index(SUMMARY),
        text.index(ITEMS_HEADER),
        text.index("1. category: topic0; title: w3x0"),  # the 3 most recent, oldest first
        text.index("2. category: topic1; title: w4x0"),
        text.index("3. category: topic2; title: w5x0"),
        text.index(CANDIDATE_HEADER),
        text.index("title: w100x0"),
        text.index("<|im_start|>assistant"),
    ]
    assert order == sorted(order)
    assert "w2x0" not in text  # only K=3 items
    assert prompt.prefix.endswith(CANDIDATE_HEADER + "\n")
    assert prompt.tokens == [len(encode_prompt(tokenizer, prompt.prefix + s)) for s in prompt.suffixes]
    # Training text: prompt + answer + the template's end of turn.
    train = b.training_text(SUMMARY, history, item(100), 1)
    assert train == prompt.prefix + prompt.suffixes[0] + "Yes<|im_end|>\n"
    assert b.training_text(SUMMARY, history, item(100), 0).endswith("assistant\nNo<|im_end|>\n")


def test_domain_wording(tokenizer):
    news = builder(tokenizer).instruction
    shopping = builder(tokenizer, domain="shopping").instruction
    generic = builder(tokenizer, domain="generic").instruction
    assert "read" in news and "click on the candidate news article" in news
    assert "bought" in shopping and "buy the candidate product" in shopping
    assert "interact with the candidate item" in generic
    for text in (news, shopping, generic):
        assert "'Yes' or 'No'" in text


def test_item_text_is_one_line_without_ids(tokenizer):
    b = builder(tokenizer, item_max_chars=40)
    text = b.item_text([{"name": "title", "value": "a\nb\tc " + "long " * 30}, {"name": "abstract", "value": ""}])
    assert "\n" not in text and "\t" not in text and text.startswith("title: a b c")
    assert len(text) <= len("title: ") + 40 and text.endswith("...")
    assert "abstract" not in text  # empty values are left out


def test_guard_never_cuts_candidate_or_answer_marker(tokenizer):
    b = builder(tokenizer, max_length=400, summary_min_words=10)
    summary = "word " * 3000
    history = [item(n, words=200) for n in range(25)]
    candidate = item(999, words=30)
    prompt = b.fit(summary, history, [candidate])
    text = prompt.prefix + prompt.suffixes[0]
    assert prompt.tokens[0] <= 400 - b.reserve
    assert b.item_text(candidate) in text  # whole candidate text
    assert text.endswith(CANDIDATE_HEADER + "\n" + b.item_text(candidate) + "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.summary_words_cut > 0
    train = b.training_text(summary, history, candidate, 1)
    assert train.endswith("assistant\nYes<|im_end|>\n")
    assert len(encode_prompt(tokenizer, train)) <= 400
    # Every candidate of a list shares the fitted prefix and fits.
    candidates = [item(900 + n, words=5 + 4 * n) for n in range(5)]
    prompt = b.fit(summary, history, candidates)
    assert max(prompt.tokens) <= b.budget
    assert all(s.startswith(b.item_text(c)) for s, c in zip(prompt.suffixes, candidates))


def test_candidate_alone_too_long_is_a_clear_error(tokenizer):
    b = builder(tokenizer, max_length=120, item_max_chars=2000)
    with pytest.raises(PromptTooLongError, match="candidate alone does not fit"):
        b.fit(SUMMARY, [item(1)], [item(2, words=400)])


def test_summary_is_shortened_before_recent_items_are_dropped(tokenizer):
    history = [item(n, words=12) for n in range(5)]
    long_summary = " ".join(f"s{k}" for k in range(200))
    b = builder(tokenizer, max_length=2048, summary_min_words=20)
    full = b.fit(long_summary, history, [item(50)])
    assert full.summary_words_cut == 0 and full.history_items == 3
    # A budget the full prompt misses by a little: only the summary gives way.
    b = builder(tokenizer, max_length=full.tokens[0] + b.reserve - 40, summary_min_words=20)
    cut = b.fit(long_summary, history, [item(50)])
    assert cut.summary_words_cut > 0 and cut.history_items == 3 and cut.items_dropped == 0
    assert "s0 s1 s2" in cut.prefix and "s199" not in cut.prefix and "..." in cut.prefix
    # Tighter: the summary stops at summary_min_words, then the oldest items go.
    without_summary = b.fit("", history, [item(50)]).tokens[0]
    b = builder(tokenizer, max_length=without_summary + b.reserve - 10, summary_min_words=20)
    dropped = b.fit(long_summary, history, [item(50)])
    assert 0 < dropped.items_dropped < 3 and not dropped.caps_shortened
    assert len(long_summary.split()) - dropped.summary_words_cut >= 20
    assert "w4x0" in dropped.prefix and "w2x0" not in dropped.prefix  # the most recent stays
    assert dropped.tokens[0] <= b.budget


def test_caps_shrink_after_items_are_dropped(tokenizer):
    history = [item(n, words=120) for n in range(4)]
    b = builder(tokenizer, max_length=260, summary_min_words=5, item_max_chars=2000)
    prompt = b.fit("a b c d e f g", history, [item(7, words=5)])
    assert prompt.tokens[0] <= b.budget
    assert prompt.caps_shortened and prompt.history_items == 1 and prompt.items_dropped == 2
    assert prompt.summary_words_cut == 0  # 7 words: nothing to cut above summary_min_words
    assert "w3x0" in prompt.prefix and "w3x119" not in prompt.prefix  # most recent, shortened
    assert prompt.suffixes[0].startswith(b.item_text(item(7, words=5)))


@pytest.mark.parametrize("variant", ["hierarchical", "summary_only"])
def test_zero_recent_items(tokenizer, variant):
    config = {"recent_items": 0} if variant == "hierarchical" else {}
    b = builder(tokenizer, variant=variant, **config)
    assert b.k == 0
    prompt = b.fit(SUMMARY, [item(n) for n in range(5)], [item(9)])
    text = prompt.prefix + prompt.suffixes[0]
    assert ITEMS_HEADER not in text and "recent" not in b.instruction
    assert SUMMARY in text and prompt.history_items == 0
    with pytest.raises(ValueError):
        b.user_prefix(SUMMARY, [item(1)])


def test_summary_only_reads_hierarchical_summaries_unless_configured():
    assert RecommendPromptConfig(variant="summary_only").mode == "hierarchical"
    assert RecommendPromptConfig(variant="summary_only", summary_mode="recurrent").mode == "recurrent"
    assert RecommendPromptConfig(variant="summary_only", recent_items=2).k == 2
    assert RecommendPromptConfig(variant="recurrent").mode == "recurrent"
    assert RecommendPromptConfig().k == 3 and RecommendPromptConfig().mode == "hierarchical"
    assert RecommendPromptConfig(variant="tallrec").mode is None
    assert RecommendPromptConfig(variant="tallrec").k is None
    with pytest.raises(ValueError, match="tallrec uses no summary"):
        RecommendPromptConfig(variant="tallrec", summary_mode="hierarchical")
    with pytest.raises(ValueError, match="contradicts"):
        RecommendPromptConfig(variant="hierarchical", summary_mode="recurrent")


def test_tallrec_fits_as_many_recent_items_as_possible(tokenizer):
    history = [item(n, words=10) for n in range(20)]
    roomy = builder(tokenizer, variant="tallrec").fit(None, history, [item(99)])
    text = roomy.prefix + roomy.suffixes[0]
    assert SUMMARY_HEADER not in text and "summary" not in text
    assert roomy.history_items == 20 and "20. category" in text
    budget = builder(tokenizer, variant="tallrec").count(text) - 100
    b = builder(tokenizer, variant="tallrec", max_length=budget)
    tight = b.fit(None, history, [item(99)])
    assert 0 < tight.history_items < 20 and tight.items_dropped == 20 - tight.history_items
    assert tight.tokens[0] <= b.budget
    assert "w19x0" in tight.prefix and "w0x0" not in tight.prefix
    # One more item would not have fitted.
    more = b.full(None, history[-(tight.history_items + 1):], item(99))
    assert b.count("".join(more)) > b.budget
    # A cap on tallrec items.
    capped = builder(tokenizer, variant="tallrec", recent_items=5).fit(None, history, [item(99)])
    assert capped.history_items == 5
    with pytest.raises(ValueError):
        builder(tokenizer, variant="tallrec").fit(SUMMARY, history, [item(99)])


def test_short_history_uses_what_exists_and_min_history_check(tokenizer):
    prompt = builder(tokenizer, recent_items=5).fit(SUMMARY, [item(1), item(2)], [item(3)])
    assert prompt.history_items == 2 and prompt.items_dropped == 0
    RecommendPromptConfig(recent_items=5).check_min_history(5)
    with pytest.raises(ConfigError, match="min_history"):
        RecommendPromptConfig(recent_items=5).check_min_history(4)
    RecommendPromptConfig(variant="tallrec").check_min_history(1)


def test_yes_no_token_ids_come_from_the_tokenizer(tokenizer):
    b = builder(tokenizer)
    assert b.yes_id == tokenizer.convert_tokens_to_ids("Yes")
    assert b.no_id == tokenizer.convert_tokens_to_ids("No")
    assert b.yes_id != b.no_id
    # The answer after the assistant header is exactly that one token.
    head, tail = b.full(SUMMARY, [], item(1))
    ids = encode_prompt(tokenizer, head + tail + "Yes")
    assert ids[-1] == b.yes_id and ids[:-1] == encode_prompt(tokenizer, head + tail)
    other = builder(tokenizer, yes="yes", no="no")
    assert other.yes_id == tokenizer.convert_tokens_to_ids("yes") != b.yes_id
    with pytest.raises(ConfigError, match="exactly one token"):
        builder(tokenizer, yes="Absolutely yes")


def test_tokenizer_without_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    b = PromptBuilder(RecommendPromptConfig(), plain)
    prompt = b.fit(SUMMARY, [item(1)], [item(2)])
    text = prompt.prefix + prompt.suffixes[0]
    assert text.startswith(b.instruction) and text.endswith("\n\n### Assistant:\n")
    assert b.training_text(SUMMARY, [item(1)], item(2), 1) == text + "Yes" + plain.eos_token


def test_score_config_checks():
    assert ScoreConfig().method_name == "llm-trsr-hierarchical"
    assert ScoreConfig(prompt={"variant": "tallrec"}).method_name == "tallrec"
    assert ScoreConfig(method="mine.v2").method_name == "mine.v2"
    with pytest.raises(ValueError, match="exceeds engine.max_model_len"):
        ScoreConfig(prompt={"max_length": 4096})
    with pytest.raises(ValueError, match="names a folder"):
        ScoreConfig(method="a/b")
    with pytest.raises(ValueError):
        RecommendPromptConfig(recent_item=3)  # unknown keys are errors
