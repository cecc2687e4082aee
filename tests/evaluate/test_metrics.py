"""Ranking metrics: hand-computed lists, ties, chance level, bootstrap, errors."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from trsr.evaluate import metrics
from trsr.evaluate.metrics import (
    bootstrap_ci,
    chance_level,
    per_list_metrics,
    ranking_metrics,
    mean_metrics,
)

LOG2_3 = math.log2(3)
LOG2_6 = math.log2(6)

# --------------------------------------------------------------------- hand examples
#
# List "a": 6 candidates, 2 positives, no ties. By descending score the labels are
#   rank 1: 0.9 (0)  rank 2: 0.8 (1)  rank 3: 0.7 (0)
#   rank 4: 0.6 (0)  rank 5: 0.5 (1)  rank 6: 0.4 (0)
#   recall@3 = 1/2 (the rank-2 positive only), recall@5 = recall@10 = 2/2 = 1
#   mrr@K = 1/2 for K >= 2 (first positive at rank 2)
#   ndcg@3 = (1/log2 3) / (1 + 1/log2 3)                   = 0.38685
#   ndcg@5 = (1/log2 3 + 1/log2 6) / (1 + 1/log2 3)        = 0.62406
#   auc: pairs (pos, neg) = 2 * 4 = 8; 0.8 beats 0.7, 0.6, 0.4 (3), 0.5 beats 0.4 (1)
#        -> 4/8 = 0.5
# List "b": 4 candidates, the positive scored highest -> everything 1.
# List "c": 3 candidates, the positive scored lowest (rank 3)
#   recall@3 = 1, recall@1 = recall@2 = 0; mrr@3 = 1/3; ndcg@3 = 1/log2(4) = 0.5; auc 0
# List "d": 2 candidates, both positive -> recall@1 = 1/2 (only one fits in the top 1),
#   everything else 1 (ndcg@1 = 1: the ideal top 1 holds one positive too); auc undefined,
#   excluded from the mean and counted.
HAND_ROWS = [
    ("a", 0, 0.9), ("a", 1, 0.8), ("a", 0, 0.7), ("a", 0, 0.6), ("a", 1, 0.5), ("a", 0, 0.4),
    ("b", 1, 3.0), ("b", 0, 1.0), ("b", 0, 2.0), ("b", 0, 0.0),
    ("c", 1, 0.1), ("c", 0, 0.2), ("c", 0, 0.3),
    ("d", 1, 0.7), ("d", 1, 0.2),
]  # fmt: skip

HAND_EXPECTED = {
    "recall@1": [0.0, 1.0, 0.0, 0.5],
    "recall@2": [0.5, 1.0, 0.0, 1.0],
    "recall@3": [0.5, 1.0, 1.0, 1.0],
    "recall@5": [1.0, 1.0, 1.0, 1.0],
    "mrr@1": [0.0, 1.0, 0.0, 1.0],
    "mrr@3": [0.5, 1.0, 1 / 3, 1.0],
    "mrr@5": [0.5, 1.0, 1 / 3, 1.0],
    "ndcg@1": [0.0, 1.0, 0.0, 1.0],
    "ndcg@3": [(1 / LOG2_3) / (1 + 1 / LOG2_3), 1.0, 0.5, 1.0],
    "ndcg@5": [(1 / LOG2_3 + 1 / LOG2_6) / (1 + 1 / LOG2_3), 1.0, 0.5, 1.0],
}
HAND_KS = (1, 2, 3, 5)


def columns(rows):
    ids, labels, scores = zip(*rows)
    return list(ids), list(labels), list(scores)


def lists_of(size: int, count: int, scores: np.ndarray, positive_at: int = 0):
    """`count` lists of `size` rows, the positive at row `positive_at` of each."""
    ids = np.repeat(np.arange(count), size)
    labels = np.zeros(size * count, dtype=np.int8)
    labels[positive_at::size] = 1
    return ids, labels, scores


@pytest.mark.parametrize("ties", ["random", "pessimistic", "optimistic"])
def test_hand_computed_lists(ties):
    result = per_list_metrics(*columns(HAND_ROWS), ks=HAND_KS, ties=ties)
    assert list(result["list_id"]) == ["a", "b", "c", "d"]
    for name, expected in HAND_EXPECTED.items():
        np.testing.assert_allclose(result[name], expected, err_msg=name)
    np.testing.assert_allclose(result["auc"][:3], [0.5, 1.0, 0.0])
    assert math.isnan(result["auc"][3])
    np.testing.assert_array_equal(result["positives"], [2, 1, 1, 2])
    np.testing.assert_array_equal(result["size"], [6, 4, 3, 2])


def test_hand_computed_summary_and_auc_exclusion():
    summary = ranking_metrics(*columns(HAND_ROWS), ks=(3,))
    assert summary["lists"] == 4
    assert summary["auc_excluded"] == 1
    assert summary["recall@3"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert summary["mrr@3"] == pytest.approx((0.5 + 1 + 1 / 3 + 1) / 4)
    assert summary["auc"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # "d" left out
    assert set(summary) == {"recall@3", "mrr@3", "ndcg@3", "auc", "lists", "auc_excluded"}


def test_rows_of_a_list_need_not_be_contiguous():
    rows = list(HAND_ROWS)
    order = np.random.default_rng(3).permutation(len(rows))
    shuffled = per_list_metrics(*columns([rows[i] for i in order]), ks=HAND_KS)
    position = {list_id: i for i, list_id in enumerate(shuffled["list_id"])}
    aligned = [position[list_id] for list_id in ["a", "b", "c", "d"]]
    for name, expected in HAND_EXPECTED.items():
        np.testing.assert_allclose(shuffled[name][aligned], expected, err_msg=name)


def test_lists_of_different_sizes():
    # size 2: positive at rank 2; size 5: rank 4; size 30: rank 11 (just outside top 10)
    rows = [("s2", 0, 1.0), ("s2", 1, 0.0)]
    rows += [("s5", int(i == 3), 5.0 - i) for i in range(5)]
    rows += [("s30", int(i == 10), 30.0 - i) for i in range(30)]
    result = per_list_metrics(*columns(rows), ks=(3, 10))
    np.testing.assert_allclose(result["recall@3"], [1, 0, 0])
    np.testing.assert_allclose(result["recall@10"], [1, 1, 0])
    np.testing.assert_allclose(result["mrr@10"], [1 / 2, 1 / 4, 0])
    np.testing.assert_allclose(result["ndcg@10"], [1 / LOG2_3, 1 / math.log2(5), 0])
    # auc: s2 beats 0 of 1; s5 beats 1 of 4; s30 beats 19 of 29
    np.testing.assert_allclose(result["auc"], [0, 1 / 4, 19 / 29])


def test_multi_positive_recall_and_ndcg_ideal():
    # 3 positives in a list of 5, ranked 1, 3, 4 ->
    #   recall@2 = 1/3, recall@3 = 2/3, recall@5 = 1
    #   ndcg@3 = (1 + 1/log2 4) / (1 + 1/log2 3 + 1/log2 4)
    #   auc: negatives at ranks 2 and 5: rank-1 positive beats 2, others beat 1 -> 4/6
    labels = [1, 0, 1, 1, 0]
    scores = [5, 4, 3, 2, 1]
    result = per_list_metrics(["x"] * 5, labels, scores, ks=(2, 3, 5))
    assert result["recall@2"][0] == pytest.approx(1 / 3)
    assert result["recall@3"][0] == pytest.approx(2 / 3)
    assert result["recall@5"][0] == pytest.approx(1.0)
    assert result["mrr@2"][0] == pytest.approx(1.0)
    assert result["ndcg@3"][0] == pytest.approx((1 + 0.5) / (1 + 1 / LOG2_3 + 0.5))
    assert result["ndcg@5"][0] == pytest.approx(
        (1 + 0.5 + 1 / math.log2(5)) / (1 + 1 / LOG2_3 + 0.5)
    )
    assert result["auc"][0] == pytest.approx(4 / 6)


# ------------------------------------------------------------------------------ ties


def test_partial_tie_under_each_mode():
    # positive tied with 2 negatives at 0.5, one negative above, one below:
    # pessimistic rank 4, optimistic rank 2; auc = (1 beaten + 2 ties * 1/2) / 4 = 0.5
    ids = ["t"] * 5
    labels = [0, 0, 1, 0, 0]
    scores = [0.9, 0.5, 0.5, 0.5, 0.1]
    pess = per_list_metrics(ids, labels, scores, ks=(2, 3, 4), ties="pessimistic")
    opt = per_list_metrics(ids, labels, scores, ks=(2, 3, 4), ties="optimistic")
    assert pess["mrr@4"][0] == pytest.approx(1 / 4) and pess["recall@3"][0] == 0
    assert opt["mrr@4"][0] == pytest.approx(1 / 2) and opt["recall@2"][0] == 1
    assert pess["auc"][0] == opt["auc"][0] == pytest.approx(0.5)


def test_random_ties_spread_the_positive_uniformly_over_the_tied_ranks():
    count = 3000  # the partial tie above, repeated: the rank is uniform over 2, 3, 4
    ids = np.repeat(np.arange(count), 5)
    labels = np.tile([0, 0, 1, 0, 0], count)
    scores = np.tile([0.9, 0.5, 0.5, 0.5, 0.1], count)
    result = per_list_metrics(ids, labels, scores, ks=(1, 2, 3, 4), seed=7)
    rank = 1 / result["mrr@4"]
    assert set(np.round(rank).astype(int)) == {2, 3, 4}
    assert result["recall@1"].sum() == 0
    for r in (2, 3, 4):
        assert np.mean(np.round(rank) == r) == pytest.approx(1 / 3, abs=0.04)
    np.testing.assert_allclose(result["auc"], 0.5)


def test_multi_positive_ties():
    # all four tied: pessimistic puts the 2 positives at ranks 3, 4; optimistic at 1, 2
    ids, labels, scores = ["m"] * 4, [1, 0, 1, 0], [1.0] * 4
    pess = per_list_metrics(ids, labels, scores, ks=(2, 4), ties="pessimistic")
    opt = per_list_metrics(ids, labels, scores, ks=(2, 4), ties="optimistic")
    assert pess["recall@2"][0] == 0 and pess["recall@4"][0] == 1
    assert pess["mrr@4"][0] == pytest.approx(1 / 3)
    assert pess["ndcg@4"][0] == pytest.approx(
        (1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / LOG2_3)
    )
    assert opt["recall@2"][0] == 1 and opt["ndcg@2"][0] == pytest.approx(1.0)
    assert pess["auc"][0] == opt["auc"][0] == pytest.approx(0.5)


def test_constant_scorer_pessimistic_gets_zero_and_optimistic_one():
    ids, labels, scores = lists_of(21, 50, np.zeros(21 * 50))
    pess = ranking_metrics(ids, labels, scores, ties="pessimistic")
    opt = ranking_metrics(ids, labels, scores, ties="optimistic")
    for k in (3, 5, 10):
        assert pess[f"recall@{k}"] == 0 and pess[f"mrr@{k}"] == 0 and pess[f"ndcg@{k}"] == 0
        assert opt[f"recall@{k}"] == 1 and opt[f"mrr@{k}"] == 1
    assert pess["auc"] == opt["auc"] == 0.5


def reference_per_list(labels, scores, k, ties):
    """Brute force for one list: sort in Python, count pairs in Python."""
    n = len(labels)
    if ties == "pessimistic":
        order = sorted(range(n), key=lambda i: (-scores[i], labels[i]))
    else:
        order = sorted(range(n), key=lambda i: (-scores[i], -labels[i]))
    ranks = [r + 1 for r, i in enumerate(order) if labels[i] == 1]
    recall = sum(r <= k for r in ranks) / len(ranks)
    mrr = 1 / min(ranks) if min(ranks) <= k else 0.0
    dcg = sum(1 / math.log2(r + 1) for r in ranks if r <= k)
    idcg = sum(1 / math.log2(r + 1) for r in range(1, min(len(ranks), k) + 1))
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    auc = wins / (len(pos) * len(neg)) if neg else math.nan
    return recall, mrr, dcg / idcg, auc


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_matches_brute_force_on_random_lists_with_many_ties(ties):
    rng = np.random.default_rng(11)
    ids, labels, scores, expected = [], [], [], []
    for list_no in range(300):
        size = int(rng.integers(1, 12))
        lab = rng.integers(0, 2, size)
        lab[rng.integers(size)] = 1
        sc = rng.integers(0, 4, size).astype(float)  # few values: many ties
        ids += [f"L{list_no}"] * size
        labels += lab.tolist()
        scores += sc.tolist()
        expected.append(reference_per_list(lab.tolist(), sc.tolist(), 3, ties))
    order = rng.permutation(len(ids))  # and interleave the lists
    result = per_list_metrics(
        np.array(ids)[order], np.array(labels)[order], np.array(scores)[order],
        ks=(3,), ties=ties,
    )  # fmt: skip
    position = {list_id: i for i, list_id in enumerate(result["list_id"])}
    aligned = [position[f"L{i}"] for i in range(300)]
    expected = np.array(expected)
    for column, name in enumerate(["recall@3", "mrr@3", "ndcg@3", "auc"]):
        np.testing.assert_allclose(result[name][aligned], expected[:, column], err_msg=name)


def test_two_key_sort_fallback_gives_the_same_result(monkeypatch):
    rows = columns(HAND_ROWS)
    expected = per_list_metrics(*rows, ks=HAND_KS, ties="pessimistic")
    monkeypatch.setattr(metrics, "_MAX_KEY", 0)
    fallback = per_list_metrics(*rows, ks=HAND_KS, ties="pessimistic")
    for name in HAND_EXPECTED:
        np.testing.assert_array_equal(fallback[name], expected[name])


# ---------------------------------------------------------------------------- chance

CHANCE_21 = {
    3: (3 / 21, (1 + 1 / 2 + 1 / 3) / 21),
    5: (5 / 21, (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 21),
    10: (10 / 21, sum(1 / r for r in range(1, 11)) / 21),
}


def test_chance_level_values():
    for k, (recall, mrr) in CHANCE_21.items():
        level = chance_level(21, k)
        assert level[f"recall@{k}"] == pytest.approx(recall)
        assert level[f"mrr@{k}"] == pytest.approx(mrr)
    assert chance_level(21, 3)["recall@3"] == pytest.approx(0.143, abs=5e-4)
    assert chance_level(21, 3)["mrr@3"] == pytest.approx(0.087, abs=5e-4)
    assert chance_level(21, 10)["mrr@10"] == pytest.approx(0.1395, abs=5e-5)
    assert chance_level(2, 10)["recall@10"] == 1.0  # K beyond the list
    assert chance_level(2, 10)["ndcg@10"] == pytest.approx((1 + 1 / LOG2_3) / 2)


@pytest.mark.parametrize("scorer", ["random", "constant", "constant-positive-first"])
def test_uninformative_scorers_land_at_chance(scorer):
    count, size = 20_000, 21
    rng = np.random.default_rng(5)
    if scorer == "random":
        scores = rng.random(count * size)
    else:
        scores = np.full(count * size, 0.25)
    # positive at the last row, or at the first row: input order must not leak into ranks
    positive_at = 0 if scorer == "constant-positive-first" else size - 1
    summary = ranking_metrics(*lists_of(size, count, scores, positive_at), seed=1)
    assert summary["lists"] == count
    for k, (recall, mrr) in CHANCE_21.items():
        assert abs(summary[f"recall@{k}"] - recall) < 0.01, (k, summary)
        assert abs(summary[f"mrr@{k}"] - mrr) < 0.006, (k, summary)
        ndcg = chance_level(size, k)[f"ndcg@{k}"]
        assert abs(summary[f"ndcg@{k}"] - ndcg) < 0.008, (k, summary)
    assert summary["auc"] == pytest.approx(0.5, abs=0.01)


def test_perfect_scorer_gets_one_everywhere():
    rng = np.random.default_rng(2)
    ids = np.repeat(np.arange(400), 21)
    labels = np.zeros(ids.size, dtype=int)
    # 1 to 3 positives per list (with more than K positives Recall@K cannot reach 1)
    for extra in range(3):
        labels[extra::21] = rng.random(400) < 0.5 if extra else 1
    scores = labels + 0.0  # positives tied with each other, negatives tied
    for ties in ("random", "pessimistic", "optimistic"):
        summary = ranking_metrics(ids, labels, scores, ties=ties)
        for name, value in summary.items():
            if name not in ("lists", "auc_excluded"):
                assert value == 1.0, (ties, name, value)


# ---------------------------------------------------------------------- determinism


def test_seed_determinism_in_tied_cases():
    ids, labels, scores = lists_of(21, 200, np.zeros(21 * 200))
    first = per_list_metrics(ids, labels, scores, seed=3)
    again = per_list_metrics(ids, labels, scores, seed=3)
    other = per_list_metrics(ids, labels, scores, seed=4)
    np.testing.assert_array_equal(first["mrr@10"], again["mrr@10"])
    assert not np.array_equal(first["mrr@10"], other["mrr@10"])


def test_seed_does_not_matter_without_ties():
    rng = np.random.default_rng(8)
    ids, labels, scores = lists_of(21, 200, rng.random(21 * 200))
    first = per_list_metrics(ids, labels, scores, seed=3)
    other = per_list_metrics(ids, labels, scores, seed=4)
    for k in (3, 5, 10):
        np.testing.assert_array_equal(first[f"mrr@{k}"], other[f"mrr@{k}"])


# --------------------------------------------------------------------------- inputs


def test_accepts_numpy_lists_and_pyarrow():
    ids, labels, scores = columns(HAND_ROWS)
    expected = per_list_metrics(ids, labels, scores, ks=HAND_KS)
    variants = [
        (np.array(ids), np.array(labels, dtype=np.int8), np.array(scores)),
        (pa.array(ids), pa.array(labels, pa.int8()), pa.array(scores)),
        (
            pa.chunked_array([ids[:5], ids[5:]]),
            pa.chunked_array([labels[:5], labels[5:]], pa.int8()),
            pa.chunked_array([scores[:7], scores[7:]]),
        ),
        (pa.array(ids).dictionary_encode(), np.array(labels, dtype=bool), scores),
    ]
    for variant in variants:
        result = per_list_metrics(*variant, ks=HAND_KS)
        assert list(result["list_id"]) == ["a", "b", "c", "d"]
        for name in HAND_EXPECTED:
            np.testing.assert_allclose(result[name], expected[name], err_msg=name)


def test_integer_list_ids():
    result = per_list_metrics([7, 7, 3, 3], [1, 0, 0, 1], [1.0, 0.0, 1.0, 0.0], ks=(1,))
    assert list(result["list_id"]) == [7, 3]
    np.testing.assert_array_equal(result["recall@1"], [1.0, 0.0])


def test_ranking_metrics_of_no_lists():
    summary = ranking_metrics([], [], [])
    assert summary["lists"] == 0
    assert math.isnan(summary["recall@3"])


# --------------------------------------------------------------------------- errors


def test_error_mismatched_lengths():
    with pytest.raises(ValueError, match="same length.*3, 2 and 3"):
        per_list_metrics(["a", "a", "a"], [1, 0], [0.1, 0.2, 0.3])


def test_error_nan_scores_are_counted():
    with pytest.raises(ValueError, match="2 NaN"):
        per_list_metrics(["a"] * 4, [1, 0, 0, 0], [0.1, np.nan, 0.3, np.nan])
    with pytest.raises(ValueError, match="1 NaN"):  # a pyarrow null counts too
        per_list_metrics(["a"] * 2, [1, 0], pa.array([0.1, None]))


@pytest.mark.parametrize("bad", [[1, 2, 0], [1, -1, 0], [1, 0.5, 0], [1, np.nan, 0]])
def test_error_labels_not_binary(bad):
    with pytest.raises(ValueError, match="labels must be 0 or 1: 1 of 3"):
        per_list_metrics(["a"] * 3, bad, [0.1, 0.2, 0.3])


def test_error_string_labels():
    with pytest.raises(ValueError, match="labels"):
        per_list_metrics(["a"] * 2, ["1", "0"], [0.1, 0.2])


def test_error_list_without_positive_is_named():
    with pytest.raises(ValueError, match=r"1 list\(s\) have no positive.*'user-42'"):
        per_list_metrics(["ok", "ok", "user-42", "user-42"], [1, 0, 0, 0], [1, 2, 3, 4])


def test_error_null_list_id_bad_ties_bad_ks():
    with pytest.raises(ValueError, match="null list id"):
        per_list_metrics(pa.array(["a", None]), [1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="ties must be one of"):
        per_list_metrics(["a"], [1], [0.1], ties="average")
    with pytest.raises(ValueError, match="positive integers"):
        per_list_metrics(["a"], [1], [0.1], ks=(0, 3))
    with pytest.raises(ValueError, match="at least one"):
        per_list_metrics(["a"], [1], [0.1], ks=())
    with pytest.raises(ValueError, match="positive integer"):
        chance_level(0, 3)


# ------------------------------------------------------------------------ bootstrap


def test_bootstrap_contains_the_mean_and_narrows_with_more_lists():
    rng = np.random.default_rng(9)
    small = (rng.random(200) < 0.3).astype(float)
    large = (rng.random(20_000) < 0.3).astype(float)
    low_s, high_s = bootstrap_ci(small, n=500)
    low_l, high_l = bootstrap_ci(large, n=500)
    assert low_s <= small.mean() <= high_s
    assert low_l <= large.mean() <= high_l
    assert (high_l - low_l) < (high_s - low_s) / 5  # ~ 1/sqrt(100) = 1/10 as wide
    # roughly the normal-approximation width for a proportion
    assert (high_s - low_s) == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 200), rel=0.3)


def test_bootstrap_deterministic_ignores_nan_and_checks_arguments():
    values = np.r_[np.linspace(0, 1, 101), np.nan]
    assert bootstrap_ci(values, n=200, seed=1) == bootstrap_ci(values, n=200, seed=1)
    assert bootstrap_ci(values, n=200, seed=1) != bootstrap_ci(values, n=200, seed=2)
    low, high = bootstrap_ci(values, n=200)
    assert not math.isnan(low) and low < 0.5 < high
    assert bootstrap_ci(np.full(10, 0.25)) == (0.25, 0.25)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([np.nan])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([0.1, 0.2], alpha=1.5)


def test_bootstrap_over_per_list_output():
    ids, labels, scores = columns(HAND_ROWS)
    per_list = per_list_metrics(ids, labels, scores)
    low, high = bootstrap_ci(per_list["auc"], n=200)  # the NaN of list "d" is dropped
    assert 0.0 <= low <= mean_metrics(per_list)["auc"] <= high <= 1.0
