"""Running a grouping pass (`run_grouping`): read every source, union, group by key and
write, as one Ray Data plan (a shuffle, so not checkpointed)."""

from __future__ import annotations

import time

import pyarrow as pa

from trsr import storage
from trsr.ray_utils import init_ray
from trsr.runner.failures import StageFailed, user_error
from trsr.runner.inputs import read_parquet
from trsr.runner.job import GroupJob, Source, Step
from trsr.runner.stats import merge_stats


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
        raise StageFailed(f"{job.name} failed: {user_error(error)}") from error
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
