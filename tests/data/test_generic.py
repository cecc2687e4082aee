"""Generic (bring-your-own-data) converter: every file type, time forms, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trsr.data.converters.generic import GenericSource
from trsr.data.converters import convert
from trsr.data.converters.generic import convert as convert_generic
from trsr.errors import ConfigError, InputFileError
from tests.data.converted import sequences, timestamps, items, rejects

# 2020-01-01T00:00:00Z and friends, as unix seconds.
JAN1, JAN1_10H, JAN2 = 1577836800, 1577872800, 1577923200

EXPECTED_SEQUENCES = {"u1": ["b", "c", "a"], "u2": ["c", "a"]}
EXPECTED_TIMESTAMPS = {"u1": [JAN1, JAN1, JAN2], "u2": [JAN1, JAN1_10H]}
EXPECTED_ITEMS = {
    "a": [("Title", "Alpha, the film"), ("Genre", "Drama, Comedy"), ("Year", "1999")],
    "b": [("Title", "Beta"), ("Year", "2001")],
    "c": [("Title", "Gamma"), ("Genre", "Horror")],
}

# The same interactions with times written in every accepted way. u1's b and c tie
# (c's float floors to the same second): file order decides.
CSV_INTERACTIONS = (
    "user_id,item_id,timestamp\n"
    "u1,a,2020-01-02T00:00:00Z\n"
    "u1,b,1577836800\n"
    "u2,c,2020-01-01\n"
    "u1,c,1577836800.9\n"
    "u2,a,2020-01-01 12:00:00+02:00\n"
)
CSV_ITEMS = (
    "item_id,title,genre,year\n"
    'a,"Alpha, the film","Drama, Comedy",1999\n'
    "b,Beta,,2001\n"
    "c,Gamma,Horror,\n"
)
INTERACTION_ROWS = [("u1", "a", JAN2), ("u1", "b", JAN1), ("u2", "c", JAN1), ("u1", "c", JAN1),
                    ("u2", "a", JAN1_10H)]


def write_format(folder: Path, kind: str) -> tuple[str, str]:
    """The test data as `kind` files; returns (interactions name, items name)."""
    folder.mkdir(parents=True, exist_ok=True)
    users, item_ids, times = (list(x) for x in zip(*INTERACTION_ROWS))
    if kind == "csv":
        (folder / "interactions.csv").write_text(CSV_INTERACTIONS)
        (folder / "items.csv").write_text(CSV_ITEMS)
    elif kind == "tsv":
        (folder / "interactions.tsv").write_text(CSV_INTERACTIONS.replace(",", "\t"))
        (folder / "items.tsv").write_text(
            "item_id\ttitle\tgenre\tyear\n"
            "a\tAlpha, the film\tDrama, Comedy\t1999\nb\tBeta\t\t2001\nc\tGamma\tHorror\t\n"
        )
    elif kind in ("parquet", "parquet-datetime"):
        time_array = (
            pa.array(times, pa.int64())
            if kind == "parquet"
            else pa.array([t * 1000 for t in times], pa.timestamp("ms", tz="UTC"))
        )
        pq.write_table(pa.table({"user_id": users, "item_id": item_ids, "timestamp": time_array}),
                       folder / "interactions.parquet")
        pq.write_table(
            pa.table({
                "item_id": ["a", "b", "c"],
                "title": ["Alpha, the film", "Beta", "Gamma"],
                "genre": pa.array([["Drama", "Comedy"], None, ["Horror"]], pa.list_(pa.string())),
                "year": pa.array([1999, 2001, None], pa.int64()),
            }),
            folder / "items.parquet",
        )
        return "interactions.parquet", "items.parquet"
    elif kind in ("jsonl", "jsonl-mixed"):
        if kind == "jsonl":
            lines = [{"user_id": u, "item_id": i, "timestamp": t} for u, i, t in INTERACTION_ROWS]
        else:  # numbers and ISO strings in one column: read on the slow path
            lines = [dict(zip(("user_id", "item_id", "timestamp"), row.split(",")))
                     for row in CSV_INTERACTIONS.splitlines()[1:]]
            lines[1]["timestamp"] = JAN1
        (folder / "interactions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        items = [
            {"item_id": "a", "title": "Alpha, the film", "genre": ["Drama", "Comedy"], "year": 1999},
            {"item_id": "b", "title": "Beta", "year": 2001},
            {"item_id": "c", "title": "Gamma", "genre": ["Horror"], "year": None},
        ]
        (folder / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        return "interactions.jsonl", "items.jsonl"
    extension = kind
    return f"interactions.{extension}", f"items.{extension}"


def make_csv(tmp_path: Path, interactions: str | bytes = CSV_INTERACTIONS,
             items: str | bytes = CSV_ITEMS) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    for name, text in (("interactions.csv", interactions), ("items.csv", items)):
        (folder / name).write_bytes(text.encode() if isinstance(text, str) else text)
    return folder


def run(folder: Path, **options):
    return convert_generic(GenericSource(path=str(folder), **options))


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
    kept = sum(len(s) for s in sequences(result).values()) + len(unknown)
    assert counts["rows_in"] == kept + counts["rows_rejected"]
    item_rows = {r["row"] for r in table if r["source"] == item_file}
    assert counts["items_rejected"] == len(item_rows)
    assert counts["items_in"] - counts["items_rejected"] == result.items.num_rows


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "parquet-datetime", "jsonl", "jsonl-mixed"])
def test_every_file_type(tmp_path, kind):
    folder = tmp_path / kind
    interactions, item_file = write_format(folder, kind)
    result = convert(GenericSource(path=str(folder), interactions=interactions, items=item_file))
    assert sequences(result) == EXPECTED_SEQUENCES
    assert timestamps(result) == EXPECTED_TIMESTAMPS
    assert result.attributes == ["Title", "Genre", "Year"]
    assert items(result) == EXPECTED_ITEMS
    assert len(result.rejects) == 0
    assert result.counts == {
        "rows_in": 5,
        "rows_rejected": 0,
        "users_in": 2,
        "users_rejected": 0,
        "unknown_item_occurrences": 0,
        "items_in": 3,
        "items_rejected": 0,
    }


def test_custom_columns_absolute_paths_and_file_order(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "events.csv").write_text(
        "product,visitor,when\nc,v2,9\nb,v1,5\na,v1,1\n"
    )
    (elsewhere / "catalogue.csv").write_text(
        'sku,desc,name\na,"line one\nline two, with ""quotes""",Alpha\nb,,Beta\nc,x,Gamma\n'
    )
    result = convert_generic(GenericSource(
        path=str(tmp_path / "unused"),
        interactions=str(elsewhere / "events.csv"),
        items=str(elsewhere / "catalogue.csv"),
        user_column="visitor",
        item_column="product",
        time_column=None,
        item_id_column="sku",
        attributes=["name", "desc"],
    ))
    assert sequences(result) == {"v1": ["b", "a"], "v2": ["c"]}  # file order, not `when`
    assert timestamps(result) == {"v1": None, "v2": None}
    assert result.attributes == ["Name", "Description"]
    assert items(result) == {
        "a": [("Name", "Alpha"), ("Description", 'line one\nline two, with "quotes"')],
        "b": [("Name", "Beta")],
        "c": [("Name", "Gamma"), ("Description", "x")],
    }


