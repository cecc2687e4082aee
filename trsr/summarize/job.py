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
from dataclasses import replace

import pyarrow.compute as pc

from trsr import storage
from trsr.config import fingerprint
from trsr.schema import LISTS, SPLITS, SUMMARIES
from trsr.errors import ConfigError, TrsrError
from trsr.runner import RunContext, Step, StageJob, run_grouping, run_stage, value_counts
from trsr.runs import LAYOUT, RunFolder, StageFolder
from trsr.summarize.config import SummarizeConfig
from trsr.summarize import refresh, stages
from trsr.summarize.render import RenderBlocks
from trsr.summarize.stages import Finalize, SummarizeStage, steps_needed
from trsr.summarize.state import OK, STATE, UNCHANGED

log = logging.getLogger(__name__)
SPLIT_PRIORITY = ("test", "valid", "train")
# Input order: the splits in priority order (test first), lists by list_id within each.
INPUT_SPLITS = SPLIT_PRIORITY


def summary_folder(run_dir: str, mode: str, users: str = "protocol") -> StageFolder:
    run = RunFolder(run_dir)
    return run.user_summaries(mode) if users == "all" else run.summaries(mode)


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


def longest_history(inputs: list[str], column: str) -> int:
    """The longest history among the inputs (Parquet statistics are not enough for
    list lengths: a streamed scan of the history column)."""
    longest = 0
    for batch in storage.scan_batches(inputs, columns=[column]):
        longest = max(longest, int(pc.max(pc.list_value_length(batch.column(0))).as_py() or 0))
    storage.release_arrow_memory()
    return longest


def engine_stage_plan(steps: int, execution: str, max_stages: int) -> list[list[int]]:
    """The levels/steps each engine stage runs: one stage for all (fused), else one per
    step, in at most `max_stages` stages of consecutive steps (per_step)."""
    if execution == "fused" or steps <= 1:
        return [list(range(steps))]
    stages = min(steps, max_stages)
    size = math.ceil(steps / stages)
    return [list(range(start, min(start + size, steps))) for start in range(0, steps, size)]


def stage_inputs(run: RunFolder, users: str) -> tuple[list[str], str, str, list[str]]:
    """(input files, id column, history column, columns read) of the summarize stage:
    the prepared lists (users "protocol") or the prepared sequences (users "all")."""
    if users == "all":
        return [run.sequences()], "user_id", "item_ids", ["user_id", "item_ids"]
    return [run.lists(split) for split in INPUT_SPLITS], "list_id", "history", list(LISTS.names)


def output_folder(run: RunFolder, config: SummarizeConfig, mode: str) -> StageFolder:
    return run.user_summaries(mode) if config.users == "all" else run.summaries(mode)


def settings_fingerprint(config: SummarizeConfig, seed: int, mode: str) -> str:
    """What decides a summary's text besides the history: an --update reuses earlier
    summaries only when this is unchanged."""
    settings = config.model_dump(mode="json", exclude={"modes"})
    # Resources change where the work runs, not what it produces.
    for key in ("actors", "num_cpus", "num_gpus"):
        settings["engine"].pop(key, None)
    settings.pop("max_engine_stages", None)  # how steps are grouped, not what they produce
    return fingerprint(settings, mode, seed, LAYOUT, stages.BEHAVIOUR)


def stage_fingerprint(config: SummarizeConfig, context: RunContext, mode: str) -> str:
    # An --update computes what a full run would: the same fingerprint.
    return fingerprint(settings_fingerprint(config, context.seed, mode), context.run.prepared_fingerprint())


