import pyarrow as pa
import pyarrow.compute as pc
import pytest

from trsr.data.config import ProtocolConfig
from trsr.data import protocol
from trsr.data.rejects import Rejects
from trsr.schema import SAMPLES, SEQUENCES


def make_sequences(lengths: dict[str, int], catalogue: int = 200) -> tuple[pa.Table, list[str]]:
    """User u gets items i0, i1, ... (offset per user so histories differ)."""
    items = [f"i{k}" for k in range(catalogue)]
    users, item_ids = [], []
    for n, (user, length) in enumerate(sorted(lengths.items())):
        users.append(user)
        item_ids.append([items[(7 * n + k) % catalogue] for k in range(length)])
    table = pa.table(
        {"user_id": users, "item_ids": item_ids, "timestamps": [None] * len(users)}, schema=SEQUENCES
    )
    return table, items


def build(sequences, catalogue, seed=1, **overrides):
    rejects = Rejects()
    config = ProtocolConfig(**overrides)
    return protocol.build_samples(sequences, catalogue, config, seed, rejects), rejects


def test_lists_have_one_positive_the_target_and_negatives_outside_history():
    sequences, catalogue = make_sequences({f"u{k}": 16 for k in range(60)})
    result, _ = build(sequences, catalogue)
    by_user = dict(zip(sequences.column("user_id").to_pylist(), sequences.column("item_ids").to_pylist()))
    for split, negatives in (("train", 1), ("valid", 20), ("test", 20)):
        table = result.samples[split]
        assert table.schema.equals(SAMPLES)
        for lid in pc.unique(table.column("list_id")).to_pylist():
            rows = table.filter(pc.equal(table.column("list_id"), lid)).to_pylist()
            user = rows[0]["user_id"]
            assert len(rows) == negatives + 1
            assert [r["candidate"] for r in rows if r["label"] == 1] == [by_user[user][-1]]
            assert rows[0]["history"] == by_user[user][:-1]
            negs = {r["candidate"] for r in rows if r["label"] == 0}
            assert len(negs) == negatives  # distinct
            assert not negs & set(by_user[user])  # never in history or the target
            assert sorted(r["position"] for r in rows) == list(range(negatives + 1))
    assert result.users_per_split == {"train": 48, "valid": 6, "test": 6}


def test_positive_position_is_shuffled_not_always_first():
    sequences, catalogue = make_sequences({f"u{k}": 12 for k in range(200)})
    result, _ = build(sequences, catalogue, users={"train": 0.0, "valid": 0.0, "test": 1.0})
    test = result.samples["test"]
    positions = test.filter(pc.equal(test.column("label"), 1)).column("position").to_pylist()
    assert len(positions) == 200
    assert len(set(positions)) > 10  # spread over the 21 slots
    assert sum(p == 0 for p in positions) < 40


def test_same_seed_same_samples_other_seed_differs():
    sequences, catalogue = make_sequences({f"u{k}": 15 for k in range(50)})
    first, _ = build(sequences, catalogue, seed=3)
    second, _ = build(sequences, catalogue, seed=3)
    other, _ = build(sequences, catalogue, seed=4)
    for split in ("train", "valid", "test"):
        assert first.samples[split].equals(second.samples[split])
    assert not all(first.samples[s].equals(other.samples[s]) for s in ("train", "valid", "test"))


def test_split_does_not_depend_on_input_order():
    sequences, catalogue = make_sequences({f"u{k}": 15 for k in range(50)})
    reversed_ = sequences.take(pa.array(list(range(sequences.num_rows))[::-1]))
    a, _ = build(sequences, catalogue)
    b, _ = build(reversed_, catalogue)
    for split in ("train", "valid", "test"):
        assert a.samples[split].equals(b.samples[split])


def test_length_filter_and_accounting_add_up():
    lengths = {"short": 5, "ok10": 11, "ok25": 26, "long": 27, "empty": 0}
    lengths.update({f"u{k}": 14 for k in range(20)})
    sequences, catalogue = make_sequences(lengths)
    result, rejects = build(sequences, catalogue, users={"train": 0.5, "valid": 0.2, "test": 0.2})
    assert result.users_in == 25
    total = sum(result.users_per_split.values()) + sum(result.excluded.values())
    assert total == 25
    protocol_rejects = rejects.table().to_pylist()
    reasons = {r["user_id"]: r["reason"] for r in protocol_rejects}
    assert reasons["short"].startswith("history shorter than min_history")
    assert reasons["long"].startswith("history longer than max_history")
    assert reasons["empty"] == "empty sequence"
    # Boundary lengths (10 and 25 history items) are eligible: at most "not sampled".
    for user in ("ok10", "ok25"):
        assert reasons.get(user, "not sampled").startswith("not sampled")
    # Eligible = 22 users: 0.2 -> 4 test, 4 valid, 0.5 -> 11 train, 3 not sampled.
    assert result.users_per_split == {"train": 11, "valid": 4, "test": 4}
    assert result.excluded["not sampled (split sizes reached)"] == 3


def test_truncate_keeps_most_recent_items():
    sequences, catalogue = make_sequences({"long": 31})
    result, _ = build(
        sequences, catalogue, long_history="truncate", users={"train": 0.0, "valid": 0.0, "test": 1.0}
    )
    row = result.samples["test"].to_pylist()[0]
    full = sequences.column("item_ids")[0].as_py()
    assert row["history"] == full[-26:-1]


def test_truncate_never_draws_negatives_from_the_older_history():
    # 61 items of an 81-item catalogue: the 20 the user never saw are the only negatives,
    # though only the 25 most recent history items are shown.
    sequences, catalogue = make_sequences({"long": 61}, catalogue=81)
    result, _ = build(
        sequences, catalogue, long_history="truncate", users={"train": 0.0, "valid": 0.0, "test": 1.0}
    )
    rows = result.samples["test"].to_pylist()
    full = sequences.column("item_ids")[0].as_py()
    assert len(rows[0]["history"]) == 25
    negatives = {r["candidate"] for r in rows if r["label"] == 0}
    assert negatives == set(catalogue) - set(full)


def test_counts_in_split_sizes_and_test_filled_first():
    sequences, catalogue = make_sequences({f"u{k}": 12 for k in range(30)})
    result, _ = build(sequences, catalogue, users={"train": 100, "valid": 10, "test": 10})
    assert result.users_per_split == {"train": 10, "valid": 10, "test": 10}


def test_catalogue_too_small_is_excluded_with_reason():
    sequences, catalogue = make_sequences({"u": 15}, catalogue=20)
    result, rejects = build(sequences, catalogue, users={"train": 0.0, "valid": 0.0, "test": 1.0})
    assert result.users_per_split["test"] == 0
    assert rejects.table().column("reason").to_pylist() == ["catalogue too small for 20 negatives"]


def test_invalid_protocol_config_is_rejected():
    with pytest.raises(ValueError, match="min_history"):
        ProtocolConfig(min_history=30, max_history=25)
    with pytest.raises(ValueError, match="fractions"):
        ProtocolConfig(users={"train": 0.8, "valid": 0.2, "test": 0.2})
