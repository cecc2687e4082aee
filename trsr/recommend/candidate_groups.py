"""The grouping pass of `trsr score --candidates` (trsr.recommend.candidates): the rows
of a candidates file, the user's history and summary -> one CANDIDATE_LISTS row per user.

Candidates of unknown users, unknown items, duplicates and empty ids are kept in the
user's row as `rejected` (item, reason); `set_aside_rejects` turns them into REJECTS rows
for the scoring stage's _rejects.parquet, so every candidate row of the file ends in the
output or in the rejects.
"""

from __future__ import annotations

import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.errors import DataError
from trsr.runs import StageFolder
from trsr.schema import CANDIDATE_LISTS, REJECTS, SUMMARY_MISSING

SPLIT = "candidates"  # the split value of a user's candidate list
FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}

# The rows the grouping pass groups by user: one schema for the three sources.
GROUP_ROWS = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("kind", pa.string()),  # candidate, history, summary
        pa.field("item_id", pa.string()),  # candidate
        pa.field("items", pa.list_(pa.string())),  # history: the K most recent items
        pa.field("summary", pa.string()),
        pa.field("status", pa.string()),
        pa.field("problem", pa.string()),  # candidate: why the row is unusable (null: ok)
    ]
)


# ------------------------------------------------------------------ grouping pass steps


class CandidateRows:
    """A batch of the candidates file -> GROUP_ROWS (kind "candidate"), one per
    candidate; empty ids are kept with their problem (they become rejects)."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = batch.column_names
        if "user_id" not in names or not ({"item_id", "item_ids"} & set(names)):
            raise DataError(
                f"{self.source}: a candidates file needs the columns user_id and item_id (one row per "
                f"candidate) or user_id and item_ids (a list per user); found {names}"
            )
        users = batch.column("user_id").cast(pa.string())
        if "item_id" in names:
            items = batch.column("item_id").cast(pa.string())
        else:
            lists = batch.column("item_ids")
            if pa.types.is_string(lists.type) or pa.types.is_large_string(lists.type) or pa.types.is_null(lists.type):
                lists = pc.split_pattern_regex(pc.utf8_trim_whitespace(lists.cast(pa.string())), r"[\s,|]+")
            lists = lists.cast(pa.list_(pa.string()))
            users = pc.take(users, pc.list_parent_indices(lists))
            items = pc.list_flatten(lists)
        users, items = users.to_pylist(), items.to_pylist()
        problems = []
        for user, item in zip(users, items):
            if user is None or not str(user).strip():
                problems.append("user_id is empty")
            elif item is None or not str(item).strip():
                problems.append("item_id is empty")
            else:
                problems.append(None)
        n = len(users)
        return pa.table(
            {
                "user_id": [u if u is not None else "" for u in users],
                "kind": ["candidate"] * n,
                "item_id": items,
                "items": pa.nulls(n, pa.list_(pa.string())),
                "summary": pa.nulls(n, pa.string()),
                "status": pa.nulls(n, pa.string()),
                "problem": problems,
            },
            schema=GROUP_ROWS,
        )


class HistoryRows:
    """SEQUENCES rows -> GROUP_ROWS (kind "history"): the K most recent items (None: all)."""

    def __init__(self, recent: int | None):
        self.recent = recent

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch.column("item_ids").to_pylist()
        if self.recent is not None:
            histories = [h[-self.recent :] if self.recent else [] for h in histories]
        n = batch.num_rows
        return pa.table(
            {
                "user_id": batch.column("user_id").cast(pa.string()),
                "kind": pa.array(["history"] * n, pa.string()),
                "item_id": pa.nulls(n, pa.string()),
                "items": pa.array(histories, pa.list_(pa.string())),
                "summary": pa.nulls(n, pa.string()),
                "status": pa.nulls(n, pa.string()),
                "problem": pa.nulls(n, pa.string()),
            },
            schema=GROUP_ROWS,
        )


class SummaryRows:
    """user_summaries rows -> GROUP_ROWS (kind "summary")."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        return pa.table(
            {
                "user_id": batch.column("user_id").cast(pa.string()),
                "kind": pa.array(["summary"] * n, pa.string()),
                "item_id": pa.nulls(n, pa.string()),
                "items": pa.nulls(n, pa.list_(pa.string())),
                "summary": batch.column("summary"),
                "status": batch.column("status"),
                "problem": pa.nulls(n, pa.string()),
            },
            schema=GROUP_ROWS,
        )


