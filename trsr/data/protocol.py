"""The evaluation protocol: eligible users, split by user, ranking lists with negatives.

For each user sequence [i_1, ..., i_n] the target is i_n and the history is
i_1..i_{n-1}. A user is eligible when min_history <= len(history) <= max_history
(longer histories are dropped, as in the paper, or truncated to the most recent
max_history items). Eligible users are split by a seeded hash of their id (so the
split does not depend on file order), and each sampled user gets one ranking list:
the positive plus N negatives drawn uniformly from the catalogue, excluding the
user's history and target, in a seeded random order.

Every user is accounted for: sampled into a split, or excluded with a reason
(rejects stage "protocol").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from trsr.data.config import ProtocolConfig
from trsr.data.rejects import Rejects
from trsr.schema import LISTS, SAMPLES, SPLITS

PROTOCOL = "protocol"  # stage name in rejects
SOURCE = "sequences"


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process and Python version."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def user_rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(stable_hash(seed, *parts))


def list_id(split: str, user_id: str) -> str:
    return f"{split}:{user_id}"


@dataclass
class ProtocolResult:
    samples: dict[str, pa.Table]  # split -> SAMPLES rows
    lists: dict[str, pa.Table]  # split -> LISTS rows (the same lists, one row each)
    users_in: int
    users_per_split: dict[str, int]
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> users

    def check_accounting(self) -> None:
        total = sum(self.users_per_split.values()) + sum(self.excluded.values())
        if total != self.users_in:
            raise AssertionError(
                f"protocol accounting broken: {self.users_in} users in, {total} accounted for"
            )


def split_sizes(config: ProtocolConfig, eligible: int) -> dict[str, int]:
    """Users per split from fractions (<= 1) or counts (> 1), capped by eligibility.

    Test is filled first, then valid, then train, so a small dataset keeps its
    evaluation lists whole.
    """
    wanted = {}
    for split in SPLITS:
        value = getattr(config.users, split)
        wanted[split] = int(round(value * eligible)) if value <= 1 else int(value)
    sizes, left = {}, eligible
    for split in ("test", "valid", "train"):
        sizes[split] = min(wanted[split], left)
        left -= sizes[split]
    return {split: sizes[split] for split in SPLITS}


def build_samples(
    sequences: pa.Table,
    catalogue: pa.Array | list[str],
    config: ProtocolConfig,
    seed: int,
    rejects: Rejects,
) -> ProtocolResult:
    """Ranking lists per split from canonical sequences and the catalogue's item ids."""
    catalogue_ids = np.asarray(pa.array(catalogue, pa.string()).to_pylist(), dtype=object)
    index_of = {item: i for i, item in enumerate(catalogue_ids)}
    users = sequences.column("user_id").to_pylist()
    item_lists = sequences.column("item_ids").to_pylist()

    excluded: dict[str, int] = {}

    def exclude(user: str, reason: str, raw: str | None = None) -> None:
        excluded[reason] = excluded.get(reason, 0) + 1
        rejects.add(PROTOCOL, SOURCE, reason, user_id=user, raw=raw)

    # (user, history kept, target, every earlier item: none of them may be a negative)
    eligible: list[tuple[str, list[str], str, list[str]]] = []
    too_short = f"history shorter than min_history ({config.min_history} items)"
    too_long = f"history longer than max_history ({config.max_history} items)"
    for user, items in zip(users, item_lists):
        if not items:
            exclude(user, "empty sequence")
            continue
        history, target = items[:-1], items[-1]
        seen = history
        if len(history) < config.min_history:
            exclude(user, too_short, raw=f"{len(history)} items")
            continue
        if len(history) > config.max_history:
            if config.long_history == "drop":
                exclude(user, too_long, raw=f"{len(history)} items")
                continue
            history = history[-config.max_history :]
        if target not in index_of:
            exclude(user, "target item not in catalogue", raw=target)
            continue
        eligible.append((user, history, target, seen))

    # Seeded, order-independent split: rank users by a hash of (seed, user id).
    eligible.sort(key=lambda row: (stable_hash(seed, "split", row[0]), row[0]))
    sizes = split_sizes(config, len(eligible))
    assignment: dict[str, list[tuple[str, list[str], str, list[str]]]] = {}
    start = 0
    for split in ("test", "valid", "train"):
        assignment[split] = eligible[start : start + sizes[split]]
        start += sizes[split]
    for user, *_ in eligible[start:]:
        exclude(user, "not sampled (split sizes reached)")

    samples: dict[str, pa.Table] = {}
    lists: dict[str, pa.Table] = {}
    users_per_split: dict[str, int] = {}
    catalogue_size = len(catalogue_ids)
    for split in SPLITS:
        negatives_per_list = getattr(config.negatives, split)
        rows: dict[str, list] = {name: [] for name in LISTS.names}
        kept = 0
        for user, history, target, seen in sorted(assignment[split], key=lambda row: row[0]):
            # With long_history "truncate" the older items are not shown, but the user
            # did interact with them: they are no negatives either.
            forbidden = {index_of[i] for i in seen if i in index_of}
            forbidden.add(index_of[target])
            if catalogue_size - len(forbidden) < negatives_per_list:
                exclude(user, f"catalogue too small for {negatives_per_list} negatives")
                continue
            rng = user_rng(seed, "negatives", split, user)
            negatives = _draw_negatives(rng, catalogue_size, forbidden, negatives_per_list)
            candidates = [target] + [catalogue_ids[i] for i in negatives]
            labels = [1] + [0] * len(negatives)
            order = rng.permutation(len(candidates))
            lid = list_id(split, user)
            rows["list_id"].append(lid)
            rows["split"].append(split)
            rows["user_id"].append(user)
            rows["list_index"].append(kept)
            rows["history"].append(history)
            rows["candidates"].append([candidates[k] for k in order])
            rows["labels"].append([labels[k] for k in order])
            kept += 1
        lists[split] = pa.Table.from_pydict(rows, schema=LISTS)
        samples[split] = samples_of(lists[split])
        users_per_split[split] = kept

    result = ProtocolResult(samples, lists, len(users), users_per_split, excluded)
    result.check_accounting()
    return result


def samples_of(lists: pa.Table) -> pa.Table:
    """LISTS rows -> SAMPLES rows (one per candidate, in list order), in Arrow: a million
    lists of 21 candidates never become 21 million Python rows."""
    import pyarrow.compute as pc

    candidates = lists.column("candidates").combine_chunks()
    parent = pc.list_parent_indices(candidates)
    offsets = candidates.offsets.to_numpy()
    index = np.arange(len(parent)) - offsets[parent.to_numpy()]
    per_list = lists.select(["list_id", "split", "user_id", "history"]).take(parent)
    return pa.Table.from_arrays(
        [
            per_list.column("list_id"),
            per_list.column("split"),
            per_list.column("user_id"),
            per_list.column("history"),
            pc.list_flatten(candidates),
            pc.list_flatten(lists.column("labels").combine_chunks()),
            pa.array(index, pa.int16()),
        ],
        schema=SAMPLES,
    )


def _draw_negatives(
    rng: np.random.Generator, catalogue_size: int, forbidden: set[int], count: int
) -> list[int]:
    """`count` distinct catalogue indices outside `forbidden`, by seeded rejection."""
    chosen: list[int] = []
    seen = set(forbidden)
    while len(chosen) < count:
        draw = rng.integers(0, catalogue_size, size=2 * (count - len(chosen)) + 4)
        for index in draw.tolist():
            if index not in seen:
                seen.add(index)
                chosen.append(index)
                if len(chosen) == count:
                    break
    return chosen
