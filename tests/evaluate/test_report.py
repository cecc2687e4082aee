"""The evaluation report: every method on the same lists, intervals, Markdown/JSON/PNG."""

import json

import numpy as np
import pyarrow as pa
import pytest

from trsr import storage
from trsr.config import load
from trsr.schema import SCORES
from trsr.errors import TrsrError
from trsr.evaluate.report import evaluate, find_methods
from trsr.experiment import ExperimentConfig
from trsr.runs import RunFolder


def write_scores(run_dir, method, lists, scorer, split="test", size=21, **details):
    rows = []
    for n in range(lists):
        for c in range(size):
            label = int(c == n % size)  # the positive sits at a different place per list
            rows.append(dict(list_id=f"{split}:{n:04d}", split=split, user_id=f"u{n}", candidate=f"N{c}",
                             label=label, score=float(scorer(n, c, label)), method=method))
    table = pa.Table.from_pylist(rows, schema=SCORES)
    write_complete(run_dir, method, split, table, **details)


def write_complete(run_dir, method, split, table, **details):
    """Scores as the score stage leaves them: a data file and the folder's manifest."""
    folder = RunFolder(run_dir).scores(method, split)
    storage.write_parquet(table, folder.join("part-0.parquet"))
    folder.finish("by-hand", {}, **details)


def experiment(run_dir, *extra):
    return load(ExperimentConfig, None, [f"run_dir={run_dir}", "prepare.source.format=mind",
                                         "prepare.source.path=unused", "evaluate.bootstrap=300", *extra])


def evaluate_run(run_dir, *extra, **kwargs):
    exp = experiment(run_dir, *extra)
    return evaluate(exp.evaluate, exp.context(), **kwargs)


def test_perfect_constant_and_random_scorers(tmp_path):
    run = str(tmp_path / "run")
    rng = np.random.default_rng(0)
    write_scores(run, "perfect", 600, lambda n, c, label: label)
    write_scores(run, "constant", 600, lambda n, c, label: 0.5)
    write_scores(run, "random", 600, lambda n, c, label: rng.random())
    assert find_methods(run, "test") == ["constant", "perfect", "random"]

    result = evaluate_run(run)
    perfect, constant, random = (result["methods"][m] for m in ("perfect", "constant", "random"))
    for k in (3, 5, 10):
        assert perfect["metrics"][f"recall@{k}"] == 1.0 and perfect["intervals"][f"recall@{k}"] == [1.0, 1.0]
        assert perfect["metrics"][f"mrr@{k}"] == 1.0
    # The constant and the random scorer land at chance (k/21), within 4 standard errors.
    for row in (constant, random):
        for k in (3, 5, 10):
            p = k / 21
            assert abs(row["metrics"][f"recall@{k}"] - p) < 4 * (p * (1 - p) / 600) ** 0.5
            low, high = row["intervals"][f"recall@{k}"]
            assert low <= row["metrics"][f"recall@{k}"] <= high and high - low < 0.1
    assert constant["metrics"]["auc"] == 0.5
    assert result["chance"]["recall@3"] == pytest.approx(3 / 21)
    assert perfect["users"] == perfect["lists"] == 600

    md = storage.read_bytes(storage.join(run, "report", "test.md")).decode()
    header = md.splitlines()[2]
    assert header.split("|")[3:9] == [" Recall@3 ", " Recall@5 ", " Recall@10 ", " MRR@3 ", " MRR@5 ", " MRR@10 "]
    assert "| perfect | 600 | 1.0000 [1.000, 1.000]" in md
    assert json.loads(storage.read_bytes(storage.join(run, "report", "test.json")))["methods"].keys() == {
        "perfect", "constant", "random"}
    assert storage.read_bytes(storage.join(run, "report", "test.png"))[:4] == b"\x89PNG"

    # Deterministic: the same inputs and seed give the same report.
    assert evaluate_run(run, write=False)["methods"] == result["methods"]


def test_methods_are_compared_on_the_lists_they_share(tmp_path):
    run = str(tmp_path / "run")
    write_scores(run, "all", 50, lambda n, c, label: label)
    write_scores(run, "some", 20, lambda n, c, label: label)
    result = evaluate_run(run)
    assert result["lists"] == 20
    assert result["methods"]["all"]["lists"] == 20 and result["methods"]["all"]["lists_scored"] == 50
    assert "Lists scored per method" in storage.read_bytes(storage.join(run, "report", "test.md")).decode()
    only = evaluate_run(run, "evaluate.methods=[all]", write=False)
    assert only["lists"] == 50 and list(only["methods"]) == ["all"]


