import pytest

from trsr.data.io import read_delimited
from trsr.data.rejects import Rejects
from trsr.data.text import render_item, shorten
from trsr.errors import InputFileError


def read(path, **kwargs):
    rejects = Rejects()
    table = read_delimited(str(path), stage="convert", rejects=rejects, **kwargs)
    return table, rejects.table().to_pylist()


def test_tsv_wrong_field_counts_and_bad_utf8_are_rejected_with_row_numbers(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b"a\tb\tc\nd\te\nf\tg\xff\th\ni\tj\tk\nl\tm\tn\to\np\tq\tr\n")
    table, rejects = read(path, columns=["x", "y", "z"], delimiter="\t", quoted=False)
    assert table.column("x").to_pylist() == ["a", "i", "p"]
    assert table.column("row").to_pylist() == [1, 4, 6]
    by_row = {r["row"]: r for r in rejects}
    assert by_row[2]["reason"] == "expected 3 fields, found 2"
    assert by_row[5]["reason"] == "expected 3 fields, found 4"
    assert by_row[3]["field"] == "y" and "invalid UTF-8" in by_row[3]["reason"]
    assert all(r["source"] == str(path) for r in rejects)


def test_csv_with_header_quotes_and_newlines(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b'id,title\n1,"hello, world"\n2,"multi\nline"\n3\n4,x,y\n5,ok\n')
    table, rejects = read(path, columns=None, delimiter=",", quoted=True, required=["id", "title"])
    assert table.column("title").to_pylist() == ["hello, world", "multi\nline", "ok"]
    assert table.column("row").to_pylist() == [1, 2, 5]
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (3, "expected 2 fields, found 1"),
        (4, "expected 2 fields, found 3"),
    ]


def test_missing_file_and_missing_column_name_the_file(tmp_path):
    with pytest.raises(InputFileError, match="nope.tsv: file not found"):
        read(tmp_path / "nope.tsv", columns=["a"], delimiter="\t", quoted=False)
    path = tmp_path / "x.csv"
    path.write_text("id,name\n1,a\n")
    with pytest.raises(InputFileError, match=r"x.csv: missing column\(s\) \['title'\]"):
        read(path, columns=None, delimiter=",", quoted=True, required=["id", "title"])


def test_render_item_is_one_line_without_ids_and_caps_long_values():
    attributes = [
        {"name": "Title", "value": "Line one\nline\ttwo"},
        {"name": "Brand", "value": "  "},
        {"name": "Description", "value": "word " * 100},
    ]
    text = render_item(attributes, max_chars={"Description": 40})
    assert "\n" not in text and "\t" not in text
    assert text.startswith("Title: Line one line two; Description: word")
    assert "Brand" not in text
    assert text.endswith("...") and len(text.split("Description: ")[1]) <= 40
    assert shorten("short", 10) == "short"
