import pyarrow as pa
import pytest

from trsr import storage
from trsr.data.io import read_delimited
from trsr.data.rejects import Rejects


@pytest.mark.integration
def test_parquet_json_and_delimited_roundtrip_on_s3(s3_bucket):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    path = storage.join(s3_bucket, "run", "part.parquet")
    assert not storage.exists(path)
    storage.write_parquet(table, path)
    assert storage.exists(path)
    assert storage.read_parquet(path).equals(table)

    storage.write_json({"k": [1, 2]}, storage.join(s3_bucket, "run", "stats.json"))
    assert storage.read_json(storage.join(s3_bucket, "run", "stats.json")) == {"k": [1, 2]}

    with storage.open_binary(storage.join(s3_bucket, "raw", "x.tsv"), "wb") as handle:
        handle.write(b"1\ta\n2\n3\tc\n")
    rejects = Rejects()
    read = read_delimited(
        storage.join(s3_bucket, "raw", "x.tsv"),
        columns=["id", "v"],
        delimiter="\t",
        stage="convert",
        rejects=rejects,
        quoted=False,
    )
    assert read.column("id").to_pylist() == ["1", "3"]
    assert rejects.table().column("row").to_pylist() == [2]


def test_local_paths(tmp_path):
    path = str(tmp_path / "deep" / "t.parquet")
    table = pa.table({"a": [1]})
    storage.write_parquet(table, path)
    assert storage.exists(path) and storage.read_parquet(path).equals(table)
    assert not storage.is_remote(path) and storage.is_remote("s3://b/k")
