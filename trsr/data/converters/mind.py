"""MIND (Microsoft News) -> canonical items and sequences.

Input: a folder with `behaviors.tsv` and `news.tsv`, tab separated, no header.

    behaviors.tsv  impression_id, user_id, time ("11/12/2019 2:14:46 PM"),
                   history (space-separated news ids, may be empty),
                   impressions (space-separated "N123-1" clicked / "N456-0" not clicked;
                   MIND's test split has bare ids without a label: no clicks)
    news.tsv       news_id, category, subcategory, title, abstract, url,
                   title_entities, abstract_entities

One sequence per user: the history of the user's earliest impression row (by time,
then row order; MIND repeats the same history on every row of a user), followed by the
news the user clicked in all their impression rows, in time order. History items have
no time (null timestamp); clicks carry their impression time in unix seconds (the
naive MIND time read as UTC).

Everything is vectorised (pyarrow reading, polars transforms): the only Python loops
run over rejected rows, never over the input.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
import pyarrow as pa
from pydantic import Field

from trsr import storage
from trsr.config import Section
from trsr.data.converters.base import (
    CONVERT,
    ConvertedDataset,
    drop_unknown_items_batched,
    items_from_frame,
    reject_duplicate_ids,
    sequences_from_frame,
)
from trsr.data.converters.tables import distinct_rows, read_tsv, require_nonempty
from trsr.data.io import ROW, require_file
from trsr.data.rejects import Rejects
from trsr.errors import ConfigError

BEHAVIOR_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]
NEWS_COLUMNS = [
    "news_id",
    "category",
    "subcategory",
    "title",
    "abstract",
    "url",
    "title_entities",
    "abstract_entities",
]
# Attribute (config name) -> name shown in prompts ("Category: travel; SubCategory: ...").
ATTRIBUTE_NAMES = {
    "category": "Category",
    "subcategory": "SubCategory",
    "title": "Title",
    "abstract": "Abstract",
}
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"

# One impression token: a news id (no whitespace, no dash) with an optional -0/-1 label.
_TOKEN = r"[^\s-]+(?:-[01])?"
_TOKEN_FULL = rf"^{_TOKEN}$"
_IMPRESSIONS_VALID = rf"^\s*(?:{_TOKEN}(?:\s+|$))*$"
# On a validated field every "-1" ends a clicked token.
_CLICKED = r"[^\s-]+-1"
_IDS = r"\S+"

REASON_EMPTY_USER = "empty user id"
REASON_BAD_TIME = "unparseable time (expected M/D/YYYY H:MM:SS AM/PM)"
REASON_BAD_TOKEN = "malformed impression token (expected <news id>-1, <news id>-0 or <news id>)"
REASON_EMPTY_NEWS = "empty news id"


class MindSource(Section):
    """MIND: `behaviors.tsv` + `news.tsv` (tab separated, no header)."""

    format: Literal["mind"] = "mind"
    path: str = Field(description="folder holding the two files")
    behaviors: str = "behaviors.tsv"
    news: str = "news.tsv"
    # Rendered in this order; any of category, subcategory, title, abstract.
    attributes: list[str] = ["category", "subcategory", "title"]


def convert(source: MindSource) -> ConvertedDataset:
    attributes = _attribute_columns(source.attributes)
    behaviors_path = storage.join(source.path, source.behaviors)
    news_path = storage.join(source.path, source.news)
    for path, what in ((behaviors_path, "MIND behaviors"), (news_path, "MIND news")):
        require_file(path, what)
        require_nonempty(path)

    rejects = Rejects()
    items, item_counts = _convert_news(news_path, attributes, rejects)
    known = pl.from_arrow(items.column("item_id").combine_chunks()).alias("item_id")
    sequences, sequence_counts = _convert_behaviors(behaviors_path, known, rejects)

    counts = {**sequence_counts, **item_counts}
    return ConvertedDataset(
        items=items,
        sequences=sequences,
        rejects=rejects,
        attributes=[ATTRIBUTE_NAMES[name] for name in source.attributes],
        counts=counts,
    )


# ----------------------------------------------------------------------------- checks


def _attribute_columns(names: list[str]) -> dict[str, str]:
    """{display name: news.tsv column} in rendering order; ConfigError on a bad name."""
    unknown = [name for name in names if name not in ATTRIBUTE_NAMES]
    if unknown:
        raise ConfigError(
            f"prepare.source.attributes: unknown MIND attribute(s) {unknown}; "
            f"allowed: {list(ATTRIBUTE_NAMES)}"
        )
    if not names:
        raise ConfigError(
            f"prepare.source.attributes: empty; name at least one of {list(ATTRIBUTE_NAMES)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"prepare.source.attributes: {repeated} listed more than once")
    return {ATTRIBUTE_NAMES[name]: name for name in names}


def _id_from_raw(raw: pl.Expr, index: int) -> pl.Expr:
    """Field `index` of a malformed record's raw text, or null if absent or blank."""
    value = raw.str.split("\t").list.get(index, null_on_oob=True).str.strip_chars()
    return pl.when(value != "").then(value).otherwise(None)


