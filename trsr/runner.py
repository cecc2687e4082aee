"""The stage runner: every streaming stage as one Ray Data pipeline, Parquet to Parquet.

    read_parquet(inputs) -> filter (optional row predicate)
      -> [Ray's checkpoint filter: rows committed by an earlier, interrupted run]
      -> blocks of whole engine batches (`rows_per_block`)
      -> step 1 actor pool -> ... -> step n actor pool      (resources from config)
      -> write_parquet(<stage folder>)                      one file per block

This is the one module that builds Ray Data pipelines; a stage is described by plain
data (`StageJob`, `Step`) and its steps are plain classes over Arrow tables (no Ray
inside; unit tests call them directly). Nothing the stage reads or writes passes
through the driver: it only counts (Parquet metadata, Ray aggregates).

Resume. Ray Data's own row-level checkpointing (`ray.data.checkpoint.CheckpointConfig`,
beta in Ray 2.60) records the ids of each written block in `<stage>/_checkpoint/` in
the same two-phase commit as the block's file; a rerun with the same fingerprint
(`StageFolder.begin`) filters those ids out right after the read and computes only the
rest. What the design keeps for it: the plan starts with a file read and ends with a
file write; no join or limit in between (a predicate filter is deterministic); ids are
unique per input row; the checkpoint is deleted by trsr after the manifest is written
(not by Ray, which would delete it before); and blocks are cut to a fixed number of
rows (`rows_per_block`, from the stage's input rows) so that a crash loses at most
the blocks in flight. Block order is preserved and committed blocks are whole blocks, so the
blocks (and every engine batch) of a resumed run are those of an uninterrupted one.

Block size. The driver's memory grows with the number of blocks, not rows: measured
~50 KB per block over a summarize or score stage (Ray Data's per-block stats and
bookkeeping, ~10 KB of live Python objects, and native memory in Ray's core worker;
no setting turns them off). `runner.block_batches` puts several engine batches in one
block: k times fewer blocks and a k times flatter driver, for up to k batches per
actor recomputed after a crash; `runner.max_blocks` caps the blocks of a stage (more
batches per block beyond it), so the driver's memory stops growing with the rows. Memory the driver frees is returned to the system
while a stage runs (DriverHeapTrimmer).

Faults. Engine actors that die are restarted and their batches retried by Ray
(`runner.actor_restarts`, `runner.task_retries`). A batch whose step raises is split in
halves until the rows that raise are found (`_Guarded`): those rows are written with
their error (and go to `_rejects.parquet` with the reason), the others go on. A batch
in which every row fails is not a bad row but a broken stage: the error is raised. The
job fails with a clear message when the failed rows exceed `runner.max_failed_share`
of its input (checked while it runs, so a broken stage stops early).

Declined rows. A stage may decline input rows by policy (`StageJob.keep`, e.g. lists
without a usable summary when score.prompt.missing_summary is "reject"): the keep
conditions join the read filter, so those rows are never processed, and they are
written to `_rejects.parquet` with the policy's reason and counted as rows_declined
(rows_in = rows_reused + rows_computed + rows_declined), not as failures.

Progress. The last step reports rows done to a small counter actor; the driver prints
"[name] done/total unit, rows/s, ETA" every `runner.progress_seconds`.
"""

from __future__ import annotations

import logging
import math
import posixpath
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from trsr import storage
from trsr.config import Section
from trsr.schema import REJECTS
from trsr.errors import TrsrError
from trsr.ray_utils import init_ray, require_resources
from trsr.runs import StageFolder

log = logging.getLogger(__name__)

ERROR = "error"  # the column every step's output carries: null = ok, else the reason
ERROR_FIELD = pa.field(ERROR, pa.string())
REASON_MAX_CHARS = 500


