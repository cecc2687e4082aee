"""One knob, several values, one LLM variant: what moves the LLM rows of the quality table.

    .venv/bin/python benchmarks/ablation.py       # TALLRec-style on amazon-games-6k, 96 vs 384 training lists
    .venv/bin/python benchmarks/ablation.py --variant hierarchical --knob train.epochs --values 1 3 6

Each value is a run of the variant with the pipeline `trsr run` uses (every stage
skipped when up to date) on the quality table's prepared lists
(benchmarks/quality_table.py's run folder, prepared there first when absent), so every
value is scored on the same test lists. The recipe's own value is the quality table's
run folder itself (nothing recomputed when that table was made); any other value gets
a folder benchmarks/results/cache/ablation/<dataset>/<variant>/<knob>=<value>/ whose
prepared/ links to it. A variant that reads summaries summarizes in each folder (its
summarizer time counts); TALLRec-style reads none, which is why it is the default: the
training users can grow without summarizer time.

Prints a table (Recall@3, Recall@10, MRR@10, AUC with 95% intervals; each value's change
of Recall@3 and AUC against the first value, on the same lists, with a paired bootstrap
interval; training lists and texts; train and score seconds) and writes
benchmarks/results/ablation-<dataset>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_table  # noqa: E402  (benchmarks/ is no package; this puts the repo on sys.path)
from trsr.experiment import ExperimentConfig  # noqa: E402

RESULTS = quality_table.RESULTS
CACHE = RESULTS / "cache" / "ablation"
METRICS = ("recall@3", "recall@10", "mrr@10", "auc")
# Compared with the first value list by list: both rankings score the same test lists, so
# the difference's interval is much narrower than the two rows' intervals suggest.
PAIRED = ("recall@3", "auc")
LABELS = {"recall@3": "Recall@3", "auc": "AUC"}


def knob_value(experiment: ExperimentConfig, knob: str):
    """The value of a dotted config key, e.g. train.max_lists."""
    value = experiment
    for part in knob.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def run_value(dataset: str, variant: str, knob: str, value: str, extra: list[str]) -> dict:
    """Train and score `variant` with knob=value; its row of the table."""
    from trsr import storage
    from trsr.data.prepare import prepare
    from trsr.evaluate.report import evaluate
    from trsr.pipeline import run_pipeline

    recipe = quality_table.experiment_for(dataset, extra)
    overrides = [f"variants=[{variant}]", "with_baselines=false", *extra, f"{knob}={value}"]
    experiment = quality_table.experiment_for(dataset, overrides)
    if str(knob_value(experiment, knob)) != str(knob_value(recipe, knob)):
        folder = CACHE / dataset / variant / f"{knob}={value}"
        folder.mkdir(parents=True, exist_ok=True)
        prepare(recipe.prepare, recipe.context())  # skipped when up to date
        link = folder / "prepared"
        if not link.exists():
            os.symlink(Path(recipe.run_dir) / "prepared", link)
        experiment = quality_table.experiment_for(dataset, [*overrides, f"run_dir={folder}"])
    run_pipeline(experiment)
    method = experiment.for_variant(variant).score.method_name
    report = evaluate(
        experiment.evaluate, experiment.context(), split="test", methods=[method], write=False,
        encoder=experiment.baselines.encoder,
    )
    row = report["methods"][method]
    training = storage.read_json(storage.join(experiment.context().run.training(method).path, "result.json"))
    seconds = (report.get("run") or {}).get("stage_seconds") or {}
    return {
        "value": value,
        "run_dir": experiment.run_dir,
        "per_list": per_list(experiment, method),
        "method": method,
        "users": row["users"],
        "metrics": {m: row["metrics"][m] for m in METRICS},
        "intervals": {m: row["intervals"][m] for m in METRICS},
        "training_lists": training["lists"],
        "training_texts": training["examples"],
        "train_seconds": seconds.get(f"train {method}"),
        "score_seconds": seconds.get(f"score {method}"),
    }


def per_list(experiment: ExperimentConfig, method: str) -> dict[str, dict[str, float]]:
    """{list_id: {metric: value}} of `method`'s test scores (the report's tie rule and seed)."""
    from trsr.evaluate.metrics import per_list_metrics
    from trsr.evaluate.report import read_scores

    table = read_scores(experiment.run_dir, method, "test")
    values = per_list_metrics(
        table.column("list_id"), table.column("label"), table.column("score"),
        ks=(3,), ties=experiment.evaluate.ties, seed=experiment.seed,
    )
    return {list_id: {m: float(values[m][i]) for m in PAIRED} for i, list_id in enumerate(values["list_id"])}


def paired_change(base: dict, other: dict, metric: str, bootstrap: int = 1000, seed: int = 0) -> list[float]:
    """[mean, low, high]: `other` minus `base` on `metric`, over the lists both scored,
    with a percentile bootstrap 95% interval of the per-list differences."""
    from trsr.evaluate.metrics import bootstrap_ci

    shared = sorted(set(base) & set(other))
    if len(shared) != len(base) or len(shared) != len(other):
        raise ValueError(f"the values scored different lists ({len(base)} and {len(other)}, {len(shared)} shared)")
    differences = [other[k][metric] - base[k][metric] for k in shared]
    differences = [d for d in differences if d == d]  # AUC is NaN for a list without a negative
    low, high = bootstrap_ci(differences, n=bootstrap, seed=seed)
    return [sum(differences) / len(differences), low, high]


def with_changes(rows: list[dict], seed: int = 0) -> list[dict]:
    """Each row with `change` (against the first row, see PAIRED) instead of its per-list values."""
    base = rows[0]["per_list"]
    out = []
    for k, row in enumerate(rows):
        row = {key: value for key, value in row.items() if key != "per_list"}
        if k:
            row["change"] = {m: paired_change(base, rows[k]["per_list"], m, seed=seed) for m in PAIRED}
        out.append(row)
    return out


def markdown(result: dict) -> str:
    first = result["rows"][0]["value"]
    lines = [
        f"## Ablation: {result['knob']} ({result['variant']}, {result['dataset']})",
        "",
        f"| {result['knob']} | users | Recall@3 | Recall@10 | MRR@10 | AUC | change against {first} (paired 95%) "
        "| training lists / texts | train s | score s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = [
            f"{row['metrics'][m]:.3f} [{row['intervals'][m][0]:.3f}, {row['intervals'][m][1]:.3f}]"
            if m in ("recall@3", "auc") else f"{row['metrics'][m]:.3f}"
            for m in METRICS
        ]
        change = row.get("change")
        change = "; ".join(
            f"{LABELS[m]} {change[m][0]:+.3f} [{change[m][1]:+.3f}, {change[m][2]:+.3f}]"
            for m in PAIRED
        ) if change else ""
        seconds = [f"{s:,.0f}" if s is not None else "" for s in (row["train_seconds"], row["score_seconds"])]
        lines.append(
            f"| {row['value']} | {row['users']} | " + " | ".join(cells) + f" | {change}"
            + f" | {row['training_lists']} / {row['training_texts']} | " + " | ".join(seconds) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon_games_cpu", choices=list(quality_table.DATASETS))
    parser.add_argument("--variant", default="tallrec")
    parser.add_argument("--knob", default="train.max_lists", help="a dotted config key")
    parser.add_argument("--values", nargs="+", default=["96", "384"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = [run_value(args.dataset, args.variant, args.knob, value, args.overrides) for value in args.values]
    rows = with_changes(rows, seed=quality_table.experiment_for(args.dataset, args.overrides).seed)
    result = {"dataset": args.dataset, "variant": args.variant, "knob": args.knob, "overrides": args.overrides, "rows": rows}
    text = markdown(result)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"ablation-{args.dataset}.md").write_text(text)
    (RESULTS / f"ablation-{args.dataset}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
