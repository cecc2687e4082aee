"""Ranking metrics over ranking lists (Recall@K, MRR@K, NDCG@K, AUC).

A ranking list is the set of rows sharing a `list_id` (in the SCORES table: one positive
and its negatives, but any number of positives >= 1 and any list size is accepted). Every
row carries a binary `label` and a model `score`; a list is ranked by descending score.

    per_list = per_list_metrics(scores["list_id"], scores["label"], scores["score"])
    summary = mean_metrics(per_list)          # {"recall@3": ..., "auc": ..., "lists": ...}
    low, high = bootstrap_ci(per_list["recall@3"])
    chance_level(21, 3)                      # {"recall@3": 0.143, "mrr@3": 0.087, ...}

Metrics, per list (binary relevance, ranks are 1-based):

    recall@K  fraction of the list's positives ranked in the top K (the hit rate when
              there is one positive)
    mrr@K     1 / rank of the first positive if that rank <= K, else 0
    ndcg@K    DCG@K / ideal DCG@K, DCG = sum over positives ranked <= K of 1/log2(rank+1),
              the ideal ranking putting all positives first
    auc       probability that a positive outscores a negative, a tie counting 1/2 (it
              depends on the scores only, not on `ties`); NaN for a list with no negative

Equal scores: a scorer that gives many candidates the same score (a constant, or a
coarse "yes/no" model) must not be credited for where the positive happens to sit in the
input. `ties` decides how tied candidates are ordered:

    "random"       (default) a seeded random order; expected metrics of a constant
                   scorer are those of `chance_level`. Deterministic for a given input
                   (same rows in the same order) and seed.
    "pessimistic"  a positive tied with negatives is ranked below all of them
    "optimistic"   a positive tied with negatives is ranked above all of them

Comparing the pessimistic and optimistic numbers shows how much a method relies on ties.

Everything is vectorised with numpy (one sort over all rows); a million lists of 21
candidates take seconds.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "DEFAULT_KS",
    "TIES",
    "per_list_metrics",
    "mean_metrics",
    "ranking_metrics",
    "bootstrap_ci",
    "chance_level",
]

DEFAULT_KS: tuple[int, ...] = (3, 5, 10)
TIES = ("random", "pessimistic", "optimistic")
_MAX_NAMED = 5  # how many offending list ids an error message names
_MAX_KEY = 2**62  # bound on the combined (list, score rank) sort key


# --------------------------------------------------------------------------- inputs


def _as_numpy(values: Any) -> np.ndarray:
    """A 1-d numpy view of a numpy array, a list, a polars series or a pyarrow array."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_numpy(zero_copy_only=False)
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-d sequence, got shape {array.shape}")
    return array


