"""Training examples as a Ray Dataset for Ray Train's ingest (used by `train.train_lora`).

    source     ray.data.read_parquet of a Parquet file or of a folder's top-level
               `*.parquet` files (local or s3://; `_manifest.json`, `_checkpoint/` and
               the like are ignored), or `from_arrow` of examples given as a Python list
    tokenize   map_batches (Ray tasks): check each example, tokenize it (the model's
               tokenizer, loaded once per Ray worker process), its 64-bit digest and its
               order key: a seeded hash of its group (or, ungrouped, of its digest)
    pack       groupby(order key, group).map_groups with Ray Data's sort shuffle: one
               training row per group (`train_data.pack_group`, prefix-shared) or per
               text, in order-key order, which is a seeded permutation of the groups that
               does not depend on the input's order, files or block sizes
    measure    on the driver: counts and the data fingerprint (an order-independent sum
               of the digests) from ONE small row per block, streamed
               (`train_stats.measure`); the driver never holds the examples
    train      the rows with texts: `TorchTrainer(datasets={"train": ...})` splits them
               across the workers every epoch (streaming_split, preserve_order), and each
               worker reads its shard through `train_shard.shard_rows` (a seeded local
               shuffle per epoch, skipping what a resumed checkpoint already trained on)

Every epoch re-runs the pipeline (streamed: nothing is materialized), so tokenization
costs about 1/epochs of a pass per epoch; its cost is small next to training.
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import Any, Sequence

import pyarrow as pa

from trsr import storage
from trsr.errors import ConfigError, InputFileError
from trsr.llm.tokenizer import load_tokenizer
from trsr.runner import read_parquet
from trsr.recommend.train_data import (
    check_encoded,
    combine_digests,
    example_digest,
    label_starts,
    normalize_example,
    normalize_examples,
    order_key,
    pack_group,
)
from trsr.recommend.train_stats import measure

log = logging.getLogger(__name__)

TEXT_COLUMNS = (("text", "answer_start"), ("prompt", "completion"))
# Examples per Ray block when the examples come as a Python list.
LIST_BLOCK_ROWS = 1024
OK, OVERLONG, INVALID = 0, 1, 2

TOKENIZED = pa.schema(
    [
        ("okey", pa.int64()),
        ("group", pa.string()),
        ("ids", pa.list_(pa.int32())),
        ("start", pa.int32()),
        ("length", pa.int32()),
        ("status", pa.int8()),
        ("error", pa.string()),
        ("digest", pa.uint64()),
    ]
)
TRAIN_COLUMNS = ["ids", "positions", "segments", "targets", "weights", "texts", "text_tokens"]
PACKED = pa.schema(
    [
        ("okey", pa.int64()),
        ("ids", pa.list_(pa.int32())),
        ("positions", pa.list_(pa.int32())),
        ("segments", pa.list_(pa.int32())),
        ("targets", pa.list_(pa.int32())),
        ("weights", pa.list_(pa.float32())),
        ("texts", pa.int32()),
        ("text_tokens", pa.int64()),
        ("members", pa.int32()),
        ("dropped", pa.int32()),
        ("longest_dropped", pa.int32()),
        ("error", pa.string()),
        ("digest", pa.uint64()),
    ]
)


# ---------------------------------------------------------------------------- source


def ray_filesystem(path: str):
    """The pyarrow filesystem (and inner path) for Ray to read or write an s3:// path.

    Like `storage.arrow_filesystem`, as a pickleable filesystem for Ray Train's
    controller and the Ray Data tasks that read the examples. It carries the endpoint and
    region (settings), never credentials: the remote side resolves its own, from its
    node's environment or instance role, the ways Ray and the clouds document."""
    import pyarrow.fs as pafs
    import s3fs

    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if os.environ.get("AWS_DEFAULT_REGION"):
        kwargs["client_kwargs"] = {"region_name": os.environ["AWS_DEFAULT_REGION"]}
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, **kwargs)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), str(path)[len("s3://") :]


def parquet_files(path: str) -> list[str]:
    """The Parquet files of `path`: the file itself, or a folder's top-level `*.parquet`
    files in name order (names starting with `_` or `.` are not data)."""
    path = str(path).rstrip("/")
    fs = storage.fsspec_filesystem(path)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if fs.isfile(path):
        return [path]
    if not fs.isdir(path):
        raise InputFileError(f"{path}: training examples not found")
    files = []
    for entry in fs.ls(path, detail=True):
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if entry.get("type") == "file" and name.endswith(".parquet") and not name.startswith(("_", ".")):
            files.append(storage.join(path, name))
    if not files:
        raise InputFileError(f"{path}: no .parquet files in this folder")
    return sorted(files)


