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

The helpers below (`read_table`, `reject_where`, `reject_blank`, `unix_seconds`,
`group_interactions`, `choose_attributes`) are shared with the RecBole and Amazon-M2
converters.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import polars as pl

from trsr import storage
from trsr.config import GenericSource
from trsr.data.converters.base import (
    CONVERT,
    ConvertedDataset,
    display_name,
    drop_unknown_items,
    items_from_frame,
    reject_duplicate_ids,
    sequences_from_frame,
)
from trsr.data.io import ROW, read_delimited, require_file
from trsr.data.rejects import Rejects
from trsr.errors import ConfigError, InputFileError

FORMATS = (".csv", ".tsv", ".parquet", ".jsonl")


# ----------------------------------------------------------------------------- reading


def resolve(base: str, name: str) -> str:
    """`name` relative to the folder `base`, unless it is absolute (or a URL)."""
    if storage.is_remote(name) or os.path.isabs(name):
        return name
    return storage.join(base, name)


def read_table(
    path: str,
    *,
    stage: str,
    rejects: Rejects,
    required: Iterable[str] = (),
    what: str = "input",
) -> pl.DataFrame:
    """Read a .csv/.tsv/.parquet/.jsonl file into a frame plus a 1-based `row` column.

    CSV and TSV columns are strings; Parquet and JSONL keep their types (ids and
    attributes are cast to text by the caller, times by `unix_seconds`). Malformed
    records go to `rejects`; a missing file or a missing `required` column raises
    InputFileError naming the file.
    """
    extension = os.path.splitext(str(path))[1].lower()
    if extension not in FORMATS:
        raise InputFileError(
            f"{path}: unsupported file type {extension or '(none)'!r} ({what}); "
            f"expected one of {', '.join(FORMATS)}"
        )
    require_file(path, what)
    if extension in (".csv", ".tsv"):
        table = read_delimited(
            path,
            columns=None,
            delimiter="," if extension == ".csv" else "\t",
            stage=stage,
            rejects=rejects,
            quoted=extension == ".csv",
            what=what,
        )
    elif extension == ".parquet":
        try:
            table = storage.read_parquet(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise InputFileError(f"{path}: cannot read as Parquet ({what}): {error}") from error
        table = table.append_column(ROW, pa.array(range(1, table.num_rows + 1), pa.int64()))
    else:
        table = _read_jsonl(path, stage, rejects, what)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    missing = [column for column in required if column not in frame.columns]
    if missing:
        found = [c for c in frame.columns if c != ROW]
        raise InputFileError(f"{path}: missing column(s) {missing} ({what}); found {found}")
    return frame


def _read_jsonl(path: str, stage: str, rejects: Rejects, what: str) -> pa.Table:
    data = storage.read_bytes(path)
    if not data.strip():
        return pa.table({ROW: pa.array([], pa.int64())})
    try:
        table = pajson.read_json(pa.BufferReader(data))
        table.validate(full=True)  # the JSON reader lets invalid UTF-8 through
        return table.append_column(ROW, pa.array(range(1, table.num_rows + 1), pa.int64()))
    except pa.ArrowInvalid:
        pass
    # Slow path, only for a file with a bad line or mixed value types: parse each
    # line, reject the bad ones, keep scalars as text.
    records: list[dict] = []
    numbers: list[int] = []
    number = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        number += 1
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            rejects.add(stage, path, "invalid UTF-8", row=number,
                        raw=line.decode("utf-8", errors="replace"))
            continue
        except json.JSONDecodeError as error:
            rejects.add(stage, path, f"invalid JSON ({error.msg})", row=number,
                        raw=line.decode("utf-8"))
            continue
        if not isinstance(record, dict):
            rejects.add(stage, path, "not a JSON object", row=number, raw=line.decode("utf-8"))
            continue
        records.append({key: _json_text(value) for key, value in record.items()})
        numbers.append(number)
    names: list[str] = []
    for record in records:
        for key in record:
            if key not in names:
                names.append(key)
    columns = {name: pa.array([r.get(name) for r in records], pa.string()) for name in names}
    columns[ROW] = pa.array(numbers, pa.int64())
    return pa.table(columns)


def _json_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
        return ", ".join(_json_text(v) or "" for v in value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def as_text(frame: pl.DataFrame, column: str) -> pl.Expr:
    """An expression turning `column` of any type into text (lists joined by ", ")."""
    dtype = frame.schema[column]
    expr = pl.col(column)
    if dtype == pl.String:
        return expr
    if isinstance(dtype, (pl.List, pl.Array)) and not dtype.inner.is_nested():
        return expr.list.eval(pl.element().cast(pl.String)).list.join(", ")
    if isinstance(dtype, pl.Struct):
        return expr.struct.json_encode()
    if dtype.is_nested():
        return expr.map_elements(
            lambda value: json.dumps(value, ensure_ascii=False, default=str),
            return_dtype=pl.String,
        )
    if dtype == pl.Boolean:
        return pl.when(expr).then(pl.lit("true")).when(expr.not_()).then(pl.lit("false"))
    return expr.cast(pl.String)


# ----------------------------------------------------------------------------- rejects


def rejected_records(rejects: Rejects) -> int:
    """How many distinct records `rejects` refused (a record may have several rejects,
    e.g. invalid UTF-8 in two fields); rejects without a row number count one each."""
    rows = rejects.table().column("row")
    return pc.count_distinct(rows, mode="only_valid").as_py() + rows.null_count


def blank(column: str) -> pl.Expr:
    """True where `column` (text) is null or only whitespace."""
    return pl.col(column).is_null() | (pl.col(column).str.strip_chars() == "")


def reject_where(
    frame: pl.DataFrame,
    condition: pl.Expr,
    *,
    source: str,
    rejects: Rejects,
    field: str | None,
    reason: str,
    user_column: str | None = None,
    item_column: str | None = None,
    raw_column: str | None = None,
) -> pl.DataFrame:
    """Send the rows matching `condition` to rejects (one each); return the others.

    `user_column` / `item_column` / `raw_column` name text columns copied into the
    reject's user_id / item_id / raw (so a user's rejected rows can be traced).
    """
    condition = condition.fill_null(False)
    bad = frame.filter(condition)
    if bad.height:

        def text(column: str | None) -> pl.Expr:
            if column is None:
                return pl.lit(None, pl.String)
            return pl.col(column).cast(pl.String)

        rejects.add_table(
            bad.select(
                pl.lit(CONVERT).alias("stage"),
                pl.lit(str(source)).alias("source"),
                (pl.col(ROW).cast(pl.Int64) if ROW in bad.columns else pl.lit(None, pl.Int64)).alias("row"),
                pl.lit(field, pl.String).alias("field"),
                pl.lit(reason).alias("reason"),
                text(user_column).alias("user_id"),
                text(item_column).alias("item_id"),
                text(raw_column).alias("raw"),
            ).to_arrow()
        )
    return frame.filter(condition.not_())


def reject_blank(
    frame: pl.DataFrame,
    columns: Iterable[str],
    *,
    source: str,
    rejects: Rejects,
    user_column: str | None = None,
    item_column: str | None = None,
) -> pl.DataFrame:
    """Reject rows whose required text `columns` are null or blank ("empty <column>")."""
    for column in columns:
        frame = reject_where(
            frame,
            blank(column),
            source=source,
            rejects=rejects,
            field=column,
            reason=f"empty {column}",
            user_column=None if user_column == column else user_column,
            item_column=None if item_column == column else item_column,
        )
    return frame


# ------------------------------------------------------------------------------- times

# Tried in order on ISO-8601 text normalised to a "T" separator; `%#z` takes "Z",
# "+02:00" and "+0200". Strings without an offset are UTC.
_ZONED = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z")
_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def unix_seconds(frame: pl.DataFrame, column: str) -> pl.Expr:
    """`column` as Int64 unix seconds; null where the value does not parse.

    Numbers are seconds (floats are floored); datetimes/dates convert directly
    (naive ones are UTC); text may be a number or an ISO-8601 date or date-time.
    """
    dtype = frame.schema[column]
    expr = pl.col(column)
    if dtype.is_integer():
        return expr.cast(pl.Int64)
    if dtype.is_float():
        return pl.when(expr.is_finite()).then(expr.floor()).cast(pl.Int64, strict=False)
    if isinstance(dtype, pl.Datetime):
        return expr.dt.epoch("s")
    if dtype == pl.Date:
        return expr.cast(pl.Datetime("ms")).dt.epoch("s")
    if dtype != pl.String:
        expr = expr.cast(pl.String, strict=False)
    text = expr.str.strip_chars()
    as_float = text.cast(pl.Float64, strict=False)
    number = pl.coalesce(
        text.cast(pl.Int64, strict=False),
        pl.when(as_float.is_finite()).then(as_float.floor()).cast(pl.Int64, strict=False),
    )
    iso = text.str.replace(r"^(\d{4}-\d{2}-\d{2})[ T]", "${1}T")
    parsed = [
        iso.str.to_datetime(f, strict=False, time_unit="ms", time_zone="UTC").dt.epoch("s")
        for f in _ZONED
    ] + [iso.str.to_datetime(f, strict=False, time_unit="ms").dt.epoch("s") for f in _NAIVE]
    return pl.coalesce(number, *parsed)


# ------------------------------------------------------------------------- sequences


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


# --------------------------------------------------------------------------- convert


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
