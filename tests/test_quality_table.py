"""benchmarks/quality_table.py's table: every method's row with its AUC and no-summary
count, the chance row, the summary probe and the stage seconds."""

from tests.conftest import benchmark_module


def table_module():
    return benchmark_module("quality_table")


def row(value, without=None):
    names = [f"{m}@{k}" for m in ("recall", "mrr") for k in (3, 5, 10)] + ["auc"]
    return {"metrics": {n: value for n in names}, "intervals": {n: [value - 0.05, value + 0.05] for n in names},
            "users": 300, "lists_scored": 300, "lists_without_summary": without}


def test_markdown_has_every_method_the_no_summary_counts_the_probe_and_stage_seconds():
    module = table_module()
    probe = {"hierarchical": {"model": ["smollm2-135m-instruct"], "lists": 300, "usable": 287, "probed": 287, "k": 3,
                              "recall_ratio": 0.64,
                              "rankers": {name: {"metrics": {"recall@3": v, "mrr@3": v / 2},
                                                 "intervals": {"recall@3": [v - 0.05, v + 0.05], "mrr@3": [0.0, 1.0]}}
                                          for name, v in (("summary", 0.31), ("history_mean", 0.48), ("other_user", 0.18))}}}
    table = {"dataset": "amazon_games_cpu", "lists": 300, "chance": {**{f"recall@{k}": k / 21 for k in (3, 5, 10)},
                                                                     **{f"mrr@{k}": 0.1 for k in (3, 5, 10)}, "auc": 0.5},
             "methods": {"llm-trsr-hierarchical": row(0.4, without=13), "sasrec": row(0.5)},
             "baselines": {"sasrec": {"seconds": 12.0, "best_epoch": 6}},
             "summary_probe": probe, "stage_seconds": {"summarize hierarchical": 569.0, "score sasrec": 3.0}}
    md = module.markdown([table])
    assert "| method | users | Recall@3 | Recall@5 | Recall@10 | MRR@3 | MRR@5 | MRR@10 | AUC | no summary |" in md
    assert "| llm-trsr-hierarchical | 300 | 0.400 [0.350, 0.450]" in md and md.count("13 of 300") == 1
    sasrec = next(line for line in md.splitlines() if line.startswith("| sasrec "))
    assert sasrec.endswith("| 0.500 [0.450, 0.550] |  |")  # a baseline reads no summary
    assert "| (chance) |  | 0.143 |" in md
    assert "### How much of the user is in the summary" in md
    assert "| hierarchical | smollm2-135m-instruct | 287 of 287 usable (300 lists) | summary |" in md
    assert "Stage seconds: summarize hierarchical 569, score sasrec 3." in md
