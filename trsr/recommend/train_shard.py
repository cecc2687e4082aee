"""The worker side of the training ingest: a Ray Train worker's TrainingRows of one
epoch, read from its shard of the rows `train_ingest.prepare` made (`shard_rows`).
"""

from __future__ import annotations

from typing import Any, Iterator

from trsr.recommend.train_data import TrainingRow, mix_seed
from trsr.recommend.train_ingest import TRAIN_COLUMNS

# Rows a worker fetches from its shard at a time (also the local shuffle's batch).
FETCH_ROWS = 16


def shard_rows(shard, *, seed: int, epoch: int, rank: int, shuffle_buffer: int, skip: int = 0) -> Iterator[TrainingRow]:
    """This worker's TrainingRows of one epoch from its Ray Train dataset shard.

    The shard arrives in the run's fixed order; a local shuffle buffer of
    `shuffle_buffer` rows, seeded by (seed, epoch, rank), reorders it per epoch (0: no
    reshuffle). The first `skip` rows (trained before a resumed checkpoint) are passed
    over. With the same data, seed and number of workers the rows come in the same
    order every time."""
    import numpy as np

    kwargs: dict[str, Any] = {"batch_size": FETCH_ROWS, "batch_format": "pyarrow", "prefetch_batches": 1}
    if shuffle_buffer:
        kwargs["local_shuffle_buffer_size"] = max(shuffle_buffer, FETCH_ROWS)
        kwargs["local_shuffle_seed"] = mix_seed(seed, epoch, rank)
    seen = 0
    for batch in shard.iter_batches(**kwargs):
        n = batch.num_rows
        if seen + n <= skip:
            seen += n
            continue
        columns = {name: batch.column(name) for name in TRAIN_COLUMNS}
        for i in range(n):
            seen += 1
            if seen <= skip:
                continue
            yield TrainingRow(
                ids=np.asarray(columns["ids"][i].values, dtype=np.int32),
                positions=np.asarray(columns["positions"][i].values, dtype=np.int32),
                segments=np.asarray(columns["segments"][i].values, dtype=np.int32),
                targets=np.asarray(columns["targets"][i].values, dtype=np.int32),
                weights=np.asarray(columns["weights"][i].values, dtype=np.float32),
                texts=int(columns["texts"][i].as_py()),
                text_tokens=int(columns["text_tokens"][i].as_py()),
            )