def _columns(path: str, files: list[str], group_column: str | None) -> tuple[tuple[str, str], str | None]:
    import pyarrow.parquet as pq

    filesystem, inner = storage.arrow_filesystem(files[0])
    names = set(pq.read_schema(inner, filesystem=filesystem).names)
    for pair in TEXT_COLUMNS:
        if set(pair) <= names:
            break
    else:
        raise InputFileError(
            f"{path}: expected the columns text + answer_start or prompt + completion, found {sorted(names)}"
        )
    if group_column and group_column not in names:
        if group_column != "group":
            log.warning("%s: no column %r: the examples train ungrouped", path, group_column)
        group_column = None
    return pair, group_column


def _schema_names(path: str) -> set[str]:
    import pyarrow.parquet as pq

    filesystem, inner = storage.arrow_filesystem(path)
    return set(pq.read_schema(inner, filesystem=filesystem).names)


def source_dataset(train_texts: Sequence | str, groups: Sequence[str] | None, group_column: str | None):
    """(dataset of raw examples, its (text, answer) columns, its group column or None,
    a name for messages). Paths are read by Ray; lists become Arrow blocks here."""
    import ray

    if isinstance(train_texts, (str, os.PathLike)):
        path = str(train_texts)
        if groups is not None:
            raise ConfigError("groups= applies to examples given as a list; a Parquet source names its group_column")
        files = parquet_files(path)
        pair, group_column = _columns(path, files, group_column)
        if storage.is_remote(path):
            filesystem, _ = ray_filesystem(path)
            paths = [f[len("s3://") :] for f in files]
        else:
            filesystem, paths = None, files
        columns = list(pair) + ([group_column] if group_column else [])
        failed = "error" in _schema_names(files[0])
        # The runner's reader (Ray's V1 Parquet datasource: the examples are read again
        # every epoch, and V2 costs 10-20 s per execution here; see runner.read_parquet).
        dataset = read_parquet(paths, filesystem=filesystem, columns=columns + (["error"] if failed else []))
        if failed:
            # A folder written by the stage runner: lists that failed to build are rows
            # with an error (and in its _rejects.parquet), not training examples.
            from ray.data.expressions import col

            dataset = dataset.filter(expr=col("error").is_null()).drop_columns(["error"])
        return dataset, pair, group_column, path
    examples = normalize_examples(train_texts)
    if not examples:
        raise ConfigError("no training examples")
    if groups is not None and len(groups) != len(examples):
        raise ConfigError(f"{len(groups)} group keys for {len(examples)} training examples")
    table = pa.table(
        {
            "text": pa.array([t for t, _ in examples], pa.string()),
            "answer_start": pa.array([s for _, s in examples], pa.int64()),
            **({"group": pa.array([None if g is None else str(g) for g in groups], pa.string())} if groups is not None else {}),
        }
    )
    blocks = [table.slice(i, LIST_BLOCK_ROWS) for i in range(0, table.num_rows, LIST_BLOCK_ROWS)]
    return ray.data.from_arrow(blocks), ("text", "answer_start"), ("group" if groups is not None else None), "list"


# ---------------------------------------------------------------------------- stages


def tokenize_batch(
    batch: pa.Table, *, model: str, columns: tuple[str, str], group_column: str | None, loss: str,
    max_length: int, seed: int,
) -> pa.Table:
    """Ray Data stage: one TOKENIZED row per example (bad examples carry their error)."""
    first, second = columns
    a, b = batch.column(first).to_pylist(), batch.column(second).to_pylist()
    groups = batch.column(group_column).to_pylist() if group_column else [None] * len(a)
    n = len(a)
    out: dict[str, list] = {
        "okey": [0] * n, "group": [""] * n, "ids": [[] for _ in range(n)], "start": [0] * n,
        "length": [0] * n, "status": [INVALID] * n, "error": [None] * n, "digest": [0] * n,
    }
    good: list[int] = []
    examples: list[tuple[str, int]] = []
    for i, (x, y) in enumerate(zip(a, b)):
        try:
            examples.append(normalize_example((x, y), index=repr(str(x)[:60])))
            good.append(i)
        except ValueError as error:
            out["error"][i] = f"input: {error}"
    for i, (text, answer_start), (ids, start) in zip(good, examples, label_starts(load_tokenizer(model), examples)):
        group = None if groups[i] is None else str(groups[i])
        digest = example_digest(text, answer_start, group)
        out["digest"][i] = digest
        out["group"][i] = "" if group is None else "g:" + group
        out["okey"][i] = order_key(seed, "g:" + group if group is not None else f"t:{digest}")
        out["length"][i] = len(ids)
        try:
            check_encoded(ids, start, loss, repr(text[:60]))
        except ConfigError as error:
            out["error"][i] = f"config: {error}"
            continue
        if len(ids) > max_length:
            out["status"][i] = OVERLONG
            continue
        out["status"][i], out["ids"][i], out["start"][i] = OK, ids, start
    return pa.Table.from_pydict(out, schema=TOKENIZED)


