"""Scoring the candidates of your own retrieval: `trsr score --candidates PATH`.

    candidates (Parquet, CSV or JSON lines; a file or a folder; local or s3://):
        user_id, item_id       one row per candidate, or
        user_id, item_ids      one row per user: a list (Parquet, JSON) or a string of
                               ids separated by spaces, commas or "|" (CSV)
    + prepared/sequences       the user's history (the K most recent items are shown)
    + user_summaries/<mode>/   the user's latest summary (`trsr summarize --users all`)
      -> grouping pass          one row per user: its distinct known candidates, summary
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
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.config import fingerprint
from trsr.errors import ConfigError, DataError
from trsr.recommend import lists as ranking_lists
from trsr.recommend.config import ScoreConfig
from trsr.recommend.lists import PROMPT_LISTS, AttachItems
from trsr.recommend.score import ScoreStage, output_settings, resolve_adapter
from trsr.runner import GroupJob, Source, StageJob, Step, arrow_mask, run_grouping, run_stage, shuffle_partitions
from trsr.runs import LAYOUT, RunFolder, StageFolder, inputs_signature
from trsr.schema import CANDIDATE_SCORES, LISTS, REJECTS, SUMMARY_MISSING

log = logging.getLogger(__name__)

SPLIT = "candidates"  # the split value of a user's candidate list
FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}

# The rows the grouping pass groups by user: one schema for the three sources.
GROUP_ROWS = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("kind", pa.string()),  # candidate, history, summary
        pa.field("item_id", pa.string()),  # candidate
        pa.field("items", pa.list_(pa.string())),  # history: the K most recent items
        pa.field("summary", pa.string()),
        pa.field("status", pa.string()),
        pa.field("problem", pa.string()),  # candidate: why the row is unusable (null: ok)
    ]
)
REJECTED = pa.struct([("item_id", pa.string()), ("reason", pa.string())])
# One user's candidate list, as the checkpointed stage reads it.
CANDIDATE_LISTS = pa.schema(
    list(LISTS)
    + [
        pa.field("summary", pa.string()),
        pa.field("status", pa.string()),
        pa.field("scorable", pa.bool_()),  # at least one known candidate of a known user
        pa.field("rejected", pa.list_(REJECTED)),
    ]
)


# ------------------------------------------------------------------ grouping pass steps


class CandidateRows:
    """A batch of the candidates file -> GROUP_ROWS (kind "candidate"), one per
    candidate; empty ids are kept with their problem (they become rejects)."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = batch.column_names
        if "user_id" not in names or not ({"item_id", "item_ids"} & set(names)):
            raise DataError(
                f"{self.source}: a candidates file needs the columns user_id and item_id (one row per "
                f"candidate) or user_id and item_ids (a list per user); found {names}"
            )
        users = batch.column("user_id").cast(pa.string())
        if "item_id" in names:
            items = batch.column("item_id").cast(pa.string())
        else:
            lists = batch.column("item_ids")
            if pa.types.is_string(lists.type) or pa.types.is_large_string(lists.type) or pa.types.is_null(lists.type):
                lists = pc.split_pattern_regex(pc.utf8_trim_whitespace(lists.cast(pa.string())), r"[\s,|]+")
            lists = lists.cast(pa.list_(pa.string()))
            users = pc.take(users, pc.list_parent_indices(lists))
            items = pc.list_flatten(lists)
        users, items = users.to_pylist(), items.to_pylist()
        problems = []
        for user, item in zip(users, items):
            if user is None or not str(user).strip():
                problems.append("user_id is empty")
            elif item is None or not str(item).strip():
                problems.append("item_id is empty")
            else:
                problems.append(None)
        n = len(users)
        return pa.table(
            {
                "user_id": [u if u is not None else "" for u in users],
                "kind": ["candidate"] * n,
                "item_id": items,
                "items": pa.nulls(n, pa.list_(pa.string())),
                "summary": pa.nulls(n, pa.string()),
                "status": pa.nulls(n, pa.string()),
                "problem": problems,
            },
            schema=GROUP_ROWS,
        )


