"""Running a streaming stage (`run_stage`): the Ray Data plan, read -> filter ->
checkpoint filter -> blocks -> step actor pools -> write, its checkpoint config, and
the checks on its output (see the package's docstring)."""

from __future__ import annotations

import math
import time
import warnings

import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.errors import TrsrError
from trsr.ray_utils import init_ray, require_resources
from trsr.runner.config import RunnerConfig
from trsr.runner.failures import StageFailed, TooManyFailures, step_class, user_error, write_rejects
from trsr.runner.inputs import count_rows, ray_where, read_parquet
from trsr.runner.job import StageJob, Step
from trsr.runner.progress import DriverHeapTrimmer, ProgressPrinter, progress_actor
from trsr.runner.stats import output_stats
from trsr.runs import StageFolder
from trsr.schema import REJECTS


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
    progress = progress_actor()
    printer = None
    todo_work = todo if job.work_total is None else max(job.work_total - _work_done(job, earlier), 0)
    if config.progress_seconds and todo_work > 0:
        printer = ProgressPrinter(job, progress, todo_work, config.progress_seconds)
        printer.start()
    trimmer = DriverHeapTrimmer(config.trim_driver_heap_seconds) if config.trim_driver_heap_seconds else None
    if trimmer is not None:
        trimmer.start()
    try:
        in_fs, _ = storage.arrow_filesystem(job.inputs[0])
        dataset = read_parquet([storage.arrow_filesystem(p)[1] for p in job.inputs], filesystem=in_fs, columns=job.columns)
        if job.where or job.keep:
            dataset = dataset.filter(expr=ray_where([*job.where, *job.keep]))
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
                f"{config.max_failed_share} allows; the last error: {user_error(error)}. Rows done so far "
                f"(and the failed ones, with their reason) are kept in {folder.path}; a rerun continues from them"
            ) from error
        # A step failed on a whole batch (every row on its own): a broken stage or
        # environment. The stage stops; a rerun resumes after the committed blocks.
        raise StageFailed(
            f"{job.name} failed: {user_error(error)}; rows done so far are kept in "
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

    output = output_stats(job, earlier)
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
    rejected = write_rejects(job, declined, earlier_rejects) if failed or declined or rejected_before else 0
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


def _map(dataset, step: Step, progress, failure_limit, job: StageJob, config: RunnerConfig):
    """One step as an actor-pool map in batches of job.batch_rows rows (a block holds
    runner.block_batches of them)."""
    import ray

    return dataset.map_batches(
        step_class(step.name),
        fn_constructor_kwargs={
            "step": step, "progress": progress, "failure_limit": failure_limit,
            "work_rows": job.work_rows if progress is not None else None,
        },
        compute=ray.data.ActorPoolStrategy(size=step.actors),
        batch_size=job.batch_rows,
        batch_format="pyarrow",
        num_cpus=step.num_cpus,
        num_gpus=step.num_gpus,
        max_restarts=config.actor_restarts,
        max_task_retries=config.task_retries,
    )


def _work_done(job: StageJob, earlier: set[str]) -> int:
    """Rows of an interrupted run's committed output that got the stage's work."""
    if not earlier or job.work_rows is None:
        return 0
    done = sum(job.work_rows(pa.Table.from_batches([batch])) for batch in storage.scan_batches(sorted(earlier)))
    storage.release_arrow_memory()
    return done


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