# ------------------------------------------------------------------------------- news


def _convert_news(path: str, attributes: dict[str, str], rejects: Rejects) -> tuple[pa.Table, dict]:
    table, read_rejected = read_tsv(path, NEWS_COLUMNS, "MIND news")
    read_rejected = pl.from_arrow(read_rejected)
    # Name the news id of a record with the wrong field count when it is readable.
    read_rejected = read_rejected.with_columns(
        pl.when(pl.col("field").is_null())
        .then(_id_from_raw(pl.col("raw"), 0))
        .otherwise(pl.col("item_id"))
        .alias("item_id")
    )
    rejects.add_table(read_rejected.to_arrow())
    rejected_rows = distinct_rows(read_rejected)

    needed = ["news_id", *dict.fromkeys(attributes.values()), ROW]
    frame = pl.from_arrow(table.select(needed))
    del table
    frame = frame.with_columns(pl.col("news_id").str.strip_chars())

    empty = frame.filter(pl.col("news_id") == "")
    if empty.height:
        rejects.add_table(
            empty.select(
                pl.lit(CONVERT).alias("stage"),
                pl.lit(path).alias("source"),
                pl.col(ROW).alias("row"),
                pl.lit("news_id").alias("field"),
                pl.lit(REASON_EMPTY_NEWS).alias("reason"),
            ).to_arrow()
        )
        frame = frame.filter(pl.col("news_id") != "")
    rows_before = frame.height
    frame = reject_duplicate_ids(frame, "news_id", path, rejects, what="item")
    duplicates = rows_before - frame.height

    items = items_from_frame(frame.sort("news_id"), "news_id", attributes)
    counts = {
        "items_in": items.num_rows + rejected_rows + empty.height + duplicates,
        "items_rejected": rejected_rows + empty.height + duplicates,
    }
    return items, counts


# -------------------------------------------------------------------------- behaviors


