import itertools

import pytest

from trsr.errors import ConfigError
from trsr.summarize.checks import (
    _grams,
    _words,
    check_generation,
    content_stems,
    end_on_sentence,
    instruction_grams,
    shared_content,
    trim_to_sentence,
)
from trsr.domains import DOMAINS
from trsr.summarize.prompts import load_prompts
from trsr.summarize.segment import PromptTooLong, blocks_of, fit_prompt, render_items
from trsr.summarize.stages import steps_needed


def test_presets_differ_by_domain_and_fill_placeholders():
    news, shopping = load_prompts("news"), load_prompts("shopping")
    assert "news" in news.block and "shopping" in shopping.block
    assert news.hash != shopping.hash
    for domain, style in itertools.product(DOMAINS, ("free_form", "attributes")):
        prompts = load_prompts(domain, style=style)
        assert "1. A" in prompts.block_prompt("1. A")
        merged = prompts.merge_prompt(["first", "second"])
        assert "1. first" in merged and "2. second" in merged
        update = prompts.update_prompt("likes sport", "1. B")
        assert "likes sport" in update and "1. B" in update
        assert "{" not in update


def test_styles_ask_for_different_things_and_the_config_picks_one():
    from trsr.summarize.config import SummarizeConfig

    free, attributes = load_prompts("shopping"), load_prompts("shopping", style="attributes")
    assert free.hash != attributes.hash  # the summaries' fingerprint follows the wording
    assert "describe this user" in free.block and "recur" in attributes.merge
    assert SummarizeConfig(domain="shopping", style="attributes").prompts() == attributes
    with pytest.raises(ConfigError, match="unknown style"):
        load_prompts("news", style="haiku")


def test_override_file_replaces_templates_and_is_validated(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("block: 'Summarize: {items}'\n")
    prompts = load_prompts("news", str(path))
    assert prompts.block_prompt("X") == "Summarize: X"
    assert prompts.merge == load_prompts("news").merge
    path.write_text("block: 'no placeholder'\n")
    with pytest.raises(ConfigError, match="placeholder"):
        load_prompts("news", str(path))
    path.write_text("blok: '{items}'\n")
    with pytest.raises(ConfigError, match="unknown template"):
        load_prompts("news", str(path))
    with pytest.raises(ConfigError, match="unknown domain"):
        load_prompts("sports")


def test_blocks_keep_every_item_in_order():
    items = list(range(23))
    blocks = blocks_of(items, 5)
    assert [len(b) for b in blocks] == [5, 5, 5, 5, 3]
    assert sum(blocks, []) == items


def test_fit_prompt_shortens_long_values_but_keeps_every_item():
    items = [[{"name": "Title", "value": f"item {k} " + "long words " * 60}] for k in range(5)]
    count = lambda text: len(text.split())  # noqa: E731 - a simple token count

    def build(caps):
        return "Summarize:\n" + render_items(items, caps)

    prompt, tokens, caps, shortened = fit_prompt(build, count, 200, {"Title"}, 300)
    assert shortened and tokens <= 200
    assert caps["Title"] < 300
    for k in range(5):
        assert f"{k + 1}. Title: item {k}" in prompt
    with pytest.raises(PromptTooLong):
        fit_prompt(build, count, 10, {"Title"}, 300)


def test_steps_needed():
    assert steps_needed("recurrent", 5, 2) == 5
    assert steps_needed("hierarchical", 1, 2) == 1
    assert steps_needed("hierarchical", 2, 2) == 2
    assert steps_needed("hierarchical", 5, 2) == 4  # 5 -> 3 -> 2 -> 1
    assert steps_needed("hierarchical", 5, None) == 2  # paper: one merge of all
    assert steps_needed("hierarchical", 9, 3) == 3  # 9 -> 3 -> 1


def test_output_checks():
    prompts = load_prompts("news")
    instructions = instruction_grams(prompts.block, prompts.merge, prompts.update)
    assert check_generation("", instructions, "stop") == "empty"
    assert check_generation("sports " * 40, instructions, "stop") == "repetitive"
    echo = "Describe the user; do not list the articles one by one. Here are news articles this user read"
    assert check_generation(echo, instructions, "stop") == "echo"
    # Repeating the items' own words is what a summary does: not an echo, although
    # every 4-gram of it is in the prompt that carried the item.
    title = "Budget vote in the senate tonight as leaders meet to agree on spending cuts"
    # ... but copying the numbered item list out is.
    assert check_generation("The user's interests are:\n1. Category: politics; Title: Budget vote\n2.", instructions, "length") == "echo"
    assert check_generation("The user's interests are: 1. Sports; 2. Finance; 3. Sports; 4.", instructions, "stop") == "echo"
    assert check_generation(title, instructions, "stop") is None
    assert check_generation(title, frozenset(_grams(_words(prompts.block_prompt("1. " + title)))), "stop") == "echo"
    fine = "The user follows politics, especially budget debates, and local news."
    assert check_generation(fine, instructions, "stop") is None
    assert check_generation(fine, instructions, "length") is None  # complete sentence: trimmed, accepted
    # No sentence end: cut at the last clause boundary and closed with a period.
    clause = "The user follows politics and budget debates in detail, and local news and"
    assert check_generation(clause, instructions, "length") is None
    assert end_on_sentence(clause) == "The user follows politics and budget debates in detail."
    assert check_generation("The user follows politics and budget debates and local news and", instructions, "length") == "over_length"
    assert trim_to_sentence("One sentence here. Another one is cut") == "One sentence here."
    # A list number is no sentence end.
    assert end_on_sentence("The user reads travel and food news, mostly recipes. Interests:\n1. Travel\n2.") == (
        "The user reads travel and food news, mostly recipes."
    )


PERSONA = "I am an AI designed to assist people with editing their documents and emails."


def test_grounding_check_flags_text_about_something_else():
    items = "1. Category: Strategy; Title: Civilization VI - PC\n2. Category: Puzzles; Title: Tetris Effect"
    about = "The user plays strategy games such as Civilization and likes a good puzzle."
    persona = PERSONA
    # Plurals and word forms meet: "strategies" / "strategy", "puzzles" / "puzzle".
    assert {"strat", "puzzl", "civil"} <= content_stems(about) & content_stems(items)
    assert shared_content(persona, items) == 0
    assert check_generation(about, frozenset(), "stop", items, min_shared=1) is None
    assert check_generation(persona, frozenset(), "stop", items, min_shared=1) == "ungrounded"
    assert check_generation(about, frozenset(), "stop", items, min_shared=4) == "ungrounded"
    # Off (0) or no source: no grounding check.
    assert check_generation(persona, frozenset(), "stop", items, min_shared=0) is None
    assert check_generation(persona, frozenset(), "stop", None, min_shared=1) is None
    # Generic words of any description of a person ("user", "enjoys", "interests")
    # ground nothing.
    assert shared_content("The user enjoys many things and has various interests.", "user enjoys interests various") == 0
    # Text cut at the token limit is judged on what is kept.
    cut = PERSONA + " The user plays strategy games and"
    assert check_generation(cut, frozenset(), "length", items, min_shared=1) == "ungrounded"
    assert check_generation(cut, frozenset(), "stop", items, min_shared=1) is None
