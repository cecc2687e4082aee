"""Summarization mechanics with a tiny random model on the transformers engine (no Ray)."""

import pyarrow as pa
import pytest

from trsr.schema import LISTS, SUMMARIES
from trsr.llm.engine import EngineConfig
from trsr.summarize.config import GenerationConfig, SummarizeConfig
from trsr.summarize.render import RenderBlocks
from trsr.summarize.stages import Finalize, SummarizeStage, steps_needed
from trsr.summarize.state import MISSING, PROMPT_TOO_LONG

ITEMS = {
    f"n{k}": [
        {"name": "Category", "value": ["sports", "travel", "food"][k % 3]},
        {"name": "Title", "value": f"Headline number {k} about {['goals', 'beaches', 'recipes'][k % 3]}"},
    ]
    for k in range(40)
}
USERS = pa.table(
    {
        "list_id": ["test:a", "train:b", "valid:c"],
        "split": ["test", "train", "valid"],
        "user_id": ["a", "b", "c"],
        "list_index": [0, 0, 0],
        "history": [[f"n{k}" for k in range(3)], [f"n{k}" for k in range(3, 10)], [f"n{k}" for k in range(10, 22)]],
        "candidates": [["n30", "n31"], ["n32", "n33"], ["n34", "n35"]],
        "labels": [[1, 0], [0, 1], [1, 0]],
    },
    schema=LISTS,
)


class RecordingEngine:
    """The real engine, with every prompt it receives written down.

    First attempts go to `calls`, retries of flagged outputs (a random model's text is
    mostly flagged) to `retries`, one list per engine call.
    """

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[list[str]] = []
        self.retries: list[list[str]] = []

    def generate(self, prompts, params=None):
        texts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        is_retry = all("Answer in plain sentences" in t for t in texts)
        (self.retries if is_retry else self.calls).append(texts)
        return self.engine.generate(prompts, params)


def make_config(tiny_model, **overrides) -> SummarizeConfig:
    values = dict(
        items_per_block=3,
        fan_in=2,
        engine=EngineConfig(backend="transformers", model=tiny_model, max_model_len=1024, batch_size=8),
        generation=GenerationConfig(max_new_tokens=12),
    )
    values.update(overrides)
    return SummarizeConfig(**values)


@pytest.fixture(scope="module")
def rendered(tiny_model):
    return RenderBlocks(make_config(tiny_model), ITEMS)(USERS)


def test_render_blocks_cuts_histories_and_keeps_every_item(rendered):
    rows = {r["user_id"]: r for r in rendered.to_pylist()}
    assert [len(rows[u]["blocks"]) for u in "abc"] == [1, 3, 4]
    block = rows["b"]["blocks"][0]
    assert block.splitlines()[0] == "1. Category: sports; Title: Headline number 3 about goals"
    assert len(block.splitlines()) == 3
    for user, history in zip(USERS.column("user_id").to_pylist(), USERS.column("history").to_pylist()):
        text = "\n".join(rows[user]["blocks"])
        for item in history:
            number = item[1:]
            assert f"Headline number {number} " in text  # item present...
        assert " n1 " not in f" {text} "  # ...but never its id


def test_hierarchical_levels_receive_the_right_prompts(tiny_model, hf_engine, rendered):
    config = make_config(tiny_model)
    engine = RecordingEngine(hf_engine)
    levels = steps_needed("hierarchical", 4, 2)
    state = rendered
    for level in range(levels):
        state = SummarizeStage(config, "hierarchical", [level], seed=3, engine=engine)(state)
    rows = {r["user_id"]: r for r in state.to_pylist()}
    # Level 0: one block prompt per block over all users, in one batch (8 blocks).
    assert len(engine.calls[0]) == 1 + 3 + 4
    assert all("oldest first" in p for p in engine.calls[0])
    # Level 1: b (3 nodes) -> groups [2, 1]: one merge; c (4 nodes) -> two merges.
    assert len(engine.calls[1]) == 3
    level0 = {u: [i["text"] for i in rows[u]["intermediates"] if i["step"] == 0] for u in "bc"}
    first_merge = engine.calls[1][0]
    assert f"1. {level0['b'][0]}" in first_merge and f"2. {level0['b'][1]}" in first_merge
    # Level 2: b merges its 2 nodes, c merges its 2 nodes; a never merges.
    assert len(engine.calls[2]) == 2
    for user in "abc":
        assert len(rows[user]["nodes"]) == 1 and rows[user]["nodes"][0] == rows[user]["nodes"][0].strip()
    assert rows["a"]["calls"] >= 1 and all(i["step"] == 0 for i in rows["a"]["intermediates"])
    assert rows["a"]["nodes"][0] == rows["a"]["intermediates"][0]["text"]
    assert sum(r["retries"] for r in rows.values()) == sum(len(c) for c in engine.retries)
    assert sum(r["calls"] for r in rows.values()) == 8 + 3 + 2 + sum(len(c) for c in engine.retries)


