"""The summarization state of one ranking list's user (STATE), carried from step to
step, with the modes, statuses and refresh kinds it records.

A row holds the list's columns, items, blocks (numbered item text per block), nodes
(summaries of the current level, or [the running summary]), intermediates (every
summary made so far with its level/step and index), tokens_in, tokens_out, calls,
retries, status. `new_state` and `kept_state` make the rows the stages start from.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from trsr.schema import INTERMEDIATE, LISTS, SUMMARY_MISSING, SUMMARY_OK

HIERARCHICAL = "hierarchical"
RECURRENT = "recurrent"
MODES = (HIERARCHICAL, RECURRENT)

OK, MISSING = SUMMARY_OK, SUMMARY_MISSING  # missing: not summarized (beyond summarize.max_users)
PROMPT_TOO_LONG = "prompt_too_long"

# The summarization state of one ranking list's user, carried from step to step: the
# list's own columns (passed through to the summaries) and the work so far.
STATE = pa.schema(
    list(LISTS)
    + [
        pa.field("items", pa.int32()),  # items covered (the window of the history)
        pa.field("first_position", pa.int32()),  # position of the first covered item
        pa.field("blocks", pa.list_(pa.string())),  # numbered item lines per block
        pa.field("nodes", pa.list_(pa.string())),  # summaries of the current level / [running summary]
        pa.field("node_problems", pa.list_(pa.string())),  # the checks' verdict on each node (null: none)
        pa.field("intermediates", pa.list_(INTERMEDIATE)),
        pa.field("tokens_in", pa.int64()),
        pa.field("tokens_out", pa.int64()),
        pa.field("calls", pa.int32()),
        pa.field("retries", pa.int32()),
        pa.field("shortened_blocks", pa.int32()),
        pa.field("trimmed", pa.int32()),
        pa.field("flagged_steps", pa.int32()),
        # ok / missing / prompt_too_long; Finalize turns ok into the final node's problem.
        pa.field("status", pa.string()),
        pa.field("block_count", pa.int32()),  # blocks of the covered history
        # Summaries of an earlier run this run takes instead of generating them
        # (`--update`: the nodes over unchanged blocks), and what this run is for the
        # user: new / updated / recomputed / unchanged (see SUMMARIES.refresh).
        pa.field("reuse", pa.list_(INTERMEDIATE)),
        pa.field("refresh", pa.string()),
    ]
)
NEW, UPDATED, RECOMPUTED, UNCHANGED = "new", "updated", "recomputed", "unchanged"


def new_state(row: dict[str, Any], first_position: int = 0) -> dict[str, Any]:
    """The empty state of a LISTS row (its columns carried along) covering its history
    from `first_position` on."""
    state = {name: row[name] for name in LISTS.names}
    state.update(
        items=len(row["history"]) - first_position,
        first_position=first_position,
        blocks=[],
        nodes=[],
        node_problems=[],
        intermediates=[],
        tokens_in=0,
        tokens_out=0,
        calls=0,
        retries=0,
        shortened_blocks=0,
        trimmed=0,
        flagged_steps=0,
        status=OK,
        block_count=0,
        reuse=[],
        refresh=NEW,
    )
    return state


def kept_state(row: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """The state that writes an earlier SUMMARIES row again as it was ("unchanged"):
    no blocks, so no step generates anything for it."""
    state = new_state(row, earlier["first_position"] or 0)
    state.update(
        items=earlier["items"],
        nodes=[earlier["summary"]] if earlier["summary"] is not None else [],
        node_problems=[None] if earlier["summary"] is not None else [],
        intermediates=earlier["intermediates"] or [],
        status=earlier["status"],
        block_count=earlier["blocks"],
        refresh=UNCHANGED,
    )
    for name in ("tokens_in", "tokens_out", "calls", "retries", "shortened_blocks", "trimmed", "flagged_steps"):
        state[name] = earlier[name]
    return state
