"""Amazon-M2 converter on small folders in the real KDD Cup 2023 format."""

from __future__ import annotations

from pathlib import Path

import pytest

from trsr.data.converters.amazon_m2 import AmazonM2Source
from trsr.data.converters import convert
from trsr.data.converters.amazon_m2 import convert as convert_amazon_m2
from trsr.errors import ConfigError, InputFileError
from tests.data.converted import sequences, items, rejects

PRODUCTS_HEADER = "id,locale,title,price,brand,color,size,model,material,author,desc\n"
PRODUCTS = PRODUCTS_HEADER + (
    'B0A,UK,"Kettle, steel",30.95,Acme,silver,1.7 L,K1,steel,,"Boils water, fast.\n'
    'Says ""hello"" too"\n'
    "B0B,UK,Mug,4.5,,,,,,,\n"
    'B0C,UK,Book,12.0,,,,,,"Doe, Jane",A novel\n'
    "B0A,DE,Wasserkocher,29.99,Acme,,,,,,\n"
    "B0D,DE,Tasse,3.0,,,,,,,\n"
)
SESSIONS_HEADER = "prev_items,next_item,locale\n"
SESSIONS = SESSIONS_HEADER + (
    "\"['B0A' 'B0B']\",B0C,UK\n"
    "\"['B0A' 'B0B' 'B0C'\n 'B0A']\",B0B,UK\n"  # numpy wraps long arrays over lines
    "\"['B0A']\",B0D,DE\n"
    "\"['B0C']\",B0A,UK\n"
)


def make(tmp_path: Path, sessions: str | bytes = SESSIONS, products: str | bytes = PRODUCTS) -> Path:
    folder = tmp_path / "m2"
    folder.mkdir(exist_ok=True)
    for name, text in (("sessions_train.csv", sessions), ("products_train.csv", products)):
        data = text.encode() if isinstance(text, str) else text
        (folder / name).write_bytes(data)
    return folder


def run(folder: Path, **options):
    return convert_amazon_m2(AmazonM2Source(path=str(folder), **options))


def check_accounting(result, sessions_file: str, products_file: str) -> None:
    counts = result.counts
    table = rejects(result)
    users = result.sequences.column("user_id").to_pylist()
    assert users == sorted(users) and len(set(users)) == len(users)
    assert counts["users_in"] == result.sequences.num_rows + counts["users_rejected"]
    assert counts["users_rejected"] == len({r["user_id"] for r in table} - {None} - set(users))
    unknown = [r for r in table if r["reason"] == "unknown item id"]
    assert counts["unknown_item_occurrences"] == len(unknown)
    session_rows = {r["row"] for r in table if r["source"] == sessions_file and r not in unknown}
    assert counts["rows_rejected"] == len(session_rows)
    product_rows = {r["row"] for r in table if r["source"] == products_file}
    assert counts["items_rejected"] == len(product_rows)
    assert counts["items_in"] - counts["items_rejected"] == result.items.num_rows
    assert result.sequences.column("timestamps").null_count == result.sequences.num_rows


def test_one_locale(tmp_path):
    folder = make(tmp_path)
    result = run(folder)  # locale defaults to UK
    assert sequences(result) == {
        "session-1": ["B0A", "B0B", "B0C"],
        "session-2": ["B0A", "B0B", "B0C", "B0A", "B0B"],
        "session-4": ["B0C", "B0A"],
    }
    assert result.attributes == [
        "Title", "Price", "Brand", "Color", "Size", "Model", "Material", "Author",
        "Description", "Locale",
    ]
    assert items(result) == {
        "B0A": [
            ("Title", "Kettle, steel"),
            ("Price", "30.95"),
            ("Brand", "Acme"),
            ("Color", "silver"),
            ("Size", "1.7 L"),
            ("Model", "K1"),
            ("Material", "steel"),
            ("Description", 'Boils water, fast.\nSays "hello" too'),
            ("Locale", "UK"),
        ],
        "B0B": [("Title", "Mug"), ("Price", "4.5"), ("Locale", "UK")],
        "B0C": [
            ("Title", "Book"),
            ("Price", "12.0"),
            ("Author", "Doe, Jane"),
            ("Description", "A novel"),
            ("Locale", "UK"),
        ],
    }
    assert len(result.rejects) == 0
    assert result.counts == {
        "rows_in": 3,
        "rows_rejected": 0,
        "users_in": 3,
        "users_rejected": 0,
        "unknown_item_occurrences": 0,
        "items_in": 3,
        "items_rejected": 0,
        "rows_other_locale": 1,
        "items_other_locale": 2,
    }


