"""The summarize job: prepared ranking lists -> summaries/<mode>/, streamed on Ray Data.

    prepared/lists/{test,valid,train}.parquet (one row per list = per user)
      -> RenderBlocks            CPU actor: blocks of N items fitted to the token budget
                                 (lists beyond summarize.max_users pass unsummarized)
      -> SummarizeStage x L      engine actors: one step per level/step (per_step)
         (or one fused step)     or one step through all of them (fused)
      -> Finalize                one SUMMARIES row per list
      -> summaries/<mode>/       one Parquet file per block of users_per_batch lists,
                                 _stats.json, _rejects.parquet, _manifest.json

Each mode is one stage of the runner (trsr.runner): resumable row by row after a crash,
with progress lines, rejects and stats from the written files. Every list of every
split is in the output (status "missing" where it was not summarized), so the stages
that read summaries (training texts, scoring) read this one table.
"""

from __future__ import annotations

import logging
import math

import pyarrow.compute as pc

from trsr import storage
from trsr.config import fingerprint
from trsr.schema import LISTS, SPLITS, SUMMARIES
from trsr.errors import TrsrError
from trsr.experiment import ExperimentConfig
from trsr.runner import Step, StageJob, run_stage
from trsr.runs import LAYOUT, RunFolder, StageFolder
from trsr.summarize.config import SummarizeConfig
from trsr.summarize.stages import (
    OK,
    STATE,
    Finalize,
    RenderBlocks,
    SummarizeStage,
    steps_needed,
)

log = logging.getLogger(__name__)
SPLIT_PRIORITY = ("test", "valid", "train")
# Input order: the splits in priority order (test first), lists by list_id within each.
INPUT_SPLITS = SPLIT_PRIORITY


def summary_folder(run_dir: str, mode: str) -> StageFolder:
    return RunFolder(run_dir).summaries(mode)


def split_caps(run: RunFolder, max_users: int | dict | None) -> dict[str, int | None]:
    """Lists to summarize per split (None = all): a cap per split as given, or a total
    filled test first, then valid, then train (lists in list_id order)."""
    if max_users is None:
        return {split: None for split in SPLITS}
    if isinstance(max_users, dict):
        return {split: max_users.get(split) for split in SPLITS}
    caps, left = {}, int(max_users)
    for split in SPLIT_PRIORITY:
        rows = storage_rows(run.lists(split))
        caps[split] = min(rows, left)
        left -= caps[split]
    return caps


def storage_rows(path: str) -> int:
    import pyarrow.parquet as pq

    filesystem, inner = storage.arrow_filesystem(path)
    with filesystem.open_input_file(inner) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def longest_history(run: RunFolder) -> int:
    """The longest history of the prepared lists (Parquet statistics are not enough for
    list lengths: a streamed scan of the history column)."""
    longest = 0
    for batch in storage.scan_batches([run.lists(s) for s in SPLITS], columns=["history"]):
        longest = max(longest, int(pc.max(pc.list_value_length(batch.column(0))).as_py() or 0))
    storage.release_arrow_memory()
    return longest


def stage_fingerprint(experiment: ExperimentConfig, run: RunFolder, mode: str) -> str:
    prepared = run.prepared_fingerprint()
    settings = experiment.summarize.model_dump(mode="json", exclude={"modes"})
    # Resources change where the work runs, not what it produces.
    for key in ("actors", "num_cpus", "num_gpus"):
        settings["engine"].pop(key, None)
    return fingerprint(settings, mode, experiment.seed, prepared, LAYOUT)