class HistoryRows:
    """SEQUENCES rows -> GROUP_ROWS (kind "history"): the K most recent items (None: all)."""

    def __init__(self, recent: int | None):
        self.recent = recent

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch.column("item_ids").to_pylist()
        if self.recent is not None:
            histories = [h[-self.recent :] if self.recent else [] for h in histories]
        n = batch.num_rows
        return pa.table(
            {
                "user_id": batch.column("user_id").cast(pa.string()),
                "kind": pa.array(["history"] * n, pa.string()),
                "item_id": pa.nulls(n, pa.string()),
                "items": pa.array(histories, pa.list_(pa.string())),
                "summary": pa.nulls(n, pa.string()),
                "status": pa.nulls(n, pa.string()),
                "problem": pa.nulls(n, pa.string()),
            },
            schema=GROUP_ROWS,
        )


class SummaryRows:
    """user_summaries rows -> GROUP_ROWS (kind "summary")."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        return pa.table(
            {
                "user_id": batch.column("user_id").cast(pa.string()),
                "kind": pa.array(["summary"] * n, pa.string()),
                "item_id": pa.nulls(n, pa.string()),
                "items": pa.nulls(n, pa.list_(pa.string())),
                "summary": batch.column("summary"),
                "status": batch.column("status"),
                "problem": pa.nulls(n, pa.string()),
            },
            schema=GROUP_ROWS,
        )


class GroupUser:
    """The GROUP_ROWS of one user -> one CANDIDATE_LISTS row (none for a user without
    candidates). The catalogue's ids are loaded once per actor."""

    def __init__(self, items: str):
        ids = storage.read_parquet(items, columns=["item_id"]).column("item_id")
        self.known = set(ids.to_pylist())

    def __call__(self, rows: pa.Table) -> pa.Table:
        columns = rows.to_pydict()
        candidates = [
            (item, problem)
            for kind, item, problem in zip(columns["kind"], columns["item_id"], columns["problem"])
            if kind == "candidate"
        ]
        if not candidates:
            return CANDIDATE_LISTS.empty_table()
        user = columns["user_id"][0]
        history, summary, status = None, None, SUMMARY_MISSING
        for kind, items, text, state in zip(columns["kind"], columns["items"], columns["summary"], columns["status"]):
            if kind == "history":
                history = items
            elif kind == "summary":
                summary, status = text, state or SUMMARY_MISSING
        kept: list[str] = []
        rejected: list[dict[str, Any]] = []
        for item, problem in candidates:
            reason = problem or self._reason(user, item, history, kept)
            if reason:
                rejected.append({"item_id": item, "reason": reason})
            else:
                kept.append(item)
        row = {
            "list_id": user,
            "split": SPLIT,
            "user_id": user,
            "list_index": 0,
            "history": history or [],
            "candidates": kept,
            "labels": [0] * len(kept),
            "summary": summary,
            "status": status,
            "scorable": bool(kept),
            "rejected": rejected,
        }
        return pa.Table.from_pylist([row], schema=CANDIDATE_LISTS)

    def _reason(self, user: str, item: str, history: list[str] | None, kept: list[str]) -> str | None:
        if history is None:
            return f"unknown user {user!r}: not in prepared/sequences"
        if item not in self.known:
            return f"unknown item {item!r}: not in prepared/items"
        if item in kept:
            return "duplicate candidate of this user"
        return None


def _group_stats(table: pa.Table) -> dict:
    rejected = pc.list_flatten(table.column("rejected"))
    reasons: dict[str, int] = {}
    for reason in pc.struct_field(rejected, "reason").to_pylist() if len(rejected) else []:
        kind = reason.split(" ", 2)[1] if reason.startswith("unknown") else reason
        key = {"user": "unknown user", "item": "unknown item"}.get(kind, kind)
        reasons[key] = reasons.get(key, 0) + 1
    kept = int(pc.sum(pc.list_value_length(table.column("candidates"))).as_py() or 0)
    return {
        "users": table.num_rows,
        "users_scorable": int(pc.sum(table.column("scorable")).as_py() or 0),
        "candidates_in": kept + len(rejected),
        "candidates_kept": kept,
        "candidates_rejected": len(rejected),
        "rejected_by_reason": reasons,
    }


