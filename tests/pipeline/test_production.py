"""The production path of the README ("Score your own candidates") on a tiny random
model, through the command line: prepare -> summarize every user -> score your own
candidates; then the next day's interactions, an --update that recomputes only the
users with new reads, and the candidates again.

The recommender is the LoRA adapter that `trsr train` made in the shared pipeline run
(tests/pipeline/conftest.py), passed with score.engine.lora_adapter: the README's
`trsr summarize` (training users) and `trsr train` steps are the same commands that
run there, and repeating them here cost CI two minutes for nothing new."""

import csv
from pathlib import Path

import pytest

from trsr import storage
from trsr.cli import main
from trsr.recommend.candidates import read_candidate_scores
from trsr.schema import CANDIDATE_SCORES

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own-data"
RECIPE = str(ROOT / "jobs" / "configs" / "production.yaml")

pytestmark = pytest.mark.integration


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_production_path_scores_own_candidates_and_refreshes_only_changed_users(tmp_path, tiny_model, finished_run, capsys):
    _, trained = finished_run
    adapter = trained["train llm-trsr-hierarchical"]["best_adapter"]
    # The example bookshop cut to 24 readers (and the new reader of day 2), for time.
    day1, day2 = read_csv(EXAMPLE / "interactions.csv"), read_csv(EXAMPLE / "interactions-day2.csv")
    readers = sorted({r["user_id"] for r in day1})
    with_new_reads = sorted({r["user_id"] for r in day2[len(day1):]} & set(readers))
    users = sorted(set(readers[:20]) | set(with_new_reads[:4]))
    keep = set(users) | {"U0121"}
    data = tmp_path / "data"
    data.mkdir()
    (data / "items.csv").write_bytes((EXAMPLE / "items.csv").read_bytes())
    write_csv(data / "interactions.csv", [r for r in day1 if r["user_id"] in keep])
    write_csv(data / "interactions-day2.csv", [r for r in day2 if r["user_id"] in keep])
    candidates = [r for r in read_csv(EXAMPLE / "candidates.csv") if r["user_id"] in keep]
    candidates += [
        {"user_id": "ghost", "item_id": "B0001"},
        {"user_id": users[0], "item_id": "B9999"},
        {"user_id": users[1], "item_id": candidates[20]["item_id"]},  # users[1]'s first, again
        {"user_id": users[2], "item_id": ""},
    ]
    write_csv(data / "candidates.csv", candidates)

    args = [
        "--config", RECIPE,
        "--set", f"run_dir={tmp_path / 'run'}",
        "--set", f"prepare.source.path={data}",
        "--set", "prepare.protocol.min_history=8",
        "--set", "prepare.protocol.users={train: 16, valid: 4, test: 4}",
        "--set", "summarize.engine.backend=transformers",  # vLLM's summarize job is tested in tests/summarize
        "--set", f"summarize.engine.model={tiny_model}",
        "--set", "summarize.engine.dtype=float32",
        "--set", "summarize.generation.max_new_tokens=8",
        "--set", f"score.engine.model={tiny_model}",
        "--set", f"score.engine.lora_adapter={adapter}",
        "--set", "score.engine.dtype=float32",
        "--set", "score.prompt.max_missing_summary_share=1",  # the tiny model's summaries are flagged
    ]
    day2_args = [*args, "--set", "prepare.source.interactions=interactions-day2.csv"]
    for command in (["data", "prepare"], ["summarize", "--users", "all"]):
        assert main([*command, *args]) == 0, command
    run = tmp_path / "run"

    out = tmp_path / "ranked"
    assert main(["score", *args, "--candidates", str(data / "candidates.csv"), "--top-k", "5", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    n = len(users)
    assert f"score candidates llm-trsr-hierarchical: {n + 1} users and {20 * n + 4} candidates in the file; {n} users scored" in printed
    table = read_candidate_scores(str(out))
    assert table.schema.equals(CANDIDATE_SCORES)
    ranked: dict = {}
    for row in table.to_pylist():
        ranked.setdefault(row["user_id"], []).append(row)
    # Every user of the file: in the output (the best 5, ranks 1..5, best first) or in
    # the rejects with the reason; no candidate lost.
    assert sorted(ranked) == users
    for rows in ranked.values():
        assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
        assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    rejects = storage.read_parquet(str(out / "_rejects.parquet"))
    reasons = dict(zip(rejects.column("user_id").to_pylist(), rejects.column("reason").to_pylist()))
    assert sorted(reasons) == sorted(["ghost", *users[:3]])
    assert reasons["ghost"].startswith("unknown user") and reasons[users[0]].startswith("unknown item")
    assert reasons[users[1]] == "duplicate candidate of this user" and reasons[users[2]] == "item_id is empty"
    assert (run / "candidates" / "llm-trsr-hierarchical" / "input").exists()
    # Every user summarized over their whole history, keyed by user id.
    histories: dict = {}
    for row in read_csv(data / "interactions.csv"):
        histories[row["user_id"]] = histories.get(row["user_id"], 0) + 1
    from trsr.summarize.job import read_summaries

    summaries = read_summaries(str(run), "hierarchical", users="all").to_pylist()
    assert sorted(r["user_id"] for r in summaries) == users
    for row in summaries:
        n = histories[row["user_id"]]
        assert (row["first_position"], row["last_position"], row["items"], row["blocks"]) == (0, n - 1, n, -(-n // 5))

    # Day 2: new reads for a few readers, a new reader. Only they are summarized again.
    changed = {r["user_id"] for r in day2[len(day1):] if r["user_id"] in keep}
    assert 4 <= len(changed - {"U0121"}) < 12
    before = {r["user_id"]: r for r in read_summaries(str(run), "hierarchical", users="all").to_pylist()}  # every file
    assert main(["data", "prepare", *day2_args]) == 0
    assert main(["summarize", *day2_args, "--users", "all", "--update"]) == 0
    printed = capsys.readouterr().out
    unchanged = len(users) - len(changed - {"U0121"})
    assert f"update: {unchanged} users unchanged, {len(changed) - 1} updated, 1 new, 0 recomputed" in printed
    after = read_summaries(str(run), "hierarchical", users="all").to_pylist()
    assert {r["user_id"] for r in after if r["refresh"] != "unchanged"} == changed
    for row in after:
        if row["user_id"] not in changed:
            assert row["summary"] == before[row["user_id"]]["summary"] and row["calls"] == before[row["user_id"]]["calls"]

    # The candidates again after the update (the list-per-user formats are unit-tested
    # in tests/recommend/test_candidates.py): every known user ranked with the new summaries.
    assert main(["score", *day2_args, "--candidates", str(data / "candidates.csv"), "--top-k", "3"]) == 0
    table = read_candidate_scores(str(run / "candidates" / "llm-trsr-hierarchical" / "scores"))
    assert sorted(set(table.column("user_id").to_pylist())) == users and table.num_rows == 3 * len(users)
