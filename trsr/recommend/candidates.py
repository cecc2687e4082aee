"""Scoring the candidates of your own retrieval: `trsr score --candidates PATH`.

    candidates (Parquet, CSV or JSON lines; a file or a folder; local or s3://):
        user_id, item_id       one row per candidate, or
        user_id, item_ids      one row per user: a list (Parquet, JSON) or a string of
                               ids separated by spaces, commas or "|" (CSV)
    + prepared/sequences       the user's history (the K most recent items are shown)
    + user_summaries/<mode>/   the user's latest summary (`trsr summarize --users all`)
      -> grouping pass          one row per user (candidate_groups): its distinct known candidates, summary
         (trsr.runner.run_grouping)   and history; candidates of unknown users, unknown
                               items, duplicates and empty ids are set aside with a reason
      -> checkpointed stage     AttachItems -> ScoreAndRank (ScoreStage, then ranks)
         (trsr.runner.run_stage)
      -> <output>/              CANDIDATE_SCORES: user_id, item_id, score = p(yes), rank
                               (1 = the user's best), method, summary_status, logp_yes,
                               logp_no; _rejects.parquet (every candidate set aside, and
                               users declined by score.prompt.missing_summary), _stats.json

The grouping is a shuffle (Ray Data groupby), so it runs before the checkpointed stage
rather than inside it: Ray's row-level checkpoint filters rows right after a file read,
and needs ids that are unique per row (one row per user). Every candidate row of the
file ends in the output or in the rejects: candidates_in = scored + rejected.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.config import fingerprint
from trsr.errors import ConfigError, DataError
from trsr.recommend import lists as ranking_lists
from trsr.recommend.candidate_groups import (
    CANDIDATE_LISTS,
    GROUP_ROWS,
    CandidateRows,
    GroupUser,
    HistoryRows,
    SummaryRows,
    candidate_files,
    grouping_stats,
    set_aside_rejects,
)
from trsr.recommend.config import ScoreConfig
from trsr.recommend.lists import PROMPT_LISTS, AttachItems
from trsr.recommend.score import ScoreStage, output_settings, resolve_adapter
from trsr.runner import GroupJob, RunContext, Source, StageJob, Step, arrow_mask, run_grouping, run_stage, shuffle_partitions
from trsr.runner import value_counts
from trsr.runs import LAYOUT, StageFolder, inputs_signature
from trsr.schema import CANDIDATE_SCORES

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ the scoring stage


class RankCandidates:
    """Scored candidate rows (SCORES_WITH_DIAGNOSTICS) -> CANDIDATE_SCORES: rank 1 = the user's
    highest p(yes), ties broken by item id; only ranks <= top_k when set."""

    def __init__(self, top_k: int | None):
        self.top_k = top_k

    def __call__(self, batch: pa.Table) -> pa.Table:
        ordered = batch.sort_by([("user_id", "ascending"), ("score", "descending"), ("candidate", "ascending")])
        users = ordered.column("user_id").to_pylist()
        ranks, previous, rank = [], None, 0
        for user in users:
            rank = rank + 1 if user == previous else 1
            previous = user
            ranks.append(rank)
        ranks_array = pa.array(ranks, pa.int32())
        table = pa.table(
            {
                "user_id": ordered.column("user_id"),
                "item_id": ordered.column("candidate"),
                "score": ordered.column("score"),
                "rank": ranks_array,
                "method": ordered.column("method"),
                "summary_status": ordered.column("summary_status"),
                "logp_yes": ordered.column("logp_yes"),
                "logp_no": ordered.column("logp_no"),
            },
            schema=CANDIDATE_SCORES,
        )
        if self.top_k is not None:
            table = table.filter(pc.less_equal(ranks_array, self.top_k))
        return table


class ScoreAndRank(ScoreStage):
    """ScoreStage, then RankCandidates on its output: one step, so that each user's
    candidates are ranked together (a later step would get the output re-cut into
    batches of `users_per_batch` rows, splitting users)."""

    def __init__(self, config: ScoreConfig, top_k: int | None, engine=None):
        super().__init__(config, engine=engine)
        self.rank = RankCandidates(top_k)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.rank(super().__call__(batch))


def _users_out(table: pa.Table) -> int:
    return int(pc.sum(pc.equal(table.column("rank"), 1)).as_py() or 0)


def _score_stats(table: pa.Table) -> dict:
    firsts = table.filter(pc.equal(table.column("rank"), 1))
    return {
        "users_scored": firsts.num_rows,
        "candidates_written": table.num_rows,
        "summary_status": value_counts(firsts.column("summary_status")),
    }


# ------------------------------------------------------------------------------ driver


def score_candidates(
    config: ScoreConfig, context: RunContext, candidates: str, output: str | None = None,
    top_k: int | None = None, force: bool = False, trained: bool = True,
) -> dict:
    """Score every user's candidates from `candidates` (see the module doc) with the
    trained adapter of the config's variant (`trained`, as in score.score); write
    CANDIDATE_SCORES to `output` (default <run_dir>/candidates/<method>/scores/);
    return the stats."""
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    run = context.run
    prepared = run.prepared_fingerprint()
    mode = config.prompt.mode
    summaries_fp, summary_files = None, []
    if mode is not None:
        folder = run.user_summaries(mode)
        summaries_fp = folder.require(
            f"run `trsr summarize --users all` with {mode} among summarize.modes first (variant "
            f"{config.prompt.variant} shows each user's {mode} summary; variant tallrec needs none)"
        )
        summary_files = folder.data_files()
    from trsr.llm.models import resolve

    resolve(config.engine.model)  # an unknown model fails here, not inside an actor
    adapter = resolve_adapter(config, run, trained)
    engine = config.engine.model_copy(update={"lora_adapter": adapter})
    config = config.model_copy(update={"engine": engine})
    method = config.method_name
    files, file_format = candidate_files(candidates)
    grouped, scores = run.candidate_input(method), run.candidate_scores(method, output)

    k = config.prompt.k
    sources = [
        Source(files, file_format, Step(CandidateRows, {"source": candidates}, GROUP_ROWS, num_cpus=0.5), ("user_id", "item_id", "item_ids")),
        Source([run.sequences()], "parquet", Step(HistoryRows, {"recent": k}, GROUP_ROWS, num_cpus=0.5), columns=["user_id", "item_ids"]),
    ]
    if summary_files:
        sources.append(
            Source(summary_files, "parquet", Step(SummaryRows, {}, GROUP_ROWS, num_cpus=0.5), columns=["user_id", "summary", "status"])
        )
    group_fp = fingerprint(inputs_signature(candidates), prepared, summaries_fp, k, mode, LAYOUT)
    group_stats = run_grouping(
        GroupJob(
            name=f"group candidates {method}",
            folder=grouped,
            sources=sources,
            key="user_id",
            group=Step(GroupUser, {"items": run.items()}, CANDIDATE_LISTS, num_cpus=0.5),
            fingerprint=group_fp,
            block_stats=grouping_stats,
            partitions=shuffle_partitions(files + [run.sequences()] + summary_files),
        ),
        force=force,
    )
    inputs = grouped.data_files()
    if not inputs or not group_stats.get("users"):
        raise DataError(f"{candidates}: no candidates found")
    where = [("scorable", "==", True)]
    keep, decline_reason = ranking_lists.summary_policy(config.prompt)
    job = StageJob(
        name=f"score candidates {method}",
        folder=scores,
        inputs=inputs,
        id_column="user_id",
        steps=[
            Step(AttachItems, {"items": run.items(), "history_items": k, "uses_summary": mode is not None}, PROMPT_LISTS),
            Step(
                ScoreAndRank,
                {"config": config, "top_k": top_k},
                CANDIDATE_SCORES,
                actors=engine.actors,
                num_cpus=engine.num_cpus,
                num_gpus=engine.num_gpus,
            ),
        ],
        batch_rows=config.users_per_batch,
        fingerprint=fingerprint(group_fp, output_settings(config, exclude={"splits", "max_lists"}), inputs_signature(adapter) if adapter else None, top_k, LAYOUT),
        where=where,
        columns=list(CANDIDATE_LISTS.names[:-1]),
        unit="users",
        block_stats=_score_stats,
        units=_users_out,
        details={"method": method, "candidates": candidates, "model": engine.model, "adapter": adapter, "top_k": top_k},
        keep=keep,
        decline_reason=decline_reason,
        earlier_rejects=lambda: set_aside_rejects(grouped, candidates),
    )
    ranking_lists.check_summaries(job.name, inputs, where, config.prompt)
    stats = run_stage(job, context.runner, force=force)
    result = {
        **stats,
        "method": method,
        "path": scores.path,
        "adapter": adapter,
        "users_in_file": group_stats.get("users", 0),
        "users_scorable": group_stats.get("users_scorable", 0),
        "candidates_in": group_stats.get("candidates_in", 0),
        "candidates_scored": group_stats.get("candidates_kept", 0) - _declined_candidates(grouped, job),
        "candidates_rejected": group_stats.get("candidates_rejected", 0),
        "rejected_by_reason": group_stats.get("rejected_by_reason", {}),
    }
    return result


def _declined_candidates(grouped: StageFolder, job: StageJob) -> int:
    """Candidates of the users the missing-summary policy declined (counted in rejects
    once per user)."""
    if not job.keep:
        return 0
    total = 0
    for batch in storage.scan_batches(grouped.dataset(), columns=["scorable", "status", "candidates"]):
        table = pa.Table.from_batches([batch]).filter(pc.field("scorable"))
        declined = table.filter(pc.invert(arrow_mask(table, job.keep)))
        total += int(pc.sum(pc.list_value_length(declined.column("candidates"))).as_py() or 0)
    return total


def read_candidate_scores(path: str) -> pa.Table:
    """The written CANDIDATE_SCORES, sorted by user and rank (small outputs, tests)."""
    folder = StageFolder(path, path)
    table = folder.read()
    if "error" in table.column_names:
        table = table.filter(pc.is_null(table.column("error")))
    table = table.select(CANDIDATE_SCORES.names).cast(CANDIDATE_SCORES)
    return table.sort_by([("user_id", "ascending"), ("rank", "ascending")])


def describe(result: dict) -> str:
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(result.get("rejected_by_reason", {}).items()))
    return (
        f"score candidates {result['method']}: {result['users_in_file']:,} users and {result['candidates_in']:,} "
        f"candidates in the file; {result.get('users_scored', 0):,} users scored "
        f"({result['candidates_scored']:,} candidates, {result.get('candidates_written', 0):,} rows written), "
        f"{result['candidates_rejected']:,} candidates set aside" + (f" ({reasons})" if reasons else "")
        + (f", {result['rows_declined']:,} users declined without a summary" if result.get("rows_declined") else "")
        + (f", {result['rows_failed']:,} users failed" if result.get("rows_failed") else "")
        + f"; {result['seconds']:.1f} s -> {result['path']}"
        + (" [up to date, skipped]" if result.get("skipped") else "")
    )
