"""Scoring your own candidates: the plain steps (the whole path through Ray is
tests/pipeline/test_production.py)."""

import pyarrow as pa
import pytest

from trsr.recommend.candidate_groups import GROUP_ROWS, CandidateRows, GroupUser
from trsr.recommend.candidates import RankCandidates
from trsr.schema import CANDIDATE_SCORES, ITEMS


def test_candidate_rows_accept_pairs_lists_and_id_strings_and_flag_empty_ids():
    pairs = CandidateRows("f.csv")(pa.table({"user_id": [7, None, 9], "item_id": ["a", "b", None]}))
    assert pairs.schema.equals(GROUP_ROWS)
    assert pairs.column("user_id").to_pylist() == ["7", "", "9"]
    assert pairs.column("problem").to_pylist() == [None, "user_id is empty", "item_id is empty"]
    lists = CandidateRows("f.jsonl")(pa.table({"user_id": ["u1", "u2"], "item_ids": [["a", "b"], ["c"]]}))
    assert list(zip(lists.column("user_id").to_pylist(), lists.column("item_id").to_pylist())) == [("u1", "a"), ("u1", "b"), ("u2", "c")]
    strings = CandidateRows("f.csv")(pa.table({"user_id": ["u1"], "item_ids": [" a, b|c  d "]}))
    assert strings.column("item_id").to_pylist() == ["a", "b", "c", "d"]
    with pytest.raises(Exception, match="f.csv: a candidates file needs the columns user_id and item_id"):
        CandidateRows("f.csv")(pa.table({"user": ["u1"], "item_id": ["a"]}))


def group_rows(rows):
    full = [dict({name: None for name in GROUP_ROWS.names}, **row) for row in rows]
    return pa.Table.from_pylist(full, schema=GROUP_ROWS)


def test_group_user_keeps_known_distinct_candidates_and_says_why_for_the_rest(tmp_path):
    from trsr import storage

    items = tmp_path / "items.parquet"
    storage.write_parquet(pa.table({"item_id": ["a", "b", "c"], "attributes": [[], [], []]}, schema=ITEMS), str(items))
    group = GroupUser(str(items))
    row = group(group_rows([
        {"user_id": "u1", "kind": "candidate", "item_id": "a"},
        {"user_id": "u1", "kind": "history", "items": ["b", "c"]},
        {"user_id": "u1", "kind": "candidate", "item_id": "zz"},
        {"user_id": "u1", "kind": "candidate", "item_id": "a"},
        {"user_id": "u1", "kind": "summary", "summary": "Likes a.", "status": "ok"},
        {"user_id": "u1", "kind": "candidate", "item_id": "c"},
    ])).to_pylist()[0]
    assert row["candidates"] == ["a", "c"] and row["labels"] == [0, 0] and row["history"] == ["b", "c"]
    assert row["summary"] == "Likes a." and row["status"] == "ok" and row["scorable"] is True
    assert [r["item_id"] for r in row["rejected"]] == ["zz", "a"]
    assert "unknown item 'zz'" in row["rejected"][0]["reason"] and "duplicate" in row["rejected"][1]["reason"]
    # A user not in the sequences: every candidate rejected, nothing to score; no summary row = missing.
    ghost = group(group_rows([{"user_id": "g", "kind": "candidate", "item_id": "a"}])).to_pylist()[0]
    assert ghost["scorable"] is False and ghost["status"] == "missing"
    assert ghost["rejected"] == [{"item_id": "a", "reason": "unknown user 'g': not in prepared/sequences"}]
    # A user with a history but no candidates is not in the output.
    assert group(group_rows([{"user_id": "u2", "kind": "history", "items": ["a"]}])).num_rows == 0


def test_rank_candidates_ranks_within_each_user_and_keeps_top_k():
    from trsr.schema import SCORES_WITH_DIAGNOSTICS

    rows = [
        {"user_id": u, "candidate": c, "score": s, "method": "m", "summary_status": "ok", "logp_yes": -1.0, "logp_no": -1.0,
         "list_id": u, "split": "candidates", "label": 0, "position": 0}
        for u, c, s in [("u2", "x", 0.1), ("u1", "b", 0.5), ("u1", "a", 0.5), ("u1", "c", 0.9), ("u2", "y", 0.7)]
    ]
    batch = pa.Table.from_pylist(rows, schema=SCORES_WITH_DIAGNOSTICS)
    ranked = RankCandidates(None)(batch)
    assert ranked.schema.equals(CANDIDATE_SCORES)
    got = list(zip(ranked.column("user_id").to_pylist(), ranked.column("item_id").to_pylist(), ranked.column("rank").to_pylist()))
    # Highest score first; a tie is broken by item id.
    assert got == [("u1", "c", 1), ("u1", "a", 2), ("u1", "b", 3), ("u2", "y", 1), ("u2", "x", 2)]
    top = RankCandidates(1)(batch)
    assert top.column("item_id").to_pylist() == ["c", "y"]
