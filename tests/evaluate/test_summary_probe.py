"""The report's summary probe, with the real item encoder (all-minilm-l6-v2): a summary
about the user ranks like the history mean, a generic one like another user's."""

import pyarrow as pa
import pytest

from trsr import storage
from trsr.data.embeddings import EncoderConfig, compute_embeddings
from trsr.evaluate.report import markdown
from trsr.runs import RunFolder, remove
from trsr.errors import TrsrError
from trsr.schema import ITEMS, SUMMARIES

from tests.evaluate.test_report import evaluate_run, experiment, write_scores

TOPICS = {
    "football": ["Premier League match report: late goal wins the derby", "Football transfer news: striker signs",
                 "World Cup qualifier: national team beats rivals", "Goalkeeper saves penalty in cup final",
                 "Football manager sacked after five defeats", "Champions League draw sets up clash"],
    "baking": ["Chocolate cake recipe with ganache", "How to bake sourdough bread at home",
               "Lemon tart with a buttery crust", "Cinnamon rolls, soft and sweet",
               "Baking tips: why your cookies spread", "Banana bread with walnuts"],
    "space": ["NASA rover finds ancient lake on Mars", "Astronomers spot a new exoplanet",
              "Rocket launch puts telescope in orbit", "Astronauts return from the space station",
              "Black hole image from a radio telescope", "Moon mission lands near the south pole"],
    "gardening": ["Growing tomatoes in containers", "Pruning roses in early spring",
                  "How to compost kitchen scraps", "Planting tulip bulbs in autumn",
                  "Lawn care: mowing height and watering", "Herb garden for a sunny windowsill"],
}
GOOD = {"football": "Follows football closely: match reports, transfers and cup games.",
        "baking": "Bakes at home: cakes, bread, tarts and cookie recipes.",
        "space": "Fascinated by space: Mars rovers, telescopes, rockets and astronauts.",
        "gardening": "A keen gardener: tomatoes, roses, compost, bulbs and lawn care."}
GENERIC = "The user enjoys reading a wide variety of interesting articles every day."


def write_run(run_dir, lists=48):
    """Items of four topics; each list's history and positive are from one topic, its 18
    negatives from the others. summaries/hierarchical says the topic, summaries/recurrent
    says nothing about the user; 8 lists of each mode have an unusable summary."""
    run = RunFolder(run_dir)
    ids = {topic: [f"{topic[:2]}{i}" for i in range(len(titles))] for topic, titles in TOPICS.items()}
    items = [{"item_id": ids[t][i], "attributes": [{"name": "title", "value": title}]}
             for t, titles in TOPICS.items() for i, title in enumerate(titles)]
    storage.write_parquet(pa.Table.from_pylist(items, schema=ITEMS), run.items())
    run.prepared_stage.finish("by-hand", {})  # prepared: what the embeddings are keyed by
    topics = list(TOPICS)
    for mode in ("hierarchical", "recurrent"):
        rows = []
        for n in range(lists):
            topic = topics[n % 4]
            others = [item for t in topics if t != topic for item in ids[t]]
            candidates = others[: n % 19] + [ids[topic][5]] + others[n % 19:]
            bad = n % 6 == 0
            rows.append(dict(
                list_id=f"test:{n:04d}", split="test", user_id=f"u{n}", list_index=0,
                history=ids[topic][:5], candidates=candidates, labels=[int(c == ids[topic][5]) for c in candidates],
                mode=mode, summary=(GOOD[topic] if mode == "hierarchical" else GENERIC),
                status="over_length" if bad else "ok", model="tiny-summarizer",
                first_position=0, last_position=4,
            ))
        folder = run.summaries(mode)
        storage.write_parquet(pa.Table.from_pylist(rows, schema=SUMMARIES), folder.join("part-0.parquet"))
        folder.finish("by-hand", {})
    write_scores(run_dir, "popularity", lists, lambda n, c, label: 0.0)
    return run


