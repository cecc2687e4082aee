"""Quality table (the paper's Table 2 layout): baselines (and LLM variants) per dataset.

    .venv/bin/python benchmarks/quality_table.py                 # baselines: amazon_games_cpu + demo
    .venv/bin/python benchmarks/quality_table.py --datasets demo --set baselines.epochs=5
    .venv/bin/python benchmarks/quality_table.py --datasets amazon_games_cpu --llm
                                          # + every LLM variant (about an hour on 2 cores)

For each dataset: prepare (skipped when up to date), train and score the baselines
(`trsr.baselines.job.run_baselines`, skipped when up to date), optionally run the LLM
pipeline (`--llm`), then evaluate every method found under <run_dir>/scores/ on the
test lists that all of them share (`trsr.evaluate.report`): Recall@3/5/10 and MRR@3/5/10
with 95% bootstrap intervals and the number of users behind each figure; per LLM
method the lists scored without a usable summary; the report's summary probe (how much
of the user is in the summaries); every stage's seconds.

Writes benchmarks/results/quality_table.md and .json, and per dataset
quality_table-<dataset>.png (the report's chart); run folders live in
benchmarks/results/cache/quality/<dataset>/ (the repository's configs' run_dir is not
touched). A recipe whose data under ../shared/data is absent is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trsr.baselines.config import MODELS  # noqa: E402
from trsr.config import load  # noqa: E402
from trsr.experiment import ExperimentConfig  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "cache" / "quality"
KS = (3, 5, 10)
COLUMNS = [f"recall@{k}" for k in KS] + [f"mrr@{k}" for k in KS]

DATASETS = {
    # name: (recipe, overrides that keep the run inside the benchmark cache)
    "amazon_games_cpu": ("jobs/configs/amazon_games_cpu.yaml", []),
    "amazon_games": ("jobs/configs/amazon_games.yaml", []),  # the paper's sizes: GPUs
    "demo": (
        "jobs/configs/demo.yaml",
        [f"prepare.source.path={CACHE / 'demo-data' / 'mind-synthetic'}"],
    ),
}


def experiment_for(name: str, extra: list[str]) -> ExperimentConfig:
    recipe, overrides = DATASETS[name]
    return load(ExperimentConfig, REPO / recipe, [f"run_dir={CACHE / name}", *overrides, *extra])


def run_llm(experiment: ExperimentConfig) -> None:
    """The LLM variants of the recipe (`variants`): summarize, train, score into
    scores/<method>/ with the same pipeline `trsr run` uses (each stage skipped when up
    to date). On CPU only the demo recipe is sized for this; amazon_games follows the
    paper's training settings and wants GPUs; amazon_games_cpu is sized for 2 cores."""
    from trsr.pipeline import run_pipeline

    run_pipeline(experiment.model_copy(update={"with_baselines": False}))


def method_order(methods: list[str]) -> list[str]:
    """Random, popularity, the seven baselines in the paper's order, then the rest."""
    rank = {m: i for i, m in enumerate(["random", "popularity", *[m for m in MODELS if m not in ("popularity", "random")]])}
    return sorted(methods, key=lambda m: (rank.get(m.removesuffix("_id"), len(rank)), m))


def evaluate_run(experiment: ExperimentConfig, split: str = "test") -> dict:
    """Every method under scores/, on the lists all of them share."""
    from trsr.evaluate.report import evaluate

    return evaluate(experiment.evaluate, experiment.context(), split=split, write=True, encoder=experiment.baselines.encoder)


