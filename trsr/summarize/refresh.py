"""Incremental refresh of every user's summaries: `trsr summarize --users all --update`.

New interactions arrive (a newer interactions file, prepared again into the run folder).
Most users have none. The update summarizes only what changed:

    user_summaries/<mode>/            the complete earlier summaries
      -> moved to <mode>.previous/    (kept until the update is complete: an interrupted
                                      update resumes against the same earlier rows)
    prepared/sequences + previous
      -> grouping pass                one row per user of the new sequences: item_ids and
         (trsr.runner.run_grouping)   the user's earlier SUMMARIES row (null: a new user)
      -> <mode>.update-input/
      -> the summarize stage          RenderBlocks decides per user: the same history ->
                                      the earlier row is written again ("unchanged"); a
                                      history that extends the old one -> the earlier
                                      summaries of unchanged blocks are reused and only the
                                      nodes above changed blocks are generated ("updated");
                                      else from scratch ("recomputed", "new")
      -> user_summaries/<mode>/       the refreshed summaries; .previous and the input are
                                      deleted after the manifest is written

Blocks are anchored at absolute positions of the history, so new interactions change
only the last (partial) block and add new ones. Under greedy decoding without sampled
retries the refreshed summaries equal a from-scratch run on the new histories. The
earlier summaries are reused only when they were made with the same settings (model,
prompts, blocks, generation); otherwise the update is a full run.
"""

from __future__ import annotations

import pyarrow as pa

from trsr import storage
from trsr.runner import GroupJob, Source, Step, shuffle_partitions
from trsr.runs import RunFolder, StageFolder, remove
from trsr.schema import PREVIOUS, SUMMARIES, UPDATE_INPUT



class SequenceRows:
    """prepared/sequences rows -> UPDATE_INPUT rows without an earlier row."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table(
            {
                "user_id": batch.column("user_id").cast(pa.string()),
                "item_ids": batch.column("item_ids").cast(pa.list_(pa.string())),
                "previous": pa.nulls(batch.num_rows, PREVIOUS),
            },
            schema=UPDATE_INPUT,
        )


class PreviousRows:
    """Earlier SUMMARIES rows -> UPDATE_INPUT rows holding them (no item_ids)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        if "error" in batch.column_names:  # rows that failed earlier: summarized again
            batch = batch.filter(pc.is_null(batch.column("error")))
        rows = batch.select(SUMMARIES.names).cast(SUMMARIES)
        return pa.table(
            {
                "user_id": rows.column("user_id"),
                "item_ids": pa.nulls(rows.num_rows, pa.list_(pa.string())),
                "previous": pa.StructArray.from_arrays([rows.column(n).combine_chunks() for n in SUMMARIES.names], fields=list(PREVIOUS)),
            },
            schema=UPDATE_INPUT,
        )


class MergePrevious:
    """The UPDATE_INPUT rows of one user -> one row with the new history and the earlier
    row; none for a user no longer in the sequences (counted as removed)."""

    def __call__(self, rows: pa.Table) -> pa.Table:
        histories = [h for h in rows.column("item_ids").to_pylist() if h is not None]
        if not histories:
            return UPDATE_INPUT.empty_table()
        earlier = [p for p in rows.column("previous").to_pylist() if p is not None]
        row = {"user_id": rows.column("user_id")[0].as_py(), "item_ids": histories[0], "previous": earlier[0] if earlier else None}
        return pa.Table.from_pylist([row], schema=UPDATE_INPUT)


def _input_stats(table: pa.Table) -> dict:
    import pyarrow.compute as pc

    with_previous = int(pc.sum(pc.is_valid(table.column("previous"))).as_py() or 0)
    return {"users": table.num_rows, "users_with_earlier_row": with_previous}


def folders(run: RunFolder, mode: str) -> tuple[StageFolder, StageFolder, StageFolder]:
    """(current, previous, update input) folders of `mode`'s user summaries."""
    current = run.user_summaries(mode)
    previous = StageFolder(current.path + ".previous", f"user_summaries/{mode}.previous")
    update_input = StageFolder(current.path + ".update-input", f"user_summaries/{mode}.update-input")
    return current, previous, update_input


def set_aside(run: RunFolder, mode: str, fingerprint: str) -> StageFolder | None:
    """The earlier complete summaries an update of `mode` reads, moved out of the way of
    the new output: None when there are none (a first run), or when the current output
    is already complete for `fingerprint` (up to date). An interrupted update left them
    in <mode>.previous and no complete output: they are used again."""
    current, previous, _ = folders(run, mode)
    if current.is_complete(fingerprint):
        return None
    if previous.exists() and not current.exists():
        return previous
    if not current.exists():
        return None
    remove(previous.path)
    storage.move(current.path, previous.path)
    return previous


def input_job(run: RunFolder, mode: str, previous: StageFolder, fingerprint: str) -> GroupJob:
    """The grouping pass that pairs each user's new history with their earlier row."""
    _, _, update_input = folders(run, mode)
    files = previous.data_files()
    return GroupJob(
        name=f"update input {mode}",
        folder=update_input,
        sources=[
            Source([run.sequences()], "parquet", Step(SequenceRows, {}, UPDATE_INPUT, num_cpus=0.5), columns=["user_id", "item_ids"]),
            Source(files, "parquet", Step(PreviousRows, {}, UPDATE_INPUT, num_cpus=0.5), columns=list(SUMMARIES.names)),
        ],
        key="user_id",
        group=Step(MergePrevious, {}, UPDATE_INPUT, num_cpus=0.5),
        fingerprint=fingerprint,
        block_stats=_input_stats,
        partitions=shuffle_partitions([run.sequences(), *files]),
    )


def clean_up(run: RunFolder, mode: str) -> None:
    """After a complete update: the earlier rows and the update input are not needed."""
    _, previous, update_input = folders(run, mode)
    remove(previous.path)
    remove(update_input.path)
