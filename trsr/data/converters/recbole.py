"""RecBole atomic files: `<dataset>.item` plus an interaction file.

Atomic files are tab separated with no quoting; header names carry a type suffix
(`item_id:token`, `title:token_seq`, `timestamp:float`) which is dropped here.

    <dataset>.item         item_id + text columns (the attributes)
    <dataset>.test.inter   sequence form: user_id, item_id_list (space separated
                           history, oldest first), item_id (the next item)
    <dataset>.inter        row form: user_id, item_id[, timestamp, rating, ...]

The sequence form gives item_id_list + [item_id] per user, no timestamps; a user on
several rows keeps the first (later rows are rejected as "duplicate user id"). The
row form groups rows by user, ordered by timestamp (stable on ties; file order when
there is no timestamp column), with timestamps as unix seconds.
"""

from __future__ import annotations

import posixpath
from typing import Literal

import polars as pl

from trsr import storage
from trsr.config import Section
from trsr.data.converters.base import (
    CONVERT,
    ConvertedDataset,
    attribute_map,
    choose_attributes,
    drop_unknown_items,
    group_interactions,
    items_from_frame,
    reject_duplicate_ids,
    sequences_from_frame,
)
from trsr.data.converters.tables import reject_blank, reject_where, rejected_records, unix_seconds
from trsr.data.io import ROW, read_delimited
from trsr.data.rejects import Rejects
from trsr.errors import InputFileError

USER, ITEM, ITEM_LIST, TIME = "user_id", "item_id", "item_id_list", "timestamp"


class RecBoleSource(Section):
    """RecBole atomic files: `<name>.item` plus `<name>.inter` or `<name>.test.inter`."""

    format: Literal["recbole"] = "recbole"
    path: str
    # File stem; inferred when the folder holds one dataset.
    dataset: str | None = None
    # Interaction file suffix: "test.inter" (history list + next item) or "inter"
    # (user, item, timestamp rows); null picks test.inter when present.
    inter: str | None = None
    # Item columns (names without the ":type" suffix); null = every text column.
    attributes: list[str] | None = None


def convert(source: RecBoleSource) -> ConvertedDataset:
    dataset = source.dataset or infer_dataset(source.path)
    items_path = storage.join(source.path, f"{dataset}.item")
    inter_path = interaction_path(source, dataset)

    # Items.
    item_rejects = Rejects()
    items = read_atomic(items_path, item_rejects, required=[ITEM], what="items")
    items_in = items.height + rejected_records(item_rejects)
    available = [c for c in items.columns if c not in (ITEM, ROW)]
    columns = choose_attributes(source.attributes, available, f"items file {items_path}")
    attributes = attribute_map(columns)
    items = items.with_columns(pl.col(ITEM).str.strip_chars())
    items = reject_blank(items, [ITEM], source=items_path, rejects=item_rejects)
    items = reject_duplicate_ids(items, ITEM, items_path, item_rejects)
    known = items.get_column(ITEM)

    # Interactions.
    inter_rejects = Rejects()
    inter = read_atomic(inter_path, inter_rejects, required=[USER, ITEM], what="interactions")
    rows_in = inter.height + rejected_records(inter_rejects)
    inter = inter.with_columns(pl.col(USER).str.strip_chars(), pl.col(ITEM).str.strip_chars())
    inter = reject_blank(inter, [USER], source=inter_path, rejects=inter_rejects)
    users_in = inter.get_column(USER).n_unique()
    if ITEM_LIST in inter.columns:
        sequences, rows_kept, unknown = _sequence_form(inter, known, inter_path, inter_rejects)
    else:
        sequences, rows_kept, unknown = _row_form(inter, known, inter_path, inter_rejects)

    counts = {
        "rows_in": rows_in,
        "rows_rejected": rows_in - rows_kept,
        "users_in": users_in,
        "users_rejected": users_in - sequences.height,
        "unknown_item_occurrences": unknown,
        "items_in": items_in,
        "items_rejected": items_in - items.height,
    }
    rejects = Rejects()
    rejects.extend(item_rejects)
    rejects.extend(inter_rejects)
    return ConvertedDataset(
        items=items_from_frame(items, ITEM, attributes),
        sequences=sequences_from_frame(sequences, timestamps_column="timestamps"),
        rejects=rejects,
        attributes=list(attributes),
        counts=counts,
    )