def dataset_table(name: str, extra: list[str], llm: bool, chart: Path | None = None) -> dict:
    from trsr.baselines.job import run_baselines
    from trsr.data.prepare import prepare
    from trsr.runs import RunFolder

    experiment = experiment_for(name, extra)
    started = time.perf_counter()
    prepare(experiment.prepare, experiment.context())
    baselines = run_baselines(experiment.baselines, experiment.context())
    if llm:
        run_llm(experiment)
    result = evaluate_run(experiment)
    seconds = time.perf_counter() - started
    if chart is not None:
        from trsr.evaluate.chart import write_chart

        write_chart(result, str(chart))
    stats = RunFolder(experiment.run_dir).prepared_stage.stats()
    users = {m: row["users"] for m, row in result["methods"].items()}
    if len(set(users.values())) != 1:
        raise AssertionError(f"{name}: methods are evaluated on different users: {users}")
    timing = {m: {"seconds": s.get("seconds"), "best_epoch": (s.get("training") or {}).get("best_epoch"),
                  "skipped": s.get("skipped")} for m, s in baselines.items()}
    return {
        "dataset": name,
        "run_dir": experiment.run_dir,
        "split": result["split"],
        "lists": result["lists"],
        "users_per_split": stats["accounting"]["protocol"]["users_per_split"],
        "items": stats.get("items"),
        "methods": {m: result["methods"][m] for m in method_order(list(result["methods"]))},
        "chance": result.get("chance", {}),
        "baselines": timing,
        "baselines_config": experiment.baselines.model_dump(mode="json"),
        "summary_probe": result.get("summary_probe") or {},
        "stage_seconds": (result.get("run") or {}).get("stage_seconds") or {},
        "seconds": round(seconds, 1),
    }


def markdown(tables: list[dict]) -> str:
    lines = ["# Quality: baselines and LLM-TRSR variants on the same test lists", ""]
    lines.append("Each cell: mean over the test lists [95% bootstrap interval, 1000 resamples of the lists]; "
                 "`users` = users (one list each) behind every figure of the row. Ties are broken at "
                 "random under the run's seed.")
    lines.append("")
    for table in tables:
        lines.append(f"## {table['dataset']} ({table['lists']} test lists, 1 positive + 20 negatives)")
        lines.append("")
        header = ["method", "users"] + [c.replace("recall", "Recall").replace("mrr", "MRR") for c in COLUMNS] + [
            "AUC", "no summary"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * len(header)) + "|")
        for method, row in table["methods"].items():
            cells = []
            for c in COLUMNS:
                low, high = row["intervals"][c]
                cells.append(f"{row['metrics'][c]:.3f} [{low:.3f}, {high:.3f}]")
            low, high = row["intervals"]["auc"]
            cells.append(f"{row['metrics']['auc']:.3f} [{low:.3f}, {high:.3f}]")
            without = row.get("lists_without_summary")
            cells.append("" if without is None else f"{without} of {row['lists_scored']}")
            lines.append("| " + " | ".join([method, str(row["users"])] + cells) + " |")
        if table["chance"]:
            lines.append("| " + " | ".join(["(chance)", ""] + [f"{table['chance'][c]:.3f}" for c in COLUMNS]
                                           + [f"{table['chance'].get('auc', 0.5):.3f}", ""]) + " |")
        lines.append("")
        lines.append("`no summary`: lists an LLM method scored without a usable summary (prompted with the "
                     "recent items only).")
        lines.append("")
        if table.get("summary_probe"):
            from trsr.evaluate.summary_probe import markdown_probe

            lines += ["#" + line if line.startswith("## ") else line for line in markdown_probe(table["summary_probe"], list(KS))]
        if table.get("stage_seconds"):
            lines.append("Stage seconds: " + ", ".join(f"{n} {s:,.0f}" for n, s in table["stage_seconds"].items()) + ".")
            lines.append("")
        timing = ", ".join(
            f"{m} {t['seconds']:.0f}s" + (f" (best epoch {t['best_epoch']})" if t["best_epoch"] else "")
            for m, t in table["baselines"].items() if t["seconds"] is not None
        )
        lines.append(f"Baseline task times (wall, sharing the machine): {timing}.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--llm", action="store_true", help="also run the LLM variants of each recipe (see run_llm)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every dataset, e.g. baselines.epochs=10")
    parser.add_argument("--output", default=str(RESULTS / "quality_table"), help="path without suffix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    tables = []
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        source = Path(experiment_for(name, args.overrides).prepare.source.path)
        if "shared" in source.parts and not source.exists():
            print(f"skipping {name}: {source} not present")
            continue
        tables.append(dataset_table(name, args.overrides, args.llm, chart=output.with_name(f"{output.name}-{name}.png")))
    text = markdown(tables)
    output.with_suffix(".md").write_text(text)
    output.with_suffix(".json").write_text(json.dumps(tables, indent=2))
    print(text)
    print(f"wrote {output.with_suffix('.md')} and {output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
