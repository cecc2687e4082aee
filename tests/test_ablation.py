"""benchmarks/ablation.py: the knob's value read from a config, the paired change, and its table."""

import pytest

from tests.conftest import benchmark_module


def test_knob_values_are_read_from_the_experiment_and_the_table_has_a_row_per_value():
    module = benchmark_module("ablation")
    recipe = module.quality_table.experiment_for("amazon_games_cpu", [])
    assert module.knob_value(recipe, "train.max_lists") == recipe.train.max_lists
    changed = module.quality_table.experiment_for("amazon_games_cpu", ["train.max_lists=384"])
    assert module.knob_value(changed, "train.max_lists") == 384 != module.knob_value(recipe, "train.max_lists")
    rows = [
        {"value": value, "users": 300, "metrics": {m: r for m in module.METRICS},
         "intervals": {m: [r - 0.05, r + 0.05] for m in module.METRICS},
         "training_lists": int(value), "training_texts": 4 * int(value), "train_seconds": 465.2, "score_seconds": None}
        for value, r in (("96", 0.577), ("384", 0.61))
    ]
    md = module.markdown({"dataset": "amazon_games_cpu", "variant": "tallrec", "knob": "train.max_lists", "rows": rows})
    assert (
        "| train.max_lists | users | Recall@3 | Recall@10 | MRR@10 | AUC | change against 96 (paired 95%) "
        "| training lists / texts | train s | score s |"
    ) in md
    assert "| 96 | 300 | 0.577 [0.527, 0.627] | 0.577 | 0.577 | 0.577 [0.527, 0.627] |  | 96 / 384 | 465 |  |" in md
    assert "| 384 | 300 | 0.610 [0.560, 0.660]" in md and "| 384 / 1536 |" in md
    rows[1]["change"] = {"recall@3": [0.033, 0.01, 0.06], "auc": [0.02, -0.01, 0.05]}
    md = module.markdown({"dataset": "amazon_games_cpu", "variant": "tallrec", "knob": "train.max_lists", "rows": rows})
    assert "| Recall@3 +0.033 [+0.010, +0.060]; AUC +0.020 [-0.010, +0.050] | 384 / 1536 |" in md


def test_the_change_is_paired_list_by_list():
    module = benchmark_module("ablation")
    # A third of the 30 lists gain 0.1 Recall@3 and nothing else moves: the paired
    # interval stays above 0 (the rows' own intervals would overlap widely); every
    # list gains 0.1 AUC: the interval is a point.
    base = {f"l{i}": {"recall@3": float(i % 2), "auc": 0.5} for i in range(30)}
    better = {k: {"recall@3": v["recall@3"] + (0.1 if int(k[1:]) % 3 == 0 else 0.0), "auc": float("nan") if k == "l0" else 0.6}
              for k, v in base.items()}
    mean, low, high = module.paired_change(base, better, "recall@3")
    assert mean == pytest.approx(0.1 / 3) and low > 0
    mean, low, high = module.paired_change(base, better, "auc")  # the NaN list left out
    assert mean == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    rows = module.with_changes([{"value": "a", "per_list": base}, {"value": "b", "per_list": better}])
    assert "change" not in rows[0] and "per_list" not in rows[1]
    assert rows[1]["change"]["recall@3"][0] == pytest.approx(0.1 / 3)
    with pytest.raises(ValueError, match="different lists"):
        module.paired_change(base, {"l0": base["l0"]}, "recall@3")