def test_recurrent_steps_carry_state_and_short_users_finish_early(tiny_model, hf_engine, rendered):
    config = make_config(tiny_model)
    engine = RecordingEngine(hf_engine)
    state = rendered
    for step in range(4):
        state = SummarizeStage(config, "recurrent", [step], seed=3, engine=engine)(state)
    # Step t has one prompt per user with more than t blocks: 3, 2, 2, 1.
    assert [len(c) for c in engine.calls] == [3, 2, 2, 1]
    rows = {r["user_id"]: r for r in state.to_pylist()}
    step1_prompt_b = engine.calls[1][0]
    summary_b0 = [i["text"] for i in rows["b"]["intermediates"] if i["step"] == 0][0]
    assert summary_b0 in step1_prompt_b
    assert rows["b"]["blocks"][1] in step1_prompt_b
    # a finished after step 0 and kept its summary.
    assert rows["a"]["nodes"] == [rows["a"]["intermediates"][0]["text"]]
    assert [i["step"] for i in rows["c"]["intermediates"]] == [0, 1, 2, 3]


def test_fused_equals_per_step_and_is_deterministic(tiny_model, hf_engine, rendered):
    config = make_config(tiny_model)
    per_step = rendered
    for level in range(3):
        per_step = SummarizeStage(config, "hierarchical", [level], seed=3, engine=hf_engine)(per_step)
    fused = SummarizeStage(config, "hierarchical", [0, 1, 2], seed=3, engine=hf_engine)(rendered)
    again = SummarizeStage(config, "hierarchical", [0, 1, 2], seed=3, engine=hf_engine)(rendered)
    assert fused.equals(per_step)
    assert fused.equals(again)
    assert fused.column("user_id").to_pylist() == ["a", "b", "c"]


def test_prompt_that_cannot_fit_is_marked_not_dropped(tiny_model):
    config = make_config(
        tiny_model,
        engine=EngineConfig(backend="transformers", model=tiny_model, max_model_len=260, batch_size=8),
        generation=GenerationConfig(max_new_tokens=40),
    )
    # Ten long attributes per item: even cut to the minimum, 3 items overflow 180 tokens.
    long_items = {k: [{"name": f"Field{j}", "value": "word " * 400} for j in range(10)] for k in ITEMS}
    rows = RenderBlocks(config, long_items)(USERS).to_pylist()
    assert [r["user_id"] for r in rows] == ["a", "b", "c"]
    assert all(r["status"] == PROMPT_TOO_LONG and r["blocks"] == [] for r in rows)


def test_long_attributes_are_shortened_to_fit(tiny_model):
    config = make_config(
        tiny_model,
        engine=EngineConfig(backend="transformers", model=tiny_model, max_model_len=600, batch_size=8),
        generation=GenerationConfig(max_new_tokens=40),
        item_max_chars=2000,
    )
    long_items = {
        k: [{"name": "Title", "value": v[1]["value"]}, {"name": "Abstract", "value": "detail " * 200}]
        for k, v in ITEMS.items()
    }
    rows = RenderBlocks(config, long_items)(USERS).to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    # 8 blocks; b's last block holds a single item and fits without shortening.
    assert sum(r["shortened_blocks"] for r in rows) == 7
    assert all(b.count("\n") == len(b.splitlines()) - 1 for r in rows for b in r["blocks"])
    assert "Headline number 21 " in rows[2]["blocks"][-1]