class RunnerConfig(Section):
    """Section `runner`: how every streaming stage handles faults and reports progress."""

    # Fail the stage when more than this share of its input rows failed (their errors
    # are in the stage's _rejects.parquet); 0 = any failed row fails the stage.
    max_failed_share: float = Field(0.01, ge=0.0, le=1.0)
    # An engine actor that dies (killed, out of memory) is restarted this many times,
    # and a batch it was running is retried this many times (-1 = without limit).
    actor_restarts: int = Field(4, ge=-1)
    task_retries: int = Field(4, ge=-1)
    # Seconds between progress lines (0 = none).
    progress_seconds: float = Field(15.0, ge=0.0)
    # Engine batches per block (= per commit and output file). The driver's memory
    # grows with the number of blocks in flight and done (Ray Data's per-block stats
    # and bookkeeping, Ray core's task state): measured ~50 KB per block, so 1M users
    # in blocks of one 64-user batch cost it ~0.8 GB, 8 batches per block ~100 MB. A
    # crash recomputes up to one block per actor.
    block_batches: int = Field(1, ge=1)
    # At most this many blocks per stage: a larger stage gets more batches per block
    # (rows_per_block), so the driver's memory stops growing with the rows (~50 KB x
    # max_blocks, ~50 MB). A crash loses the blocks in flight: about actors / max_blocks
    # of the stage (10% with 96 actors); raise it for finer resumes, at ~50 KB a block.
    max_blocks: int = Field(1000, ge=1)
    # Seconds between returns of the driver's freed heap memory to the system while a
    # stage runs (0 = never); see DriverHeapTrimmer.
    trim_driver_heap_seconds: float = Field(5.0, ge=0.0)


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


def output_schema(schema: pa.Schema) -> pa.Schema:
    """A step's output as written: every field nullable (failed rows carry only their
    id and the error) and the error column last."""
    fields = [f.with_nullable(True) for f in schema if f.name != ERROR]
    return pa.schema(fields + [ERROR_FIELD])


# ------------------------------------------------------------------------------ rows