def test_missing_interactions_file(tmp_path):
    folder = make_csv(tmp_path)
    with pytest.raises(InputFileError, match=r"events\.csv"):
        run(folder, interactions="events.csv")


def test_missing_items_file(tmp_path):
    folder = make_csv(tmp_path)
    (folder / "items.csv").unlink()
    with pytest.raises(InputFileError, match=r"items\.csv"):
        run(folder)


def test_unsupported_extension(tmp_path):
    folder = make_csv(tmp_path)
    (folder / "items.xlsx").write_bytes(b"")
    with pytest.raises(InputFileError, match=r"items\.xlsx.*unsupported"):
        run(folder, items="items.xlsx")


def test_missing_column(tmp_path):
    folder = make_csv(tmp_path)
    with pytest.raises(InputFileError, match=r"interactions\.csv.*'ts'"):
        run(folder, time_column="ts")
    with pytest.raises(InputFileError, match=r"items\.csv.*'sku'"):
        run(folder, item_id_column="sku")


def test_unknown_attribute(tmp_path):
    folder = make_csv(tmp_path)
    with pytest.raises(ConfigError, match="director"):
        run(folder, attributes=["title", "director"])


def test_bad_attribute_lists(tmp_path):
    folder = make_csv(tmp_path)
    with pytest.raises(ConfigError, match="empty"):
        run(folder, attributes=[])
    with pytest.raises(ConfigError, match=r"\['title'\] listed more than once"):
        run(folder, attributes=["title", "year", "title"])
    (folder / "ids.csv").write_text("item_id\na\nb\n")
    with pytest.raises(InputFileError, match=r"ids\.csv.*no attribute columns"):
        run(folder, items="ids.csv")