def test_lists_beyond_the_cap_pass_unsummarized_and_finalize_keeps_every_list(tiny_model, hf_engine):
    config = make_config(tiny_model)
    # A cap of 0 train lists: user b is carried along, never summarized.
    state = RenderBlocks(config, ITEMS, caps={"train": 0, "test": None, "valid": None})(USERS)
    state = SummarizeStage(config, "recurrent", [0, 1, 2, 3], seed=3, engine=hf_engine)(state)
    rows = {r["user_id"]: r for r in state.to_pylist()}
    assert rows["b"]["status"] == MISSING and rows["b"]["calls"] == 0 and rows["b"]["blocks"] == []
    assert rows["a"]["calls"] >= 1 and rows["c"]["calls"] >= 4
    out = Finalize("recurrent", "tiny", "hash", 3)(state)
    assert out.schema.equals(SUMMARIES)
    summaries = {r["user_id"]: r for r in out.to_pylist()}
    assert summaries["b"]["summary"] is None and summaries["b"]["status"] == MISSING
    assert summaries["c"]["summary"] == rows["c"]["nodes"][0] and summaries["c"]["blocks"] == 4
    # The list itself travels with the summary (what scoring and training read).
    assert summaries["c"]["candidates"] == ["n34", "n35"] and summaries["c"]["labels"] == [1, 0]
    assert out.column("list_id").to_pylist() == USERS.column("list_id").to_pylist()


class ScriptedEngine:
    """Answers each prompt by the first rule whose key is in it (a rule's value is the
    generated text and its finish reason): outputs the checks must judge, on demand."""

    def __init__(self, rules: list[tuple[str, str, str]]):
        self.rules = rules
        self.prompts: list[str] = []

    def generate(self, prompts, params=None):
        from trsr.llm.engine import Generation

        out = []
        for prompt in prompts:
            text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            self.prompts.append(text)
            answer, reason = next((a, r) for key, a, r in self.rules if key in text)
            out.append(Generation(answer, 10, 10, reason))
        return out


CLEAN = "The user follows sports results and travel stories, with a growing taste for recipes."


def test_status_describes_the_final_summary_not_intermediate_problems(tiny_model, rendered):
    config = make_config(tiny_model)
    # User c: 4 blocks, fan-in 2 -> levels 0, 1, 2. Its first block (n10..n12) always
    # gets an empty answer (retried, still empty); every other call a clean summary.
    engine = ScriptedEngine([("Headline number 10 ", "", "stop"), ("", CLEAN, "stop")])
    state = SummarizeStage(config, "hierarchical", [0, 1, 2], seed=0, engine=engine)(rendered)
    out = {r["user_id"]: r for r in Finalize("hierarchical", "m", "h", 0)(state).to_pylist()}
    c = out["c"]
    assert c["summary"] == CLEAN and c["status"] == "ok"
    assert c["flagged_steps"] == 1
    assert [(i["step"], i["index"], i["problem"]) for i in c["intermediates"] if i["problem"]] == [(0, 0, "empty")]
    # A flagged final summary is the user's status.
    engine = ScriptedEngine([("Combine them", "", "stop"), ("", CLEAN, "stop")])
    state = SummarizeStage(config, "hierarchical", [0, 1, 2], seed=0, engine=engine)(rendered)
    out = {r["user_id"]: r for r in Finalize("hierarchical", "m", "h", 0)(state).to_pylist()}
    assert out["c"]["status"] == "empty" and out["a"]["status"] == "ok"  # a: one block, no merge
    # Recurrent: a flagged first step, clean updates after it -> ok.
    engine = ScriptedEngine([("Here are news", "", "stop"), ("", CLEAN, "stop")])
    state = SummarizeStage(config, "recurrent", [0, 1, 2, 3], seed=0, engine=engine)(rendered)
    out = {r["user_id"]: r for r in Finalize("recurrent", "m", "h", 0)(state).to_pylist()}
    assert out["c"]["status"] == "ok" and out["c"]["flagged_steps"] == 1
    assert out["a"]["status"] == "empty"  # one block: its only step is its final summary


def test_a_summary_cut_at_the_token_limit_ends_on_a_sentence(tiny_model, rendered):
    config = make_config(tiny_model)
    cut = "The user follows sports results closely, likes beach travel and seaside towns, and reads recipes for"
    engine = ScriptedEngine([("", cut, "length")])
    state = SummarizeStage(config, "recurrent", [0, 1, 2, 3], seed=0, engine=engine)(rendered)
    out = {r["user_id"]: r for r in Finalize("recurrent", "m", "h", 0)(state).to_pylist()}
    assert out["c"]["summary"] == "The user follows sports results closely, likes beach travel and seaside towns."
    assert out["c"]["status"] == "ok" and out["c"]["trimmed"] == 4


PERSONA = "I am an AI designed to assist people with editing their documents and emails."