def infer_dataset(folder: str) -> str:
    """The stem of the single `*.item` file in `folder`."""
    filesystem = storage.fsspec_filesystem(folder)
    if not storage.exists(folder):
        raise InputFileError(f"{folder}: folder not found (RecBole dataset)")
    found = sorted(
        posixpath.basename(str(p).rstrip("/")) for p in filesystem.glob(storage.join(folder, "*.item"))
    )
    if len(found) != 1:
        raise InputFileError(
            f"{folder}: expected exactly one *.item file to infer the dataset name, found "
            f"{found or 'none'}; set source.dataset"
        )
    return found[0][: -len(".item")]


def interaction_path(source: RecBoleSource, dataset: str) -> str:
    if source.inter is not None:
        return storage.join(source.path, f"{dataset}.{source.inter.lstrip('.')}")
    test = storage.join(source.path, f"{dataset}.test.inter")
    return test if storage.exists(test) else storage.join(source.path, f"{dataset}.inter")


def read_atomic(path: str, rejects: Rejects, *, required: list[str], what: str) -> pl.DataFrame:
    """An atomic file as string columns named without their ":type" suffix, plus `row`."""
    table = read_delimited(
        path, columns=None, delimiter="\t", stage=CONVERT, rejects=rejects, quoted=False, what=what
    )
    names = [name if name == ROW else name.split(":", 1)[0].strip() for name in table.column_names]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputFileError(f"{path}: column(s) {duplicated} appear more than once ({what})")
    missing = [c for c in required if c not in names]
    if missing:
        raise InputFileError(
            f"{path}: missing column(s) {missing} ({what}); the header has "
            f"{[n for n in table.column_names if n != ROW]}"
        )
    frame = pl.from_arrow(table.rename_columns(names))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _sequence_form(
    inter: pl.DataFrame, known: pl.Series, path: str, rejects: Rejects
) -> tuple[pl.DataFrame, int, int]:
    """user_id, item_id_list, item_id rows -> history + [next item] per user."""
    inter = reject_blank(inter, [ITEM], source=path, rejects=rejects, user_column=USER)
    inter = reject_duplicate_ids(inter, USER, path, rejects, what="user")
    rows_kept = inter.height
    frame = inter.select(
        pl.col(USER).alias("user_id"),
        pl.col(ITEM_LIST).str.extract_all(r"\S+").fill_null(pl.lit([], pl.List(pl.String))).alias("item_ids"),
        pl.col(ITEM).alias("_next"),
        pl.col(ROW),
    )
    # Unknown ids are checked per field so that each reject names its column.
    frame, unknown_history = drop_unknown_items(frame, known, path, rejects, ITEM_LIST)
    frame = frame.rename({"item_ids": "_history"}).with_columns(
        pl.concat_list(pl.col("_next")).alias("item_ids")
    )
    frame, unknown_next = drop_unknown_items(frame, known, path, rejects, ITEM)
    frame = frame.select(
        "user_id",
        pl.concat_list("_history", "item_ids").alias("item_ids"),
        pl.lit(None, pl.List(pl.Int64)).alias("timestamps"),
    ).sort("user_id", maintain_order=True)
    return frame, rows_kept, unknown_history + unknown_next


def _row_form(
    inter: pl.DataFrame, known: pl.Series, path: str, rejects: Rejects
) -> tuple[pl.DataFrame, int, int]:
    """user_id, item_id[, timestamp] rows -> items grouped per user in time order."""
    inter = reject_blank(inter, [ITEM], source=path, rejects=rejects, user_column=USER)
    has_time = TIME in inter.columns
    if has_time:
        inter = reject_blank(inter, [TIME], source=path, rejects=rejects,
                             user_column=USER, item_column=ITEM)
        inter = inter.with_columns(unix_seconds(inter, TIME).alias("_seconds"))
        inter = reject_where(
            inter,
            pl.col("_seconds").is_null(),
            source=path,
            rejects=rejects,
            field=TIME,
            reason=f"unparseable {TIME} (expected unix seconds)",
            user_column=USER,
            item_column=ITEM,
            raw_column=TIME,
        )
        inter = inter.drop(TIME).rename({"_seconds": TIME})
    rows_kept = inter.height
    sequences, unknown = group_interactions(
        inter.select(USER, ITEM, *([TIME] if has_time else []), ROW),
        user_column=USER,
        item_column=ITEM,
        time_column=TIME if has_time else None,
        known_item_ids=known,
        source=path,
        rejects=rejects,
    )
    return sequences, rows_kept, unknown