def test_all_locales_suffix_ids(tmp_path):
    folder = make(tmp_path)
    result = convert(AmazonM2Source(path=str(folder), locale=None, attributes=["desc", "title"]))
    assert sequences(result) == {
        "session-1": ["B0A@UK", "B0B@UK", "B0C@UK"],
        "session-2": ["B0A@UK", "B0B@UK", "B0C@UK", "B0A@UK", "B0B@UK"],
        "session-3": ["B0A@DE", "B0D@DE"],
        "session-4": ["B0C@UK", "B0A@UK"],
    }
    assert result.attributes == ["Description", "Title"]
    assert items(result) == {
        "B0A@UK": [("Description", 'Boils water, fast.\nSays "hello" too'), ("Title", "Kettle, steel")],
        "B0B@UK": [("Title", "Mug")],
        "B0C@UK": [("Description", "A novel"), ("Title", "Book")],
        "B0A@DE": [("Title", "Wasserkocher")],
        "B0D@DE": [("Title", "Tasse")],
    }
    assert result.counts["rows_in"] == 4 and result.counts["items_in"] == 5
    assert result.counts["rows_other_locale"] == 0 and result.counts["items_other_locale"] == 0
    check_accounting(result, str(folder / "sessions_train.csv"), str(folder / "products_train.csv"))


def test_other_prev_items_forms(tmp_path):
    # A Python list repr (commas) and an empty history are read too.
    folder = make(tmp_path, sessions=SESSIONS_HEADER + "\"['B0A', 'B0B']\",B0C,UK\n[],B0B,UK\n")
    result = run(folder)
    assert sequences(result) == {"session-1": ["B0A", "B0B", "B0C"], "session-2": ["B0B"]}


def test_missing_sessions_file(tmp_path):
    folder = make(tmp_path)
    (folder / "sessions_train.csv").unlink()
    with pytest.raises(InputFileError, match="sessions_train.csv"):
        run(folder)


def test_missing_products_file(tmp_path):
    folder = make(tmp_path)
    with pytest.raises(InputFileError, match="products_test.csv"):
        run(folder, products="products_test.csv")


def test_missing_session_column(tmp_path):
    folder = make(tmp_path, sessions="prev_items,locale\n\"['B0A']\",UK\n")
    with pytest.raises(InputFileError, match=r"sessions_train\.csv.*next_item"):
        run(folder)


def test_missing_product_column(tmp_path):
    text = PRODUCTS.replace(",desc\n", "\n", 1)
    folder = make(tmp_path, products=text)
    with pytest.raises(InputFileError, match=r"products_train\.csv.*desc"):
        run(folder)
    # Without desc among the attributes the file is fine... except that its data rows
    # still have 11 fields, so they are rejected row by row.
    result = run(folder, attributes=["title"])
    assert {(r["row"], r["reason"]) for r in rejects(result) if "products" in r["source"]} >= {
        (1, "expected 10 fields, found 11")
    }


def test_unknown_attribute(tmp_path):
    folder = make(tmp_path)
    with pytest.raises(ConfigError, match="colour"):
        run(folder, attributes=["title", "colour"])
    with pytest.raises(ConfigError, match="more than once"):
        run(folder, attributes=["title", "title"])


def test_wrong_field_count(tmp_path):
    text = SESSIONS + "\"['B0A']\",B0B,UK,extra\n" + "\"['B0B']\",B0A,UK\n"
    folder = make(tmp_path, sessions=text)
    result = run(folder)
    [reject] = rejects(result)
    assert reject["row"] == 5
    assert reject["field"] is None
    assert reject["reason"] == "expected 3 fields, found 4"
    assert reject["user_id"] == "session-5"
    assert "extra" in reject["raw"]
    assert sequences(result)["session-6"] == ["B0B", "B0A"]
    assert result.counts["rows_in"] == 5 and result.counts["rows_rejected"] == 1
    assert result.counts["users_in"] == 5 and result.counts["users_rejected"] == 1
    check_accounting(result, str(folder / "sessions_train.csv"), str(folder / "products_train.csv"))


def test_invalid_utf8(tmp_path):
    data = SESSIONS.encode() + b"\"['B0A']\",B0\xff,UK\n"
    folder = make(tmp_path, sessions=data)
    result = run(folder)
    [reject] = rejects(result)
    assert (reject["row"], reject["field"]) == (5, "next_item")
    assert reject["reason"] == "invalid UTF-8 in field 'next_item'"
    assert reject["user_id"] == "session-5"
    assert "session-5" not in sequences(result)
    assert result.counts["rows_in"] == 4 and result.counts["rows_rejected"] == 1
    check_accounting(result, str(folder / "sessions_train.csv"), str(folder / "products_train.csv"))