def test_probe_tells_a_summary_about_the_user_from_a_generic_one(tmp_path):
    run_dir = str(tmp_path / "run")
    write_run(run_dir)
    result = evaluate_run(run_dir)
    probe = result["summary_probe"]
    assert set(probe) == {"hierarchical", "recurrent"}
    for mode in probe.values():
        # 8 of 48 lists have an unusable summary: left out of the probe, counted.
        assert (mode["lists"], mode["usable"], mode["probed"]) == (48, 40, 40)
        assert mode["model"] == ["tiny-summarizer"] and mode["k"] == 3
    good, generic = probe["hierarchical"]["rankers"], probe["recurrent"]["rankers"]
    # The history mean is the same ranker in both modes (same lists, same covered items).
    assert good["history_mean"] == generic["history_mean"]
    assert good["history_mean"]["metrics"]["recall@3"] > 0.9
    # A summary naming the topic ranks like the history; it beats another user's summary.
    assert good["summary"]["metrics"]["recall@3"] > 0.9 and probe["hierarchical"]["recall_ratio"] > 0.9
    assert good["other_user"]["metrics"]["recall@3"] < 0.5
    # The same generic text for everyone carries nothing: it ranks like another user's.
    assert generic["summary"]["metrics"]["recall@3"] == generic["other_user"]["metrics"]["recall@3"]
    assert probe["recurrent"]["recall_ratio"] < probe["hierarchical"]["recall_ratio"] - 0.3
    md = storage.read_bytes(storage.join(run_dir, "report", "test.md")).decode()
    assert "## How much of the user is in the summary" in md
    assert "| hierarchical | tiny-summarizer | 40 of 40 usable (48 lists) | summary |" in md
    assert "## How much of the user is in the summary" in markdown(result, full=False)
    # Deterministic: the same run and seed give the same probe.
    assert evaluate_run(run_dir, write=False)["summary_probe"] == probe


def test_probe_samples_max_lists_and_can_be_turned_off(tmp_path):
    run_dir = str(tmp_path / "run")
    write_run(run_dir)
    sampled = evaluate_run(run_dir, "evaluate.summary_probe.max_lists=10", write=False)["summary_probe"]
    assert sampled["hierarchical"]["probed"] == 10 and sampled["hierarchical"]["usable"] == 40
    again = evaluate_run(run_dir, "evaluate.summary_probe.max_lists=10", write=False)["summary_probe"]
    assert again == sampled  # the seeded sample: the same lists every time
    off = evaluate_run(run_dir, "evaluate.summary_probe.enabled=false", write=False)
    assert off["summary_probe"] == {}
    assert "How much of the user" not in markdown(off)


def test_probe_reads_the_baselines_item_vectors_when_they_are_up_to_date(tmp_path, ray_local):
    """With an up-to-date embeddings folder the probe reuses its item vectors: the same
    figures as encoding the items itself."""
    run_dir = str(tmp_path / "run")
    write_run(run_dir)
    encoded_here = evaluate_run(run_dir, write=False)["summary_probe"]
    exp = experiment(run_dir)
    info = compute_embeddings(EncoderConfig(), exp.context())
    assert info["items"] == 24
    reused = evaluate_run(run_dir, write=False)["summary_probe"]
    for mode in reused:
        for name, ranker in reused[mode]["rankers"].items():
            for metric, value in ranker["metrics"].items():
                assert value == pytest.approx(encoded_here[mode]["rankers"][name]["metrics"][metric], abs=0.03)


def test_summaries_without_scores_give_a_report_with_the_probe_only(tmp_path):
    """Comparing summarizers needs no scoring: the report has the probe alone."""
    run_dir = str(tmp_path / "run")
    run = write_run(run_dir)
    remove(run.stage_dir(RunFolder.SCORES))
    result = evaluate_run(run_dir)
    assert result["methods"] == {} and result["summary_probe"]["hierarchical"]["probed"] == 40
    md = storage.read_bytes(storage.join(run_dir, "report", "test.md")).decode()
    assert md.startswith("# test split: no scored method yet; the summary probe only")
    assert "| hierarchical | tiny-summarizer | 40 of 40 usable (48 lists) | summary |" in md
    with pytest.raises(TrsrError, match="no scores for split 'test'"):
        evaluate_run(run_dir, "evaluate.summary_probe.enabled=false")


def test_a_mode_without_any_usable_summary_is_reported_as_such(tmp_path):
    """A tiny or failing summarizer: every summary flagged; the probe says so."""
    run_dir = str(tmp_path / "run")
    run = write_run(run_dir)
    for mode in ("hierarchical", "recurrent"):
        folder = run.summaries(mode)
        table = folder.read()
        table = table.set_column(table.schema.get_field_index("status"), "status",
                                 pa.array(["echo"] * table.num_rows, pa.string()))
        remove(folder.path)
        storage.write_parquet(table.cast(SUMMARIES), folder.join("part-0.parquet"))
        folder.finish("by-hand", {})
    result = evaluate_run(run_dir)
    assert {m: (r["usable"], r["probed"], "rankers" in r) for m, r in result["summary_probe"].items()} == {
        "hierarchical": (0, 0, False), "recurrent": (0, 0, False)}
    assert "| hierarchical | tiny-summarizer | 0 of 0 usable (48 lists) | (no usable summary) |" in markdown(result)
