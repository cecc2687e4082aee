"""MIND converter: exact output on hand-written files, every bad-input case, real sample."""

from __future__ import annotations

import calendar
import time
from pathlib import Path

import polars as pl
import pytest

from trsr.data.converters.mind import MindSource
from trsr.data.converters import convert as dispatch
from trsr.data.converters.mind import convert
from trsr.errors import ConfigError, InputFileError


def epoch(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%m/%d/%Y %I:%M:%S %p"))


def news_line(news_id: str, category: str, title: str, abstract: str = "", sub: str = "sub") -> str:
    return "\t".join([news_id, category, sub, title, abstract, f"https://x/{news_id}", "[]", "[]"])


def write(folder: Path, behaviors: list[str] | bytes, news: list[str] | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("behaviors.tsv", behaviors), ("news.tsv", news)):
        data = content if isinstance(content, bytes) else ("\n".join(content) + "\n").encode()
        (folder / name).write_bytes(data)
    return folder


NEWS = [
    news_line("N1", "sports", "Title one", "Abstract one", "football_nfl"),
    news_line("N2", "travel", "  Title two  ", "", "travelnews"),
    news_line("N3", "finance", "Title three", "Abstract three", "markets"),
    news_line("N4", "sports", "Title four", "Abstract four", "golf"),
    news_line("N5", "music", "Title five", "Abstract five", "musicnews"),
]

GOOD_BEHAVIORS = [
    "1\tU2\t11/13/2019 9:00:00 AM\tN5 N5\tN3-1 N4-0 N5-1",  # later row: history unused
    "2\tU1\t11/12/2019 2:14:46 PM\tN3 N1 N3\tN2-0 N4-1",
    "3\tU2\t11/12/2019 8:00:00 AM\tN1 N2\tN4-1 N1-0",
    # Same time as row 2: row order decides; this row's history is not used.
    "4\tU1\t11/12/2019 2:14:46 PM\tN5\tN5-1",
    "5\tU3\t11/14/2019 12:00:00 AM\t\tN1-0 N2-0",
    # MIND test split: no labels, so no clicks.
    "6\tU4\t11/15/2019 1:00:00 PM\t\tN2 N3",
]


def rows_of(dataset, **where) -> list[dict]:
    table = pl.from_arrow(dataset.rejects.table())
    for key, value in where.items():
        table = table.filter(pl.col(key) == value)
    return table.sort("row").to_dicts()


def check_accounting(dataset) -> None:
    counts = dataset.counts
    assert counts["users_in"] == dataset.sequences.num_rows + counts["users_rejected"]
    assert counts["items_in"] == dataset.items.num_rows + counts["items_rejected"]
    unknown = [r for r in rows_of(dataset) if r["reason"] == "unknown item id"]
    assert counts["unknown_item_occurrences"] == len(unknown)


# ---------------------------------------------------------------------------- good input


def test_sequences_timestamps_and_sort_order(tmp_path):
    folder = write(tmp_path, GOOD_BEHAVIORS, NEWS)
    dataset = convert(MindSource(path=str(folder)))
    assert dataset.sequences.to_pylist() == [
        {
            "user_id": "U1",
            "item_ids": ["N3", "N1", "N3", "N4", "N5"],
            "timestamps": [None, None, None, epoch("11/12/2019 2:14:46 PM"), epoch("11/12/2019 2:14:46 PM")],
        },
        {
            # History from the earliest row (row 3), then clicks in time order.
            "user_id": "U2",
            "item_ids": ["N1", "N2", "N4", "N3", "N5"],
            "timestamps": [
                None,
                None,
                epoch("11/12/2019 8:00:00 AM"),
                epoch("11/13/2019 9:00:00 AM"),
                epoch("11/13/2019 9:00:00 AM"),
            ],
        },
        # Empty history and no clicks: kept, the protocol excludes it later.
        {"user_id": "U3", "item_ids": [], "timestamps": []},
        {"user_id": "U4", "item_ids": [], "timestamps": []},
    ]
    assert epoch("11/12/2019 2:14:46 PM") == 1573568086  # naive MIND time read as UTC
    assert len(dataset.rejects) == 0
    assert dataset.counts == {
        "rows_in": 6,
        "rows_rejected": 0,
        "users_in": 4,
        "users_rejected": 0,
        "unknown_item_occurrences": 0,
        "items_in": 5,
        "items_rejected": 0,
    }


def test_sequences_sorted_by_user_id_regardless_of_file_order(tmp_path):
    behaviors = [
        f"{i}\tU{u}\t11/12/2019 {1 + i % 11}:00:00 AM\tN1\tN2-1" for i, u in enumerate([9, 10, 1, 5, 10, 2])
    ]
    dataset = convert(MindSource(path=str(write(tmp_path, behaviors, NEWS))))
    users = dataset.sequences.column("user_id").to_pylist()
    assert users == sorted(users) == ["U1", "U10", "U2", "U5", "U9"]


def test_attributes_rendering_order_and_blank_values(tmp_path):
    folder = write(tmp_path, GOOD_BEHAVIORS, NEWS)
    dataset = convert(MindSource(path=str(folder), attributes=["title", "abstract", "category"]))
    assert dataset.attributes == ["Title", "Abstract", "Category"]
    items = {row["item_id"]: row["attributes"] for row in dataset.items.to_pylist()}
    assert items["N1"] == [
        {"name": "Title", "value": "Title one"},
        {"name": "Abstract", "value": "Abstract one"},
        {"name": "Category", "value": "sports"},
    ]
    # Stripped, and the blank abstract is left out.
    assert items["N2"] == [
        {"name": "Title", "value": "Title two"},
        {"name": "Category", "value": "travel"},
    ]
    default = convert(MindSource(path=str(folder)))
    assert default.attributes == ["Category", "SubCategory", "Title"]
    assert default.items.to_pylist()[0] == {
        "item_id": "N1",
        "attributes": [
            {"name": "Category", "value": "sports"},
            {"name": "SubCategory", "value": "football_nfl"},
            {"name": "Title", "value": "Title one"},
        ],
    }


def test_unknown_attribute_is_a_config_error(tmp_path):
    folder = write(tmp_path, GOOD_BEHAVIORS, NEWS)
    with pytest.raises(ConfigError, match="'url'"):
        convert(MindSource(path=str(folder), attributes=["title", "url"]))


def test_dispatch_by_format(tmp_path):
    folder = write(tmp_path, GOOD_BEHAVIORS, NEWS)
    assert dispatch(MindSource(path=str(folder))).sequences.num_rows == 4


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("missing", ["behaviors.tsv", "news.tsv"])
def test_missing_file_names_it(tmp_path, missing):
    folder = write(tmp_path, GOOD_BEHAVIORS, NEWS)
    (folder / missing).unlink()
    with pytest.raises(InputFileError, match=missing):
        convert(MindSource(path=str(folder)))


@pytest.mark.parametrize("empty", ["behaviors.tsv", "news.tsv"])
@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_file_names_it(tmp_path, empty, content):
    folder = write(tmp_path, GOOD_BEHAVIORS, NEWS)
    (folder / empty).write_bytes(content)
    with pytest.raises(InputFileError, match=rf"{empty}.*empty"):
        convert(MindSource(path=str(folder)))


BAD_BEHAVIORS = b"\n".join(
    [
        b"1\tU1\t11/12/2019 2:14:46 PM\tN1 N9\tN2-1 N3-0",  # N9 unknown (history)
        b"2\tU5\t11/12/2019 2:14:46 PM\tN1",  # 4 fields
        b"3\tU6\t11/12/2019 2:14:46 PM\tN\xff1\tN2-1",  # invalid UTF-8 in history
        b"4\tU7\tyesterday\tN1\tN2-1",  # bad time
        b"5\tU1\t11/13/2019 2:14:46 PM\tN1\tN2-1 N3-x",  # malformed token
        b"6\t \t11/12/2019 2:14:46 PM\tN1\tN2-1",  # empty user id
        b"7\tU8\t11/12/2019 3:00:00 PM\t\tN99-1 N2-0",  # empty history, unknown click
        b"8\tU\xfe9\t11/12/2019 2:14:46 PM\tN1\tN2-1",  # invalid UTF-8 in user id
        b"",
    ]
)
BAD_NEWS = b"\n".join(
    [
        news_line("N1", "sports", "One").encode(),
        news_line("N2", "travel", "Two").encode(),
        news_line("N3", "finance", "Three").encode(),
        news_line("N1", "music", "Duplicate").encode(),  # duplicate id
        b"N7\tsports\tshort",  # 3 fields
        news_line("N4", "music", "Bad \xff").encode("latin-1"),  # invalid UTF-8 in title
        news_line("  ", "music", "No id").encode(),  # empty news id
        b"",
    ]
)


@pytest.fixture
def bad(tmp_path):
    folder = write(tmp_path, BAD_BEHAVIORS, BAD_NEWS)
    return convert(MindSource(path=str(folder))), str(folder / "behaviors.tsv"), str(folder / "news.tsv")


def test_bad_behaviour_rows_are_rejected_with_row_field_and_reason(bad):
    dataset, behaviors, _ = bad
    got = [
        (r["row"], r["field"], r["reason"], r["user_id"], r["item_id"], r["raw"])
        for r in rows_of(dataset, source=behaviors)
    ]
    assert got == [
        (1, "history", "unknown item id", "U1", "N9", None),
        (2, None, "expected 5 fields, found 4", "U5", None, "2\tU5\t11/12/2019 2:14:46 PM\tN1"),
        (3, "history", "invalid UTF-8 in field 'history'", "U6", None, "N\ufffd1"),
        (4, "time", "unparseable time (expected M/D/YYYY H:MM:SS AM/PM)", "U7", None, "yesterday"),
        (
            5,
            "impressions",
            "malformed impression token (expected <news id>-1, <news id>-0 or <news id>)",
            "U1",
            None,
            "N3-x",
        ),
        (6, "user_id", "empty user id", None, None, None),
        (7, "impressions", "unknown item id", "U8", "N99", None),
        (8, "user_id", "invalid UTF-8 in field 'user_id'", None, None, "U\ufffd9"),
    ]
    assert {r["stage"] for r in rows_of(dataset)} == {"convert"}


def test_bad_news_rows_are_rejected(bad):
    dataset, _, news = bad
    got = [(r["row"], r["field"], r["reason"], r["item_id"]) for r in rows_of(dataset, source=news)]
    assert got == [
        (4, "news_id", "duplicate item id (first occurrence kept)", "N1"),
        (5, None, "expected 8 fields, found 3", "N7"),
        (6, "title", "invalid UTF-8 in field 'title'", None),
        (7, "news_id", "empty news id", None),
    ]
    items = {r["item_id"]: r["attributes"] for r in dataset.items.to_pylist()}
    assert sorted(items) == ["N1", "N2", "N3"]
    assert items["N1"][0] == {"name": "Category", "value": "sports"}  # first occurrence kept


def test_bad_input_counts_add_up(bad):
    dataset, _, _ = bad
    assert dataset.sequences.to_pylist() == [
        {"user_id": "U1", "item_ids": ["N1", "N2"], "timestamps": [None, epoch("11/12/2019 2:14:46 PM")]},
        # Empty history and its only click unknown: kept with an empty sequence.
        {"user_id": "U8", "item_ids": [], "timestamps": []},
    ]
    assert dataset.counts == {
        "rows_in": 8,
        "rows_rejected": 6,  # rows 2, 3, 4, 5, 6, 8; rows 1 and 7 kept
        "users_in": 5,  # U1, U5, U6, U7, U8 (two rows have no readable user id)
        "users_rejected": 3,  # U5, U6, U7
        "unknown_item_occurrences": 2,
        "items_in": 7,
        "items_rejected": 4,
    }
    check_accounting(dataset)
    # Every rejected user has a reject row naming it.
    rejected_users = {r["user_id"] for r in rows_of(dataset)}
    assert {"U5", "U6", "U7"} <= rejected_users


def test_all_rows_rejected(tmp_path):
    folder = write(tmp_path, ["1\tU1\tnot a time\tN1\tN2-1", "2\tU2\t11/12/2019 2:14:46 PM\tN1\tN2-7"], NEWS)
    dataset = convert(MindSource(path=str(folder)))
    assert dataset.sequences.num_rows == 0
    assert dataset.counts["rows_in"] == dataset.counts["rows_rejected"] == 2
    assert dataset.counts["users_in"] == dataset.counts["users_rejected"] == 2
    assert [r["raw"] for r in rows_of(dataset)] == ["not a time", "N2-7"]


@pytest.mark.parametrize(
    "impressions, ok",
    [
        ("N1-1 N2-0", True),
        ("N1 N2", True),
        ("  N1-1   N2-0 ", True),
        ("", True),
        ("N1-1 N2-", False),
        ("N1-1 -1", False),
        ("N1-10", False),
        ("N1-1-0", False),
        ("N1-1,N2-0", False),
    ],
)
def test_impression_token_grammar(tmp_path, impressions, ok):
    folder = write(tmp_path, [f"1\tU1\t11/12/2019 2:14:46 PM\tN3\t{impressions}"], NEWS)
    dataset = convert(MindSource(path=str(folder)))
    assert (dataset.counts["rows_rejected"] == 0) is ok
    if ok:
        clicked = ["N1"] if "N1-1" in impressions else []
        assert dataset.sequences.column("item_ids").to_pylist() == [["N3", *clicked]]


# ---------------------------------------------------------------------------- real data


def test_real_mind_sample(shared_data):
    folder = shared_data / "mind-sample"
    dataset = convert(MindSource(path=str(folder)))
    counts = dataset.counts

    # Independent reading of the raw files in plain Python.
    lines = [line for line in (folder / "behaviors.tsv").read_bytes().split(b"\n") if line.strip(b"\r")]
    assert len(lines) == 5000
    records = [line.decode().rstrip("\r").split("\t") for line in lines]
    news = {line.split("\t")[0] for line in (folder / "news.tsv").read_text().splitlines() if line}
    users = {r[1] for r in records}
    earliest: dict[str, tuple] = {}
    for number, r in enumerate(records, start=1):
        key = (epoch(r[2]), number)
        if r[1] not in earliest or key < earliest[r[1]][0]:
            earliest[r[1]] = (key, r[3].split())
    history_unknown = sum(1 for _, h in earliest.values() for i in h if i not in news)
    clicks = [t[:-2] for r in records for t in r[4].split() if t.endswith("-1")]
    click_unknown = sum(1 for i in clicks if i not in news)
    expected_items = sum(1 for _, h in earliest.values() for i in h if i in news) + len(clicks) - click_unknown

    assert counts["rows_in"] == 5000
    rejected_rows = {r["row"] for r in rows_of(dataset) if r["reason"] != "unknown item id"}
    assert counts["rows_rejected"] == len(rejected_rows)
    assert counts["users_in"] == len(users) == dataset.sequences.num_rows + counts["users_rejected"]
    assert counts["unknown_item_occurrences"] == history_unknown + click_unknown > 0
    assert counts["items_in"] == len(news) == dataset.items.num_rows + counts["items_rejected"]
    check_accounting(dataset)

    sequences = pl.from_arrow(dataset.sequences)
    assert sequences.get_column("item_ids").list.len().sum() == expected_items
    assert sequences.get_column("user_id").to_list() == sorted(users)
    # Every id left in a sequence has text; timestamps align with items.
    flat = set(sequences.get_column("item_ids").explode().drop_nulls().to_list())
    assert flat <= news
    assert (
        sequences.get_column("item_ids").list.len() == sequences.get_column("timestamps").list.len()
    ).all()
    # Very long and empty histories exist in the sample.
    assert max(len(h) for _, h in earliest.values()) > 200
    assert any(not h for _, h in earliest.values())