def _encode_lists(list_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Dense list codes 0..L-1 (order of first appearance) and the L distinct ids."""
    if isinstance(list_ids, pa.ChunkedArray):
        array = list_ids.combine_chunks()
    elif isinstance(list_ids, pa.Array):
        array = list_ids
    else:
        ids = _as_numpy(list_ids)
        try:
            array = pa.array(ids)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise ValueError(f"list_ids: cannot be read as ids ({error})") from error
    if array.null_count:
        raise ValueError(f"list_ids: {array.null_count} null list id(s)")
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()  # drop unused dictionary entries
    encoded = pc.dictionary_encode(array)
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    dictionary = encoded.dictionary
    return indices.astype(np.int64, copy=False), dictionary.to_numpy(zero_copy_only=False)


def _check_labels(labels: Any) -> np.ndarray:
    raw = _as_numpy(labels)
    if raw.dtype == bool:
        return raw.astype(np.int8)
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"labels must be 0/1 numbers, got dtype {raw.dtype}")
    bad = ~((raw == 0) | (raw == 1))  # NaN (also a null from pyarrow) is bad too
    if bad.any():
        examples = sorted({str(value) for value in raw[bad][:100].tolist()})[:_MAX_NAMED]
        raise ValueError(
            f"labels must be 0 or 1: {int(bad.sum())} of {raw.size} label(s) are not "
            f"(e.g. {', '.join(examples)})"
        )
    return raw.astype(np.int8)


def _check_scores(scores: Any) -> np.ndarray:
    raw = _as_numpy(scores)
    try:
        values = raw.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scores must be numbers, got dtype {raw.dtype} ({error})") from error
    nan = np.isnan(values)
    if nan.any():
        raise ValueError(
            f"scores contain {int(nan.sum())} NaN (or null) value(s) out of {values.size}; "
            "every candidate needs a score"
        )
    return values


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one cutoff")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has duplicates: {ks}")
    return tuple(int(k) for k in ks)


def _named(ids: np.ndarray, mask: np.ndarray) -> str:
    named = ", ".join(repr(value) for value in ids[mask][:_MAX_NAMED].tolist())
    more = int(mask.sum()) - _MAX_NAMED
    return named + (f" and {more} more" if more > 0 else "")


# -------------------------------------------------------------------------- metrics


def per_list_metrics(
    list_ids: Any,
    labels: Any,
    scores: Any,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "random",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Metrics of every ranking list, one value per list.

    `list_ids`, `labels` (0/1) and `scores` are parallel sequences with one entry per
    candidate (numpy arrays, lists, or pyarrow arrays). Rows of one list need not be
    contiguous. Returns {"list_id": the distinct ids in order of first appearance,
    "recall@K", "mrr@K", "ndcg@K" for every K in `ks`, "auc", "positives", "size"},
    every array of length L (the number of lists). `auc` is NaN for a list without a
    negative. See the module docstring for `ties`.

    Raises ValueError on mismatched lengths, NaN/null scores, labels other than 0/1,
    null list ids, or a list without a positive (naming it).
    """
    ks = _check_ks(ks)
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    codes, ids = _encode_lists(list_ids)
    label = _check_labels(labels)
    score = _check_scores(scores)
    if not (codes.size == label.size == score.size):
        raise ValueError(
            "list_ids, labels and scores must have the same length, got "
            f"{codes.size}, {label.size} and {score.size}"
        )
    n_lists = ids.size
    size = np.bincount(codes, minlength=n_lists)
    positives = np.bincount(codes, weights=label, minlength=n_lists).astype(np.int64)
    no_positive = positives == 0
    if no_positive.any():
        raise ValueError(
            f"{int(no_positive.sum())} list(s) have no positive candidate: "
            f"{_named(ids, no_positive)}"
        )
    negatives = size - positives
    start = np.concatenate(([0], np.cumsum(size)[:-1])) if n_lists else size

    order, run_first, run_last = _rank_order(codes, n_lists, score, label, ties, seed)
    sorted_codes = codes[order]
    sorted_label = label[order].astype(bool)
    rank = np.arange(codes.size) - start[sorted_codes] + 1  # 1-based within the list

    pos_codes = sorted_codes[sorted_label]
    pos_rank = rank[sorted_label]
    first = np.ones(pos_codes.size, dtype=bool)
    first[1:] = pos_codes[1:] != pos_codes[:-1]  # positives are sorted by list then rank
    first_rank = np.empty(n_lists, dtype=np.int64)
    first_rank[pos_codes[first]] = pos_rank[first]

    max_k = max(ks)
    # ideal[j] = DCG of j positives at ranks 1..j
    ideal = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(2, max_k + 2)))))
    gain = 1.0 / np.log2(pos_rank + 1.0)

    result: dict[str, np.ndarray] = {"list_id": ids}
    for k in ks:
        hit = pos_rank <= k
        hits = np.bincount(pos_codes, weights=hit, minlength=n_lists)
        result[f"recall@{k}"] = hits / positives
        result[f"mrr@{k}"] = np.where(first_rank <= k, 1.0 / first_rank, 0.0)
        dcg = np.bincount(pos_codes, weights=np.where(hit, gain, 0.0), minlength=n_lists)
        result[f"ndcg@{k}"] = dcg / ideal[np.minimum(positives, k)]
    # AUC (Mann-Whitney U) from ascending mid-ranks: a tie run holding descending
    # positions first..last of its list has ascending mid-rank size + 1 - its mean rank.
    mid = (run_first + run_last)[sorted_label] / 2.0 - start[pos_codes]  # 0-based
    ascending = size[pos_codes] - mid
    rank_sum = np.bincount(pos_codes, weights=ascending, minlength=n_lists)
    pairs = positives * negatives
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2.0) / pairs
    result["auc"] = np.where(pairs > 0, auc, np.nan)
    result["positives"] = positives
    result["size"] = size
    return result


