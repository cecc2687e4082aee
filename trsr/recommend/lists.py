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

import logging
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from trsr.data.catalogue import Catalogue
from trsr.schema import ATTRIBUTE, LISTS, SUMMARY_MISSING, SUMMARY_OK, SUMMARY_UNUSED
from trsr import storage
from trsr.errors import DataError, TrsrError
from trsr.runs import RunFolder, StageFolder

log = logging.getLogger(__name__)

OK, MISSING, UNUSED = SUMMARY_OK, SUMMARY_MISSING, SUMMARY_UNUSED

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
        from trsr.schema import SPLITS

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


def usable_summary(summary: str | None, status: str, has_summary: bool) -> str | None:
    """The summary a prompt shows: only a summary with status "ok", and none for tallrec."""
    return summary if status == OK and has_summary else None


# ------------------------------------------------------- lists without a usable summary


def summary_policy(prompt) -> tuple[list[tuple[str, str, Any]], Callable[[pa.Table], list[str]] | None]:
    """(keep conditions, decline reason) of a stage that prompts with `prompt`
    (RecommendPromptConfig) under its missing_summary policy: with "reject" the runner
    takes only lists whose summary status is ok and declines the others with their status
    as the reason (StageJob.keep / decline_reason); otherwise it takes every list."""
    if prompt.mode is None or prompt.missing_summary != "reject":
        return [], None

    def reason(rows: pa.Table) -> list[str]:
        return [
            f"no usable {prompt.mode} summary (status {status or MISSING}); score.prompt.missing_summary=reject"
            for status in rows.column("status").to_pylist()
        ]

    return [("status", "==", OK)], reason


def summary_statuses(inputs: list[str], where) -> dict[str, int]:
    """Lists by summary status among the summary rows `where` selects (a streamed scan
    of the status column; a null status counts as "missing")."""
    from trsr.runner import arrow_where

    counts: dict[str, int] = {}
    if not inputs:
        return counts
    for batch in storage.scan_batches(inputs, columns=["status"], filter=arrow_where(where) if where else None):
        values = pc.value_counts(batch.column(0))
        for status, n in zip(values.field("values").to_pylist(), values.field("counts").to_pylist()):
            key = status or MISSING
            counts[key] = counts.get(key, 0) + n
    return dict(sorted(counts.items()))


def check_summaries(what: str, inputs: list[str], where, prompt) -> dict[str, int]:
    """Before a stage that prompts with `prompt` takes the lists `where` selects: their
    counts by summary status. Warns when some have no usable summary (saying what the
    missing_summary policy does with them) and raises DataError when their share is
    above prompt.max_missing_summary_share. {} for variants without a summary."""
    if prompt.mode is None:
        return {}
    counts = summary_statuses(inputs, where)
    total = sum(counts.values())
    without = total - counts.get(OK, 0)
    if not without:
        return counts
    share = without / total
    detail = ", ".join(f"{status} {n}" for status, n in counts.items() if status != OK)
    if share > prompt.max_missing_summary_share:
        raise DataError(
            f"{what}: {without} of {total} lists ({share:.1%}) have no usable {prompt.mode} summary "
            f"({detail}), more than score.prompt.max_missing_summary_share="
            f"{prompt.max_missing_summary_share} allows. Summarize those users (summarize.max_users "
            f"must cover the lists this stage takes: train.max_lists, score.max_lists) or raise "
            f"the share (lists without a summary are then {'rejected' if prompt.missing_summary == 'reject' else 'prompted without one'}, "
            f"score.prompt.missing_summary)"
        )
    action = "rejected" if prompt.missing_summary == "reject" else "prompted without a summary"
    message = (
        f"{what}: {without} of {total} lists ({share:.1%}) have no usable {prompt.mode} summary "
        f"({detail}); they are {action} (score.prompt.missing_summary={prompt.missing_summary})"
    )
    log.debug(message)  # printed below, once, in the console's own format
    print(f"[{what}] warning: {message.split(': ', 1)[1]}", flush=True)
    return counts