@pytest.mark.parametrize(
    "prev_items",
    ["[B0A B0B]", "['B0A' ... 'B0B']", "['B0A' 'B0B'", "B0A", "['B0A''B0B']"],
)
def test_unparseable_prev_items(tmp_path, prev_items):
    folder = make(tmp_path, sessions=SESSIONS + f'"{prev_items}",B0B,UK\n')
    result = run(folder)
    [reject] = rejects(result)
    assert (reject["row"], reject["field"], reject["user_id"]) == (5, "prev_items", "session-5")
    assert reject["reason"].startswith("unparseable prev_items")
    assert reject["raw"] == prev_items
    assert result.counts["rows_rejected"] == 1 and result.counts["users_rejected"] == 1
    check_accounting(result, str(folder / "sessions_train.csv"), str(folder / "products_train.csv"))


def test_empty_required_fields(tmp_path):
    text = SESSIONS + "\"['B0A']\",,UK\n" + ",B0A,UK\n" + "\"['B0A']\",B0B,\n"
    folder = make(tmp_path, sessions=text)
    result = run(folder)
    assert sorted((r["row"], r["field"], r["reason"], r["user_id"]) for r in rejects(result)) == [
        (5, "next_item", "empty next_item", "session-5"),
        (6, "prev_items", "empty prev_items", "session-6"),
        (7, "locale", "empty locale", "session-7"),
    ]
    assert result.counts["rows_in"] == 6 and result.counts["rows_rejected"] == 3
    check_accounting(result, str(folder / "sessions_train.csv"), str(folder / "products_train.csv"))


def test_unknown_item_ids(tmp_path):
    text = SESSIONS + "\"['B0Z' 'B0A' 'B0D']\",B0Y,UK\n" + "\"['B0X']\",B0W,UK\n"
    folder = make(tmp_path, sessions=text)
    result = run(folder)
    got = sorted((r["row"], r["field"], r["item_id"], r["user_id"], r["reason"]) for r in rejects(result))
    assert got == [
        (5, "next_item", "B0Y", "session-5", "unknown item id"),
        (5, "prev_items", "B0D", "session-5", "unknown item id"),  # a DE product
        (5, "prev_items", "B0Z", "session-5", "unknown item id"),
        (6, "next_item", "B0W", "session-6", "unknown item id"),
        (6, "prev_items", "B0X", "session-6", "unknown item id"),
    ]
    seqs = sequences(result)
    assert seqs["session-5"] == ["B0A"]
    assert seqs["session-6"] == []  # kept: the protocol excludes it with a reason
    assert result.counts["unknown_item_occurrences"] == 5
    assert result.counts["rows_rejected"] == 0 and result.counts["users_rejected"] == 0
    check_accounting(result, str(folder / "sessions_train.csv"), str(folder / "products_train.csv"))


def test_duplicate_product_ids(tmp_path):
    text = PRODUCTS + "B0B,UK,Second mug,5.0,,,,,,,\n" + ",UK,No id,1.0,,,,,,,\n"
    folder = make(tmp_path, products=text)
    result = run(folder)
    got = sorted((r["row"], r["field"], r["reason"], r["item_id"]) for r in rejects(result))
    assert got == [
        (6, "id", "duplicate item id (first occurrence kept)", "B0B"),
        (7, "id", "empty id", None),
    ]
    assert items(result)["B0B"][0] == ("Title", "Mug")
    assert result.counts["items_in"] == 5 and result.counts["items_rejected"] == 2
    check_accounting(result, str(folder / "sessions_train.csv"), str(folder / "products_train.csv"))


def test_locale_matching_nothing(tmp_path):
    folder = make(tmp_path)
    with pytest.raises(ConfigError, match=r"'uk'.*\['DE', 'UK'\]"):
        run(folder, locale="uk")


def test_float_noise_in_prices_is_rounded_and_text_prices_kept(tmp_path):
    products = PRODUCTS_HEADER + "B0A,UK,Kettle,30.950000000000003,,,,,,,\nB0B,UK,Mug,about 5,,,,,,,\nB0C,UK,Book,,,,,,,,\n"
    result = run(make(tmp_path, products=products))
    prices = {item: dict(attrs).get("Price") for item, attrs in items(result).items()}
    assert prices == {"B0A": "30.95", "B0B": "about 5", "B0C": None}
