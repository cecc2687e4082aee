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

from trsr.runner.config import RunContext, RunnerConfig
from trsr.runner.failures import ERROR, ERROR_FIELD, REASON_MAX_CHARS, StageFailed, TooManyFailures, describe_error, output_schema
from trsr.runner.group import run_grouping
from trsr.runner.inputs import arrow_mask, arrow_where, count_rows, read_parquet
from trsr.runner.job import GroupJob, Source, StageJob, Step, Where, shuffle_partitions
from trsr.runner.progress import DriverHeapTrimmer, progress_line
from trsr.runner.stage import rows_per_block, run_stage
from trsr.runner.stats import merge_stats, value_counts

__all__ = [
    "ERROR",
    "ERROR_FIELD",
    "REASON_MAX_CHARS",
    "DriverHeapTrimmer",
    "GroupJob",
    "RunContext",
    "RunnerConfig",
    "Source",
    "StageFailed",
    "StageJob",
    "Step",
    "TooManyFailures",
    "Where",
    "arrow_mask",
    "arrow_where",
    "count_rows",
    "describe_error",
    "merge_stats",
    "value_counts",
    "output_schema",
    "progress_line",
    "read_parquet",
    "rows_per_block",
    "run_grouping",
    "run_stage",
    "shuffle_partitions",
]
