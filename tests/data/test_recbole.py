"""RecBole converter: atomic files in both interaction forms, bad input, real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from trsr.data.converters.recbole import RecBoleSource
from trsr.data.converters import convert
from trsr.data.converters.recbole import convert as convert_recbole
from trsr.errors import ConfigError, InputFileError
from tests.data.converted import sequences, timestamps, items, rejects

ITEM = (
    "item_id:token\ttitle:token_seq\tprice:float\n"
    "i1\tZelda\t59.9\n"
    "i2\tMario Kart\t\n"
    'i3\t"Quoted" title, with comma\t10\n'
)
SEQUENCE_INTER = (
    "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    "u2\ti1 i2\ti3\n"
    "u1\ti3\ti1\n"
    "u10\ti1 i2 i3 i1\ti2\n"
)
ROW_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "u2\ti1\t5\t300\n"
    "u1\ti2\t3\t250.9\n"
    "u2\ti3\t4\t100\n"
    "u1\ti1\t1\t200\n"
    "u2\ti2\t2\t300\n"
)


def make(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    folder = tmp_path / "recbole"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_bytes(text.encode() if isinstance(text, str) else text)
    return folder


def run(folder: Path, **options):
    return convert_recbole(RecBoleSource(path=str(folder), **options))


def check_accounting(result, inter_file: str, item_file: str) -> None:
    counts = result.counts
    table = rejects(result)
    users = result.sequences.column("user_id").to_pylist()
    assert users == sorted(users) and len(set(users)) == len(users)
    assert counts["users_in"] == result.sequences.num_rows + counts["users_rejected"]
    assert counts["users_rejected"] == len({r["user_id"] for r in table} - {None} - set(users))
    unknown = [r for r in table if r["reason"] == "unknown item id"]
    assert counts["unknown_item_occurrences"] == len(unknown)
    inter_rows = {r["row"] for r in table if r["source"] == inter_file and r not in unknown}
    assert counts["rows_rejected"] == len(inter_rows)
    item_rows = {r["row"] for r in table if r["source"] == item_file}
    assert counts["items_rejected"] == len(item_rows)
    assert counts["items_in"] - counts["items_rejected"] == result.items.num_rows


def test_sequence_form(tmp_path):
    folder = make(tmp_path, {"shop.item": ITEM, "shop.test.inter": SEQUENCE_INTER,
                             "shop.inter": ROW_INTER})
    result = convert(RecBoleSource(path=str(folder)))  # dataset inferred, test.inter preferred
    assert sequences(result) == {
        "u1": ["i3", "i1"],
        "u10": ["i1", "i2", "i3", "i1", "i2"],
        "u2": ["i1", "i2", "i3"],
    }
    assert timestamps(result) == {"u1": None, "u10": None, "u2": None}
    assert result.attributes == ["Title", "Price"]
    assert items(result) == {
        "i1": [("Title", "Zelda"), ("Price", "59.9")],
        "i2": [("Title", "Mario Kart")],
        "i3": [("Title", '"Quoted" title, with comma'), ("Price", "10")],
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
    }


def test_row_form_orders_by_timestamp(tmp_path):
    folder = make(tmp_path, {"shop.item": ITEM, "shop.test.inter": SEQUENCE_INTER,
                             "shop.inter": ROW_INTER})
    result = run(folder, inter="inter", attributes=["price"])
    assert sequences(result) == {"u1": ["i1", "i2"], "u2": ["i3", "i1", "i2"]}  # ties: file order
    assert timestamps(result) == {"u1": [200, 250], "u2": [100, 300, 300]}
    assert result.attributes == ["Price"]
    assert items(result) == {"i1": [("Price", "59.9")], "i2": [], "i3": [("Price", "10")]}
    assert result.counts["rows_in"] == 5 and result.counts["users_in"] == 2
    check_accounting(result, str(folder / "shop.inter"), str(folder / "shop.item"))


def test_row_form_without_timestamps_keeps_file_order(tmp_path):
    inter = "user_id:token\titem_id:token\nu1\ti3\nu2\ti1\nu1\ti1\nu1\ti2\n"
    folder = make(tmp_path, {"shop.item": ITEM, "shop.inter": inter})
    result = run(folder, dataset="shop")
    assert sequences(result) == {"u1": ["i3", "i1", "i2"], "u2": ["i1"]}
    assert timestamps(result) == {"u1": None, "u2": None}


def test_dataset_inference_needs_one_item_file(tmp_path):
    folder = make(tmp_path, {"a.item": ITEM, "b.item": ITEM, "a.inter": ROW_INTER})
    with pytest.raises(InputFileError, match=r"a\.item.*b\.item"):
        run(folder)
    assert sequences(run(folder, dataset="a"))["u1"] == ["i1", "i2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputFileError, match=r"none"):
        run(empty)


def test_missing_item_file(tmp_path):
    folder = make(tmp_path, {"shop.inter": ROW_INTER})
    with pytest.raises(InputFileError, match=r"shop\.item"):
        run(folder, dataset="shop")


def test_missing_inter_file(tmp_path):
    folder = make(tmp_path, {"shop.item": ITEM, "shop.inter": ROW_INTER})
    with pytest.raises(InputFileError, match=r"shop\.valid\.inter"):
        run(folder, inter="valid.inter")


def test_missing_column(tmp_path):
    folder = make(tmp_path, {"shop.item": ITEM, "shop.inter": "user:token\titem_id:token\nu1\ti1\n"})
    with pytest.raises(InputFileError, match=r"shop\.inter.*user_id"):
        run(folder)
    folder = make(tmp_path, {"shop.item": ITEM.replace("item_id:token", "id:token"),
                             "shop.inter": ROW_INTER})
    with pytest.raises(InputFileError, match=r"shop\.item.*item_id"):
        run(folder)


def test_unknown_attribute(tmp_path):
    folder = make(tmp_path, {"shop.item": ITEM, "shop.inter": ROW_INTER})
    with pytest.raises(ConfigError, match="genre"):
        run(folder, attributes=["title", "genre"])


def test_wrong_field_count(tmp_path):
    inter = SEQUENCE_INTER + "u3\ti1\n" + "u4\ti1\ti2\n"
    folder = make(tmp_path, {"shop.item": ITEM, "shop.test.inter": inter})
    result = run(folder)
    [reject] = rejects(result)
    assert (reject["row"], reject["field"], reject["raw"]) == (4, None, "u3\ti1")
    assert reject["reason"] == "expected 3 fields, found 2"
    assert sequences(result)["u4"] == ["i1", "i2"]
    assert result.counts["rows_in"] == 5 and result.counts["rows_rejected"] == 1
    check_accounting(result, str(folder / "shop.test.inter"), str(folder / "shop.item"))


def test_invalid_utf8(tmp_path):
    item = ITEM.encode() + b"i4\tCaf\xe9\t3\n"
    folder = make(tmp_path, {"shop.item": item, "shop.test.inter": SEQUENCE_INTER})
    result = run(folder)
    [reject] = rejects(result)
    assert (reject["row"], reject["field"]) == (4, "title:token_seq")
    assert reject["reason"] == "invalid UTF-8 in field 'title:token_seq'"
    assert "i4" not in items(result)
    assert result.counts["items_in"] == 4 and result.counts["items_rejected"] == 1
    check_accounting(result, str(folder / "shop.test.inter"), str(folder / "shop.item"))


def test_unparseable_timestamp(tmp_path):
    inter = ROW_INTER + "u3\ti1\t5\tyesterday\n" + "u1\ti3\t5\t\n"
    folder = make(tmp_path, {"shop.item": ITEM, "shop.inter": inter})
    result = run(folder)
    got = sorted((r["row"], r["field"], r["reason"], r["user_id"], r["item_id"], r["raw"])
                 for r in rejects(result))
    assert got == [
        (6, "timestamp", "unparseable timestamp (expected unix seconds)", "u3", "i1", "yesterday"),
        (7, "timestamp", "empty timestamp", "u1", "i3", None),
    ]
    assert "u3" not in sequences(result)  # its only row was rejected
    assert sequences(result)["u1"] == ["i1", "i2"]
    assert result.counts["rows_in"] == 7 and result.counts["rows_rejected"] == 2
    assert result.counts["users_in"] == 3 and result.counts["users_rejected"] == 1
    check_accounting(result, str(folder / "shop.inter"), str(folder / "shop.item"))


def test_unknown_item_ids_sequence_form(tmp_path):
    inter = SEQUENCE_INTER + "u3\ti9 i1 i8\ti7\n"
    folder = make(tmp_path, {"shop.item": ITEM, "shop.test.inter": inter})
    result = run(folder)
    got = sorted((r["row"], r["field"], r["item_id"], r["user_id"], r["reason"]) for r in rejects(result))
    assert got == [
        (4, "item_id", "i7", "u3", "unknown item id"),
        (4, "item_id_list", "i8", "u3", "unknown item id"),
        (4, "item_id_list", "i9", "u3", "unknown item id"),
    ]
    assert sequences(result)["u3"] == ["i1"]
    assert result.counts["unknown_item_occurrences"] == 3
    assert result.counts["rows_rejected"] == 0
    check_accounting(result, str(folder / "shop.test.inter"), str(folder / "shop.item"))


def test_unknown_item_ids_row_form(tmp_path):
    inter = ROW_INTER + "u1\ti9\t5\t220\n" + "u3\ti8\t5\t10\n"
    folder = make(tmp_path, {"shop.item": ITEM, "shop.inter": inter})
    result = run(folder)
    got = sorted((r["row"], r["field"], r["item_id"], r["user_id"]) for r in rejects(result))
    assert got == [(6, "item_id", "i9", "u1"), (7, "item_id", "i8", "u3")]
    assert sequences(result) == {"u1": ["i1", "i2"], "u2": ["i3", "i1", "i2"], "u3": []}
    assert timestamps(result) == {"u1": [200, 250], "u2": [100, 300, 300], "u3": []}
    assert result.counts["unknown_item_occurrences"] == 2
    assert result.counts["users_in"] == 3 and result.counts["users_rejected"] == 0
    check_accounting(result, str(folder / "shop.inter"), str(folder / "shop.item"))


def test_duplicate_ids(tmp_path):
    item = ITEM + "i2\tMario Kart 2\t\n"
    inter = SEQUENCE_INTER + "u1\ti2\ti3\n" + "u5\ti1\t\n"
    folder = make(tmp_path, {"shop.item": item, "shop.test.inter": inter})
    result = run(folder)
    got = sorted((r["source"].rsplit("/", 1)[1], r["row"], r["field"], r["reason"],
                  r["user_id"], r["item_id"]) for r in rejects(result))
    assert got == [
        ("shop.item", 4, "item_id", "duplicate item id (first occurrence kept)", None, "i2"),
        ("shop.test.inter", 4, "user_id", "duplicate user id (first occurrence kept)", "u1", None),
        ("shop.test.inter", 5, "item_id", "empty item_id", "u5", None),
    ]
    assert sequences(result)["u1"] == ["i3", "i1"]
    assert items(result)["i2"] == [("Title", "Mario Kart")]
    assert result.counts["rows_in"] == 5 and result.counts["rows_rejected"] == 2
    assert result.counts["users_in"] == 4 and result.counts["users_rejected"] == 1
    assert result.counts["items_in"] == 4 and result.counts["items_rejected"] == 1
    check_accounting(result, str(folder / "shop.test.inter"), str(folder / "shop.item"))


@pytest.mark.shared_data
def test_real_games_6k(shared_data):
    folder = shared_data / "amazon-games-6k"
    result = run(folder)
    assert result.sequences.num_rows == 50_546
    lengths = result.sequences.column("item_ids").combine_chunks().value_lengths().to_numpy()
    assert int(((lengths - 1 >= 10) & (lengths - 1 <= 25)).sum()) == 8_285
    assert int(lengths.sum()) == 440_264
    seqs = sequences(result)
    assert seqs["0"] == [str(i) for i in range(15)]  # first line: 0..13 then 14
    assert seqs["1"] == [str(i) for i in range(15, 25)]
    assert result.attributes == ["Title"]
    assert result.items.num_rows == 16_859
    assert result.items.slice(0, 1).to_pylist()[0]["attributes"] == [
        {"name": "Title", "value": "Fire Emblem: The Sacred Stones"}
    ]
    assert len(result.rejects) == 0
    assert result.counts["unknown_item_occurrences"] == 0
    check_accounting(result, str(folder / "Games-6k.test.inter"), str(folder / "Games-6k.item"))


@pytest.mark.shared_data
def test_real_movielens_100k(shared_data):
    folder = shared_data / "movielens-100k"
    result = run(folder)
    assert result.sequences.num_rows == 943
    assert result.counts["rows_in"] == 100_000 and result.counts["users_in"] == 943
    ids = result.sequences.column("item_ids").combine_chunks()
    times = result.sequences.column("timestamps").combine_chunks()
    assert len(ids.values) == len(times.values) == 100_000
    for series in times.to_pylist():  # 943 short lists
        assert series == sorted(series)
    assert result.attributes == ["Movie title", "Release year", "Class"]
    assert result.items.num_rows == 1_682
    assert items(result)["1"] == [
        ("Movie title", "Toy Story"),
        ("Release year", "1995"),
        ("Class", "Animation Children's Comedy"),
    ]
    first = dict(zip(result.sequences.column("user_id").to_pylist(), times.to_pylist()))["196"]
    assert 881250949 in first
    assert len(result.rejects) == 0
    check_accounting(result, str(folder / "ml-100k.inter"), str(folder / "ml-100k.item"))
