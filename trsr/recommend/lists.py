"""Ranking lists as the recommender stages read them (scoring and training texts).

A ranking list is one user's candidates for one split (prepared/lists, schema LISTS).
The stages that prompt the recommender read lists from:

    summaries/<mode>/       every list with its user's summary (variants with a summary)
    prepared/lists/<split>  the lists alone (tallrec: no summary)

filtered to one split and, optionally, to the first N lists (`list_index < N`: a
filter, not a limit, so that a resumed run selects the same rows). The first step of
those stages, `AttachItems`, looks the items up in the catalogue (loaded once per
actor) and hands on PROMPT_LISTS rows: the summary (when usable), the K most recent
history items and each candidate with their attributes.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from trsr.data.catalogue import Catalogue
from trsr.data.schema import ATTRIBUTE, LISTS
from trsr.errors import TrsrError
from trsr.runs import RunFolder, StageFolder

OK = "ok"
MISSING = "missing"  # no usable summary row for the user
UNUSED = "unused"  # tallrec: no summary in the prompt

# One ranking list with everything the recommender prompt shows.
PROMPT_LISTS = pa.schema(
    [
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        # The user's preference summary; null when missing or unused.
        pa.field("summary", pa.string()),
        # "ok", "missing", "unused" (tallrec) or the summarizer's status ("echo", ...);
        # a summary is shown only when "ok".
        pa.field("summary_status", pa.string(), nullable=False),
        # Attributes of the history items the prompt may show, oldest first (the K most
        # recent for the summary variants; all for tallrec).
        pa.field("history", pa.list_(pa.list_(ATTRIBUTE)), nullable=False),
        pa.field("candidates", pa.list_(pa.string()), nullable=False),
        pa.field("candidate_attributes", pa.list_(pa.list_(ATTRIBUTE)), nullable=False),
        pa.field("labels", pa.list_(pa.int8()), nullable=False),
    ]
)


def source(run: RunFolder, mode: str | None) -> tuple[list[str], str]:
    """(Parquet files, what they are) that hold the lists of a variant reading `mode`
    summaries (None: the prepared lists of every split)."""
    if mode is None:
        from trsr.data.schema import SPLITS

        return [run.lists(split) for split in SPLITS], "prepared lists"
    folder: StageFolder = run.summaries(mode)
    folder.require(
        f"run `trsr summarize` with {mode} among summarize.modes first (variant tallrec needs no summaries)"
    )
    return folder.data_files(), folder.name


def input_fingerprints(run: RunFolder, prompt) -> tuple[str, str | None]:
    """Fingerprints of the prepared data and (for variants with a summary) the
    summaries the prompt `prompt` (RecommendPromptConfig) reads; clear errors when the
    stage that writes them has not run."""
    prepared = run.prepared_fingerprint()
    mode = prompt.mode
    summaries = None
    if mode is not None:
        summaries = run.summaries(mode).require(
            f"run `trsr summarize` with {mode} among summarize.modes first (variant "
            f"{prompt.variant} reads {mode} summaries; variant tallrec needs none)"
        )
    return prepared, summaries


def where(split: str, max_lists: int | None) -> list[tuple[str, str, Any]]:
    conditions: list[tuple[str, str, Any]] = [("split", "==", split)]
    if max_lists is not None:
        conditions.append(("list_index", "<", max_lists))
    return conditions


def columns(mode: str | None) -> list[str]:
    return list(LISTS.names) + (["summary", "status"] if mode is not None else [])


class AttachItems:
    """LISTS rows (+ summary, status) -> PROMPT_LISTS rows, items looked up per actor.

    `history_items`: keep only that many most recent history items (None: all).
    `uses_summary`: False for tallrec (status "unused", no summary)."""

    def __init__(self, items: str | Catalogue, history_items: int | None, uses_summary: bool):
        self.catalogue = Catalogue.load(items) if isinstance(items, str) else items
        self.history_items = history_items
        self.uses_summary = uses_summary

    def __call__(self, batch: pa.Table) -> pa.Table:
        has_summary = "summary" in batch.column_names
        rows = []
        for row in batch.to_pylist():
            history = row["history"]
            shown = history if self.history_items is None else (history[-self.history_items :] if self.history_items else [])
            candidates = row["candidates"]
            if len(candidates) != len(row["labels"]) or not candidates:
                raise TrsrError(f"list {row['list_id']}: {len(candidates)} candidates, {len(row['labels'])} labels")
            if not self.uses_summary:
                summary, status = None, UNUSED
            elif has_summary:
                summary, status = row["summary"], row["status"] or MISSING
            else:
                summary, status = None, MISSING
            rows.append(
                dict(
                    list_id=row["list_id"],
                    split=row["split"],
                    user_id=row["user_id"],
                    summary=summary,
                    summary_status=status,
                    history=self.catalogue.attributes(shown),
                    candidates=candidates,
                    candidate_attributes=self.catalogue.attributes(candidates),
                    labels=row["labels"],
                )
            )
        return pa.Table.from_pylist(rows, schema=PROMPT_LISTS)


def lists_without_summary(summary_status: dict[str, int]) -> int:
    """Lists prompted without a usable summary, from counts by summary_status (tallrec's
    "unused" lists read none by design and are not counted)."""
    return int(sum(n for status, n in summary_status.items() if status not in (OK, UNUSED)))


def usable_summary(summary: str | None, status: str, has_summary: bool) -> str | None:
    """The summary a prompt shows: only a summary with status "ok", and none for tallrec."""
    return summary if status == OK and has_summary else None
