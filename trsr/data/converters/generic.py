"""Bring-your-own-data converter: an interactions table and an items table.

    interactions   one row per (user, item[, time]) event, any extra columns ignored
    items          one row per item: an id column and text attribute columns

Files may be `.csv` (comma separated, "..." quoting, values may hold newlines),
`.tsv` (tab separated, no quoting), `.parquet` or `.jsonl` (one JSON object per line).
Paths are relative to `source.path` unless absolute.

Time values may be integer or float unix seconds, or ISO-8601 dates / date-times
("2020-01-31", "2020-01-31T12:00:00", "2020-01-31 12:00:00.5", "...Z", "...+02:00");
strings without an offset are read as UTC. Each user's interactions are ordered by
time (a stable sort: ties keep file order), or kept in file order when
`time_column` is null.

Row numbers in rejects are 1-based record numbers with the header and blank lines
not counted (for CSV a record may span several lines; for Parquet, the table row).

The shared helpers it uses (`read_table`, `reject_where`, `reject_blank`,
`unix_seconds` in `trsr.data.converters.tables`; `group_interactions`,
`choose_attributes` in `trsr.data.converters.base`) serve the RecBole and Amazon-M2
converters too.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

from trsr.config import Section
from trsr.data.converters.base import (
    CONVERT,
    ConvertedDataset,
    attribute_map,
    choose_attributes,
    group_interactions,
    items_from_frame,
    reject_duplicate_ids,
    sequences_from_frame,
    user_counts,
)
from trsr.data.converters.tables import (
    as_text,
    read_table,
    reject_blank,
    reject_where,
    rejected_records,
    resolve,
    unix_seconds,
)
from trsr.data.io import ROW
from trsr.data.rejects import Rejects


class GenericSource(Section):
    """Bring your own data: an interactions table and an items table.

    Files may be .csv, .tsv, .parquet or .jsonl; paths are relative to `path`.
    """

    format: Literal["generic"] = "generic"
    path: str
    interactions: str = "interactions.csv"
    items: str = "items.csv"
    user_column: str = "user_id"
    item_column: str = "item_id"
    # Orders each user's interactions; null keeps file order.
    time_column: str | None = "timestamp"
    # Id column in the items table; null = item_column.
    item_id_column: str | None = None
    # Text columns of the items table to use, in order; null = all but the id.
    attributes: list[str] | None = None


def convert(source: GenericSource) -> ConvertedDataset:
    user_col, item_col, time_col = source.user_column, source.item_column, source.time_column
    id_col = source.item_id_column or item_col
    items_path = resolve(source.path, source.items)
    inter_path = resolve(source.path, source.interactions)

    # Items.
    item_rejects = Rejects()
    items = read_table(items_path, stage=CONVERT, rejects=item_rejects, required=[id_col],
                       what="items")
    items_in = items.height + rejected_records(item_rejects)
    available = [c for c in items.columns if c not in (id_col, ROW)]
    columns = choose_attributes(source.attributes, available, f"items file {items_path}")
    attributes = attribute_map(columns)
    items = items.select(
        as_text(items, id_col).str.strip_chars().alias(id_col),
        *[as_text(items, c).alias(c) for c in columns],
        pl.col(ROW),
    )
    items = reject_blank(items, [id_col], source=items_path, rejects=item_rejects)
    items = reject_duplicate_ids(items, id_col, items_path, item_rejects)
    items_table = items_from_frame(items, id_col, attributes)

    # Interactions.
    inter_rejects = Rejects()
    required = [user_col, item_col] + ([time_col] if time_col else [])
    frame = read_table(inter_path, stage=CONVERT, rejects=inter_rejects, required=required,
                       what="interactions")
    rows_in = frame.height + rejected_records(inter_rejects)
    frame = frame.select(
        as_text(frame, user_col).str.strip_chars().alias(user_col),
        as_text(frame, item_col).str.strip_chars().alias(item_col),
        *([pl.col(time_col)] if time_col else []),
        pl.col(ROW),
    )
    frame = reject_blank(frame, [user_col], source=inter_path, rejects=inter_rejects)
    users_in = frame.get_column(user_col).n_unique()
    frame = reject_blank(frame, [item_col], source=inter_path, rejects=inter_rejects,
                         user_column=user_col)
    if time_col:
        if frame.schema[time_col] == pl.String:
            frame = reject_blank(frame, [time_col], source=inter_path, rejects=inter_rejects,
                                 user_column=user_col, item_column=item_col)
        else:
            frame = reject_where(frame, pl.col(time_col).is_null(), source=inter_path,
                                 rejects=inter_rejects, field=time_col, reason=f"empty {time_col}",
                                 user_column=user_col, item_column=item_col)
        frame = frame.with_columns(
            unix_seconds(frame, time_col).alias("_seconds"),
            as_text(frame, time_col).alias("_time_text"),
        )
        frame = reject_where(
            frame,
            pl.col("_seconds").is_null(),
            source=inter_path,
            rejects=inter_rejects,
            field=time_col,
            reason=f"unparseable {time_col} (expected unix seconds or an ISO-8601 date/time)",
            user_column=user_col,
            item_column=item_col,
            raw_column="_time_text",
        )
        frame = frame.drop(time_col, "_time_text").rename({"_seconds": time_col})
    rows_kept = frame.height
    sequences, unknown = group_interactions(
        frame,
        user_column=user_col,
        item_column=item_col,
        time_column=time_col,
        known_item_ids=items.get_column(id_col),
        source=inter_path,
        rejects=inter_rejects,
    )

    counts = {
        "rows_in": rows_in,
        "rows_rejected": rows_in - rows_kept,
        **user_counts(users_in, sequences),
        "unknown_item_occurrences": unknown,
        "items_in": items_in,
        "items_rejected": items_in - items.height,
    }
    rejects = Rejects()
    rejects.extend(item_rejects)
    rejects.extend(inter_rejects)
    return ConvertedDataset(
        items=items_table,
        sequences=sequences_from_frame(sequences, timestamps_column="timestamps"),
        rejects=rejects,
        attributes=list(attributes),
        counts=counts,
    )
