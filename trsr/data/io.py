"""Reading raw delimited files (TSV/CSV) with row-level accounting.

`read_delimited` returns the well-formed rows as an all-string Arrow table plus a
`row` column (1-based record number in the file, header excluded), and sends every
malformed row to `Rejects` with the file, record number and reason:

- a record with the wrong number of fields ("expected 5 fields, found 4");
- a record whose bytes are not valid UTF-8 ("invalid UTF-8 in field 'title'").

Whole-file problems (missing file, missing header columns, unreadable) raise
`InputFileError` naming the file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from trsr import storage
from trsr.data.rejects import Rejects
from trsr.errors import InputFileError

ROW = "row"


def require_file(path: str, what: str) -> None:
    if not storage.exists(path):
        raise InputFileError(f"{path}: file not found ({what})")


def read_delimited(
    path: str,
    *,
    columns: list[str] | None,
    delimiter: str,
    stage: str,
    rejects: Rejects,
    quoted: bool,
    required: list[str] | None = None,
    what: str = "input",
) -> pa.Table:
    """Read a delimited text file into string columns, rejecting malformed rows.

    columns: the column names when the file has no header (MIND); None reads them
        from the header line (CSV with header, RecBole atomic files).
    quoted: True for CSV with "..." quoting (values may hold delimiters and newlines),
        False for TSV where quotes are ordinary characters.
    required: header columns that must exist (checked only when columns is None).
    """
    require_file(path, what)
    invalid: list[tuple[int | None, int, int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, row.expected_columns, row.actual_columns, row.text))
        return "skip"

    read_options = pacsv.ReadOptions(
        use_threads=False,  # keeps record numbers exact for rejects
        block_size=64 << 20,
        column_names=columns,
        autogenerate_column_names=False,
    )
    parse_options = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if quoted else False,
        newlines_in_values=quoted,
        ignore_empty_lines=True,
        invalid_row_handler=on_invalid,
    )
    try:
        header = None
        if columns is None:
            header = _read_header(path, delimiter, quoted)
            read_options = pacsv.ReadOptions(
                use_threads=False, block_size=64 << 20, column_names=header, skip_rows=1
            )
        names = columns or header or []
        convert_options = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            check_utf8=False,
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        table = pacsv.read_csv(
            storage.local_or_bytes(path),
            read_options=read_options,
            parse_options=parse_options,
            convert_options=convert_options,
        )
    except pa.ArrowInvalid as error:
        raise InputFileError(f"{path}: cannot parse as delimited text: {error}") from error

    if columns is None and required:
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise InputFileError(
                f"{path}: missing column(s) {missing}; the header has {table.column_names}"
            )

    # Record numbers of kept rows: physical order minus the skipped ones before them.
    # pyarrow numbers records from the start of the file (header included, blank
    # lines not counted); we report data records, 1-based, header excluded.
    header_offset = 1 if columns is None else 0
    skipped = sorted(n - header_offset for n, *_ in invalid if n is not None)
    numbers = _kept_row_numbers(table.num_rows, skipped)
    for number, expected, actual, text in invalid:
        rejects.add(
            stage,
            path,
            f"expected {expected} fields, found {actual}",
            row=None if number is None else number - header_offset,
            raw=text,
        )
    table = table.append_column(ROW, pa.array(numbers, pa.int64()))
    return _reject_invalid_utf8(table, path, stage, rejects)


def _read_header(path: str, delimiter: str, quoted: bool) -> list[str]:
    with storage.open_binary(path) as handle:
        first = handle.readline()
    try:
        line = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise InputFileError(f"{path}: header line is not valid UTF-8 ({error})") from error
    if not line:
        raise InputFileError(f"{path}: file is empty (expected a header line)")
    names = line.split(delimiter)
    if quoted:
        names = [n.strip().strip('"') for n in names]
    return names


def _kept_row_numbers(num_rows: int, skipped: list[int]) -> np.ndarray:
    """1-based record numbers of the rows that survived, given the skipped ones."""
    candidates = np.arange(1, num_rows + len(skipped) + 1, dtype=np.int64)
    return np.setdiff1d(candidates, np.asarray(skipped, dtype=np.int64))[:num_rows]


def _reject_invalid_utf8(table: pa.Table, path: str, stage: str, rejects: Rejects) -> pa.Table:
    bad = None
    for name in table.column_names:
        if name == ROW:
            continue
        column = table.column(name)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        # Slow path, only for a column that holds invalid bytes: find the rows.
        values = column.cast(pa.binary()).to_pylist()
        mask = []
        for index, value in enumerate(values):
            ok = True
            if value is not None:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    ok = False
                    rejects.add(
                        stage,
                        path,
                        f"invalid UTF-8 in field {name!r}",
                        row=table.column(ROW)[index].as_py(),
                        field=name,
                        raw=value.decode("utf-8", errors="replace"),
                    )
            mask.append(not ok)
        column_bad = pa.array(mask)
        bad = column_bad if bad is None else pc.or_(bad, column_bad)
    if bad is None:
        return table
    return table.filter(pc.invert(bad))
