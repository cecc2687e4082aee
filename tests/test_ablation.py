"""benchmarks/ablation.py: the knob's value read from a config, and its table."""

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
    assert "| train.max_lists | users | Recall@3 | Recall@10 | MRR@10 | AUC | training lists / texts | train s | score s |" in md
    assert "| 96 | 300 | 0.577 [0.527, 0.627] | 0.577 | 0.577 | 0.577 [0.527, 0.627] | 96 / 384 | 465 |  |" in md
    assert "| 384 | 300 | 0.610 [0.560, 0.660]" in md and "| 384 / 1536 |" in md
