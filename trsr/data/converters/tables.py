"""Reading the converters' input tables and checking their rows.

`read_table` reads a .csv/.tsv/.parquet/.jsonl file into a frame with a 1-based
`row` column; `read_tsv` reads a headerless tab-separated file with known columns.
`as_text`, `blank` and `unix_seconds` are expressions over the columns read;
`reject_where` / `reject_blank` send bad rows to rejects, and `rejected_records` /
`distinct_rows` count the records behind rejects. Shared by every converter.
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
from trsr.data.converters.base import CONVERT
from trsr.data.io import ROW, read_delimited, require_file
from trsr.data.rejects import Rejects
from trsr.errors import InputFileError

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


def require_nonempty(path: str) -> None:
    try:
        size = storage.fsspec_filesystem(path).size(str(path))
    except (OSError, FileNotFoundError) as error:  # pragma: no cover - racing deletion
        raise InputFileError(f"{path}: cannot read ({error})") from error
    if not size:
        raise InputFileError(f"{path}: file is empty")


def read_tsv(path: str, columns: list[str], what: str) -> tuple[pa.Table, pa.Table]:
    """read_delimited with its rejects kept apart: (kept rows, reject rows)."""
    read_rejects = Rejects()
    table = read_delimited(
        path,
        columns=columns,
        delimiter="\t",
        stage=CONVERT,
        rejects=read_rejects,
        quoted=False,
        what=what,
    )
    rejected = read_rejects.table()
    if table.num_rows == 0 and rejected.num_rows == 0:
        raise InputFileError(f"{path}: file is empty (no records)")
    return table, rejected


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


def distinct_rows(rejected: pl.DataFrame) -> int:
    """Records behind a set of rejects (a record may have several bad fields)."""
    if rejected.height == 0:
        return 0
    rows = rejected.get_column("row")
    return rows.drop_nulls().n_unique() + rows.null_count()


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