def test_missing_scores_and_bad_files_fail_clearly(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(TrsrError, match="no scores for split 'test'; run `trsr score`"):
        evaluate_run(run)
    write_scores(run, "a", 5, lambda n, c, label: label)
    with pytest.raises(TrsrError, match=r"scores/b/test: no complete scores"):
        evaluate_run(run, "evaluate.methods=[a, b]")
    bad = pa.table({"list_id": ["x"], "score": [0.1]})
    write_complete(run, "c", "test", bad)
    with pytest.raises(TrsrError, match=r"scores/c/test: missing column\(s\)"):
        evaluate_run(run)


def test_scores_made_from_other_prepared_data_are_left_out_and_refused_by_name(tmp_path):
    """Scores remember the prepared data they ranked; after the run is prepared again
    (another protocol, another source) a method not scored again is not compared."""
    run = str(tmp_path / "run")
    RunFolder(run).prepared_stage.finish("prepared-now", {})
    write_scores(run, "fresh", 30, lambda n, c, label: label, prepared="prepared-now")
    write_scores(run, "stale", 30, lambda n, c, label: label, prepared="prepared-before")
    write_scores(run, "by_hand", 30, lambda n, c, label: label)  # no record: taken as it is
    result = evaluate_run(run)
    assert sorted(result["methods"]) == ["by_hand", "fresh"]
    assert list(result["left_out"]) == ["stale"] and "prepared-before" in result["left_out"]["stale"]
    md = storage.read_bytes(storage.join(run, "report", "test.md")).decode()
    assert "Left out (scored from other prepared data; score them again): stale." in md
    with pytest.raises(TrsrError, match=r"scores/stale/test: scored from other prepared data .*score 'stale' again"):
        evaluate_run(run, "evaluate.methods=[fresh, stale]")


def test_evaluate_cli_prints_the_table(tmp_path, capsys):
    from trsr.cli import main

    run = str(tmp_path / "run")
    write_scores(run, "perfect", 30, lambda n, c, label: label)
    code = main(["evaluate", "--set", f"run_dir={run}", "--set", "prepare.source.format=mind",
                 "--set", "prepare.source.path=unused", "--config", str(write_yaml(tmp_path))])
    assert code == 0
    out = capsys.readouterr().out
    assert "| perfect | 30 | 1.0000" in out


def write_yaml(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("run_dir: x\nprepare:\n  source:\n    format: mind\n    path: unused\n")
    return path


def test_the_report_says_how_many_lists_each_llm_method_scored_without_a_summary(tmp_path):
    run = str(tmp_path / "run")
    write_scores(run, "llm-trsr-hierarchical", 40, lambda n, c, label: label)
    write_scores(run, "tallrec", 40, lambda n, c, label: label)
    write_scores(run, "ncf", 40, lambda n, c, label: 0.5)
    # The score stage's stats count lists by summary status.
    RunFolder(run).scores("llm-trsr-hierarchical", "test").finish("by-hand", {"summary_status": {"ok": 33, "over_length": 5, "missing": 2}})
    RunFolder(run).scores("tallrec", "test").finish("by-hand", {"summary_status": {"unused": 40}})
    result = evaluate_run(run)
    rows = result["methods"]
    assert rows["llm-trsr-hierarchical"]["lists_without_summary"] == 7
    assert rows["tallrec"]["lists_without_summary"] is None and rows["ncf"]["lists_without_summary"] is None
    md = storage.read_bytes(storage.join(run, "report", "test.md")).decode()
    assert "Lists scored without a usable summary (prompted with the recent items only): llm-trsr-hierarchical 7 of 40." in md


def test_the_report_shows_the_summaries_health_and_the_run_behind_it(tmp_path):
    run = str(tmp_path / "run")
    write_scores(run, "llm-trsr-recurrent", 40, lambda n, c, label: label)
    folder = RunFolder(run)
    folder.summaries("recurrent").finish("by-hand", {"seconds": 123.4, "status": {"ok": 30, "echo": 6, "missing": 4}})
    folder.scores("llm-trsr-recurrent", "test").finish(
        "by-hand", {"seconds": 56.0, "summary_status": {"ok": 40}}, model="smollm2-135m-instruct", adapter="/x/adapter"
    )
    result = evaluate_run(run)
    facts = result["run"]
    assert facts["summaries"] == {"recurrent": {"echo": 6, "missing": 4, "ok": 30}}
    assert facts["stage_seconds"] == {"summarize recurrent": 123.4, "score llm-trsr-recurrent": 56.0}
    assert facts["models"]["llm-trsr-recurrent"] == {"model": "smollm2-135m-instruct", "adapter": "/x/adapter"}
    md = storage.read_bytes(storage.join(run, "report", "test.md")).decode()
    assert "- recurrent: 30 of 36 summarized users usable (echo 6, missing 4, ok 30)" in md
    assert "- llm-trsr-recurrent: model smollm2-135m-instruct, adapter /x/adapter" in md
    assert "stage seconds: summarize recurrent 123, score llm-trsr-recurrent 56" in md
    assert "## Run" in md and "written " in md


def test_methods_are_grouped_by_family_and_every_method_has_its_own_colour():
    from trsr.evaluate.chart import method_colours
    from trsr.evaluate.examples import by_family

    families = {
        "random": "trivial", "llm-trsr-hierarchical": "llm", "ncf": "ctr", "gru4rec": "sequential",
        "popularity": "trivial", "din": "ctr", "dien": "ctr", "narm": "sequential", "sasrec": "sequential",
        "core": "sequential", "llm-trsr-recurrent": "llm", "mine": "other",
    }
    assert by_family(families) == [
        "llm-trsr-hierarchical", "llm-trsr-recurrent", "gru4rec", "narm", "sasrec", "core",
        "ncf", "din", "dien", "random", "popularity", "mine",
    ]
    colours = method_colours(families)
    assert len(set(colours.values())) == len(families)  # 12 methods, 12 colours
