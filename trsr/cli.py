"""The `trsr` command line. Thin: parse arguments, build a config, call the library.

    trsr data generate   write a synthetic MIND-format dataset (learnable structure)
    trsr data prepare    convert a raw dataset, sample ranking lists, write Parquet + stats
    trsr data stats      print the paper's Table 1 for a prepared run folder
    trsr summarize       summarize every user's history with an LLM (Ray Data job)
    trsr baselines       train and score the classic baselines on the same lists
    trsr train           LoRA fine-tune the recommender LLM (Ray Train job)
    trsr score           score ranking lists with p(yes) (Ray Data batch inference)
    trsr evaluate        metrics of every scored method with bootstrap intervals
    trsr run             run the whole pipeline from one experiment config
    trsr plan            what every stage asks of the cluster, checked against its shape

Every command that takes --config also takes --set key=value overrides (dotted keys,
YAML values), e.g. --set prepare.protocol.min_history=5. Configs: jobs/configs/*.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from trsr import __version__
from trsr.config import SOURCE_FORMATS, SyntheticConfig, load
from trsr.experiment import ExperimentConfig
from trsr.recommend.prompt import VARIANTS
from trsr.errors import TrsrError

EPILOG = (
    "Paths may be local or s3://bucket/prefix (AWS_* environment variables configure S3). "
    "Docs: README.md; configs: jobs/configs/."
)


def _add_config_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--config", required=required, help="experiment YAML (jobs/configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trsr",
        description="LLM-based text-rich sequential recommendation (LLM-TRSR) as Ray batch jobs.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"trsr {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="dataset commands: generate, prepare, stats",
                               description="Dataset commands.")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    generate = data_commands.add_parser(
        "generate",
        help="write a synthetic MIND-format dataset (users with drifting topic interests)",
        description="Write behaviors.tsv and news.tsv in MIND's format with learnable "
        "structure, for demos, tests and benchmarks. Same options + seed = same bytes.",
    )
    generate.add_argument("--output", required=True, help="folder to write (local or s3://)")
    for name, field in SyntheticConfig.model_fields.items():
        generate.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=field.default,
            help=f"{field.description or name} (default {field.default})",
        )

    prepare = data_commands.add_parser(
        "prepare",
        help="convert a raw dataset and sample ranking lists into a run folder",
        description="Convert a raw dataset (MIND, Amazon-M2, RecBole atomic files, or a "
        "generic interactions + items table) to canonical Parquet, apply the protocol "
        "(history 10-25 items, split by user, 1:1 train and 1:20 valid/test negatives "
        "excluding the user's history, shuffled candidates), and write items, sequences, "
        "samples/{train,valid,test}, rejects (with reasons) and stats.json into "
        "<run_dir>/prepared. Either give FORMAT and --input, or --config.",
        epilog=EPILOG,
    )
    prepare.add_argument("format", nargs="?", choices=SOURCE_FORMATS, help="raw dataset format")
    prepare.add_argument("--input", help="folder with the raw files (source.path)")
    prepare.add_argument("--run-dir", help="run folder (run_dir); required without --config")
    prepare.add_argument("--seed", type=int, help="seed for split, negatives and order")
    prepare.add_argument("--force", action="store_true", help="run even if outputs are up to date")
    _add_config_args(prepare, required=False)

    stats = data_commands.add_parser(
        "stats",
        help="print Table 1 (attributes, positives per split, history length, tokens/item)",
        description="Print the paper's Table 1 for a prepared run folder, counting tokens "
        "per item with the given tokenizer, plus the run's accounting.",
    )
    stats.add_argument("run_dir", help="run folder holding prepared/")
    stats.add_argument(
        "--tokenizer",
        default=None,
        help="'whitespace' or a model reference, e.g. smollm2-135m-instruct "
        "(default: the one used at prepare time)",
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    summarize = commands.add_parser(
        "summarize",
        help="summarize each user's history (hierarchical and/or recurrent) on Ray Data",
        description="Read <run_dir>/prepared, cut each user's history into blocks, and "
        "summarize it with a frozen LLM (vLLM or transformers engine) as Ray Data stages: "
        "hierarchical (block summaries merged level by level, fan_in per merge) and/or "
        "recurrent (summary updated block by block). Writes <run_dir>/summaries/<mode>/ "
        "Parquet (user, summary, intermediate summaries, tokens, status) and stats.json. "
        "Starts a local Ray cluster unless RAY_ADDRESS is set (ray job submit).",
        epilog=EPILOG,
    )
    summarize.add_argument("--force", action="store_true", help="run even if outputs are up to date")
    summarize.add_argument(
        "--users",
        choices=["protocol", "all"],
        default=None,
        help="whose histories (summarize.users): the protocol's ranking lists -> summaries/<mode>/, "
        "or every user of the prepared sequences -> user_summaries/<mode>/ (production)",
    )
    summarize.add_argument(
        "--update",
        action="store_true",
        help="with --users all: refresh the earlier user summaries after new interactions (prepare again "
        "first): unchanged users keep their row, the others reuse the summaries of unchanged blocks",
    )
    _add_config_args(summarize, required=True)

    baselines = commands.add_parser(
        "baselines",
        help="train and score the classic baselines (NCF ... CORE, popularity, random)",
        description="Encode every item's text once (Ray Data, cached in <run_dir>/embeddings/), "
        "train the models of section `baselines` on the training split (one Ray task per "
        "model) and score the valid/test lists into <run_dir>/scores/<method>/, the LLM "
        "scorer's schema, so `trsr evaluate` tables them together. See trsr/baselines/README.md.",
        epilog=EPILOG,
    )
    baselines.add_argument("--force", action="store_true", help="run even if outputs are up to date")
    _add_config_args(baselines, required=True)

    train = commands.add_parser(
        "train",
        help="LoRA fine-tune the recommender on the training split (Ray Train, DeepSpeed ZeRO-2)",
        description="Build one training text per training candidate (the same guarded prompt "
        "the scorer uses, followed by the Yes/No answer) as a Ray Data job, then fine-tune a "
        "LoRA adapter with Ray Train (section `train`: DeepSpeed ZeRO-2 or torch, workers, "
        "epochs, learning rate, ...). Checkpoints every epoch to <run_dir>/train/<method>/lora/, "
        "resumes from the last one, validates each epoch on validation lists and keeps the best.",
        epilog=EPILOG,
    )
    train.add_argument("--variant", default=None, choices=VARIANTS,
                       help="recommender variant; default: score.prompt.variant")
    train.add_argument("--force", action="store_true", help="retrain from scratch even if up to date")
    _add_config_args(train, required=True)

    score = commands.add_parser(
        "score",
        help="score ranking lists: p(yes) per candidate, user prefix shared (Ray Data)",
        description="Score every candidate of the ranking lists of a split with the "
        "recommender (the trained adapter of the variant unless score.engine.lora_adapter is "
        "set or train.enabled is false): p(yes) from the Yes/No next-token logits, one shared "
        "prompt prefix per user. Writes <run_dir>/scores/<method>/<split>.parquet.",
        epilog=EPILOG,
    )
    score.add_argument("--variant", default=None, choices=VARIANTS,
                       help="recommender variant; default: score.prompt.variant")
    score.add_argument("--split", default=None, choices=["train", "valid", "test"],
                       help="one split (default: every split in score.splits)")
    score.add_argument("--force", action="store_true", help="run even if outputs are up to date")
    score.add_argument(
        "--candidates",
        default=None,
        metavar="PATH",
        help="score your own candidates instead of the protocol's lists: Parquet, CSV or JSON lines "
        "(a file or folder, local or s3://) with user_id, item_id (or user_id, item_ids); needs "
        "`trsr summarize --users all`. Writes user_id, item_id, score, rank",
    )
    score.add_argument("--top-k", type=int, default=None, help="with --candidates: write only each user's best N")
    score.add_argument(
        "--output", default=None, help="with --candidates: output folder (default <run_dir>/candidates/<method>/scores)"
    )
    _add_config_args(score, required=True)

    evaluate = commands.add_parser(
        "evaluate",
        help="Recall/MRR/NDCG@K and AUC of every scored method, with bootstrap intervals",
        description="Evaluate every method under <run_dir>/scores/ (LLM variants and baselines) "
        "on the same ranking lists: Recall@K, MRR@K, NDCG@K (section evaluate.ks) and AUC with "
        "bootstrap intervals. Prints the table and writes <run_dir>/report/<split>.{md,json,png}.",
        epilog=EPILOG,
    )
    evaluate.add_argument("--split", default=None, choices=["valid", "test"], help="default: evaluate.split")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _add_config_args(evaluate, required=True)

    run = commands.add_parser(
        "run",
        help="run the pipeline from one experiment config",
        description="Run every stage of an experiment config into its run folder: prepare, "
        "summarize, then for each of `variants` train and score, then evaluate. A stage whose "
        "outputs exist for the same config and inputs is skipped.",
        epilog=EPILOG,
    )
    run.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    _add_config_args(run, required=True)

    plan = commands.add_parser(
        "plan",
        help="the GPUs and CPUs every stage asks for, checked against a cluster",
        description="Reads: the experiment config (nothing else; no data, no Ray job). "
        "Prints every stage `trsr run` would start with the actors it asks for at once, "
        "and checks that each stage fits the cluster: --cluster NODESxGPUS[:CPUS] (e.g. "
        "12x8), else `cluster` of the recipe, else the connected (or a local) Ray cluster. "
        "Exits 2, naming the stage and the numbers, when one does not fit. "
        "Example: trsr plan --config jobs/configs/mind_cluster.yaml --cluster 12x8",
        epilog=EPILOG,
    )
    plan.add_argument("--cluster", default=None, help="declared shape: NODESxGPUS[:CPUS per node], e.g. 12x8:96")
    _add_config_args(plan, required=True)
    return parser


def _experiment_from_args(args: argparse.Namespace) -> ExperimentConfig:
    base: dict = {}
    if args.config is None:
        if not args.format or not args.input or not args.run_dir:
            raise TrsrError(
                "trsr data prepare: give FORMAT, --input and --run-dir, or --config "
                "(see `trsr data prepare --help`)"
            )
    overrides = list(args.overrides)
    if args.format:
        overrides.insert(0, f"prepare.source.format={args.format}")
    if args.input:
        overrides.insert(0, f"prepare.source.path={args.input}")
    if args.run_dir:
        overrides.insert(0, f"run_dir={args.run_dir}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load(ExperimentConfig, args.config, overrides, base=base)


def _cmd_generate(args: argparse.Namespace) -> int:
    from trsr.data.synthetic import generate_mind

    fields = {name: getattr(args, name) for name in SyntheticConfig.model_fields}
    summary = generate_mind(SyntheticConfig(**fields), args.output)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from trsr.data.prepare import describe, prepare

    experiment = _experiment_from_args(args)
    stats = prepare(experiment, force=args.force)
    print(describe(stats))
    note = " (up to date, skipped)" if stats.get("skipped") else ""
    print(f"\nprepared data in {experiment.run_dir}/prepared{note}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from trsr import storage
    from trsr.data.prepare import describe
    from trsr.schema import SPLITS
    from trsr.data.stats import table1
    from trsr.runs import RunFolder

    run = RunFolder(args.run_dir)
    path = run.prepared_stage.stats_path
    if not storage.exists(path):
        raise TrsrError(f"{path}: not found; run `trsr data prepare` into {args.run_dir} first")
    stats = storage.read_json(path)
    if args.tokenizer and args.tokenizer != stats["table1"].get("tokenizer"):
        samples = {split: storage.read_parquet(run.samples(split)) for split in SPLITS}
        stats["table1"] = table1(storage.read_parquet(run.items()), samples, args.tokenizer, stats["seed"])
    print(json.dumps(stats, indent=2) if args.json else describe(stats))
    return 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    from trsr.summarize.job import describe, summarize

    overrides = list(args.overrides) + ([f"summarize.users={args.users}"] if args.users else [])
    experiment = load(ExperimentConfig, args.config, overrides)
    stats = summarize(experiment, force=args.force, update=args.update)
    if stats.get("skipped"):
        where = "user_summaries" if experiment.summarize.users == "all" else "summaries"
        print(f"summaries in {experiment.run_dir}/{where} are up to date (skipped)")
    print(describe(stats))
    return 0


def _variant_experiment(args: argparse.Namespace) -> ExperimentConfig:
    experiment = load(ExperimentConfig, args.config, args.overrides)
    return experiment.for_variant(args.variant) if args.variant else experiment


def _cmd_baselines(args: argparse.Namespace) -> int:
    from trsr.baselines.job import describe, run_baselines

    experiment = load(ExperimentConfig, args.config, args.overrides)
    print(describe(run_baselines(experiment, force=args.force)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trsr.recommend.sft import describe, train

    print(describe(train(_variant_experiment(args), force=args.force)))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from trsr.recommend.score import describe, score

    if args.candidates:
        from trsr.recommend import candidates

        result = candidates.score_candidates(
            _variant_experiment(args), args.candidates, output=args.output, top_k=args.top_k, force=args.force
        )
        print(candidates.describe(result))
        return 0
    if args.top_k is not None or args.output is not None:
        raise TrsrError("--top-k and --output apply to --candidates scoring only")
    print(describe(score(_variant_experiment(args), split=args.split, force=args.force)))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from trsr.evaluate.report import evaluate, markdown

    experiment = load(ExperimentConfig, args.config, args.overrides)
    result = evaluate(experiment, split=args.split)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from trsr.pipeline import run_pipeline

    experiment = load(ExperimentConfig, args.config, args.overrides)
    run_pipeline(experiment, force=args.force)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from trsr import plan

    experiment = load(ExperimentConfig, args.config, args.overrides)
    shape = args.cluster or experiment.cluster
    from trsr.ray_utils import ClusterShape, init_ray

    if shape:
        cluster = ClusterShape.parse(shape)
    else:
        init_ray()
        cluster = ClusterShape.connected()
    plans = plan.experiment_plan(experiment)
    print(f"cluster: {cluster.describe()}")
    print(plan.table(plans, cluster))
    plan.require_plan(experiment, cluster)
    print("every stage fits")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers = {
        ("data", "generate"): _cmd_generate,
        ("data", "prepare"): _cmd_prepare,
        ("data", "stats"): _cmd_stats,
        ("summarize", None): _cmd_summarize,
        ("baselines", None): _cmd_baselines,
        ("train", None): _cmd_train,
        ("score", None): _cmd_score,
        ("evaluate", None): _cmd_evaluate,
        ("run", None): _cmd_run,
        ("plan", None): _cmd_plan,
    }
    key = (args.command, getattr(args, "data_command", None))
    try:
        return handlers[key](args)
    except TrsrError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