def test_wrong_field_count(tmp_path):
    folder = make_csv(tmp_path, interactions=CSV_INTERACTIONS + "u3,a\n" + "u2,b,1577836801\n")
    result = run(folder)
    [reject] = rejects(result)
    assert (reject["row"], reject["field"], reject["raw"]) == (6, None, "u3,a")
    assert reject["reason"] == "expected 3 fields, found 2"
    assert sequences(result)["u2"] == ["c", "b", "a"]
    assert result.counts["rows_in"] == 7 and result.counts["rows_rejected"] == 1
    check_accounting(result, str(folder / "interactions.csv"), str(folder / "items.csv"))


def test_invalid_utf8(tmp_path):
    folder = tmp_path / "tsv"
    folder.mkdir()
    (folder / "interactions.tsv").write_bytes(
        b"user_id\titem_id\ttimestamp\nu1\ta\t5\nu\xff\xfe\tb\t6\nu1\tb\t7\n"
    )
    (folder / "items.tsv").write_text("item_id\ttitle\na\tAlpha\nb\tBeta\n")
    result = run(folder, interactions="interactions.tsv", items="items.tsv")
    [reject] = rejects(result)
    assert (reject["row"], reject["field"]) == (2, "user_id")
    assert reject["reason"] == "invalid UTF-8 in field 'user_id'"
    assert sequences(result) == {"u1": ["a", "b"]}
    assert result.counts["rows_in"] == 3 and result.counts["rows_rejected"] == 1
    check_accounting(result, str(folder / "interactions.tsv"), str(folder / "items.tsv"))


@pytest.mark.parametrize("value", ["next tuesday", "2020-13-45", "1e400", "12:00"])
def test_unparseable_time(tmp_path, value):
    folder = make_csv(tmp_path, interactions=CSV_INTERACTIONS + f"u3,b,{value}\n")
    result = run(folder)
    [reject] = rejects(result)
    assert (reject["row"], reject["field"], reject["user_id"], reject["item_id"], reject["raw"]) == (
        6, "timestamp", "u3", "b", value,
    )
    assert reject["reason"] == (
        "unparseable timestamp (expected unix seconds or an ISO-8601 date/time)"
    )
    assert sequences(result) == EXPECTED_SEQUENCES  # u3's only row is gone: user rejected
    assert result.counts["users_in"] == 3 and result.counts["users_rejected"] == 1
    check_accounting(result, str(folder / "interactions.csv"), str(folder / "items.csv"))


def test_empty_required_fields(tmp_path):
    extra = ",a,5\n" + "u1,,6\n" + "u3,a,\n"
    folder = make_csv(tmp_path, interactions=CSV_INTERACTIONS + extra)
    result = run(folder)
    got = sorted((r["row"], r["field"], r["reason"], r["user_id"]) for r in rejects(result))
    assert got == [
        (6, "user_id", "empty user_id", None),
        (7, "item_id", "empty item_id", "u1"),
        (8, "timestamp", "empty timestamp", "u3"),
    ]
    assert sequences(result) == EXPECTED_SEQUENCES
    assert result.counts["rows_in"] == 8 and result.counts["rows_rejected"] == 3
    assert result.counts["users_in"] == 3 and result.counts["users_rejected"] == 1
    check_accounting(result, str(folder / "interactions.csv"), str(folder / "items.csv"))