# ------------------------------------------------------------------ the scoring stage


class RankCandidates:
    """Scored candidate rows (STAGE_OUTPUT) -> CANDIDATE_SCORES: rank 1 = the user's
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
    counts = pc.value_counts(firsts.column("summary_status"))
    return {
        "users_scored": firsts.num_rows,
        "candidates_written": table.num_rows,
        "summary_status": dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())),
    }


# ------------------------------------------------------------------------------ driver


def candidate_files(path: str) -> tuple[list[str], str]:
    """(files, format) of a candidates file or folder; one format per folder."""
    fs = storage.fsspec_filesystem(path)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if not fs.exists(path):
        raise DataError(f"{path}: candidates file not found")
    if fs.isdir(path):
        names = sorted(str(n) for n in fs.find(path) if not posixpath.basename(str(n)).startswith(("_", ".")))
        scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
        files = [n if n.startswith(scheme) else scheme + n for n in names]
    else:
        files = [path]
    formats = {FORMATS.get(posixpath.splitext(f)[1].lower()) for f in files}
    if not files or None in formats or len(formats) != 1:
        raise DataError(
            f"{path}: candidates must be files of one format named *.parquet, *.csv or *.jsonl "
            f"(found {[posixpath.basename(f) for f in files][:5]})"
        )
    return files, formats.pop()


def _folders(run: RunFolder, method: str, output: str | None) -> tuple[StageFolder, StageFolder]:
    base = storage.join(run.root, "candidates", method)
    grouped = StageFolder(storage.join(base, "input"), f"candidates/{method}/input")
    scores = StageFolder(output or storage.join(base, "scores"), output or f"candidates/{method}/scores")
    return grouped, scores


def score_candidates(
    experiment, candidates: str, output: str | None = None, top_k: int | None = None, force: bool = False
) -> dict:
    """Score every user's candidates from `candidates` (see the module doc) with the
    trained adapter of the experiment's variant; write CANDIDATE_SCORES to `output`
    (default <run_dir>/candidates/<method>/scores/); return the stats."""
    config: ScoreConfig = experiment.score
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    run = RunFolder(experiment.run_dir)
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
    adapter = resolve_adapter(experiment)
    engine = config.engine.model_copy(update={"lora_adapter": adapter})
    config = config.model_copy(update={"engine": engine})
    method = config.method_name
    files, file_format = candidate_files(candidates)
    grouped, scores = _folders(run, method, output)

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
            block_stats=_group_stats,
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
        earlier_rejects=lambda: _set_aside(grouped, candidates),
    )
    ranking_lists.check_summaries(job.name, inputs, where, config.prompt)
    stats = run_stage(job, experiment.runner, force=force)
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


def _set_aside(grouped: StageFolder, source: str) -> list[pa.Table]:
    """REJECTS rows of the candidates the grouping pass set aside (a streamed scan)."""
    parts = []
    for batch in storage.scan_batches(grouped.dataset(), columns=["user_id", "rejected"]):
        table = pa.Table.from_batches([batch])
        lengths = pc.list_value_length(table.column("rejected"))
        if not (pc.sum(lengths).as_py() or 0):
            continue
        flat = pc.list_flatten(table.column("rejected"))
        users = pc.take(table.column("user_id"), pc.list_parent_indices(table.column("rejected")))
        n = len(flat)
        parts.append(
            pa.table(
                {
                    "stage": pa.array(["score candidates"] * n, pa.string()),
                    "source": pa.array([source] * n, pa.string()),
                    "row": pa.nulls(n, pa.int64()),
                    "field": pa.array(["user_id, item_id"] * n, pa.string()),
                    "reason": pc.struct_field(flat, "reason"),
                    "user_id": users,
                    "item_id": pc.struct_field(flat, "item_id"),
                    "raw": pa.nulls(n, pa.string()),
                },
                schema=REJECTS,
            )
        )
    return parts


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