def test_an_ungrounded_summary_is_retried_and_kept_only_when_the_retry_is_grounded(tiny_model, rendered):
    # Every first answer is persona text, which shares no word with the headlines.
    # The retry (it carries the grounding reminder) answers about the items for every
    # block but user a's only one.
    rules = [
        ("Headline number 0 ", PERSONA, "stop"),
        ("using only what the articles above show", CLEAN, "stop"),
        ("", PERSONA, "stop"),
    ]
    config = make_config(tiny_model, generation=GenerationConfig(max_new_tokens=12, min_shared_words=1))
    state = SummarizeStage(config, "hierarchical", [0, 1, 2], seed=0, engine=ScriptedEngine(rules))(rendered)
    out = {r["user_id"]: r for r in Finalize("hierarchical", "m", "h", 0)(state).to_pylist()}
    assert out["a"]["status"] == "ungrounded" and out["a"]["summary"] == PERSONA  # kept as text, not usable
    assert out["a"]["retries"] == 1
    for user in ("b", "c"):
        assert out[user]["status"] == "ok" and out[user]["summary"] == CLEAN
        assert out[user]["retries"] == out[user]["calls"] / 2  # every call retried once
        assert all(node["problem"] is None for node in out[user]["intermediates"])
    # With the check off, the persona text is a well-formed summary.
    config = make_config(tiny_model)
    state = SummarizeStage(config, "hierarchical", [0, 1, 2], seed=0, engine=ScriptedEngine(rules))(rendered)
    out = {r["user_id"]: r for r in Finalize("hierarchical", "m", "h", 0)(state).to_pylist()}
    assert {r["status"] for r in out.values()} == {"ok"} and out["c"]["retries"] == 0
    # Recurrent updates are grounded in the earlier summary and the new items: an update
    # that keeps the (grounded) earlier summary's words passes.
    config = make_config(tiny_model, generation=GenerationConfig(max_new_tokens=12, min_shared_words=1))
    engine = ScriptedEngine([("Here are news", CLEAN, "stop"), ("", "The user follows sports results.", "stop")])
    state = SummarizeStage(config, "recurrent", [0, 1, 2, 3], seed=0, engine=engine)(rendered)
    out = {r["user_id"]: r for r in Finalize("recurrent", "m", "h", 0)(state).to_pylist()}
    assert out["c"]["status"] == "ok" and out["c"]["retries"] == 0


def test_a_flagged_node_does_not_spoil_the_summary_built_on_it(tiny_model, rendered):
    config = make_config(tiny_model)
    # User c: 4 blocks (n10-12, n13-15, n16-18, n19-21). Block 1's summary is always
    # empty (also on retry).
    rules = [("Headline number 13 ", "", "stop"), ("", CLEAN, "stop")]
    engine = ScriptedEngine(rules)
    state = SummarizeStage(config, "hierarchical", [0, 1, 2], seed=0, engine=engine)(rendered)
    out = {r["user_id"]: r for r in Finalize("hierarchical", "m", "h", 0)(state).to_pylist()}
    c = out["c"]
    assert c["status"] == "ok" and c["summary"] == CLEAN and c["flagged_steps"] == 1
    # Level 1: blocks 0 and 1 -> block 1 is empty, so block 0's summary moves up alone
    # (no merge call); blocks 2 and 3 merge. Level 2 merges the two. No merge prompt
    # carries an empty summary.
    merges = [p for p in engine.prompts if "Combine them" in p]
    assert len(merges) == 2 + 2  # b (3 blocks): 2 merges; c: one at level 1 (not 2), one at level 2
    assert all("1. \n" not in p and "2. \n" not in p for p in merges)
    # Recurrent: the update with block 3 is empty: c keeps its summary so far (clean),
    # the flagged step stays on record.
    rules = [("Headline number 19 ", "", "stop"), ("", CLEAN, "stop")]
    state = SummarizeStage(config, "recurrent", [0, 1, 2, 3], seed=0, engine=ScriptedEngine(rules))(rendered)
    c = {r["user_id"]: r for r in Finalize("recurrent", "m", "h", 0)(state).to_pylist()}["c"]
    assert c["status"] == "ok" and c["summary"] == CLEAN and c["flagged_steps"] == 1
    assert [(i["step"], i["problem"]) for i in c["intermediates"] if i["problem"]] == [(3, "empty")]
    # A flagged summary so far is replaced by a clean update (nothing to keep).
    rules = [("Headline number 10 ", "", "stop"), ("", CLEAN, "stop")]
    state = SummarizeStage(config, "recurrent", [0, 1, 2, 3], seed=0, engine=ScriptedEngine(rules))(rendered)
    c = {r["user_id"]: r for r in Finalize("recurrent", "m", "h", 0)(state).to_pylist()}["c"]
    assert c["status"] == "ok" and c["summary"] == CLEAN
