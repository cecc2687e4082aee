"""The canonical data model: every Parquet file a trsr job reads or writes.

Each table has exactly one schema, declared here. Converters produce `ITEMS` and
`SEQUENCES`; the protocol turns them into `SAMPLES`; scorers (LLM and baselines)
write `SCORES`; every stage sends bad rows to `REJECTS` with a reason.

    items       item_id, attributes = ordered [(name, value)] text attributes
    sequences   user_id, item_ids (chronological), timestamps (optional, same length)
    samples     list_id, split, user_id, history, candidate, label, position
    scores      list_id, split, user_id, candidate, label, score, method
    rejects     stage, source, row, field, reason, user_id, item_id, raw

Attributes are a list of (name, value) structs rather than wide columns so that one
schema fits every catalogue (news has 4 attributes, Amazon-M2 has 10) and the order in
which attributes are rendered into prompts is kept with the data.
"""

from __future__ import annotations

import pyarrow as pa

ATTRIBUTE = pa.struct([("name", pa.string()), ("value", pa.string())])

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("attributes", pa.list_(ATTRIBUTE), nullable=False),
    ]
)

SEQUENCES = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_ids", pa.list_(pa.string()), nullable=False),
        # Unix seconds per item, or null where the source has no time (MIND history).
        pa.field("timestamps", pa.list_(pa.int64()), nullable=True),
    ]
)

SPLITS = ("train", "valid", "test")

SAMPLES = pa.schema(
    [
        # One ranking list per (split, user): a positive and its negatives.
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        # Chronological history before the target (oldest first).
        pa.field("history", pa.list_(pa.string()), nullable=False),
        pa.field("candidate", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        # Order of the candidate inside its list after the seeded shuffle.
        pa.field("position", pa.int16(), nullable=False),
    ]
)

SCORES = pa.schema(
    [
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("candidate", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
    ]
)

REJECTS = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),  # convert, protocol, summarize, ...
        pa.field("source", pa.string(), nullable=False),  # file the row came from
        pa.field("row", pa.int64(), nullable=True),  # 1-based line/record number in source
        pa.field("field", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=True),
        pa.field("item_id", pa.string(), nullable=True),
        pa.field("raw", pa.string(), nullable=True),  # offending text, truncated
    ]
)


class SchemaError(ValueError):
    """A table does not match the canonical schema it claims to follow."""


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Select, order and cast `table`'s columns to `schema`; name what is missing.

    `what` names the table in the error (e.g. a file path) so a user knows where to look.
    """
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SchemaError(
            f"{what}: missing column(s) {missing}; expected {schema.names}, "
            f"found {table.column_names}"
        )
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise SchemaError(
                    f"{what}: column {field.name!r} has type {column.type}, "
                    f"expected {field.type}: {error}"
                ) from error
        if not field.nullable and column.null_count:
            raise SchemaError(f"{what}: column {field.name!r} has {column.null_count} null(s)")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
