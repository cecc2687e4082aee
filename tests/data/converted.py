"""Views of a ConvertedDataset shared by the converter tests."""

from __future__ import annotations


def sequences(result) -> dict[str, list[str]]:
    table = result.sequences
    return dict(zip(table.column("user_id").to_pylist(), table.column("item_ids").to_pylist()))


def timestamps(result) -> dict[str, list[int] | None]:
    table = result.sequences
    return dict(zip(table.column("user_id").to_pylist(), table.column("timestamps").to_pylist()))


def items(result) -> dict[str, list[tuple[str, str]]]:
    return {
        row["item_id"]: [(a["name"], a["value"]) for a in row["attributes"]]
        for row in result.items.to_pylist()
    }


def rejects(result) -> list[dict]:
    return result.rejects.table().to_pylist()
