"""The item catalogue as each stage actor holds it: item id -> ordered attributes.

Streaming stages read rows that name items by id (histories, candidates); each actor
loads items.parquet once and looks the attributes up per batch. The attributes stay in
Arrow (a catalogue of a million products is a few hundred MB as Arrow, several times
that as Python dicts); only the id -> row index map is a Python dict.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import pyarrow as pa

from trsr.schema import ATTRIBUTE, ITEMS

Attributes = list[dict[str, str]]


class Catalogue:
    def __init__(self, items: pa.Table):
        items = items.select(ITEMS.names).combine_chunks()
        self._attributes = items.column("attributes").chunk(0) if items.num_rows else pa.array([], pa.list_(ATTRIBUTE))
        ids = items.column("item_id").to_pylist()
        self._index = {item: i for i, item in enumerate(ids)}
        if len(self._index) != len(ids):
            raise ValueError("items table has duplicate item ids")

    @classmethod
    def load(cls, path: str, only: Iterable[str] | None = None) -> "Catalogue":
        """From items.parquet; `only`: just these items (a filtered scan: what a driver
        needs for a few lists, without holding the whole catalogue)."""
        import pyarrow.dataset as ds

        from trsr import storage

        if only is None:
            return cls(storage.read_parquet(path, columns=ITEMS.names))
        filesystem, inner = storage.arrow_filesystem(path)
        dataset = ds.dataset(inner, filesystem=filesystem, format="parquet")
        wanted = pa.array(sorted(set(only)), pa.string())
        return cls(dataset.to_table(columns=ITEMS.names, filter=ds.field("item_id").isin(wanted)))

    @classmethod
    def from_mapping(cls, items: Mapping[str, Sequence[Mapping[str, str]]]) -> "Catalogue":
        """From {item_id: [{"name", "value"}, ...]} (tests, small hand-made catalogues)."""
        return cls(
            pa.table(
                {"item_id": list(items), "attributes": [list(map(dict, attrs)) for attrs in items.values()]},
                schema=ITEMS,
            )
        )

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, item: str) -> bool:
        return item in self._index

    def missing(self, ids: Iterable[str]) -> list[str]:
        return [item for item in ids if item not in self._index]

    def attributes(self, ids: Sequence[str]) -> list[Attributes]:
        """The attributes of each id, in order (KeyError names an unknown id)."""
        try:
            rows = [self._index[item] for item in ids]
        except KeyError as error:
            raise KeyError(f"item {error.args[0]!r} is not in the catalogue (items.parquet)") from None
        if not rows:
            return []
        return self._attributes.take(pa.array(rows, pa.int64())).to_pylist()

    @property
    def attribute_names(self) -> set[str]:
        import pyarrow.compute as pc

        names = pc.struct_field(pc.list_flatten(self._attributes), "name") if len(self._attributes) else pa.array([], pa.string())
        return set(pc.unique(names).to_pylist())