def _error_rows(rows: pa.Table, reasons: list[str], schema: pa.Schema) -> pa.Table:
    """Failed input rows as output rows: columns the output shares with the input are
    kept (ids, user, split), the others are null, and `error` holds the reason."""
    columns = []
    for f in schema:
        if f.name == ERROR:
            columns.append(pa.array(reasons, pa.string()))
        elif f.name in rows.column_names:
            try:
                columns.append(rows.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                columns.append(pa.nulls(rows.num_rows, f.type))
        else:
            columns.append(pa.nulls(rows.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def describe_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 3] + "..."


class StageFailed(TrsrError):
    """A step failed on a whole batch: a broken stage or environment, not a bad row."""


class TooManyFailures(TrsrError):
    """More input rows failed than runner.max_failed_share allows."""


class _Guarded:
    """Ray Data actor class around one step (see the module doc: bisecting failures,
    passing failed rows on, reporting progress from the last step)."""

    def __init__(self, step: Step, progress=None, failure_limit: int | None = None):
        self.step = step
        self.schema = output_schema(step.output_schema)
        self.stage = step.stage(**step.kwargs)
        self.progress = progress
        self.failure_limit = failure_limit

    def __call__(self, batch: pa.Table) -> pa.Table:
        failed_before = None
        if ERROR in batch.column_names:
            mask = pc.is_valid(batch.column(ERROR))
            if pc.any(mask).as_py():
                failed_before = batch.filter(mask)
                batch = batch.filter(pc.invert(mask))
            batch = batch.drop_columns([ERROR])
        parts: list[pa.Table] = []
        failures: list[tuple[pa.Table, str]] = []
        first_error: list[BaseException] = []
        if batch.num_rows:
            self._bisect(batch, parts, failures, first_error)
            if failures and not parts and batch.num_rows > 1:
                # Every row failed on its own: the step is broken, not the rows.
                raise first_error[0]
        out = [self._conform(part) for part in parts]
        out += [_error_rows(rows, [reason] * rows.num_rows, self.schema) for rows, reason in failures]
        if failed_before is not None:
            out.append(_error_rows(failed_before, failed_before.column(ERROR).to_pylist(), self.schema))
        table = pa.concat_tables(out) if out else self.schema.empty_table()
        if self.progress is not None:
            self._report(batch.num_rows + (failed_before.num_rows if failed_before is not None else 0), table)
        return table

    def _bisect(self, rows: pa.Table, parts: list, failures: list, first_error: list) -> None:
        try:
            parts.append(self.stage(rows))
        except Exception as error:  # noqa: BLE001 - any per-row failure becomes a reject
            if not first_error:
                first_error.append(error)
            if rows.num_rows == 1:
                log.warning("%s: row %s failed: %s", self.step.name, rows.column(0)[0], describe_error(error))
                failures.append((rows, describe_error(error)))
                return
            half = rows.num_rows // 2
            self._bisect(rows.slice(0, half), parts, failures, first_error)
            self._bisect(rows.slice(half), parts, failures, first_error)

    def _conform(self, table: pa.Table) -> pa.Table:
        table = table.append_column(ERROR_FIELD, pa.nulls(table.num_rows, pa.string()))
        return table.select(self.schema.names).cast(self.schema)

    def _report(self, rows_in: int, table: pa.Table) -> None:
        import ray

        failed = int(pc.sum(pc.is_valid(table.column(ERROR))).as_py() or 0) if table.num_rows else 0
        failed_total = ray.get(self.progress.add.remote(rows_in, failed))
        # Only a batch with failed rows of its own stops the stage, so that the error
        # names a real failed row (a clean batch reporting later would name none).
        if failed and self.failure_limit is not None and failed_total > self.failure_limit:
            last = table.column(ERROR).drop_null()[0].as_py()
            raise TooManyFailures(f"{failed_total} rows failed (at most {self.failure_limit} allowed): {last}")


_STEP_CLASSES: dict[str, type] = {}


def _step_class(name: str) -> type:
    """_Guarded under the step's own name, so that Ray's operators, logs and worker
    processes say which step they run ("MapBatches(SummarizeStage)")."""
    if name not in _STEP_CLASSES:
        _STEP_CLASSES[name] = type(name, (_Guarded,), {"__module__": __name__, "__qualname__": name})
    return _STEP_CLASSES[name]


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self) -> None:
            self.done = 0
            self.failed = 0

        def add(self, rows: int, failed: int) -> int:
            self.done += rows
            self.failed += failed
            return self.failed

        def totals(self) -> tuple[int, int]:
            return self.done, self.failed

    return Progress.remote()


class _ProgressPrinter(threading.Thread):
    """Prints a progress line every `seconds` until stopped (driver side)."""

    def __init__(self, job: StageJob, progress, total: int, seconds: float):
        super().__init__(daemon=True)
        self.job, self.progress, self.total, self.seconds = job, progress, total, seconds
        self.started = time.perf_counter()
        self.stopped = threading.Event()

    def run(self) -> None:
        import ray

        while not self.stopped.wait(self.seconds):
            try:
                done, failed = ray.get(self.progress.totals.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a missed progress line is harmless
                continue
            print(progress_line(self.job, done, failed, self.total, time.perf_counter() - self.started), flush=True)

    def stop(self) -> None:
        self.stopped.set()


class DriverHeapTrimmer(threading.Thread):
    """Calls glibc's malloc_trim(0), and has Arrow's allocator release what it keeps,
    every `seconds` while a stage runs.

    Why home-made: Ray has no setting for it. Measured on the scale benchmark's data
    path (benchmarks/scale.py): the driver's live Python objects grow by ~10 KB per
    block, but its resident memory grew ~45 MB from 20k to 100k users in the score
    stage, and ~90% of that was memory already freed (by the streaming executor's
    threads and Ray's core worker) that glibc kept in its arenas. Trimming every few
    seconds returns it; the cost is a heap walk (milliseconds). A no-op where glibc is
    absent (macOS, musl)."""

    def __init__(self, seconds: float):
        super().__init__(daemon=True, name="trsr-heap-trim")
        self.seconds = seconds
        self.stopped = threading.Event()
        self.trim = _malloc_trim()

    def run(self) -> None:
        while not self.stopped.wait(self.seconds):
            self._release()

    def stop(self) -> None:
        self.stopped.set()
        self._release()

    def _release(self) -> None:
        storage.release_arrow_memory()  # Arrow's own allocator (mimalloc) keeps freed memory too
        if self.trim is not None:
            self.trim(0)


def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def progress_line(job: StageJob, done: int, failed: int, total: int, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    left = max(total - done, 0)
    eta = f"ETA {_duration(left / rate)}" if rate > 0 and left else "ETA -"
    share = f" ({100 * done / total:.0f}%)" if total else ""
    failed_text = f", {failed} failed" if failed else ""
    return f"[{job.name}] {done:,}/{total:,} {job.unit}{share}{failed_text}, {rate:.2f} {job.unit}/s, {eta}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- inputs


def arrow_where(where: Where):
    import pyarrow.dataset as ds

    expression = None
    for column, op, value in where:
        if op == "==":
            term = ds.field(column) == value
        elif op == "<":
            term = ds.field(column) < value
        elif op == "in":
            term = ds.field(column).isin(list(value))
        else:
            raise ValueError(f"unsupported condition {op!r}")
        expression = term if expression is None else expression & term
    return expression


def _ray_where(where: Where):
    from ray.data.expressions import col

    expression = None
    for column, op, value in where:
        if op == "==":
            term = col(column) == value
        elif op == "<":
            term = col(column) < value
        elif op == "in":
            term = col(column).is_in(list(value))
        else:
            raise ValueError(f"unsupported condition {op!r}")
        expression = term if expression is None else expression & term
    return expression


def read_parquet(paths: list[str], filesystem=None, columns: list[str] | None = None):
    """ray.data.read_parquet through Ray's V1 Parquet datasource. Ray 2.60's default
    (DataSourceV2) starts a pool of footer-reading actors on every execution: measured
    10-14 s per stage against 2.3 s with V1 for the same small stage on this project's
    2-core machines. The switch is a documented DataContext flag, set only while the
    dataset is created (its plan is fixed then)."""
    import ray

    context = ray.data.DataContext.get_current()
    use_v2 = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns, partitioning=None)
    finally:
        context.use_datasource_v2 = use_v2


def count_rows(paths: list[str], where: Where = ()) -> int:
    """Rows of Parquet files matching `where`: footers only without conditions, else a
    scan of the condition columns (streamed)."""
    if not paths:
        return 0
    if not where:
        return storage.parquet_dataset(paths).count_rows()
    columns = list(dict.fromkeys(column for column, _, _ in where))
    rows = sum(batch.num_rows for batch in storage.scan_batches(paths, columns=columns, filter=arrow_where(where)))
    storage.release_arrow_memory()
    return rows


def _committed_rows(folder: StageFolder, id_column: str) -> int:
    """Distinct ids in the committed checkpoint files of an interrupted run (one file
    per committed block; a row's ids never span two blocks)."""
    import pyarrow.parquet as pq

    fs = storage.fsspec_filesystem(folder.checkpoint)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if not fs.exists(folder.checkpoint):
        return 0
    total = 0
    filesystem, _ = storage.arrow_filesystem(folder.checkpoint)
    for entry in fs.ls(folder.checkpoint, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if not name.endswith(".parquet") or name.endswith(".pending.parquet"):
            continue
        path = storage.join(folder.checkpoint, name)
        ids = pq.read_table(storage.arrow_filesystem(path)[1], filesystem=filesystem, columns=[id_column])
        total += pc.count_distinct(ids.column(id_column)).as_py()
    return total


# ----------------------------------------------------------------------------- stats


def merge_stats(a: dict, b: dict) -> dict:
    """Sum two additive stats dicts (nested dicts merge; "max:"/"min:" keys by max/min)."""
    out = dict(a)
    for key, value in b.items():
        if key not in out or out[key] is None:
            out[key] = value
        elif value is None:
            continue
        elif isinstance(value, dict):
            out[key] = merge_stats(out[key], value)
        elif key.startswith("max:"):
            out[key] = max(out[key], value)
        elif key.startswith("min:"):
            out[key] = min(out[key], value)
        else:
            out[key] = out[key] + value
    return out


def _output_stats(job: StageJob, earlier: set[str]) -> dict:
    """Rows, input rows covered ("units"), failed rows and the stage's own stats over
    its written files, in all and over the files this run wrote (not in `earlier`): a
    streamed Arrow scan, one batch at a time (flat memory)."""
    rows, stats, computed = 0, {"failed": 0, "units": 0}, {}
    if not job.folder.data_files():
        return {"rows": 0, "stats": stats, "computed": computed}
    earlier_names = {posixpath.basename(path) for path in earlier}
    for fragment in job.folder.dataset().get_fragments():
        new = posixpath.basename(fragment.path) not in earlier_names
        for batch in storage.scan_batches(fragment):
            table = pa.Table.from_batches([batch])
            rows += table.num_rows
            failed = pc.is_valid(table.column(ERROR))
            ok = table.filter(pc.invert(failed))
            n_failed = table.num_rows - ok.num_rows
            partial = {"failed": n_failed, "units": n_failed + (job.units(ok) if job.units else ok.num_rows)}
            if job.block_stats is not None and ok.num_rows:
                partial = merge_stats(partial, job.block_stats(ok))
            stats = merge_stats(stats, partial)
            if new:
                computed = merge_stats(computed, partial)
    return {"rows": rows, "stats": stats, "computed": computed}


def arrow_mask(table: pa.Table, where: Where) -> pa.Array:
    """Which rows of `table` meet every condition (a null value meets none)."""
    mask = pa.array([True] * table.num_rows)
    for column, op, value in where:
        values = table.column(column)
        if op == "==":
            term = pc.equal(values, value)
        elif op == "<":
            term = pc.less(values, value)
        elif op == "in":
            term = pc.is_in(values, value_set=pa.array(list(value)))
        else:
            raise ValueError(f"unsupported condition {op!r}")
        mask = pc.and_(mask, term)
    return pc.fill_null(mask, False)


def _declined_rejects(job: StageJob) -> list[pa.Table]:
    """REJECTS rows for the input rows `job.keep` declines: a streamed scan of the
    inputs (the `where` and `keep` columns and the ids), one batch at a time."""
    dataset = storage.parquet_dataset(job.inputs)
    wanted = {job.id_column, *(c for c, _, _ in job.where), *(c for c, _, _ in job.keep)}
    wanted |= {"user_id"} & set(dataset.schema.names)
    columns = [name for name in dataset.schema.names if name in wanted]
    where = arrow_where(job.where) if job.where else None
    parts = []
    for fragment in dataset.get_fragments():
        for batch in storage.scan_batches(fragment, columns=columns, filter=where):
            table = pa.Table.from_batches([batch])
            declined = table.filter(pc.invert(arrow_mask(table, job.keep)))
            n = declined.num_rows
            if not n:
                continue
            reasons = job.decline_reason(declined) if job.decline_reason else ["declined"] * n
            parts.append(
                pa.table(
                    {
                        "stage": pa.array([job.name] * n, pa.string()),
                        "source": pa.array([fragment.path] * n, pa.string()),
                        "row": pa.nulls(n, pa.int64()),
                        "field": pa.array([",".join(c for c, _, _ in job.keep)] * n, pa.string()),
                        "reason": pa.array(reasons, pa.string()),
                        "user_id": declined.column("user_id").cast(pa.string()) if "user_id" in declined.column_names else pa.nulls(n, pa.string()),
                        "item_id": pa.nulls(n, pa.string()),
                        "raw": declined.column(job.id_column).cast(pa.string()),
                    },
                    schema=REJECTS,
                )
            )
    return parts


def _write_rejects(job: StageJob, declined: int, earlier: list[pa.Table]) -> int:
    """The failed rows of the output, the declined input rows and the rows rejected
    before the stage as REJECTS rows in <stage>/_rejects.parquet."""
    import pyarrow.dataset as ds

    parts = _declined_rejects(job) if declined else []
    parts += earlier
    for batch in storage.scan_batches(job.folder.dataset(), filter=ds.field(ERROR).is_valid()):
        table = pa.Table.from_batches([batch])
        n = table.num_rows
        ids = table.column(job.id_column).cast(pa.string())
        parts.append(
            pa.table(
                {
                    "stage": pa.array([job.name] * n, pa.string()),
                    "source": pa.array([job.folder.path] * n, pa.string()),
                    "row": pa.nulls(n, pa.int64()),
                    "field": pa.array([job.id_column] * n, pa.string()),
                    "reason": table.column(ERROR),
                    "user_id": table.column("user_id").cast(pa.string()) if "user_id" in table.column_names else pa.nulls(n, pa.string()),
                    "item_id": table.column("item_id").cast(pa.string()) if "item_id" in table.column_names else pa.nulls(n, pa.string()),
                    "raw": ids,
                },
                schema=REJECTS,
            )
        )
    rejects = pa.concat_tables(parts) if parts else REJECTS.empty_table()
    storage.write_parquet(rejects, job.folder.rejects)
    return rejects.num_rows


# ------------------------------------------------------------------------------- run


def rows_per_block(batch_rows: int, rows_in: int, config: RunnerConfig) -> int:
    """Whole engine batches per block: `runner.block_batches`, or more where the stage
    would otherwise have over `runner.max_blocks` blocks. It follows the stage's input
    rows (not what is left to do), so a resumed run cuts the same blocks."""
    batches = max(config.block_batches, math.ceil(rows_in / (batch_rows * config.max_blocks)))
    return batch_rows * batches


def run_stage(job: StageJob, config: RunnerConfig | None = None, force: bool = False) -> dict:
    """Run `job` into its folder (or resume it, or skip it when complete); return its
    stats: rows_in (= rows_reused + rows_computed + rows_declined) / rows_failed (among
    those computed or reused), seconds, rows_per_s and
    the stage's own block stats (summed). Raises TrsrError when rows went missing or
    too many failed."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    config = config or RunnerConfig()
    folder = job.folder
    if not force and folder.is_complete(job.fingerprint):
        return dict(folder.stats(), skipped=True)
    resumed = folder.begin(job.fingerprint, force=force)
    started = time.perf_counter()
    init_ray()
    # Every step's actor pool runs at the same time (a streaming pipeline).
    plan = " + ".join(f"{step.name} {step.actors} x {step.num_gpus:g} GPU" for step in job.steps if step.num_gpus)
    require_resources(
        f"{job.name} ({plan or 'CPU only'})",
        gpus=sum(step.num_gpus * step.actors for step in job.steps),
        cpus=max(step.num_cpus * step.actors for step in job.steps),
    )
    rows_in = count_rows(job.inputs, job.where)
    declined = rows_in - count_rows(job.inputs, [*job.where, *job.keep]) if job.keep else 0
    reused = _committed_rows(folder, job.id_column) if resumed else 0
    earlier = set(folder.data_files()) if resumed else set()
    todo = rows_in - declined - reused
    if resumed:
        print(f"[{job.name}] resuming: {reused:,} of {rows_in:,} {job.unit} already done", flush=True)
    failure_limit = math.floor(config.max_failed_share * rows_in)

    context = ray.data.DataContext.get_current()
    saved = (context.checkpoint_config, context.execution_options.preserve_order, context.enable_progress_bars)
    filesystem, inner = storage.arrow_filesystem(folder.path)
    checkpoint_fs, checkpoint_inner = storage.arrow_filesystem(folder.checkpoint)
    context.checkpoint_config = CheckpointConfig(
        id_column=job.id_column,
        checkpoint_path=checkpoint_inner,
        override_filesystem=checkpoint_fs,
        # trsr deletes it after the manifest is written (StageFolder.finish).
        delete_checkpoint_on_success=False,
    )
    # Blocks stay in input order, so a block is the same rows in every run.
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    progress = _progress_actor()
    printer = None
    if config.progress_seconds and todo > 0:
        printer = _ProgressPrinter(job, progress, todo, config.progress_seconds)
        printer.start()
    trimmer = DriverHeapTrimmer(config.trim_driver_heap_seconds) if config.trim_driver_heap_seconds else None
    if trimmer is not None:
        trimmer.start()
    try:
        in_fs, _ = storage.arrow_filesystem(job.inputs[0])
        dataset = read_parquet([storage.arrow_filesystem(p)[1] for p in job.inputs], filesystem=in_fs, columns=job.columns)
        if job.where or job.keep:
            dataset = dataset.filter(expr=_ray_where([*job.where, *job.keep]))
        dataset = dataset.repartition(target_num_rows_per_block=rows_per_block(job.batch_rows, rows_in, config), strict=True)
        for index, step in enumerate(job.steps):
            last = index == len(job.steps) - 1
            with warnings.catch_warnings():
                # Ray 2.60 has no named parameter for actor restarts and task retries
                # yet; passing them as remote args is what it documents (and warns about).
                warnings.simplefilter("ignore", DeprecationWarning)
                dataset = _map(dataset, step, progress if last else None, failure_limit if last else None, job, config)
        dataset.write_parquet(inner, filesystem=filesystem)
    except Exception as error:
        done, failed = ray.get(progress.totals.remote())
        if failed > failure_limit:
            raise TooManyFailures(
                f"{job.name}: {failed} of {rows_in} {job.unit} failed, more than runner.max_failed_share="
                f"{config.max_failed_share} allows; the last error: {_user_error(error)}. Rows done so far "
                f"(and the failed ones, with their reason) are kept in {folder.path}; a rerun continues from them"
            ) from error
        # A step failed on a whole batch (every row on its own): a broken stage or
        # environment. The stage stops; a rerun resumes after the committed blocks.
        raise StageFailed(
            f"{job.name} failed: {_user_error(error)}; rows done so far are kept in "
            f"{folder.path} and a rerun continues from them"
        ) from error
    finally:
        if printer is not None:
            printer.stop()
        if trimmer is not None:
            trimmer.stop()
        context.checkpoint_config, context.execution_options.preserve_order, context.enable_progress_bars = saved
    done, _ = ray.get(progress.totals.remote())
    ray.kill(progress)
    seconds = time.perf_counter() - started

    output = _output_stats(job, earlier)
    storage.release_arrow_memory()
    failed = int(output["stats"].pop("failed", 0))
    units = int(output["stats"].pop("units", 0))
    if units != rows_in - declined:
        raise TrsrError(
            f"{job.name}: {rows_in - declined} {job.unit} in"
            + (f" ({declined} more declined)" if declined else "")
            + f", but {folder.path} holds {units} ({output['rows']} rows): {job.unit} were lost or written twice"
        )
    earlier_rejects = job.earlier_rejects() if job.earlier_rejects else []
    rejected_before = sum(table.num_rows for table in earlier_rejects)
    rejected = _write_rejects(job, declined, earlier_rejects) if failed or declined or rejected_before else 0
    if rejected != failed + declined + rejected_before:
        raise TrsrError(f"{job.name}: {failed} failed + {declined} declined {job.unit}, but {rejected} rejects written")
    if not rejected:
        storage.write_parquet(REJECTS.empty_table(), folder.rejects)
    if failed > failure_limit:
        raise TooManyFailures(
            f"{job.name}: {failed} of {rows_in} {job.unit} failed (runner.max_failed_share="
            f"{config.max_failed_share}); reasons in {folder.rejects}"
        )
    stats = {
        "rows_in": rows_in,
        "rows_reused": reused,
        "rows_computed": rows_in - declined - reused,
        "rows_declined": declined,
        "rows_failed": failed,
        "rows_rejected_before": rejected_before,
        "rows_out": output["rows"],
        "rejects": rejected,
        "resumed": resumed,
        "seconds": round(seconds, 2),
        "rows_per_s": round(done / seconds, 3) if seconds and done else None,
        **job.details,
        **output["stats"],
        # The same stats over the rows this run computed (the others were reused).
        "computed": {k: v for k, v in output["computed"].items() if k not in ("failed", "units")},
    }
    folder.finish(job.fingerprint, stats, **job.details)
    print(
        f"[{job.name}] {rows_in:,} {job.unit}: {rows_in - declined - reused:,} computed, {reused:,} reused, "
        f"{failed:,} failed" + (f", {declined:,} declined" if declined else "") + f", {seconds:.1f} s",
        flush=True,
    )
    return dict(stats, skipped=False)


def run_grouping(job: GroupJob, force: bool = False) -> dict:
    """Run a grouping pass (GroupJob) into its folder, or skip it when complete for the
    same fingerprint; return its stats: rows_out, seconds and the summed block stats of
    its output (a streamed scan of the written files)."""
    import ray

    folder = job.folder
    if not force and folder.is_complete(job.fingerprint):
        return dict(folder.stats(), skipped=True)
    folder.begin(job.fingerprint, force=True)  # a shuffle is redone whole
    started = time.perf_counter()
    init_ray()
    context = ray.data.DataContext.get_current()
    saved = (context.checkpoint_config, context.enable_progress_bars)
    context.checkpoint_config = None
    context.enable_progress_bars = False
    try:
        parts = []
        for source in job.sources:
            dataset = _read(source)
            step = source.normalize
            parts.append(
                dataset.map_batches(
                    _PlainStep, fn_constructor_kwargs={"step": step}, compute=ray.data.ActorPoolStrategy(size=step.actors),
                    batch_format="pyarrow", num_cpus=step.num_cpus,
                )
            )
        dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        step = job.group
        grouped = dataset.groupby(job.key, num_partitions=job.partitions).map_groups(
            _PlainStep, fn_constructor_kwargs={"step": step}, compute=ray.data.ActorPoolStrategy(size=step.actors),
            batch_format="pyarrow", num_cpus=step.num_cpus,
        )
        filesystem, inner = storage.arrow_filesystem(folder.path)
        grouped.write_parquet(inner, filesystem=filesystem)
    except Exception as error:
        raise StageFailed(f"{job.name} failed: {_user_error(error)}") from error
    finally:
        context.checkpoint_config, context.enable_progress_bars = saved
    stats: dict = {"rows_out": 0}
    for batch in storage.scan_batches(folder.dataset()) if folder.data_files() else []:
        table = pa.Table.from_batches([batch])
        stats["rows_out"] += table.num_rows
        if job.block_stats is not None:
            stats = merge_stats(stats, job.block_stats(table))
    storage.release_arrow_memory()
    stats["seconds"] = round(time.perf_counter() - started, 2)
    folder.finish(job.fingerprint, stats)
    print(f"[{job.name}] {stats['rows_out']:,} rows, {stats['seconds']:.1f} s", flush=True)
    return dict(stats, skipped=False)


class _PlainStep:
    """Ray Data actor class around one step of a grouping pass (no bisecting: a bad
    input row is the step's to turn into a rejected row, not an exception)."""

    def __init__(self, step: Step):
        self.stage = step.stage(**step.kwargs)
        self.schema = step.output_schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.stage(batch).select(self.schema.names).cast(self.schema)


def _read(source: Source):
    """A Ray Dataset over a source's files (every column read as it is; the source's
    normalize step casts)."""
    import ray

    filesystem, _ = storage.arrow_filesystem(source.paths[0])
    inner = [storage.arrow_filesystem(p)[1] for p in source.paths]
    if source.format == "parquet":
        return read_parquet(inner, filesystem=filesystem, columns=source.columns)
    if source.format == "csv":
        import pyarrow.csv as pv

        types = {name: pa.string() for name in source.text_columns}
        return ray.data.read_csv(inner, filesystem=filesystem, convert_options=pv.ConvertOptions(column_types=types))
    if source.format == "json":
        # Arrow's JSON reader (Ray's default) reads newline-delimited JSON.
        return ray.data.read_json(inner, filesystem=filesystem, file_extensions=None)
    raise ValueError(f"unsupported source format {source.format!r}")


def _map(dataset, step: Step, progress, failure_limit, job: StageJob, config: RunnerConfig):
    """One step as an actor-pool map in batches of job.batch_rows rows (a block holds
    runner.block_batches of them)."""
    import ray

    return dataset.map_batches(
        _step_class(step.name),
        fn_constructor_kwargs={"step": step, "progress": progress, "failure_limit": failure_limit},
        compute=ray.data.ActorPoolStrategy(size=step.actors),
        batch_size=job.batch_rows,
        batch_format="pyarrow",
        num_cpus=step.num_cpus,
        num_gpus=step.num_gpus,
        max_restarts=config.actor_restarts,
        max_task_retries=config.task_retries,
    )


def _user_error(error: BaseException) -> str:
    """What the step raised, from Ray's wrapped error: Ray keeps the user's exception
    as the formatted traceback before "The above exception was the direct cause"."""
    text = str(error)
    head = text.split("The above exception was the direct cause", 1)[0]
    lines = [line.strip() for line in head.strip().splitlines() if line.strip()]
    if lines and ":" in lines[-1]:
        name, _, message = lines[-1].partition(":")
        return f"{name.rsplit('.', 1)[-1]}:{message}"[:REASON_MAX_CHARS]
    return describe_error(error)
