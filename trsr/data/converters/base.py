"""What every converter returns, and helpers to build the canonical tables.

A converter reads one dataset's own files and returns a `ConvertedDataset`:
canonical items and sequences (see `trsr.schema`), the rows it rejected with
reasons, and counts for the run's accounting. Converters never sample or split:
that is the protocol's job (`trsr.data.protocol`).

Accounting rule every converter keeps: each input user (or session) is either in
`sequences` or has at least one reject row with its user_id (stage "convert"), and
`counts["users_in"] == sequences.num_rows + counts["users_rejected"]`. Item ids in
sequences that are absent from the catalogue are removed from the sequence and each
occurrence is recorded as a reject (reason "unknown item id"), counted in
`counts["unknown_item_occurrences"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from trsr.data.rejects import Rejects
from trsr.schema import ITEMS, SEQUENCES, conform

CONVERT = "convert"  # the stage name in rejects


@dataclass
class ConvertedDataset:
    items: pa.Table  # trsr.schema.ITEMS
    sequences: pa.Table  # trsr.schema.SEQUENCES
    rejects: Rejects
    attributes: list[str]  # attribute names in rendering order
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.items = conform(self.items, ITEMS, "converted items")
        self.sequences = conform(self.sequences, SEQUENCES, "converted sequences")


def items_from_frame(frame: pl.DataFrame, id_column: str, attributes: dict[str, str]) -> pa.Table:
    """Build ITEMS from a wide frame.

    attributes: {attribute name shown in prompts: column in `frame`}, in rendering
    order. Null or blank values are left out of an item's attribute list, so a prompt
    never shows "Brand: " with nothing after it. Works in long form (one row per item
    and attribute), which is much faster than building lists of structs column-wise.
    """
    ids = frame.select(pl.col(id_column).cast(pl.Utf8).alias("item_id")).with_row_index("_item")
    if not attributes:
        out = ids.with_columns(pl.lit([], dtype=pl.List(pl.Struct({"name": pl.Utf8, "value": pl.Utf8}))).alias("attributes"))
        return conform(out.drop("_item").to_arrow(), ITEMS, "items")
    names = list(attributes)
    wide = frame.select(
        [pl.col(column).cast(pl.Utf8).str.strip_chars().alias(f"_a{k}") for k, column in enumerate(attributes.values())]
    ).with_row_index("_item")
    long = (
        wide.unpivot(index="_item", variable_name="_attr", value_name="value")
        .filter(pl.col("value").is_not_null() & (pl.col("value") != ""))
        .with_columns(pl.col("_attr").str.slice(2).cast(pl.Int32).alias("_order"))
        .with_columns(pl.col("_order").replace_strict(list(range(len(names))), names, return_dtype=pl.Utf8).alias("name"))
        .sort("_item", "_order")
        .group_by("_item", maintain_order=True)
        .agg(pl.struct("name", "value").alias("attributes"))
    )
    out = ids.join(long, on="_item", how="left").sort("_item").with_columns(
        pl.col("attributes").fill_null(pl.lit([], dtype=pl.List(pl.Struct({"name": pl.Utf8, "value": pl.Utf8}))))
    )
    return conform(out.select("item_id", "attributes").to_arrow(), ITEMS, "items")


def sequences_from_frame(
    frame: pl.DataFrame,
    user_column: str = "user_id",
    items_column: str = "item_ids",
    timestamps_column: str | None = None,
) -> pa.Table:
    """Build SEQUENCES from a frame with one row per user and list columns."""
    columns = [
        pl.col(user_column).cast(pl.Utf8).alias("user_id"),
        pl.col(items_column).alias("item_ids"),
    ]
    if timestamps_column is not None:
        columns.append(pl.col(timestamps_column).cast(pl.List(pl.Int64)).alias("timestamps"))
    else:
        columns.append(pl.lit(None, dtype=pl.List(pl.Int64)).alias("timestamps"))
    return conform(frame.select(columns).to_arrow(), SEQUENCES, "sequences")


def reject_duplicate_ids(
    frame: pl.DataFrame, id_column: str, source: str, rejects: Rejects, what: str = "item"
) -> pl.DataFrame:
    """Keep the first row of each id; later rows go to rejects ("duplicate item id")."""
    duplicated = pl.col(id_column).is_first_distinct().not_()
    dupes = frame.filter(duplicated)
    if dupes.height:
        rejects.add_table(
            dupes.select(
                pl.lit(CONVERT).alias("stage"),
                pl.lit(source).alias("source"),
                pl.col("row").cast(pl.Int64) if "row" in dupes.columns else pl.lit(None, pl.Int64).alias("row"),
                pl.lit(id_column).alias("field"),
                pl.lit(f"duplicate {what} id (first occurrence kept)").alias("reason"),
                (pl.col(id_column) if what == "user" else pl.lit(None, pl.Utf8)).alias("user_id"),
                (pl.col(id_column) if what == "item" else pl.lit(None, pl.Utf8)).alias("item_id"),
            ).to_arrow()
        )
    return frame.filter(duplicated.not_())


def drop_unknown_items(
    sequences: pl.DataFrame,
    known_item_ids: pl.Series,
    source: str,
    rejects: Rejects,
    field_name: str = "item_ids",
) -> tuple[pl.DataFrame, int]:
    """Remove catalogue-unknown ids from `item_ids` (and the matching `timestamps`).

    `sequences` has user_id, item_ids (list[str]), optional timestamps (list[i64])
    and optional row (source record number). Each removed occurrence becomes one
    reject row ("unknown item id"). Returns the cleaned frame and the count removed.
    """
    has_ts = "timestamps" in sequences.columns
    has_row = "row" in sequences.columns
    indexed = sequences.with_row_index("_seq")
    long = indexed.select(
        "_seq",
        "user_id",
        *(["row"] if has_row else []),
        pl.col("item_ids"),
        *([pl.col("timestamps")] if has_ts else []),
    ).explode(["item_ids", "timestamps"] if has_ts else ["item_ids"])
    long = long.with_columns(pl.int_range(pl.len()).over("_seq").alias("_pos"))
    is_known = pl.col("item_ids").is_in(known_item_ids.implode())
    unknown = long.filter(pl.col("item_ids").is_not_null() & is_known.not_())
    if unknown.height:
        rejects.add_table(
            unknown.select(
                pl.lit(CONVERT).alias("stage"),
                pl.lit(source).alias("source"),
                (pl.col("row").cast(pl.Int64) if has_row else pl.lit(None, pl.Int64)).alias("row"),
                pl.lit(field_name).alias("field"),
                pl.lit("unknown item id").alias("reason"),
                pl.col("user_id"),
                pl.col("item_ids").alias("item_id"),
            ).to_arrow()
        )
    kept = long.filter(pl.col("item_ids").is_not_null() & is_known)
    aggregations = [pl.col("item_ids")]
    if has_ts:
        aggregations.append(pl.col("timestamps"))
    regrouped = kept.sort("_seq", "_pos").group_by("_seq", maintain_order=True).agg(aggregations)
    out = indexed.drop(["item_ids"] + (["timestamps"] if has_ts else [])).join(
        regrouped, on="_seq", how="left"
    )
    out = out.with_columns(pl.col("item_ids").fill_null(pl.lit([], dtype=pl.List(pl.Utf8))))
    if has_ts:
        out = out.with_columns(pl.col("timestamps").fill_null(pl.lit([], dtype=pl.List(pl.Int64))))
    return out.sort("_seq").drop("_seq"), unknown.height


def reject_users(
    frame: pl.DataFrame, condition: pl.Expr, reason: str, source: str, rejects: Rejects
) -> pl.DataFrame:
    """Send users matching `condition` to rejects with `reason`; return the others."""
    bad = frame.filter(condition)
    if bad.height:
        rejects.add_table(
            bad.select(
                pl.lit(CONVERT).alias("stage"),
                pl.lit(source).alias("source"),
                (pl.col("row").cast(pl.Int64) if "row" in bad.columns else pl.lit(None, pl.Int64)).alias("row"),
                pl.lit(reason).alias("reason"),
                pl.col("user_id").cast(pl.Utf8),
            ).to_arrow()
        )
    return frame.filter(condition.not_())


_DISPLAY_NAMES = {"desc": "Description"}


def display_name(column: str) -> str:
    """The attribute name shown in prompts for a source column.

    "movie_title" -> "Movie title", "release_year" -> "Release year", "title" -> "Title";
    a few abbreviations are spelled out ("desc" -> "Description").
    """
    special = _DISPLAY_NAMES.get(column.strip().lower())
    if special is not None:
        return special
    words = " ".join(column.replace("_", " ").replace("-", " ").split())
    return words[:1].upper() + words[1:] if words else column
