"""Rejected rows: collected with a reason, written to Parquet, counted in the stats.

Nothing is dropped silently. A stage that refuses a row (malformed line, unknown item,
history out of range, ...) records it here; the run's `rejects.parquet` holds them and
`stats.json` counts them by stage and reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from trsr.schema import REJECTS, conform

RAW_MAX_CHARS = 500


class Rejects:
    """Accumulates reject rows (one at a time or as whole tables) for one run."""

    def __init__(self) -> None:
        self._rows: list[dict] = []
        self._tables: list[pa.Table] = []

    def add(
        self,
        stage: str,
        source: str,
        reason: str,
        *,
        row: int | None = None,
        field: str | None = None,
        user_id: str | None = None,
        item_id: str | None = None,
        raw: str | None = None,
    ) -> None:
        if raw is not None and len(raw) > RAW_MAX_CHARS:
            raw = raw[:RAW_MAX_CHARS] + "..."
        self._rows.append(
            dict(
                stage=stage,
                source=source,
                row=row,
                field=field,
                reason=reason,
                user_id=user_id,
                item_id=item_id,
                raw=raw,
            )
        )

    def add_table(self, table: pa.Table) -> None:
        """Add many rejects at once; missing optional columns are filled with nulls."""
        if table.num_rows == 0:
            return
        for field in REJECTS:
            if field.name not in table.column_names:
                table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
        table = conform(table, REJECTS, "rejects")
        raw = table.column("raw")
        if raw.null_count < table.num_rows:
            raw = pc.utf8_slice_codeunits(raw, 0, RAW_MAX_CHARS)
            table = table.set_column(table.schema.get_field_index("raw"), "raw", raw)
        self._tables.append(table)

    def extend(self, other: "Rejects") -> None:
        self._rows.extend(other._rows)
        self._tables.extend(other._tables)

    def table(self) -> pa.Table:
        parts = list(self._tables)
        if self._rows:
            parts.append(pa.Table.from_pylist(self._rows, schema=REJECTS))
        if not parts:
            return REJECTS.empty_table()
        return pa.concat_tables(parts)

    def __len__(self) -> int:
        return len(self._rows) + sum(t.num_rows for t in self._tables)

    def counts(self) -> dict[str, dict[str, int]]:
        """{stage: {reason: count}} in a stable order."""
        table = self.table()
        counter: Counter[tuple[str, str]] = Counter(
            zip(table.column("stage").to_pylist(), table.column("reason").to_pylist())
        )
        out: dict[str, dict[str, int]] = {}
        for (stage, reason), n in sorted(counter.items()):
            out.setdefault(stage, {})[reason] = n
        return out

    def users(self, stage: str | None = None) -> set[str]:
        """Distinct user ids rejected (optionally in one stage)."""
        table = self.table()
        if stage is not None:
            table = table.filter(pc.equal(table.column("stage"), stage))
        return {u for u in table.column("user_id").to_pylist() if u is not None}


def merge(parts: Iterable[Rejects]) -> Rejects:
    out = Rejects()
    for part in parts:
        out.extend(part)
    return out
