"""The baselines' view of a prepared run: integer item indices, padded histories.

Item index 0 is padding; items 1..n are the embedded catalogue, in the embeddings
file's order. Histories are right-padded (oldest first, real items at 0..len-1) and
keep the `max_history` most recent items, so a causal model reads the user state at
position len-1.

    train   the training split only: its 1:1 lists (CTR models) and every user's
            sequence = history + positive (sequential models' prefixes, popularity)
    eval    valid/test 1:20 lists: one row per list (history, candidates in position
            order, labels) plus the SCORES columns of every candidate row
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trsr.errors import TrsrError


@dataclass
class IndexedLists:
    """The ranking lists of one split (trsr.recommend.lists) as item-index arrays for the
    baselines' tensors (C = the longest list; padding index 0)."""

    split: str
    history: np.ndarray  # int64 [L, H]
    lengths: np.ndarray  # int64 [L]
    candidates: np.ndarray  # int64 [L, C]
    labels: np.ndarray  # int8 [L, C]
    # The SCORES columns of every candidate row, and where its score sits in [L, C].
    rows: pa.Table  # list_id, split, user_id, candidate, label
    row_list: np.ndarray  # int64 [R]
    row_slot: np.ndarray  # int64 [R]

    @property
    def size(self) -> int:
        return int(self.history.shape[0])


@dataclass
class BaselineData:
    item_ids: list[str]  # index i + 1 -> item id
    embeddings: np.ndarray | None  # float32 [n + 1, D], row 0 zeros; None for simple models
    max_history: int
    train_lists: IndexedLists
    # Training users' full sequences (history + positive), item indices, oldest first.
    train_sequences: list[np.ndarray]
    eval: dict[str, IndexedLists] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def popularity(self) -> np.ndarray:
        """Interactions per item index in the training split (histories + positives)."""
        counts = np.zeros(self.n_items + 1, dtype=np.float64)
        if self.train_sequences:
            np.add.at(counts, np.concatenate(self.train_sequences), 1.0)
        counts[0] = 0.0
        return counts


def _index(item_ids: list[str]) -> dict[str, int]:
    return {item: i + 1 for i, item in enumerate(item_ids)}


def _pad(sequences: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(sequences), width), dtype=np.int64)
    lengths = np.zeros(len(sequences), dtype=np.int64)
    for i, seq in enumerate(sequences):
        seq = seq[-width:]
        out[i, : len(seq)] = seq
        lengths[i] = len(seq)
    return out, lengths


def index_lists(samples: pa.Table, index: dict[str, int], max_history: int, where: str) -> IndexedLists:
    """SAMPLES rows of one split -> IndexedLists (candidates ordered by `position`)."""
    samples = samples.sort_by([("list_id", "ascending"), ("position", "ascending")])
    list_ids = samples.column("list_id").to_pylist()
    candidates = samples.column("candidate").to_pylist()
    labels = samples.column("label").to_numpy().astype(np.int8)
    histories = samples.column("history").to_pylist()

    def lookup(item: str) -> int:
        code = index.get(item)
        if code is None:
            raise TrsrError(f"{where}: item {item!r} has no text embedding (not in items.parquet)")
        return code

    order: dict[str, int] = {}
    row_list = np.empty(len(list_ids), dtype=np.int64)
    row_slot = np.empty(len(list_ids), dtype=np.int64)
    members: list[list[int]] = []
    list_histories: list[list[int]] = []
    for r, list_id in enumerate(list_ids):
        at = order.get(list_id)
        if at is None:
            at = order[list_id] = len(members)
            members.append([])
            list_histories.append([lookup(item) for item in histories[r]])
        row_list[r] = at
        row_slot[r] = len(members[at])
        members[at].append(r)
    width = max((len(m) for m in members), default=1)
    cand = np.zeros((len(members), width), dtype=np.int64)
    lab = np.zeros((len(members), width), dtype=np.int8)
    codes = np.fromiter((lookup(c) for c in candidates), dtype=np.int64, count=len(candidates))
    cand[row_list, row_slot] = codes
    lab[row_list, row_slot] = labels
    if members and (lab.sum(axis=1) < 1).any():
        bad = [list(order)[i] for i in np.flatnonzero(lab.sum(axis=1) < 1)[:5]]
        raise TrsrError(f"{where}: list(s) without a positive candidate, e.g. {bad}")
    history, lengths = _pad(list_histories, max_history)
    rows = samples.select(["list_id", "split", "user_id", "candidate", "label"])
    return IndexedLists(
        split=samples.column("split")[0].as_py() if samples.num_rows else "",
        history=history,
        lengths=lengths,
        candidates=cand,
        labels=lab,
        rows=rows,
        row_list=row_list,
        row_slot=row_slot,
    )