def summarize_job(config: SummarizeConfig, context: RunContext, mode: str) -> StageJob:
    """The runner's description of summarizing every prepared list in `mode`."""
    run = context.run
    run.prepared_fingerprint()  # a clear error when prepare has not run
    inputs, id_column, history_column, columns = stage_inputs(run, config.users)
    max_blocks = math.ceil(longest_history(inputs, history_column) / config.items_per_block)
    if config.history_window is not None:
        max_blocks = min(max_blocks, config.history_window)
    steps = steps_needed(mode, max_blocks, config.fan_in)
    plan = engine_stage_plan(steps, config.execution, config.max_engine_stages)
    engine = config.engine
    caps = split_caps(run, config.max_users) if config.users == "protocol" else None
    render = Step(
        RenderBlocks,
        {"config": config, "items": run.items(), "caps": caps, "mode": mode},
        STATE,
        actors=1,
        num_cpus=1,
    )
    summarize = [
        Step(
            SummarizeStage,
            {"config": config, "mode": mode, "steps": step_list, "seed": context.seed},
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
        {"mode": mode, "model": engine.model, "template_hash": prompts.hash, "seed": context.seed},
        SUMMARIES,
        num_cpus=0.25,
    )
    return StageJob(
        name=f"summarize {mode}" + (" (all users)" if config.users == "all" else ""),
        folder=output_folder(run, config, mode),
        inputs=inputs,
        id_column=id_column,
        steps=[render, *summarize, finalize],
        batch_rows=config.users_per_batch,
        fingerprint=stage_fingerprint(config, context, mode),
        columns=columns,
        unit="users",
        block_stats=_block_stats,
        # Lists beyond summarize.max_users pass on unsummarized: progress and ETA count
        # the summarized ones.
        work_rows=summarized_rows if caps and any(cap is not None for cap in caps.values()) else None,
        work_total=_capped_total(run, caps),
        details={
            "mode": mode,
            "users": config.users,
            "steps": steps,
            "engine_stages": len(plan),
            "settings_fingerprint": settings_fingerprint(config, context.seed, mode),
        },
    )


def summarized_rows(table) -> int:
    """Rows of an output batch that the summarizer worked on (StageJob.work_rows)."""
    return int(pc.sum(pc.fill_null(pc.not_equal(table.column("status"), "missing"), False)).as_py() or 0)


def _capped_total(run: RunFolder, caps: dict[str, int | None] | None) -> int | None:
    """Lists summarize.max_users lets through (None: no cap, every list)."""
    if not caps or all(cap is None for cap in caps.values()):
        return None
    return sum(storage_rows(run.lists(split)) if cap is None else min(cap, storage_rows(run.lists(split)))
               for split, cap in caps.items())


def _block_stats(table) -> dict:
    statuses = value_counts(table.column("status"))
    summarized = table.filter(pc.not_equal(table.column("status"), "missing"))
    # Engine work of this run: rows kept unchanged by an --update carry their earlier counts.
    worked = table.filter(pc.fill_null(pc.not_equal(table.column("refresh"), UNCHANGED), True))
    return {
        "status": statuses,
        "refresh": value_counts(table.column("refresh")),
        "calls": int(pc.sum(worked.column("calls")).as_py() or 0),
        "retries": int(pc.sum(worked.column("retries")).as_py() or 0),
        "trimmed": int(pc.sum(worked.column("trimmed")).as_py() or 0),
        "tokens_in": int(pc.sum(worked.column("tokens_in")).as_py() or 0),
        "tokens_out": int(pc.sum(worked.column("tokens_out")).as_py() or 0),
        "summarized": summarized.num_rows,
    }


def summarize(config: SummarizeConfig, context: RunContext, force: bool = False, update: bool = False) -> dict:
    """Run every configured mode; return {"modes": {mode: stats}, "skipped": bool}.

    `update` (summarize.users "all"): refresh the earlier user summaries incrementally
    (trsr.summarize.refresh): users whose history is unchanged keep their row, users
    with new interactions reuse the summaries of their unchanged blocks."""
    if update and config.users != "all":
        raise ConfigError("--update refreshes every user's summaries: use it with summarize.users=all (--users all)")
    out: dict = {"modes": {}}
    for mode in config.modes:
        job = summarize_job(config, context, mode)
        if update:
            job = _update_job(context.run, mode, job, force)
        stats = run_stage(job, context.runner, force=force)
        if update:
            refresh.clean_up(context.run, mode)
        seconds = stats.get("seconds") or 0.0
        computed = stats.get("rows_computed", 0)
        stats.setdefault("ok", stats.get("status", {}).get(OK, 0))
        stats["output_tokens_per_s"] = round(stats["tokens_out"] / seconds, 2) if seconds and not stats.get("skipped") else stats.get("output_tokens_per_s")
        # The runner's rows_per_s counts the rows the summarizer worked on (summarized_rows),
        # not the lists summarize.max_users passes through unsummarized.
        stats["users_per_s"] = stats.get("rows_per_s") if computed else stats.get("users_per_s")
        out["modes"][mode] = stats
        log.debug("summarize %s: %s", mode, stats)
    out["skipped"] = all(s.get("skipped") for s in out["modes"].values())
    return out


def _update_job(run: RunFolder, mode: str, job: StageJob, force: bool) -> StageJob:
    """`job` reading each user's new history beside their earlier row (refresh module),
    or `job` unchanged when there is nothing earlier to reuse."""
    if not force and job.folder.is_complete(job.fingerprint):
        return job  # up to date: run_stage skips it
    previous = refresh.set_aside(run, mode, job.fingerprint)
    if previous is None:
        return job
    earlier = storage.read_json(previous.manifest).get("settings_fingerprint")
    if earlier != job.details["settings_fingerprint"]:
        print(f"[summarize {mode}] the earlier summaries were made with other settings: every user is summarized again", flush=True)
        return job
    grouping = refresh.input_job(run, mode, previous, fingerprint(job.fingerprint, previous.fingerprint()))
    run_grouping(grouping, force=force)
    return replace(job, inputs=grouping.folder.data_files(), columns=None, details=dict(job.details, update=True))


def read_summaries(run_dir: str, mode: str, columns: list[str] | None = None, users: str = "protocol"):
    """Every list's (users "all": every user's) summary row of `mode`, sorted by
    list_id (small runs, tests)."""
    folder = summary_folder(run_dir, mode, users)
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
            f"{s.get('rows_computed', 0)} rows written by this run and {s.get('rows_reused', 0)} kept from an "
            f"interrupted one, {s.get('calls', 0)} engine calls, {s['seconds']:.1f} s"
            + (f", {s['users_per_s']} users/s" if s.get("users_per_s") and not s.get("skipped") else "")
            + (" [up to date, skipped]" if s.get("skipped") else "")
        )
        refreshed = s.get("refresh") or {}
        if s.get("update"):
            lines.append(
                f"  update: {refreshed.get('unchanged', 0)} users unchanged, {refreshed.get('updated', 0)} updated, "
                f"{refreshed.get('new', 0)} new, {refreshed.get('recomputed', 0)} recomputed; "
                f"{s.get('calls', 0)} engine calls made"
            )
    return "\n".join(lines)