def _convert_behaviors(path: str, known: pl.Series, rejects: Rejects) -> tuple[pa.Table, dict]:
    table, read_rejected = read_tsv(path, BEHAVIOR_COLUMNS, "MIND behaviors")
    read_rejected = _name_rejected_users(path, pl.from_arrow(read_rejected))
    rejects.add_table(read_rejected.to_arrow())

    frame = pl.from_arrow(table.select(["user_id", "time", "history", "impressions", ROW]))
    rows_in = frame.height + distinct_rows(read_rejected)
    del table

    # Row-level checks, all vectorised: user id, time, impression tokens.
    frame = frame.with_columns(
        pl.col("user_id").str.strip_chars(),
        pl.col("time")
        .str.strip_chars()
        .str.strptime(pl.Datetime("us"), TIME_FORMAT, strict=False)
        .dt.epoch("s")
        .alias("ts"),
    )
    empty_user = pl.col("user_id") == ""
    bad_time = pl.col("ts").is_null()
    bad_tokens = pl.col("impressions").str.contains(_IMPRESSIONS_VALID).not_()
    frame = frame.with_columns((empty_user | bad_time | bad_tokens).alias("_bad"))
    bad = frame.filter(pl.col("_bad"))
    if bad.height:
        rejects.add_table(_row_rejects(bad, path, empty_user, bad_time).to_arrow())
    kept = frame.filter(pl.col("_bad").not_()).drop("_bad", "time")
    del frame

    # Users: every readable user id in the file is either kept or rejected.
    rejected_users = pl.concat(
        [read_rejected.get_column("user_id"), bad.get_column("user_id")], how="vertical"
    ).drop_nulls()
    rejected_users = rejected_users.filter(rejected_users != "").unique()
    kept_users = kept.get_column("user_id").unique()
    users_rejected = int(rejected_users.is_in(kept_users.implode()).not_().sum())
    del bad

    kept = kept.with_row_index("_idx")
    kept_rows = kept.height
    histories, unknown_history = _histories(kept, known, path, rejects)
    clicks, unknown_clicks = _clicks(kept.drop("history"), known, path, rejects)
    del kept

    joined = histories.join(clicks, on="user_id", how="left").select(
        "user_id",
        pl.concat_list(
            "item_ids", pl.col("clicks").fill_null(pl.lit([], dtype=pl.List(pl.Utf8)))
        ).alias("item_ids"),
        pl.concat_list(
            pl.lit(None, pl.Int64).repeat_by(pl.col("item_ids").list.len()),
            pl.col("click_ts").fill_null(pl.lit([], dtype=pl.List(pl.Int64))),
        ).alias("timestamps"),
    )
    del histories, clicks
    sequences = sequences_from_frame(joined.sort("user_id"), timestamps_column="timestamps")
    counts = {
        "rows_in": rows_in,
        "rows_rejected": rows_in - kept_rows,
        "users_in": sequences.num_rows + users_rejected,
        "users_rejected": users_rejected,
        "unknown_item_occurrences": unknown_history + unknown_clicks,
    }
    return sequences, counts


def _row_rejects(bad: pl.DataFrame, path: str, empty_user: pl.Expr, bad_time: pl.Expr) -> pl.DataFrame:
    """One reject per bad record, naming its first problem (user id, time, impressions)."""
    first_bad_token = (
        pl.col("impressions")
        .str.extract_all(_IDS)
        .list.eval(pl.element().filter(pl.element().str.contains(_TOKEN_FULL).not_()))
        .list.first()
    )
    return bad.select(
        pl.lit(CONVERT).alias("stage"),
        pl.lit(path).alias("source"),
        pl.col(ROW).alias("row"),
        pl.when(empty_user)
        .then(pl.lit("user_id"))
        .when(bad_time)
        .then(pl.lit("time"))
        .otherwise(pl.lit("impressions"))
        .alias("field"),
        pl.when(empty_user)
        .then(pl.lit(REASON_EMPTY_USER))
        .when(bad_time)
        .then(pl.lit(REASON_BAD_TIME))
        .otherwise(pl.lit(REASON_BAD_TOKEN))
        .alias("reason"),
        pl.when(empty_user).then(None).otherwise(pl.col("user_id")).alias("user_id"),
        pl.when(empty_user)
        .then(pl.lit(None, pl.Utf8))
        .when(bad_time)
        .then(pl.col("time"))
        .otherwise(first_bad_token)
        .alias("raw"),
    )


