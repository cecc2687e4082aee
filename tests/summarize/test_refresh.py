"""Incremental refresh (`trsr summarize --users all --update`): what is reused, and the
refreshed summaries against a from-scratch run."""

import csv
import shutil
from pathlib import Path

import pytest

from trsr.summarize.render import reusable, window_start
from trsr.summarize.state import HIERARCHICAL, RECURRENT

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own-data"


def node(step, index):
    return {"step": step, "index": index, "text": f"s{step}.{index}", "problem": None}


def earlier(history, intermediates, first=0):
    return {"history": history, "first_position": first, "intermediates": intermediates}


def state(history, first=0):
    return {"history": history, "first_position": first}


def test_reusable_nodes_cover_only_unchanged_blocks():
    old = [f"i{k}" for k in range(10)]  # blocks of 3: [0-2] [3-5] [6-8] [9]  (the last partial)
    tree = [node(0, i) for i in range(4)] + [node(1, 0), node(1, 1), node(2, 0)]
    # Two new items: block 3 changes (it was partial); blocks 0-2 are shared.
    reused = reusable(earlier(old, tree), state(old + ["n1", "n2"]), 3, 2, HIERARCHICAL)
    assert [(n["step"], n["index"]) for n in reused] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    # A merge of all blocks at once (fan_in null): only the block summaries.
    reused = reusable(earlier(old, tree), state(old + ["n1"]), 3, None, HIERARCHICAL)
    assert [(n["step"], n["index"]) for n in reused] == [(0, 0), (0, 1), (0, 2)]
    # Recurrent: the running summary after step s covers blocks 0..s.
    steps = [node(s, 0) for s in range(4)]
    assert [n["step"] for n in reusable(earlier(old, steps), state(old + ["n1"]), 3, 2, RECURRENT)] == [0, 1, 2]
    # Old history a whole number of blocks: every old node stands.
    nine = old[:9]
    assert [n["step"] for n in reusable(earlier(nine, steps[:3]), state(nine + ["n1"]), 3, 2, RECURRENT)] == [0, 1, 2]
    # A rewritten history, or a window that moved: nothing.
    assert reusable(earlier(old, steps), state(["x"] + old[1:] + ["n1"]), 3, 2, RECURRENT) == []
    assert reusable(earlier(old, steps), state(old + ["n1"], first=3), 3, 2, RECURRENT) == []


def test_window_start_moves_by_whole_blocks():
    assert [window_start(n, 3, 2) for n in (0, 3, 6, 7, 9, 10)] == [0, 0, 0, 3, 3, 6]
    assert window_start(100, 3, None) == 0


def write_interactions(path: Path, rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "timestamp"])
        writer.writerows(rows)


@pytest.mark.integration
def test_update_recomputes_only_changed_users_and_equals_a_fresh_run(tmp_path, tiny_model, ray_local):
    from trsr import storage
    from trsr.config import load
    from trsr.data.prepare import prepare
    from trsr.experiment import ExperimentConfig
    from trsr.summarize.job import read_summaries, summarize

    with (EXAMPLE / "interactions.csv").open() as handle:
        rows = [tuple(r) for r in csv.reader(handle)][1:]
    users = sorted({r[0] for r in rows})[:20]
    rows = [r for r in rows if r[0] in users]
    items = sorted({r[1] for r in rows})
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(EXAMPLE / "items.csv", data / "items.csv")
    write_interactions(data / "interactions.csv", rows)

    def experiment(run_dir):
        return load(
            ExperimentConfig,
            None,
            [
                f"run_dir={run_dir}",
                "prepare.source.format=generic",
                f"prepare.source.path={data}",
                "prepare.source.interactions=interactions.csv",
                "prepare.source.items=items.csv",
                "prepare.source.user_column=user_id",
                "prepare.source.item_column=item_id",
                "prepare.source.time_column=timestamp",
                "prepare.source.attributes=[title]",
                "prepare.protocol.min_history=4",
                "prepare.protocol.max_history=40",
                "summarize.users=all",
                "summarize.items_per_block=4",
                "summarize.fan_in=2",
                "summarize.users_per_batch=12",
                "summarize.execution=fused",
                f"summarize.engine.model={tiny_model}",
                "summarize.engine.max_model_len=1024",
                "summarize.engine.dtype=float32",
                "summarize.generation.max_new_tokens=8",
                "summarize.generation.retry_temperature=0",
            ],
        )

    run = tmp_path / "run"
    exp = experiment(run)
    prepare(exp.prepare, exp.context())
    first = summarize(exp.summarize, exp.context())["modes"]
    before = {mode: read_summaries(str(run), mode, users="all").to_pylist() for mode in ("hierarchical", "recurrent")}

    # New interactions: 1, 2, 4 and 9 new items for four users (the last block partial
    # or exactly filled before), and a new user.
    changed = {users[0]: 1, users[1]: 2, users[2]: 4, users[3]: 9}
    stamp = "2030-01-01T00:00:%02dZ"
    extra = [(user, items[(7 * n + k) % len(items)], stamp % k) for n, (user, count) in enumerate(changed.items()) for k in range(count)]
    extra += [("U-new", items[k], stamp % k) for k in range(6)]
    write_interactions(data / "interactions.csv", rows + extra)
    prepare(exp.prepare, exp.context())
    stats = summarize(exp.summarize, exp.context(), update=True)["modes"]

    fresh_run = tmp_path / "fresh"
    fresh_exp = experiment(fresh_run)
    prepare(fresh_exp.prepare, fresh_exp.context())
    fresh = summarize(fresh_exp.summarize, fresh_exp.context())["modes"]
    for mode in ("hierarchical", "recurrent"):
        s = stats[mode]
        assert s["update"] is True
        assert s["refresh"] == {"unchanged": len(users) - 4, "updated": 4, "new": 1}
        # Far fewer engine calls than summarizing everyone again.
        assert s["calls"] < fresh[mode]["calls"] / 3 and s["calls"] > 0
        updated = {r["user_id"]: r for r in read_summaries(str(run), mode, users="all").to_pylist()}
        scratch = {r["user_id"]: r for r in read_summaries(str(fresh_run), mode, users="all").to_pylist()}
        assert sorted(updated) == sorted(scratch) == sorted(users + ["U-new"])
        earlier_rows = {r["user_id"]: r for r in before[mode]}
        for user, row in updated.items():
            # Greedy decoding: the same summaries as a from-scratch run on the new histories.
            assert (row["summary"], row["status"], row["items"], row["blocks"]) == (
                scratch[user]["summary"], scratch[user]["status"], scratch[user]["items"], scratch[user]["blocks"]
            ), (mode, user)
            assert row["intermediates"] == scratch[user]["intermediates"], (mode, user)
            if user not in changed and user != "U-new":
                assert row == dict(earlier_rows[user], refresh="unchanged")  # the earlier row, as it was
        assert sum(updated[u]["calls"] for u in (*changed, "U-new")) == s["calls"]
        assert first[mode]["refresh"] == {"new": len(users)}
    # The earlier rows and the update's input are gone; a second update is up to date.
    assert not storage.exists(str(run / "user_summaries" / "hierarchical.previous"))
    assert summarize(exp.summarize, exp.context(), update=True)["skipped"] is True
