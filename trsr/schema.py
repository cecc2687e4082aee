"""The canonical data model: every Parquet file a trsr job reads or writes.

Every table written to a run folder has exactly one schema, declared here. Converters
produce `ITEMS` and `SEQUENCES`; the protocol turns them into `SAMPLES` and `LISTS`;
summarize writes `SUMMARIES`, training texts `EXAMPLES`, scorers `SCORES` (the LLM's
with diagnostics), `trsr score --candidates` `CANDIDATE_LISTS` then `CANDIDATE_SCORES`;
every stage sends bad rows to `REJECTS` with a reason. Row layouts that live only in
memory between the steps of one stage (the summarizer's STATE, PROMPT_LISTS, the
training ingest's TOKENIZED/PACKED, grouping rows) are declared with their stage.

    items       item_id, attributes = ordered [(name, value)] text attributes
    sequences   user_id, item_ids (chronological), timestamps (optional, same length)
    samples     list_id, split, user_id, history, candidate, label, position
    lists       list_id, split, user_id, list_index, history, candidates, labels
                (the same ranking lists, one row each: what the LLM stages read)
    summaries   a list's columns + the user's summary and its bookkeeping
    scores      list_id, split, user_id, candidate, label, score, method
    rejects     stage, source, row, field, reason, user_id, item_id, raw

Attributes are a list of (name, value) structs rather than wide columns so that one
schema fits every catalogue (news has 4 attributes, Amazon-M2 has 10) and the order in
which attributes are rendered into prompts is kept with the data.
"""

from __future__ import annotations

import pyarrow as pa

ATTRIBUTE = pa.struct([("name", pa.string()), ("value", pa.string())])

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("attributes", pa.list_(ATTRIBUTE), nullable=False),
    ]
)

SEQUENCES = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_ids", pa.list_(pa.string()), nullable=False),
        # Unix seconds per item, or null where the source has no time (MIND history).
        pa.field("timestamps", pa.list_(pa.int64()), nullable=True),
    ]
)

SPLITS = ("train", "valid", "test")
# The split value of a user's row in user_summaries/ (every user, not a protocol split).
ALL_USERS = "all"

# The summary_status of a ranking list where the recommender reads it (training texts,
# scores): the summarizer's status of the user's summary ("ok" = usable, or a problem:
# "echo", "over_length", ...), "missing" without a summary row, "unused" for variants
# that show no summary (tallrec).
SUMMARY_OK = "ok"
SUMMARY_MISSING = "missing"
SUMMARY_UNUSED = "unused"


def lists_without_summary(summary_status: dict[str, int]) -> int:
    """Lists prompted without a usable summary, from counts by summary_status (tallrec's
    "unused" lists read none by design and are not counted)."""
    return int(sum(n for status, n in summary_status.items() if status not in (SUMMARY_OK, SUMMARY_UNUSED)))