def summarize_job(experiment: ExperimentConfig, mode: str) -> StageJob:
    """The runner's description of summarizing every prepared list in `mode`."""
    config: SummarizeConfig = experiment.summarize
    run = RunFolder(experiment.run_dir)
    run.prepared_fingerprint()  # a clear error when prepare has not run
    max_blocks = math.ceil(longest_history(run) / config.block_size)
    steps = steps_needed(mode, max_blocks, config.fan_in)
    plan = [[s] for s in range(steps)] if config.execution == "per_step" else [list(range(steps))]
    engine = config.engine
    render = Step(
        RenderBlocks,
        {"config": config, "items": run.items(), "caps": split_caps(run, config.max_users)},
        STATE,
        actors=1,
        num_cpus=1,
    )
    summarize = [
        Step(
            SummarizeStage,
            {"config": config, "mode": mode, "steps": step_list, "seed": experiment.seed},
            STATE,
            actors=engine.actors,
            num_cpus=engine.num_cpus,
            num_gpus=engine.num_gpus,
        )
        for step_list in plan
    ]
    prompts = config.prompts()
    finalize = Step(
        Finalize,
        {"mode": mode, "model": engine.model, "template_hash": prompts.hash, "seed": experiment.seed},
        SUMMARIES,
        num_cpus=0.25,
    )
    return StageJob(
        name=f"summarize {mode}",
        folder=run.summaries(mode),
        inputs=[run.lists(split) for split in INPUT_SPLITS],
        id_column="list_id",
        steps=[render, *summarize, finalize],
        batch_rows=config.users_per_batch,
        fingerprint=stage_fingerprint(experiment, run, mode),
        columns=list(LISTS.names),
        unit="users",
        block_stats=_block_stats,
        details={"mode": mode, "steps": steps, "engine_stages": len(plan)},
    )


def _block_stats(table) -> dict:
    statuses = {}
    for status, count in zip(*_value_counts(table.column("status"))):
        statuses[status] = count
    summarized = table.filter(pc.not_equal(table.column("status"), "missing"))
    return {
        "status": statuses,
        "calls": int(pc.sum(table.column("calls")).as_py() or 0),
        "retries": int(pc.sum(table.column("retries")).as_py() or 0),
        "trimmed": int(pc.sum(table.column("trimmed")).as_py() or 0),
        "tokens_in": int(pc.sum(table.column("tokens_in")).as_py() or 0),
        "tokens_out": int(pc.sum(table.column("tokens_out")).as_py() or 0),
        "summarized": summarized.num_rows,
    }


def _value_counts(column):
    counts = pc.value_counts(column)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def summarize(experiment: ExperimentConfig, force: bool = False) -> dict:
    """Run every configured mode; return {"modes": {mode: stats}, "skipped": bool}."""
    from trsr.runner import RunnerConfig

    config: SummarizeConfig = experiment.summarize
    runner: RunnerConfig = experiment.runner
    out: dict = {"modes": {}}
    for mode in config.modes:
        job = summarize_job(experiment, mode)
        stats = run_stage(job, runner, force=force)
        seconds = stats.get("seconds") or 0.0
        computed = stats.get("rows_computed", 0)
        stats.setdefault("ok", stats.get("status", {}).get(OK, 0))
        stats["output_tokens_per_s"] = round(stats["tokens_out"] / seconds, 2) if seconds and not stats.get("skipped") else stats.get("output_tokens_per_s")
        stats["users_per_s"] = round(computed / seconds, 4) if seconds and computed else stats.get("users_per_s")
        out["modes"][mode] = stats
        log.info("summarize %s: %s", mode, stats)
    out["skipped"] = all(s.get("skipped") for s in out["modes"].values())
    return out


def read_summaries(run_dir: str, mode: str, columns: list[str] | None = None):
    """Every list's summary row of `mode`, sorted by list_id (small runs, tests)."""
    folder = summary_folder(run_dir, mode)
    if not folder.exists():
        raise TrsrError(f"{folder.manifest}: not found; run `trsr summarize` with {mode} among summarize.modes first")
    return folder.read(columns=columns).sort_by("list_id")


def describe(stats: dict) -> str:
    lines = []
    for mode, s in stats["modes"].items():
        status = s.get("status", {})
        lines.append(
            f"summarize {mode}: {s.get('summarized', 0)} of {s['rows_in']} users summarized "
            f"({status.get(OK, 0)} ok; status {dict(sorted(status.items()))}), "
            f"{s.get('rows_computed', 0)} computed and {s.get('rows_reused', 0)} reused, "
            f"{s.get('calls', 0)} engine calls, {s['seconds']:.1f} s"
            + (" [up to date, skipped]" if s.get("skipped") else "")
        )
    return "\n".join(lines)
