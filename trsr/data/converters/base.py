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

Reading input files and rejecting bad rows: `trsr.data.converters.tables`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from trsr.data.io import ROW
from trsr.data.rejects import Rejects
from trsr.errors import ConfigError, InputFileError
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


_IDS_PER_BATCH = 4_000_000


def drop_unknown_items_batched(
    frame: pl.DataFrame, known: pl.Series, path: str, rejects: Rejects, field_name: str
) -> tuple[pl.DataFrame, int]:
    """drop_unknown_items, run only on the records that hold an unknown id.

    Exploding every history costs memory; most records (all, on the full MIND
    releases) are clean, so a cheap per-list test sets them aside first.
    """
    unknown = pl.col("item_ids").list.eval(pl.element().is_in(known.implode()).not_()).list.any()
    frame = frame.with_columns(unknown.alias("_unknown"))
    dirty = frame.filter(pl.col("_unknown")).drop("_unknown")
    if dirty.height == 0:
        return frame.drop("_unknown"), 0
    clean = frame.filter(pl.col("_unknown").not_()).drop("_unknown")
    del frame
    # In slices of about _IDS_PER_BATCH ids: exploding them all at once costs GiBs.
    mean_length = max(1.0, dirty.get_column("item_ids").list.len().mean() or 1.0)
    step = max(1, int(_IDS_PER_BATCH / mean_length))
    parts, removed = [clean], 0
    for start in range(0, dirty.height, step):
        cleaned, count = drop_unknown_items(
            dirty.slice(start, step), known, path, rejects, field_name=field_name
        )
        parts.append(cleaned.select(clean.columns))
        removed += count
    return pl.concat(parts, how="vertical"), removed


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


# ------------------------------------------------------------- sequences, attributes


def group_interactions(
    frame: pl.DataFrame,
    *,
    user_column: str,
    item_column: str,
    time_column: str | None,
    known_item_ids: pl.Series,
    source: str,
    rejects: Rejects,
) -> tuple[pl.DataFrame, int]:
    """One row per user (sorted by user id): item_ids and timestamps in time order.

    `frame` holds one interaction per row with text user/item columns, `row`, and
    when `time_column` is set an Int64 column of that name. Items absent from the
    catalogue are removed, each occurrence a reject with its row number (field
    `item_column`); users left with no items keep an empty sequence.
    Returns (user_id, item_ids, timestamps) and the number of unknown occurrences.
    """
    order = [user_column] + ([time_column] if time_column else [])
    ordered = frame.sort(order, maintain_order=True)  # stable: ties keep file order
    wrapped = ordered.select(
        pl.col(user_column).alias("user_id"),
        pl.concat_list(pl.col(item_column)).alias("item_ids"),
        *([pl.concat_list(pl.col(time_column)).alias("timestamps")] if time_column else []),
        pl.col(ROW),
    )
    cleaned, unknown = drop_unknown_items(
        wrapped, known_item_ids, source, rejects, field_name=item_column
    )
    lists = [pl.col("item_ids").explode().drop_nulls()]
    if time_column:
        lists.append(pl.col("timestamps").explode().drop_nulls())
    grouped = cleaned.group_by("user_id", maintain_order=True).agg(lists)
    if not time_column:
        grouped = grouped.with_columns(pl.lit(None, pl.List(pl.Int64)).alias("timestamps"))
    return grouped.sort("user_id", maintain_order=True), unknown


def choose_attributes(requested: list[str] | None, available: list[str], what: str) -> list[str]:
    """The attribute columns to use: `requested` (checked) or all `available`."""
    if requested is None:
        if not available:
            raise InputFileError(f"{what}: no attribute columns besides the item id")
        return list(available)
    check_attribute_list(requested, available, what)
    return list(requested)


def check_attribute_list(requested: list[str], available: list[str] | tuple[str, ...],
                         what: str) -> None:
    """ConfigError for an empty list, an unknown name or a name listed twice."""
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ConfigError(
            f"prepare.source.attributes: unknown attribute(s) {unknown} for {what}; "
            f"available: {list(available)}"
        )
    if not requested:
        raise ConfigError(
            f"prepare.source.attributes: empty; name at least one of {list(available)}"
        )
    repeated = sorted({name for name in requested if requested.count(name) > 1})
    if repeated:
        raise ConfigError(f"prepare.source.attributes: {repeated} listed more than once")


def attribute_map(columns: list[str]) -> dict[str, str]:
    """{display name: column}, in order; two columns with one display name are an error."""
    out: dict[str, str] = {}
    for column in columns:
        name = display_name(column)
        if name in out:
            raise ConfigError(
                f"prepare.source.attributes: {out[name]!r} and {column!r} would both be "
                f"shown as {name!r}"
            )
        out[name] = column
    return out


def user_counts(users_in: int, sequences: pl.DataFrame) -> dict[str, int]:
    return {"users_in": users_in, "users_rejected": users_in - sequences.height}
