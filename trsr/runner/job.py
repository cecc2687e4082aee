"""What a stage is, as plain data: its steps (`Step`), a streaming stage (`StageJob`),
a grouping pass (`GroupJob`) and its inputs (`Source`), and the conditions on input
columns (`Where`) they read with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pyarrow as pa

from trsr import storage
from trsr.runs import StageFolder


# Conditions on input columns: (column, op, value) with op "==", "<" or "in".
Where = Sequence[tuple[str, str, Any]]


@dataclass(frozen=True)
class Step:
    """One map step of a stage: a plain class and the resources of each of its actors."""

    stage: type  # __init__(**kwargs); __call__(pa.Table) -> pa.Table of output_schema
    kwargs: dict
    output_schema: pa.Schema
    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def name(self) -> str:
        return self.stage.__name__


@dataclass
class StageJob:
    """What one streaming stage reads, runs and writes."""

    name: str  # in progress lines and rejects, e.g. "summarize hierarchical"
    folder: StageFolder
    inputs: list[str]  # Parquet files (local or s3://)
    id_column: str  # unique per input row; every output row carries it
    steps: list[Step]
    batch_rows: int  # rows per batch of every step (a block = runner.block_batches batches)
    fingerprint: str
    where: Where = ()
    columns: list[str] | None = None  # input columns to read (None: all)
    unit: str = "rows"  # what a row is, for progress lines ("users", "lists")
    # Additive statistics of a batch of output rows (counts and sums; keys "max:..." /
    # "min:..." merge by max/min), summed over the written files.
    block_stats: Callable[[pa.Table], dict] | None = None
    # Input rows an output block holds, for stages that write several rows per input
    # row (scores: one per candidate); None = one output row per input row. Summed over
    # the output it must equal the input rows: a row lost or written twice is caught.
    units: Callable[[pa.Table], int] | None = None
    details: dict = field(default_factory=dict)  # extra manifest fields
    # Input rows (of `where`) the stage takes; the others are declined by policy (e.g.
    # lists without a usable summary under score.prompt.missing_summary=reject): never
    # processed, written to _rejects.parquet with `decline_reason(rows)` (one string per
    # row) and counted as rows_declined, not as failures. The conditions need their
    # columns among `columns`.
    keep: Where = ()
    decline_reason: Callable[[pa.Table], list[str]] | None = None
    # REJECTS tables of rows rejected before this stage (e.g. by its grouping pass,
    # `run_grouping`), appended to its _rejects.parquet and counted as rows_rejected_before.
    earlier_rejects: Callable[[], list[pa.Table]] | None = None
    # What progress (lines, ETA, rows_per_s) counts when a stage passes some rows on
    # untouched (summarize: lists beyond summarize.max_users, status "missing"), so that
    # the ETA follows the real work: `work_rows(output batch)` counts the rows that got
    # the stage's work, `work_total` how many the input has. None: every row is work.
    work_rows: Callable[[pa.Table], int] | None = None
    work_total: int | None = None


@dataclass(frozen=True)
class Source:
    """One input of a grouping pass: files of one format and the plain class that turns
    their batches into the rows that are grouped (one schema for every source)."""

    paths: list[str]
    format: str  # "parquet", "csv" or "json" (JSON lines)
    normalize: Step
    # Columns read as text whatever they look like (CSV would infer "007" as the number 7).
    text_columns: tuple[str, ...] = ()
    columns: list[str] | None = None  # Parquet columns to read (None: all)


@dataclass
class GroupJob:
    """A grouping pass: read every source, union their rows, group them by `key`, and
    write what `group` makes of each group (0 or more rows) to `folder`. It is the step
    before a checkpointed stage that needs whole groups in one row (a user's candidates,
    summary and history): Ray's checkpoint filter runs right after a read, so a
    shuffle cannot sit inside the checkpointed plan. Not resumable below the pass (it is
    a shuffle); skipped when complete for the same fingerprint."""

    name: str
    folder: StageFolder
    sources: list[Source]
    key: str
    group: Step  # plain class: the rows of one group (pa.Table) -> pa.Table
    fingerprint: str
    block_stats: Callable[[pa.Table], dict] | None = None
    # Hash partitions of the shuffle (None: Ray's default, 200, which costs tens of
    # seconds of task start-up on a small input); see `shuffle_partitions`.
    partitions: int | None = None


def shuffle_partitions(paths: list[str], bytes_per_partition: int = 256 << 20) -> int:
    """Hash partitions for a grouping pass over files of this total size: one per
    `bytes_per_partition` (Ray's own guidance: partitions of a few hundred MB), at least 2."""
    total = 0
    for path in paths:
        fs = storage.fsspec_filesystem(path)
        total += sum(int(info.get("size") or 0) for info in (fs.find(path, detail=True).values() if fs.isdir(path) else [fs.info(path)]))
    return max(2, -(-total // bytes_per_partition))
