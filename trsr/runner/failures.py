"""Failed rows: the error column every step's output carries, the Ray Data actor class
around a step that bisects a failing batch down to the rows that raise (`_Guarded`),
the errors a stage fails with, and its `_rejects.parquet` (failed rows, rows declined
by policy, rows rejected before it)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.errors import TrsrError
from trsr.runner.inputs import arrow_mask, arrow_where
from trsr.runner.job import StageJob, Step
from trsr.schema import REJECTS


log = logging.getLogger(__name__)

ERROR = "error"  # the column every step's output carries: null = ok, else the reason
ERROR_FIELD = pa.field(ERROR, pa.string())
REASON_MAX_CHARS = 500


def output_schema(schema: pa.Schema) -> pa.Schema:
    """A step's output as written: every field nullable (failed rows carry only their
    id and the error) and the error column last."""
    fields = [f.with_nullable(True) for f in schema if f.name != ERROR]
    return pa.schema(fields + [ERROR_FIELD])


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


def user_error(error: BaseException) -> str:
    """What the step raised, from Ray's wrapped error: Ray keeps the user's exception
    as the formatted traceback before "The above exception was the direct cause"."""
    text = str(error)
    head = text.split("The above exception was the direct cause", 1)[0]
    lines = [line.strip() for line in head.strip().splitlines() if line.strip()]
    if lines and ":" in lines[-1]:
        name, _, message = lines[-1].partition(":")
        return f"{name.rsplit('.', 1)[-1]}:{message}"[:REASON_MAX_CHARS]
    return describe_error(error)


class StageFailed(TrsrError):
    """A step failed on a whole batch: a broken stage or environment, not a bad row."""


class TooManyFailures(TrsrError):
    """More input rows failed than runner.max_failed_share allows."""


class _Guarded:
    """Ray Data actor class around one step (see the package doc: bisecting failures,
    passing failed rows on, reporting progress from the last step)."""

    def __init__(self, step: Step, progress=None, failure_limit: int | None = None, work_rows=None):
        self.step = step
        self.work_rows = work_rows  # StageJob.work_rows: what progress counts
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
        if self.work_rows is not None:
            rows_in = self.work_rows(table.filter(pc.is_null(table.column(ERROR)))) if table.num_rows else 0
        failed_total = ray.get(self.progress.add.remote(rows_in, failed))
        # Only a batch with failed rows of its own stops the stage, so that the error
        # names a real failed row (a clean batch reporting later would name none).
        if failed and self.failure_limit is not None and failed_total > self.failure_limit:
            last = table.column(ERROR).drop_null()[0].as_py()
            raise TooManyFailures(f"{failed_total} rows failed (at most {self.failure_limit} allowed): {last}")


_STEP_CLASSES: dict[str, type] = {}


def step_class(name: str) -> type:
    """_Guarded under the step's own name, so that Ray's operators, logs and worker
    processes say which step they run ("MapBatches(SummarizeStage)")."""
    if name not in _STEP_CLASSES:
        _STEP_CLASSES[name] = type(name, (_Guarded,), {"__module__": __name__, "__qualname__": name})
    return _STEP_CLASSES[name]


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


def write_rejects(job: StageJob, declined: int, earlier: list[pa.Table]) -> int:
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
