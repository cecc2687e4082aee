"""Synthetic MIND-format data: deterministic, real format, length spread, learnable."""

from __future__ import annotations

import calendar
import time
from collections import Counter, defaultdict

import pytest

from trsr.data.config import MindSource, SyntheticConfig
from trsr.data.converters.mind import convert
from trsr.data.synthetic import generate_mind
from trsr.errors import ConfigError

CONFIG = SyntheticConfig(users=1500, items=1200, topics=8, rows_per_user=2, impressions=10, seed=3)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    stats = generate_mind(CONFIG, str(folder))
    return folder, stats, convert(MindSource(path=str(folder)))


def split(dataset):
    """{user: (history ids, click ids)} from converted sequences (history has no time)."""
    out = {}
    for row in dataset.sequences.to_pylist():
        pairs = list(zip(row["item_ids"], row["timestamps"]))
        out[row["user_id"]] = ([i for i, t in pairs if t is None], [i for i, t in pairs if t is not None])
    return out


def categories(dataset) -> dict[str, str]:
    return {r["item_id"]: r["attributes"][0]["value"] for r in dataset.items.to_pylist()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    config = SyntheticConfig(users=300, items=200, rows_per_user=2, seed=11)
    generate_mind(config, str(tmp_path / "a"))
    generate_mind(config, str(tmp_path / "b"))
    generate_mind(config.model_copy(update={"seed": 12}), str(tmp_path / "c"))
    for name in ("behaviors.tsv", "news.tsv"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes()
        assert a != (tmp_path / "c" / name).read_bytes()


def test_real_mind_format(generated):
    folder, stats, _ = generated
    news = (folder / "news.tsv").read_text().splitlines()
    assert len(news) == CONFIG.items
    assert all(len(line.split("\t")) == 8 for line in news)
    behaviors = (folder / "behaviors.tsv").read_text().splitlines()
    assert len(behaviors) == CONFIG.users * CONFIG.rows_per_user == stats["rows"]
    times = defaultdict(list)
    for line in behaviors:
        impression_id, user, when, history, impressions = line.split("\t")
        tokens = impressions.split(" ")
        assert len(tokens) == CONFIG.impressions
        assert sum(t.endswith("-1") for t in tokens) == 1
        assert sum(t.endswith("-0") for t in tokens) == CONFIG.impressions - 1
        assert all(t.startswith("N") for t in tokens + history.split())
        times[user].append(calendar.timegm(time.strptime(when, "%m/%d/%Y %I:%M:%S %p")))
    assert len(times) == CONFIG.users
    assert all(len(t) == CONFIG.rows_per_user and t == sorted(t) and len(set(t)) == len(t) for t in times.values())
    # MIND's time style: no zero padding ("11/9/2019 8:05:31 AM").
    assert behaviors[0].split("\t")[2].startswith("11/9/2019 ")


def test_converts_with_zero_rejects(generated):
    _, stats, dataset = generated
    assert len(dataset.rejects) == 0
    assert dataset.counts["rows_in"] == stats["rows"]
    assert dataset.counts["rows_rejected"] == 0
    assert dataset.counts["users_in"] == dataset.sequences.num_rows == CONFIG.users
    assert dataset.items.num_rows == CONFIG.items
    users = split(dataset)
    assert all(len(clicks) == CONFIG.rows_per_user for _, clicks in users.values())
    assert set(categories(dataset).values()) == set(stats["categories"])
    assert len(stats["categories"]) == CONFIG.topics


def test_history_lengths_mostly_in_range(generated):
    _, stats, dataset = generated
    lengths = [len(history) for history, _ in split(dataset).values()]
    inside = sum(CONFIG.min_history <= n <= CONFIG.max_history for n in lengths) / len(lengths)
    assert 0.9 <= inside <= 0.99
    assert any(n < CONFIG.min_history for n in lengths) and any(n > CONFIG.max_history for n in lengths)
    assert stats["users_history_out_of_range"] == round((1 - inside) * len(lengths))
    # In range, lengths spread over the whole interval.
    assert {n for n in lengths if CONFIG.min_history <= n <= CONFIG.max_history} == set(
        range(CONFIG.min_history, CONFIG.max_history + 1)
    )


def test_recent_and_long_term_history_predict_the_click(generated):
    _, _, dataset = generated
    category = categories(dataset)
    recent = overall = in_last = in_first = users = 0
    for history, clicks in split(dataset).values():
        if len(history) < 10:
            continue
        users += 1
        click = category[clicks[0]]
        recent += click == Counter(category[i] for i in history[-5:]).most_common(1)[0][0]
        overall += click in {c for c, _ in Counter(category[i] for i in history).most_common(2)}
        in_last += click in {category[i] for i in history[-5:]}
        in_first += click in {category[i] for i in history[:5]}
    chance = 1 / CONFIG.topics
    assert recent / users > 3 * chance  # recent items predict the click
    assert overall / users > 2.5 * 2 * chance  # the whole history carries long-term interests
    assert in_last / users > in_first / users + 0.15  # interests drift over time


def test_titles_reveal_their_topic(generated):
    """A word-count classifier fitted on half the titles finds the category of the rest."""
    folder, _, _ = generated
    rows = [line.split("\t") for line in (folder / "news.tsv").read_text().splitlines()]
    train, test = rows[::2], rows[1::2]
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in train:
        counts[row[1]].update(row[3].lower().split())
    correct = 0
    for row in test:
        words = row[3].lower().split()
        guess = max(counts, key=lambda c: sum(counts[c][w] / sum(counts[c].values()) for w in words))
        correct += guess == row[1]
    assert correct / len(test) > 0.9


def test_many_topics_and_tiny_configs(tmp_path):
    config = SyntheticConfig(users=50, items=40, topics=20, min_history=0, max_history=3, impressions=2)
    stats = generate_mind(config, str(tmp_path))
    dataset = convert(MindSource(path=str(tmp_path)))
    assert len(dataset.rejects) == 0
    assert len(set(categories(dataset).values())) == 20 == len(set(stats["categories"]))


@pytest.mark.parametrize(
    "update, key",
    [
        ({"min_history": 30, "max_history": 20}, "max_history"),
        ({"min_history": -1}, "min_history"),
        ({"items": 10, "topics": 11}, "items"),
    ],
)
def test_inconsistent_config_is_a_config_error(tmp_path, update, key):
    with pytest.raises(ConfigError, match=key):
        generate_mind(SyntheticConfig(**update), str(tmp_path))