class GroupUser:
    """The GROUP_ROWS of one user -> one CANDIDATE_LISTS row (none for a user without
    candidates). The catalogue's ids are loaded once per actor."""

    def __init__(self, items: str):
        ids = storage.read_parquet(items, columns=["item_id"]).column("item_id")
        self.known = set(ids.to_pylist())

    def __call__(self, rows: pa.Table) -> pa.Table:
        columns = rows.to_pydict()
        candidates = [
            (item, problem)
            for kind, item, problem in zip(columns["kind"], columns["item_id"], columns["problem"])
            if kind == "candidate"
        ]
        if not candidates:
            return CANDIDATE_LISTS.empty_table()
        user = columns["user_id"][0]
        history, summary, status = None, None, SUMMARY_MISSING
        for kind, items, text, state in zip(columns["kind"], columns["items"], columns["summary"], columns["status"]):
            if kind == "history":
                history = items
            elif kind == "summary":
                summary, status = text, state or SUMMARY_MISSING
        kept: list[str] = []
        rejected: list[dict[str, Any]] = []
        for item, problem in candidates:
            reason = problem or self._reason(user, item, history, kept)
            if reason:
                rejected.append({"item_id": item, "reason": reason})
            else:
                kept.append(item)
        row = {
            "list_id": user,
            "split": SPLIT,
            "user_id": user,
            "list_index": 0,
            "history": history or [],
            "candidates": kept,
            "labels": [0] * len(kept),
            "summary": summary,
            "status": status,
            "scorable": bool(kept),
            "rejected": rejected,
        }
        return pa.Table.from_pylist([row], schema=CANDIDATE_LISTS)

    def _reason(self, user: str, item: str, history: list[str] | None, kept: list[str]) -> str | None:
        if history is None:
            return f"unknown user {user!r}: not in prepared/sequences"
        if item not in self.known:
            return f"unknown item {item!r}: not in prepared/items"
        if item in kept:
            return "duplicate candidate of this user"
        return None


def grouping_stats(table: pa.Table) -> dict:
    rejected = pc.list_flatten(table.column("rejected"))
    reasons: dict[str, int] = {}
    for reason in pc.struct_field(rejected, "reason").to_pylist() if len(rejected) else []:
        kind = reason.split(" ", 2)[1] if reason.startswith("unknown") else reason
        key = {"user": "unknown user", "item": "unknown item"}.get(kind, kind)
        reasons[key] = reasons.get(key, 0) + 1
    kept = int(pc.sum(pc.list_value_length(table.column("candidates"))).as_py() or 0)
    return {
        "users": table.num_rows,
        "users_scorable": int(pc.sum(table.column("scorable")).as_py() or 0),
        "candidates_in": kept + len(rejected),
        "candidates_kept": kept,
        "candidates_rejected": len(rejected),
        "rejected_by_reason": reasons,
    }


def candidate_files(path: str) -> tuple[list[str], str]:
    """(files, format) of a candidates file or folder; one format per folder."""
    fs = storage.fsspec_filesystem(path)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if not fs.exists(path):
        raise DataError(f"{path}: candidates file not found")
    if fs.isdir(path):
        names = sorted(str(n) for n in fs.find(path) if not posixpath.basename(str(n)).startswith(("_", ".")))
        scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
        files = [n if n.startswith(scheme) else scheme + n for n in names]
    else:
        files = [path]
    formats = {FORMATS.get(posixpath.splitext(f)[1].lower()) for f in files}
    if not files or None in formats or len(formats) != 1:
        raise DataError(
            f"{path}: candidates must be files of one format named *.parquet, *.csv or *.jsonl "
            f"(found {[posixpath.basename(f) for f in files][:5]})"
        )
    return files, formats.pop()


def set_aside_rejects(grouped: StageFolder, source: str) -> list[pa.Table]:
    """REJECTS rows of the candidates the grouping pass set aside (a streamed scan)."""
    parts = []
    for batch in storage.scan_batches(grouped.dataset(), columns=["user_id", "rejected"]):
        table = pa.Table.from_batches([batch])
        lengths = pc.list_value_length(table.column("rejected"))
        if not (pc.sum(lengths).as_py() or 0):
            continue
        flat = pc.list_flatten(table.column("rejected"))
        users = pc.take(table.column("user_id"), pc.list_parent_indices(table.column("rejected")))
        n = len(flat)
        parts.append(
            pa.table(
                {
                    "stage": pa.array(["score candidates"] * n, pa.string()),
                    "source": pa.array([source] * n, pa.string()),
                    "row": pa.nulls(n, pa.int64()),
                    "field": pa.array(["user_id, item_id"] * n, pa.string()),
                    "reason": pc.struct_field(flat, "reason"),
                    "user_id": users,
                    "item_id": pc.struct_field(flat, "item_id"),
                    "raw": pa.nulls(n, pa.string()),
                },
                schema=REJECTS,
            )
        )
    return parts
