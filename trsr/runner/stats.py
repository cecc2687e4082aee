"""A stage's stats: additive stats dicts and their sums over its written files."""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.runner.failures import ERROR
from trsr.runner.job import StageJob


def value_counts(column: pa.ChunkedArray | pa.Array) -> dict:
    """{value: rows} of one column: the block stats' counts by status."""
    counts = pc.value_counts(column)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


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


def output_stats(job: StageJob, earlier: set[str]) -> dict:
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
