"""The first batch stage of summarization: a plain class over Arrow batches (no Ray
inside) that makes each user's summarization state (`trsr.summarize.state`).

`RenderBlocks` (CPU, tokenizer only) cuts each history into blocks and fits them to
the token budget; for an `--update` it keeps unchanged users as they were and marks
the earlier summaries a user's new state can reuse (`reusable`). A job hands it to
the stage runner (trsr.runner); a unit test calls it directly.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from trsr.schema import ALL_USERS, LISTS
from trsr.summarize.config import SummarizeConfig
from trsr.data.text import MIN_CHARS, scaled_caps
from trsr.summarize.segment import PromptTooLong, blocks_of, fit_prompt, render_items
from trsr.summarize.state import MISSING, PROMPT_TOO_LONG, RECOMPUTED, RECURRENT, STATE, UPDATED, kept_state, new_state


class RenderBlocks:
    """Ranking lists (LISTS rows) -> the state of each user: history item ids -> blocks
    of numbered item lines that fit the prompt budget.

    The budget reserves room for the generated text and, for recurrent updates, for
    the previous summary, so every later prompt built from these blocks fits too.
    `caps` (split -> lists to summarize, None = all): a list whose list_index is at or
    beyond its split's cap is passed on unsummarized (status "missing").

    Input rows are ranking lists (LISTS) or users (SEQUENCES: user_id, item_ids; the
    summarize.users "all" path), which become list-shaped rows (`lists_of_users`).
    `config.history_window` (blocks) keeps the last whole blocks of a history, anchored
    at absolute positions, so that new interactions only change the last block.
    """

    def __init__(self, config: SummarizeConfig, items, caps: dict[str, int | None] | None = None, mode: str | None = None):
        from trsr.data.catalogue import Catalogue
        from trsr.llm.chat import render_chat, user_message
        from trsr.llm.tokenizer import count_prompt_tokens, load_tokenizer

        self.config = config
        self.caps = caps or {}
        self.mode = mode  # what the reusable summaries of an --update are (None: no update)
        # A path (items.parquet) lets each Ray actor load the catalogue itself.
        self.items = Catalogue.load(items) if isinstance(items, str) else Catalogue.from_mapping(items)
        self.prompts = config.prompts()
        tokenizer = load_tokenizer(config.engine.model)
        self._count_many = lambda texts: count_prompt_tokens(
            tokenizer, [render_chat(tokenizer, user_message(text)) for text in texts]
        )
        self._counted: dict[str, int] = {}
        generated = config.generation.max_new_tokens
        self.budget = config.engine.max_model_len - 2 * generated
        # The longest previous summary an update prompt can carry: max_new_tokens.
        self._placeholder_summary = " ".join(["word"] * generated)
        self.attribute_names = self.items.attribute_names

    def __call__(self, batch: pa.Table) -> pa.Table:
        previous = batch.column("previous").to_pylist() if "previous" in batch.column_names else [None] * batch.num_rows
        if "item_ids" in batch.column_names:
            batch = lists_of_users(batch)
        lists = batch.select(LISTS.names).to_pylist()
        todo = [row for row, earlier in zip(lists, previous) if not self._beyond_cap(row) and not self._unchanged(row, earlier)]
        self._count_full_size(todo)
        rows = []
        for row, earlier in zip(lists, previous):
            if self._beyond_cap(row):
                state = new_state(row)
                state["status"] = MISSING
                rows.append(state)
            elif self._unchanged(row, earlier):
                rows.append(kept_state(row, earlier))
            else:
                state = self.render_user(row)
                if earlier is not None:
                    reuse = reusable(earlier, state, self.config.items_per_block, self.config.fan_in, self.mode)
                    state["reuse"] = reuse or []
                    state["refresh"] = UPDATED if reuse else RECOMPUTED
                rows.append(state)
        self._counted = {}
        return pa.Table.from_pylist(rows, schema=STATE)

    def _unchanged(self, row: dict[str, Any], earlier: dict[str, Any] | None) -> bool:
        """The earlier run's row stands: same history (the settings were checked to be
        the same before the stage started)."""
        return earlier is not None and list(earlier["history"]) == list(row["history"])

    def _beyond_cap(self, row: dict[str, Any]) -> bool:
        cap = self.caps.get(row["split"])
        return cap is not None and row["list_index"] >= cap

    def _count(self, text: str) -> int:
        if text not in self._counted:
            self._counted[text] = self._count_many([text])[0]
        return self._counted[text]

    def _count_full_size(self, rows: list[dict[str, Any]]) -> None:
        """Count every block's prompt at full-size item texts in one tokenizer call:
        most blocks fit as they are, and one batched call is several times cheaper than
        one call per block. Blocks that do not fit are shortened one by one after."""
        caps = scaled_caps(self.attribute_names, self.config.item_max_chars, self.config.attribute_max_chars, 1.0, MIN_CHARS)
        prompts = []
        for row in rows:
            if self.items.missing(row["history"]):
                continue  # render_user raises for it
            for block in blocks_of(row["history"], self.config.items_per_block):
                prompts.append(self.prompts.update_prompt(self._placeholder_summary, render_items(self.items.attributes(block), caps)))
        unique = [p for p in dict.fromkeys(prompts) if p not in self._counted]
        if unique:
            self._counted.update(zip(unique, self._count_many(unique)))

    def render_user(self, row: dict[str, Any]) -> dict[str, Any]:
        history = row["history"]
        missing = self.items.missing(history)
        if missing:
            # Prepared data only holds catalogue items; this guards hand-made inputs.
            raise KeyError(f"user {row['user_id']}: history item(s) {missing[:5]} not in items.parquet")
        state = new_state(row, window_start(len(history), self.config.items_per_block, self.config.history_window))
        if not history:
            state["status"] = MISSING  # nothing to summarize
            return state
        blocks = []
        for block in blocks_of(history[state["first_position"] :], self.config.items_per_block):
            attributes = self.items.attributes(block)

            def build(caps, attributes=attributes) -> str:
                return self.prompts.update_prompt(self._placeholder_summary, render_items(attributes, caps))

            try:
                _, _, caps, shortened = fit_prompt(
                    build,
                    self._count,
                    self.budget,
                    self.attribute_names,
                    self.config.item_max_chars,
                    self.config.attribute_max_chars,
                )
            except PromptTooLong:
                state["status"] = PROMPT_TOO_LONG
                state["blocks"] = []
                return state
            blocks.append(render_items(attributes, caps))
            state["shortened_blocks"] += int(shortened)
        state["blocks"] = blocks
        state["block_count"] = len(blocks)
        return state


def reusable(earlier: dict[str, Any], state: dict[str, Any], items_per_block: int, fan_in: int | None, mode: str | None) -> list[dict]:
    """The earlier run's summaries that a run over the new history would generate again
    unchanged: those whose prompts depend only on blocks the new history shares with the
    old one. The new history must extend the old (same items, same window start);
    blocks before the first one that changed (the old last block when it was partial,
    else the first new one) are shared. A hierarchical node at level l, index i covers
    blocks [i*f^l, (i+1)*f^l) (f = fan_in; with one merge of all, only level 0 is
    reusable); a recurrent step s covers blocks [0, s]. [] when nothing can be reused."""
    old, new = list(earlier["history"]), list(state["history"])
    start = earlier["first_position"] or 0
    if mode is None or start != state["first_position"] or len(new) < len(old) or new[: len(old)] != old:
        return []
    shared = (len(old) - start) // items_per_block  # whole blocks before the first changed one
    out = []
    for node in earlier["intermediates"] or []:
        step, index = node["step"], node["index"]
        if mode == RECURRENT:
            covered_end = step + 1
        elif step == 0:
            covered_end = index + 1
        elif fan_in:
            covered_end = (index + 1) * fan_in**step
        else:
            continue  # the single merge covers every block
        if covered_end <= shared:
            out.append(node)
    return out


def window_start(items: int, items_per_block: int, window: int | None) -> int:
    """Position of the first item a summary covers: the start of the `window`-th block
    from the end (None: 0). Blocks are anchored at position 0, so the window moves a
    whole block at a time and never shifts a block's boundaries."""
    if window is None:
        return 0
    blocks = math.ceil(items / items_per_block)
    return max(0, blocks - window) * items_per_block


def lists_of_users(batch: pa.Table) -> pa.Table:
    """SEQUENCES rows (user_id, item_ids) -> LISTS rows: one per user, keyed by user_id,
    split "all", the whole history and no candidates."""
    n = batch.num_rows
    users = batch.column("user_id").cast(pa.string())
    return pa.Table.from_arrays(
        [
            users,
            pa.array([ALL_USERS] * n, pa.string()),
            users,
            pa.array([0] * n, pa.int32()),
            batch.column("item_ids").cast(pa.list_(pa.string())),
            pa.array([[]] * n, pa.list_(pa.string())),
            pa.array([[]] * n, pa.list_(pa.int8())),
        ],
        schema=LISTS,
    )