def _rank_order(
    codes: np.ndarray,
    n_lists: int,
    score: np.ndarray,
    label: np.ndarray,
    ties: str,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order by list, descending score, then the tie rule.

    Returns `order` and, for every sorted position, the first and last sorted position
    of its tie run (the rows of its list with the same score).
    """
    n = codes.size
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    # Dense rank of the scores, descending (equal scores share a rank).
    by_score = np.argsort(-score)
    descending = -score[by_score]
    new_value = np.empty(n, dtype=bool)
    new_value[0] = True
    np.not_equal(descending[1:], descending[:-1], out=new_value[1:])
    dense = np.empty(n, dtype=np.int64)
    dense[by_score] = np.cumsum(new_value) - 1
    distinct = int(dense.max()) + 1
    if n_lists * distinct < _MAX_KEY:
        # One integer key (list, score rank); stable, so ties keep the input order.
        order = np.argsort(codes * distinct + dense, kind="stable")
    else:  # the key would overflow int64: sort on the two keys (slower)
        order = np.lexsort((dense, codes))
    sorted_codes = codes[order]
    sorted_dense = dense[order]
    run_start = np.empty(n, dtype=bool)
    run_start[0] = True
    run_start[1:] = (sorted_codes[1:] != sorted_codes[:-1]) | (
        sorted_dense[1:] != sorted_dense[:-1]
    )
    run_id = np.cumsum(run_start) - 1
    starts = np.flatnonzero(run_start)
    ends = np.concatenate((starts[1:] - 1, [n - 1]))
    run_first = starts[run_id]
    run_last = ends[run_id]

    # Reorder the rows of each tie run (only those) by the tie rule.
    tied = np.flatnonzero(run_first != run_last)
    if tied.size:
        tied_run = run_id[tied]
        if ties == "random":
            spread = tied.size
            rule = np.random.default_rng(seed).permutation(tied.size)
        else:
            spread = 2
            tied_label = label[order[tied]].astype(np.int64)
            # ascending = earlier = better rank: negatives first when pessimistic
            rule = tied_label if ties == "pessimistic" else 1 - tied_label
        within = np.argsort(tied_run * spread + rule, kind="stable")
        order[tied] = order[tied][within]
    return order, run_first, run_last


def mean_metrics(per_list: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of every metric over lists, plus counts.

    Returns {"recall@K": mean, ..., "auc": mean over lists that have a negative,
    "lists": number of lists, "auc_excluded": lists left out of AUC (no negative)}.
    With no lists at all the means are NaN.
    """
    result: dict[str, float] = {}
    lists = int(len(per_list["list_id"]))
    for name, values in per_list.items():
        if name in ("list_id", "positives", "size"):
            continue
        values = np.asarray(values, dtype=np.float64)
        kept = values[~np.isnan(values)]
        result[name] = float(kept.mean()) if kept.size else math.nan
    result["lists"] = lists
    if "auc" in per_list:
        result["auc_excluded"] = int(np.isnan(np.asarray(per_list["auc"], dtype=float)).sum())
    return result


def ranking_metrics(
    list_ids: Any,
    labels: Any,
    scores: Any,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "random",
    seed: int = 0,
) -> dict[str, float]:
    """`mean_metrics(per_list_metrics(...))`: the mean metrics and list counts in one call."""
    return mean_metrics(per_list_metrics(list_ids, labels, scores, ks=ks, ties=ties, seed=seed))


# ------------------------------------------------------------------ uncertainty, chance


def bootstrap_ci(
    per_list_values: Any,
    *,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a per-list metric.

    Resamples lists with replacement `n` times and returns the alpha/2 and 1 - alpha/2
    quantiles of the resampled means. NaN values (AUC of lists without a negative) are
    left out. Deterministic for a given seed.
    """
    values = np.asarray(_as_numpy(per_list_values), dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one (non-NaN) value")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    m = values.size
    means = np.empty(int(n), dtype=np.float64)
    # Resample in chunks so that a million lists do not need n * m indices at once.
    chunk = max(1, 4_000_000 // m)
    for begin in range(0, int(n), chunk):
        rows = min(chunk, int(n) - begin)
        picks = rng.integers(0, m, size=(rows, m))
        means[begin : begin + rows] = values[picks].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def chance_level(list_size: int, k: int) -> dict[str, float]:
    """Expected Recall@K, MRR@K and NDCG@K of a uniformly random ranking of
    `list_size` candidates with one positive (the positive's rank is uniform).

    Keys match `mean_metrics`: {"recall@K", "mrr@K", "ndcg@K"}. E.g. 21 candidates, K=3:
    recall 3/21 = 0.143, mrr (1 + 1/2 + 1/3)/21 = 0.087. The expected AUC is 0.5.
    """
    for name, value in (("list_size", list_size), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    top = min(int(k), int(list_size))
    ranks = np.arange(1, top + 1, dtype=np.float64)
    return {
        f"recall@{k}": top / list_size,
        f"mrr@{k}": float(np.sum(1.0 / ranks) / list_size),
        f"ndcg@{k}": float(np.sum(1.0 / np.log2(ranks + 1.0)) / list_size),
    }