def _name_rejected_users(path: str, rejected: pl.DataFrame) -> pl.DataFrame:
    """Fill in the user id of records read_delimited refused, where it is readable.

    Wrong field count: the raw text is the record, its second field is the user id.
    Invalid UTF-8 in another field: the record is looked up in the file (rare path).
    """
    if rejected.height == 0:
        return rejected
    rejected = rejected.with_columns(
        pl.when(pl.col("field").is_null())
        .then(_id_from_raw(pl.col("raw"), 1))
        .otherwise(pl.col("user_id"))
        .alias("user_id")
    )
    wanted_rows = (
        rejected.filter(pl.col("field").is_not_null() & (pl.col("field") != "user_id"))
        .get_column("row")
        .drop_nulls()
        .unique()
        .to_list()
    )
    if wanted_rows:
        # Rows whose user id field itself is invalid stay unnamed.
        unreadable = set(
            rejected.filter(pl.col("field") == "user_id").get_column("row").drop_nulls().to_list()
        )
        found = _user_ids_of_records(path, set(wanted_rows) - unreadable)
        if found:
            lookup = pl.DataFrame(
                {"row": list(found), "_found": list(found.values())},
                schema={"row": pl.Int64, "_found": pl.Utf8},
            )
            rejected = (
                rejected.join(lookup, on="row", how="left")
                .with_columns(pl.coalesce("user_id", "_found").alias("user_id"))
                .drop("_found")
            )
    return rejected


def _user_ids_of_records(path: str, records: set[int]) -> dict[int, str]:
    """User ids of the given 1-based records (blank lines are not records)."""
    found: dict[int, str] = {}
    if not records:
        return found
    last = max(records)
    number = 0
    with storage.open_binary(path) as handle:
        for line in handle:
            if not line.rstrip(b"\r\n"):
                continue
            number += 1
            if number in records:
                fields = line.split(b"\t")
                if len(fields) > 1:
                    try:
                        user = fields[1].decode("utf-8").strip()
                    except UnicodeDecodeError:
                        user = ""
                    if user:
                        found[number] = user
            if number >= last:
                break
    return found


def _histories(kept: pl.DataFrame, known: pl.Series, path: str, rejects: Rejects) -> tuple[pl.DataFrame, int]:
    """user_id, item_ids: the history of each user's earliest row, unknown ids removed."""
    earliest = kept.group_by("user_id").agg(
        pl.col("_idx").sort_by(["ts", "_idx"]).first().alias("_idx")
    )
    histories = kept.select("_idx", "user_id", ROW, "history").join(
        earliest.select("_idx"), on="_idx", how="semi"
    )
    histories = histories.select(
        "user_id",
        pl.col(ROW).alias("row"),
        pl.col("history").str.extract_all(_IDS).alias("item_ids"),
    )
    histories, unknown = drop_unknown_items_batched(histories, known, path, rejects, "history")
    return histories.select("user_id", "item_ids"), unknown


def _clicks(kept: pl.DataFrame, known: pl.Series, path: str, rejects: Rejects) -> tuple[pl.DataFrame, int]:
    """user_id, clicks, click_ts: clicked news of all of a user's rows in time order."""
    rows = kept.select(
        "_idx",
        "user_id",
        "ts",
        pl.col(ROW).alias("row"),
        pl.col("impressions").str.extract_all(_CLICKED).alias("item_ids"),
    ).filter(pl.col("item_ids").list.len() > 0)
    rows = rows.with_columns(
        pl.col("item_ids").list.eval(pl.element().str.head(-2)),
        pl.col("ts").repeat_by(pl.col("item_ids").list.len()).alias("timestamps"),
    )
    rows, unknown = drop_unknown_items_batched(rows, known, path, rejects, "impressions")
    clicks = (
        rows.sort("user_id", "ts", "_idx")
        .select("user_id", "item_ids", "timestamps")
        .explode("item_ids", "timestamps")
        .filter(pl.col("item_ids").is_not_null())
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_ids").alias("clicks"), pl.col("timestamps").alias("click_ts"))
    )
    return clicks, unknown
