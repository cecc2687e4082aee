"""Counts and fingerprint of the training data (the DataStats of `train_ingest.prepare`):
one small STATS row per block of PACKED rows (`block_stats`, a Ray Data stage), streamed
to the driver and summed there (`measure`); the driver never holds the examples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import pyarrow as pa

from trsr.errors import ConfigError, InputFileError
from trsr.recommend.train_data import combine_digests, overlong_message

STATS = pa.schema(
    [
        ("rows", pa.int64()),
        ("texts", pa.int64()),
        ("members", pa.int64()),
        ("dropped", pa.int64()),
        ("longest_dropped", pa.int64()),
        ("text_tokens", pa.int64()),
        ("row_tokens", pa.int64()),
        ("largest_row", pa.int64()),
        ("errors", pa.int64()),
        ("first_error", pa.string()),
        ("digest", pa.uint64()),
    ]
)


@dataclass
class DataStats:
    """What the driver knows about the training data (counted by Ray, streamed)."""

    texts: int  # examples kept (within max_length)
    rows: int  # training rows: groups (prefix-shared) or texts
    dropped: int  # examples over max_length left out (overlong: drop)
    text_tokens: int  # tokens of the kept texts, each counted whole
    row_tokens: int  # tokens the rows hold (what one epoch computes)
    largest_row: int  # texts of the largest group
    fingerprint: str  # of the examples (and groups): independent of order and files
    source: str  # "list" or the Parquet path
    grouped: bool  # rows are prefix-shared groups

    def as_dict(self) -> dict:
        return asdict(self)


def block_stats(block: pa.Table) -> pa.Table:
    """Ray Data stage: one STATS row per block of PACKED rows."""
    import pyarrow.compute as pc

    texts = block.column("texts").to_pylist()
    errors = [e for e in block.column("error").to_pylist() if e]
    row_tokens = pc.sum(pc.list_value_length(block.column("ids"))).as_py() or 0  # empty for rows without texts
    return pa.Table.from_pylist(
        [
            {
                "rows": sum(1 for n in texts if n),
                "texts": sum(texts),
                "members": sum(block.column("members").to_pylist()),
                "dropped": sum(block.column("dropped").to_pylist()),
                "longest_dropped": max(block.column("longest_dropped").to_pylist(), default=0),
                "text_tokens": sum(block.column("text_tokens").to_pylist()),
                "row_tokens": row_tokens,
                "largest_row": max(texts, default=0),
                "errors": len(errors),
                "first_error": errors[0] if errors else None,
                "digest": combine_digests(block.column("digest").to_pylist()),
            }
        ],
        schema=STATS,
    )


def measure(packed, *, source: str, grouped: bool, overlong: str, max_length: int) -> DataStats:
    """Counts and fingerprint of the PACKED rows: one small row per block reaches the
    driver (streamed), never the examples. Raises for bad examples and, with
    `overlong: error`, for texts over max_length."""
    totals = {name: 0 for name in STATS.names if name not in ("first_error", "digest")}
    digest, first_error = 0, None
    for row in packed.map_batches(block_stats, batch_format="pyarrow", batch_size=None).iter_rows():
        for name in totals:
            value = int(row[name] or 0)
            totals[name] = max(totals[name], value) if name in ("longest_dropped", "largest_row") else totals[name] + value
        digest = combine_digests([digest, int(row["digest"] or 0)])
        first_error = first_error or row["first_error"]
    where = f"{source}: " if source != "list" else ""
    if totals["errors"]:
        kind, message = first_error.split(": ", 1)
        text = f"{where}{totals['errors']} bad training example(s), e.g. {message}"
        raise (InputFileError(text) if kind == "input" and source != "list" else ConfigError(text))
    if totals["members"] == 0:
        raise ConfigError(f"{where}no training examples")
    if totals["dropped"] and overlong == "error":
        raise ConfigError(where + overlong_message(totals["dropped"], totals["members"], max_length, totals["longest_dropped"]))
    if totals["texts"] == 0:
        raise ConfigError(f"{where}no training example fits max_length={max_length} tokens")
    blob = json.dumps({"digest": digest, "members": totals["members"], "grouped": grouped}, sort_keys=True)
    return DataStats(
        texts=totals["texts"],
        rows=totals["rows"],
        dropped=totals["dropped"],
        text_tokens=totals["text_tokens"],
        row_tokens=totals["row_tokens"],
        largest_row=totals["largest_row"],
        fingerprint=hashlib.sha256(blob.encode()).hexdigest()[:16],
        source=source,
        grouped=grouped,
    )