SAMPLES = pa.schema(
    [
        # One ranking list per (split, user): a positive and its negatives.
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        # Chronological history before the target (oldest first).
        pa.field("history", pa.list_(pa.string()), nullable=False),
        pa.field("candidate", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        # Order of the candidate inside its list after the seeded shuffle.
        pa.field("position", pa.int16(), nullable=False),
    ]
)

# One row per ranking list, sorted by list_id (= by user within a split). list_index
# is the list's rank in its split (0-based): "the first N lists" is list_index < N,
# a filter that needs no order.
LISTS = pa.schema(
    [
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("list_index", pa.int32(), nullable=False),
        pa.field("history", pa.list_(pa.string()), nullable=False),
        # Candidates in the list's (shuffled) order; labels[i] belongs to candidates[i].
        pa.field("candidates", pa.list_(pa.string()), nullable=False),
        pa.field("labels", pa.list_(pa.int8()), nullable=False),
    ]
)

# A summary, its level/step (0-based) and index within that level.
# One generated summary of a level/step; `problem` is what the output checks flagged
# in it (null: none), kept here so a user's status can describe its final summary.
INTERMEDIATE = pa.struct(
    [("step", pa.int32()), ("index", pa.int32()), ("text", pa.string()), ("problem", pa.string())]
)

# summaries/<mode>: every ranking list with its user's summary, so that the stages that
# read summaries (training texts, scoring) read one table and join nothing.
# user_summaries/<mode> (summarize.users: all): the same schema, one row per user of
# prepared/sequences (list_id = user_id, split "all", the whole history, no candidates).
SUMMARIES = pa.schema(
    list(LISTS)
    + [
        pa.field("mode", pa.string()),
        # null when there is none: status "missing" (beyond summarize.max_users) or
        # "prompt_too_long"; other statuses keep the text the summarizer produced.
        pa.field("summary", pa.string()),
        # "ok" (usable), "missing", or the problem of the final summary: empty, echo,
        # repetitive, over_length, ungrounded; or prompt_too_long. Problems of intermediate
        # levels/steps are in `intermediates`; `flagged_steps` counts every flagged one.
        pa.field("status", pa.string()),
        pa.field("intermediates", pa.list_(INTERMEDIATE)),
        # The items the summary covers: `items` of them, at positions first_position ..
        # last_position of the history (0 = oldest; a summarize.history_window starts
        # later). Blocks are anchored at absolute positions: block k = items k*B..k*B+B-1.
        pa.field("items", pa.int32()),
        pa.field("first_position", pa.int32()),
        pa.field("last_position", pa.int32()),
        pa.field("blocks", pa.int32()),
        pa.field("tokens_in", pa.int64()),
        pa.field("tokens_out", pa.int64()),
        pa.field("calls", pa.int32()),
        pa.field("retries", pa.int32()),
        pa.field("shortened_blocks", pa.int32()),
        pa.field("trimmed", pa.int32()),
        pa.field("flagged_steps", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("template_hash", pa.string()),
        pa.field("seed", pa.int64()),
        # What this run did for the user (`trsr summarize --update`): "new" (summarized
        # from scratch: no earlier row), "updated" (the earlier row's summaries of
        # unchanged blocks reused, the rest computed), "recomputed" (an earlier row that
        # could not be reused: history rewritten, window moved, settings changed) or
        # "unchanged" (the earlier row kept as it was). calls / tokens_* count this
        # run's engine work for the row, except on "unchanged" rows (kept as they were).
        pa.field("refresh", pa.string()),
    ]
)

SCORES = pa.schema(
    [
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("candidate", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
    ]
)

# The scored candidates of your own retrieval (`trsr score --candidates`): one row per
# (user, candidate item), rank 1 = the user's best.
CANDIDATE_SCORES = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        # "ok" when the prompt showed the user's summary; else why not (see SUMMARY_*).
        pa.field("summary_status", pa.string()),
        pa.field("logp_yes", pa.float64()),
        pa.field("logp_no", pa.float64()),
    ]
)


# ---------------------------------------------------------- tables of the later stages

# scores/<method>/<split>/ as the LLM scorer writes it: SCORES + why each prompt looks as
# it does (evaluate reads the SCORES columns).
SCORE_DIAGNOSTICS = [
    pa.field("position", pa.int16()),
    pa.field("logp_yes", pa.float64()),
    pa.field("logp_no", pa.float64()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("history_items", pa.int16()),
    pa.field("items_dropped", pa.int16()),
    pa.field("summary_words_cut", pa.int32()),
    pa.field("caps_shortened", pa.bool_()),
    pa.field("summary_status", pa.string()),
]
SCORES_WITH_DIAGNOSTICS = pa.schema(list(SCORES) + SCORE_DIAGNOSTICS)

# train/<method>/texts/: one training text per candidate (the answer starts at answer_start).
EXAMPLES = pa.schema(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("answer_start", pa.int64(), nullable=False),
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),  # the candidate's place in its list
        pa.field("label", pa.int8(), nullable=False),
        pa.field("summary_status", pa.string(), nullable=False),
        pa.field("history_items", pa.int16(), nullable=False),
    ]
)

# embeddings/<encoder>/: one vector per catalogue item (baselines).
EMBEDDINGS = pa.schema([pa.field("item_id", pa.string(), nullable=False), pa.field("embedding", pa.list_(pa.float32()))])

# candidates/<method>/input/: one user's candidates from `trsr score --candidates`, grouped
# with their summary and history; `rejected` keeps the candidates set aside, with why.
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

# user_summaries/<mode>.update/ (`trsr summarize --update`): each user's new history
# beside their earlier summary row.
# Every field nullable: a user without an earlier row has a null struct.
PREVIOUS = pa.struct([field.with_nullable(True) for field in SUMMARIES])
# The rows of the grouping pass, and the summarize stage's input in an update.
UPDATE_INPUT = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("item_ids", pa.list_(pa.string())),
        pa.field("previous", PREVIOUS),  # the user's earlier row (null: none)
    ]
)


REJECTS = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),  # convert, protocol, summarize, ...
        pa.field("source", pa.string(), nullable=False),  # file the row came from
        pa.field("row", pa.int64(), nullable=True),  # 1-based line/record number in source
        pa.field("field", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=True),
        pa.field("item_id", pa.string(), nullable=True),
        pa.field("raw", pa.string(), nullable=True),  # offending text, truncated
    ]
)


class SchemaError(ValueError):
    """A table does not match the canonical schema it claims to follow."""


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Select, order and cast `table`'s columns to `schema`; name what is missing.

    `what` names the table in the error (e.g. a file path) so a user knows where to look.
    """
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SchemaError(
            f"{what}: missing column(s) {missing}; expected {schema.names}, "
            f"found {table.column_names}"
        )
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise SchemaError(
                    f"{what}: column {field.name!r} has type {column.type}, "
                    f"expected {field.type}: {error}"
                ) from error
        if not field.nullable and column.null_count:
            raise SchemaError(f"{what}: column {field.name!r} has {column.null_count} null(s)")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
