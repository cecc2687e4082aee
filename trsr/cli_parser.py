"""The `trsr` command's argument parser: every subcommand, its options and its help
(trsr.cli runs them)."""

from __future__ import annotations

import argparse

from trsr import __version__
from trsr.data.config import SOURCE_FORMATS, SyntheticConfig
from trsr.recommend.config import VARIANTS

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
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="keep the libraries' own logs (Ray, Ray Data, Ray Train, vLLM, transformers)")
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
        "scorer's schema, so `trsr evaluate` tables them together. See README.md, section Baselines.",
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
    for name, command in commands.choices.items():
        for leaf in data_commands.choices.values() if name == "data" else [command]:
            _add_output_args(leaf)
    return parser


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    """-q/-v after the command too (`trsr run --config x.yaml -q`), as before it."""
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and results")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="keep the libraries' own logs")