def test_unknown_item_id(tmp_path):
    folder = make_csv(tmp_path, interactions=CSV_INTERACTIONS + "u1,zzz,1\nu3,yyy,1\n")
    result = run(folder)
    got = sorted((r["row"], r["field"], r["reason"], r["user_id"], r["item_id"]) for r in rejects(result))
    assert got == [
        (6, "item_id", "unknown item id", "u1", "zzz"),
        (7, "item_id", "unknown item id", "u3", "yyy"),
    ]
    assert sequences(result) == {**EXPECTED_SEQUENCES, "u3": []}
    assert timestamps(result) == {**EXPECTED_TIMESTAMPS, "u3": []}
    assert result.counts["unknown_item_occurrences"] == 2
    assert result.counts["rows_rejected"] == 0 and result.counts["users_rejected"] == 0
    check_accounting(result, str(folder / "interactions.csv"), str(folder / "items.csv"))


def test_duplicate_item_ids(tmp_path):
    folder = make_csv(tmp_path, items=CSV_ITEMS + "b,Beta again,,\n" + ",Nameless,,\n")
    result = run(folder)
    got = sorted((r["row"], r["field"], r["reason"], r["item_id"]) for r in rejects(result))
    assert got == [
        (4, "item_id", "duplicate item id (first occurrence kept)", "b"),
        (5, "item_id", "empty item_id", None),
    ]
    assert items(result) == EXPECTED_ITEMS
    assert result.counts["items_in"] == 5 and result.counts["items_rejected"] == 2
    check_accounting(result, str(folder / "interactions.csv"), str(folder / "items.csv"))


def test_bad_jsonl_lines(tmp_path):
    folder = tmp_path / "jsonl"
    interactions, item_file = write_format(folder, "jsonl")
    with open(folder / interactions, "a") as handle:
        handle.write("\n")  # blank lines are not records
        handle.write('{"user_id": "u3", "item_id": "a", "timestamp": \n')
        handle.write('["u3", "a", 5]\n')
        handle.write('{"user_id": "u3", "item_id": "b", "timestamp": 7}\n')
    result = run(folder, interactions=interactions, items=item_file)
    got = sorted((r["row"], r["reason"]) for r in rejects(result))
    assert got == [(6, "invalid JSON (Expecting value)"), (7, "not a JSON object")]
    assert sequences(result) == {**EXPECTED_SEQUENCES, "u3": ["b"]}
    assert timestamps(result)["u3"] == [7]
    assert result.counts["rows_in"] == 8 and result.counts["rows_rejected"] == 2
    check_accounting(result, str(folder / interactions), str(folder / item_file))


@pytest.mark.shared_data
def test_real_movielens_as_tsv(shared_data, tmp_path):
    # The RecBole files are TSV with typed headers; read them as generic TSV.
    source = shared_data / "movielens-100k"
    folder = tmp_path / "ml"
    folder.mkdir()
    for name in ("ml-100k.inter", "ml-100k.item"):
        text = (source / name).read_bytes()
        header, rest = text.split(b"\n", 1)
        header = b"\t".join(h.split(b":")[0] for h in header.split(b"\t"))
        (folder / (name.replace(".", "_") + ".tsv")).write_bytes(header + b"\n" + rest)
    result = run(folder, interactions="ml-100k_inter.tsv", items="ml-100k_item.tsv")
    assert result.sequences.num_rows == 943
    assert result.counts["rows_in"] == 100_000 and len(result.rejects) == 0
    assert result.attributes == ["Movie title", "Release year", "Class"]
    assert sum(len(s) for s in sequences(result).values()) == 100_000
