"""Amazon-M2 (KDD Cup 2023): `sessions_train.csv` + `products_train.csv`.

    sessions_train.csv   prev_items,next_item,locale
                         prev_items is a numpy repr of the session's earlier product
                         ids, "['B09W9FND7K' 'B09JSPLN1M']" (space separated, may wrap
                         over several lines inside the quoted field)
    products_train.csv   id,locale,title,price,brand,color,size,model,material,author,desc
                         (quoted CSV; desc may hold commas, quotes and newlines)

Each session is one user, `session-<row>` (its 1-based record number in the
sessions file, so ids are stable), with sequence prev_items + [next_item] and no
timestamps. Product ids are unique per locale: with `source.locale` set only that
locale's sessions and products are kept (the others are counted, not rejected:
`rows_other_locale`, `items_other_locale`); with `locale: null` every locale is kept
and ids become "<id>@<locale>" in both tables.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from trsr.config import Section
from trsr.data.converters.base import (
    CONVERT,
    ConvertedDataset,
    attribute_map,
    check_attribute_list,
    drop_unknown_items,
    items_from_frame,
    reject_duplicate_ids,
    sequences_from_frame,
)
from trsr.data.converters.tables import reject_blank, reject_where, rejected_records, resolve
from trsr.data.io import ROW, read_delimited
from trsr.data.rejects import Rejects
from trsr.errors import ConfigError

PRODUCT_COLUMNS = (
    "id", "locale", "title", "price", "brand", "color", "size", "model", "material", "author", "desc",
)
ATTRIBUTES = PRODUCT_COLUMNS[1:]
SESSION_COLUMNS = ("prev_items", "next_item", "locale")

# One quoted id: no quotes or whitespace inside.
_ID = r"'[^'\s]+'"
# numpy separates ids by whitespace (newlines when wrapped); a Python list repr by ", ".
_SEP = r"(?:\s*,\s*|\s+)"
PREV_ITEMS = rf"^\[\s*(?:{_ID}(?:{_SEP}{_ID})*)?\s*\]$"


class AmazonM2Source(Section):
    """Amazon-M2 (KDD Cup 2023): sessions_train.csv + products_train.csv."""

    format: Literal["amazon_m2"] = "amazon_m2"
    path: str
    sessions: str = "sessions_train.csv"
    products: str = "products_train.csv"
    # Keep one locale (product ids are per locale); null keeps all (ids become id@locale).
    locale: str | None = "UK"
    attributes: list[str] = [
        "title", "price", "brand", "color", "size", "model", "material", "author", "desc", "locale",
    ]


def session_user_id(row: pl.Expr) -> pl.Expr:
    return pl.concat_str(pl.lit("session-"), row.cast(pl.String))


def convert(source: AmazonM2Source) -> ConvertedDataset:
    check_attribute_list(source.attributes, ATTRIBUTES, "Amazon-M2 products")
    attributes = attribute_map(list(source.attributes))
    sessions_path = resolve(source.path, source.sessions)
    products_path = resolve(source.path, source.products)
    locale = source.locale

    # Products.
    item_rejects = Rejects()
    table = read_delimited(
        products_path,
        columns=None,
        delimiter=",",
        stage=CONVERT,
        rejects=item_rejects,
        quoted=True,
        required=["id", "locale", *source.attributes],
        what="products",
    )
    products = pl.from_arrow(table)
    assert isinstance(products, pl.DataFrame)
    # Counted in items_in: rows of the kept locale(s) and every row rejected before
    # the locale filter (their locale is unknown or blank).
    rejected_early = rejected_records(item_rejects) + products.height
    products = products.with_columns(pl.col("id", "locale").str.strip_chars())
    products = reject_blank(products, ["locale"], source=products_path, rejects=item_rejects,
                            item_column="id")
    rejected_early -= products.height
    items_other_locale = 0
    if locale is not None:
        in_locale = pl.col("locale") == locale
        items_other_locale = products.height - products.filter(in_locale).height
        products = products.filter(in_locale)
    items_in = products.height + rejected_early
    products = reject_blank(products, ["id"], source=products_path, rejects=item_rejects)
    products = products.with_columns(_localised(pl.col("id"), locale).alias("id"))
    products = reject_duplicate_ids(products, "id", products_path, item_rejects)
    # The release stores prices as floats ("30.950000000000003"); show them as money.
    price = pl.col("price").str.strip_chars()
    as_number = price.cast(pl.Float64, strict=False)
    products = products.with_columns(
        pl.when(as_number.is_not_null()).then(as_number.round(2).cast(pl.Utf8)).otherwise(price).alias("price")
    )
    items_table = items_from_frame(products, "id", attributes)

    # Sessions.
    read_rejects = Rejects()
    table = read_delimited(
        sessions_path,
        columns=None,
        delimiter=",",
        stage=CONVERT,
        rejects=read_rejects,
        quoted=True,
        required=list(SESSION_COLUMNS),
        what="sessions",
    )
    session_rejects = Rejects()
    session_rejects.add_table(_with_session_users(read_rejects.table()))
    sessions = pl.from_arrow(table)
    assert isinstance(sessions, pl.DataFrame)
    rejected_early = rejected_records(read_rejects) + sessions.height
    sessions = sessions.select(
        session_user_id(pl.col(ROW)).alias("user_id"),
        pl.col("prev_items"),
        pl.col("next_item", "locale").str.strip_chars(),
        pl.col(ROW),
    )
    common = dict(source=sessions_path, rejects=session_rejects, user_column="user_id")
    sessions = reject_blank(sessions, ["locale"], **common)
    rejected_early -= sessions.height
    rows_other_locale = 0
    if locale is not None:
        in_locale = pl.col("locale") == locale
        kept = sessions.filter(in_locale)
        rows_other_locale = sessions.height - kept.height
        if kept.height == 0 and sessions.height:
            found = sorted(sessions.get_column("locale").unique().to_list())
            raise ConfigError(
                f"prepare.source.locale: {locale!r} matches no session in {sessions_path}; "
                f"locales found: {found}"
            )
        sessions = kept
    rows_in = sessions.height + rejected_early
    sessions = reject_blank(sessions, ["prev_items", "next_item"], **common)
    sessions = reject_where(
        sessions,
        pl.col("prev_items").str.contains(PREV_ITEMS).not_(),
        field="prev_items",
        reason="unparseable prev_items (expected a list of quoted ids like "
        "\"['B09W9FND7K' 'B09JSPLN1M']\")",
        raw_column="prev_items",
        **common,
    )
    rows_kept = sessions.height

    # Ids: quoted tokens of prev_items (suffixed with @locale in place when needed).
    prev = pl.col("prev_items")
    if locale is None:
        escaped = pl.col("locale").str.replace_all("$", "$$", literal=True)
        suffixed = pl.concat_str(pl.lit("'${1}@"), escaped, pl.lit("'"))
        prev = prev.str.replace_all(r"'([^'\s]+)'", suffixed)
    frame = sessions.select(
        "user_id",
        prev.str.extract_all(_ID).list.eval(pl.element().str.strip_chars("'")).alias("item_ids"),
        _localised(pl.col("next_item"), locale).alias("_next"),
        pl.col(ROW),
    )
    known = products.get_column("id")
    frame, unknown_prev = drop_unknown_items(frame, known, sessions_path, session_rejects,
                                             "prev_items")
    frame = frame.rename({"item_ids": "_prev"}).with_columns(
        pl.concat_list("_next").alias("item_ids")
    )
    frame, unknown_next = drop_unknown_items(frame, known, sessions_path, session_rejects,
                                             "next_item")
    frame = frame.select(
        "user_id", pl.concat_list("_prev", "item_ids").alias("item_ids")
    ).sort("user_id", maintain_order=True)

    counts = {
        "rows_in": rows_in,
        "rows_rejected": rows_in - rows_kept,
        "users_in": rows_in,  # one user per session row
        "users_rejected": rows_in - rows_kept,
        "unknown_item_occurrences": unknown_prev + unknown_next,
        "items_in": items_in,
        "items_rejected": items_in - products.height,
        "rows_other_locale": rows_other_locale,
        "items_other_locale": items_other_locale,
    }
    rejects = Rejects()
    rejects.extend(item_rejects)
    rejects.extend(session_rejects)
    return ConvertedDataset(
        items=items_table,
        sequences=sequences_from_frame(frame),
        rejects=rejects,
        attributes=list(attributes),
        counts=counts,
    )


def _localised(ids: pl.Expr, locale: str | None) -> pl.Expr:
    """Ids as they appear in the output: "<id>@<locale>" when all locales are kept."""
    if locale is not None:
        return ids
    return pl.concat_str(ids, pl.lit("@"), pl.col("locale"))


def _with_session_users(table: pa.Table) -> pa.Table:
    """Rejects from reading the sessions file, with the session's user id filled in."""
    if table.num_rows == 0:
        return table
    rows = table.column("row")
    users = pc.if_else(
        pc.is_null(rows),
        pa.scalar(None, pa.string()),
        pc.binary_join_element_wise("session-", pc.cast(rows, pa.string()), ""),
    )
    return table.set_column(table.schema.get_field_index("user_id"), "user_id", users)