def pack_batch(group: pa.Table, *, loss: str) -> pa.Table:
    """Ray Data stage (map_groups): the PACKED rows of one (order key, group): one
    prefix-shared row for a group, one row per text for ungrouped texts."""
    members = group.to_pylist()
    members.sort(key=lambda m: (m["digest"], m["ids"]))  # independent of arrival order
    out: dict[str, list] = {name: [] for name in PACKED.names}

    def emit(kept: list[dict], all_members: list[dict], share: bool) -> None:
        overlong = [m for m in all_members if m["status"] == OVERLONG]
        errors = [m["error"] for m in all_members if m["status"] == INVALID]
        if kept:
            row = pack_group([(m["ids"], m["start"]) for m in kept], loss, share=share)
            arrays = (row.ids, row.positions, row.segments, row.targets, row.weights)
            texts, text_tokens = row.texts, row.text_tokens
        else:
            arrays, texts, text_tokens = ([], [], [], [], []), 0, 0
        for name, values in zip(("ids", "positions", "segments", "targets", "weights"), arrays):
            out[name].append(values)
        out["okey"].append(all_members[0]["okey"])
        out["texts"].append(texts)
        out["text_tokens"].append(text_tokens)
        out["members"].append(len(all_members))
        out["dropped"].append(len(overlong))
        out["longest_dropped"].append(max((m["length"] for m in overlong), default=0))
        out["error"].append(errors[0] if errors else None)
        out["digest"].append(combine_digests([m["digest"] for m in all_members]))

    if members and members[0]["group"]:
        emit([m for m in members if m["status"] == OK], members, share=True)
    else:
        for member in members:
            emit([member] if member["status"] == OK else [], [member], share=False)
    return pa.Table.from_pydict(out, schema=PACKED)


def trainable_rows(block: pa.Table) -> pa.Table:
    """Ray Data stage: the rows that hold texts, with the columns the workers read."""
    import pyarrow.compute as pc

    return block.filter(pc.greater(block.column("texts"), 0)).select(TRAIN_COLUMNS)


def packed_dataset(source, *, columns, group_column, model: str, loss: str, max_length: int, seed: int):
    """The PACKED rows (every group, also those without texts left) of a source."""
    from ray.data.context import ShuffleStrategy

    context = source.context
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.execution_options.preserve_order = True
    # Sort-based grouping: the rows come out sorted by (order key, group), a seeded order
    # that no partition count or cluster setting changes (hash shuffles would).
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    tokenized = source.map_batches(
        tokenize_batch,
        batch_format="pyarrow",
        fn_kwargs=dict(
            model=model, columns=tuple(columns), group_column=group_column, loss=loss,
            max_length=max_length, seed=seed,
        ),
    )
    return tokenized.groupby(["okey", "group"]).map_groups(pack_batch, batch_format="pyarrow", fn_kwargs={"loss": loss})


def prepare(
    train_texts: Sequence | str, *, groups: Sequence[str] | None, group_column: str | None, model: str,
    loss: str, max_length: int, overlong: str, share_prefix: bool, seed: int,
):
    """(the Ray Dataset of training rows for TorchTrainer, DataStats). Needs Ray."""
    source, columns, group_column, name = source_dataset(train_texts, groups, group_column)
    if not share_prefix:
        group_column = None
    packed = packed_dataset(
        source, columns=columns, group_column=group_column, model=model, loss=loss,
        max_length=max_length, seed=seed,
    )
    stats = measure(packed, source=name, grouped=group_column is not None, overlong=overlong, max_length=max_length)
    return packed.map_batches(trainable_rows, batch_format="pyarrow", batch_size=None), stats