def train_sequences(samples: pa.Table, index: dict[str, int]) -> list[np.ndarray]:
    """One sequence per training list: its history followed by its positive."""
    positives = samples.filter(pc.equal(samples.column("label"), 1)).sort_by("list_id")
    out = []
    for history, target in zip(positives.column("history").to_pylist(), positives.column("candidate").to_pylist()):
        out.append(np.asarray([index[i] for i in history] + [index[target]], dtype=np.int64))
    return out


def load_data(
    run_dir_samples: dict[str, pa.Table],
    item_ids: list[str],
    embeddings: np.ndarray | None,
    max_history: int,
    splits: list[str],
) -> BaselineData:
    """Build BaselineData from the samples of train + `splits` and the embedded items."""
    index = _index(item_ids)
    train = run_dir_samples["train"]
    if train.num_rows == 0:
        raise TrsrError("the training split is empty; nothing to train baselines on")
    train_lists = index_lists(train, index, max_history, "samples/train")
    data = BaselineData(
        item_ids=item_ids,
        embeddings=embeddings,
        max_history=max_history,
        train_lists=train_lists,
        train_sequences=train_sequences(train, index),
    )
    for split in splits:
        data.eval[split] = index_lists(run_dir_samples[split], index, max_history, f"samples/{split}")
    return data


def prefix_examples(
    sequences: list[np.ndarray], max_history: int, min_prefix: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every (prefix -> next item) of every sequence.

    Returns history [N, H] (right-padded), lengths [N], targets [N], and the index of
    the sequence each example came from [N] (to exclude its items from negatives).
    """
    hist: list[list[int]] = []
    targets: list[int] = []
    owner: list[int] = []
    for s, seq in enumerate(sequences):
        for t in range(min_prefix, len(seq)):
            hist.append(seq[max(0, t - max_history) : t].tolist())
            targets.append(int(seq[t]))
            owner.append(s)
    if not hist:
        raise TrsrError(f"no training prefixes: every training sequence is shorter than min_prefix + 1 ({min_prefix + 1})")
    history, lengths = _pad(hist, max_history)
    return history, lengths, np.asarray(targets, dtype=np.int64), np.asarray(owner, dtype=np.int64)


class NegativeSampler:
    """Uniform negatives from items 1..n, never an item of the example's own sequence
    (as the protocol draws evaluation negatives). Seeded by the caller's generator."""

    ROUNDS = 8

    def __init__(self, sequences: list[np.ndarray], n_items: int):
        self.n_items = n_items
        width = n_items + 1
        keys = [s * width + np.unique(seq) for s, seq in enumerate(sequences)]
        self.forbidden = np.unique(np.concatenate(keys)) if keys else np.empty(0, dtype=np.int64)
        self.width = width

    def forbidden_mask(self, owner: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Bool [B, K]: items[b, k] belongs to sequence owner[b]."""
        return np.isin(owner[:, None] * self.width + items, self.forbidden)

    def sample(self, rng: np.random.Generator, owner: np.ndarray, count: int) -> np.ndarray:
        draws = rng.integers(1, self.n_items + 1, size=(owner.size, count))
        for _ in range(self.ROUNDS):
            keys = owner[:, None] * self.width + draws
            bad = np.isin(keys, self.forbidden)
            if not bad.any():
                break
            draws[bad] = rng.integers(1, self.n_items + 1, size=int(bad.sum()))
        return draws
