"""The `trsr` command's argument parser: every subcommand, its options and its help
(trsr.cli runs them).

Every command's --help ends with the same block: what it reads, what it writes, one
example. Every command accepts -q/--verbose and --json (results as JSON on stdout, its
progress lines on stderr) before or after its name; every command that works on a run
folder takes --config RECIPE.yaml, or --run-dir alone once a command given --config has
written the recipe into that folder (<run_dir>/config.yaml), or both (--run-dir then
replaces the recipe's run_dir).
"""

from __future__ import annotations

import argparse
import textwrap

from trsr import __version__
from trsr.data.config import SOURCE_FORMATS, SyntheticConfig
from trsr.recommend.config import VARIANTS

WIDTH = 88
EPILOG = (
    "Paths may be local or s3://bucket/prefix (AWS_* environment variables configure S3). "
    "Docs: README.md; recipes: jobs/configs/."
)


def _help_text(about: str, reads: str, writes: str, example: str) -> str:
    lines = [textwrap.fill(about, WIDTH), ""]
    for label, value in (("Reads:", reads), ("Writes:", writes), ("Example:", example)):
        lines.append(textwrap.fill(f"{label:<9} {value}", WIDTH, subsequent_indent=" " * 10))
    return "\n".join(lines)


def _command(commands, name: str, summary: str, about: str, reads: str, writes: str,
             example: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=summary, description=_help_text(about, reads, writes, example),
        epilog=textwrap.fill(EPILOG, WIDTH), formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_config_args(parser: argparse.ArgumentParser, run_dir_help: str | None = None) -> None:
    parser.add_argument("--config", help="experiment recipe (jobs/configs/*.yaml); written into the run folder")
    parser.add_argument(
        "--run-dir",
        help=run_dir_help or "run folder (local or s3://): alone, the recipe it holds (config.yaml); "
        "with --config, replaces its run_dir",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value); repeatable",
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    """-q/-v/--json after the command too (`trsr run --config x.yaml -q`), as before it."""
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and results")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="keep the libraries' own logs (Ray, Ray Data, Ray Train, vLLM, transformers)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result as JSON on stdout (progress lines go to stderr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trsr",
        description="LLM-based text-rich sequential recommendation (LLM-TRSR) as Ray batch jobs.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"trsr {__version__}")
    parser.set_defaults(quiet=False, verbose=False, json=False)
    _add_output_args(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="dataset commands: generate, prepare, stats",
                               description="Dataset commands.")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    generate = _command(
        data_commands, "generate",
        "write a synthetic MIND-format dataset (users with drifting topic interests)",
        "Write a synthetic dataset in MIND's format with learnable structure, for demos, tests "
        "and benchmarks. Same options + seed = same bytes.",
        reads="nothing",
        writes="OUTPUT/behaviors.tsv and OUTPUT/news.tsv",
        example="trsr data generate --output data/demo-mind --users 600",
    )
    generate.add_argument("--output", required=True, help="folder to write (local or s3://)")
    for name, field in SyntheticConfig.model_fields.items():
        generate.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=field.default,
            help=f"{field.description or name} (default {field.default})",
        )

    prepare = _command(
        data_commands, "prepare",
        "convert a raw dataset and sample ranking lists into a run folder",
        "Convert a raw dataset (MIND, Amazon-M2, RecBole atomic files, or a generic "
        "interactions + items table) to canonical Parquet and apply the protocol: history "
        "10-25 items, split by user, 1:1 train and 1:20 valid/test negatives excluding the "
        "user's history, shuffled candidates. Give FORMAT, --input and --run-dir, or a recipe.",
        reads="the raw files (prepare.source.path or --input)",
        writes="<run_dir>/prepared/: items, sequences, samples/{train,valid,test}, lists, "
        "rejects.parquet (with reasons), _stats.json; <run_dir>/config.yaml",
        example="trsr data prepare generic --input examples/own-data --run-dir runs/mine",
    )
    prepare.add_argument("format", nargs="?", choices=SOURCE_FORMATS, help="raw dataset format")
    prepare.add_argument("--input", help="folder with the raw files (prepare.source.path)")
    prepare.add_argument("--seed", type=int, help="seed for split, negatives and order")
    prepare.add_argument("--force", action="store_true", help="run even if outputs are up to date")
    _add_config_args(prepare, run_dir_help="run folder to write (run_dir); with FORMAT and --input, no recipe needed")

    stats = _command(
        data_commands, "stats",
        "print Table 1 (attributes, positives per split, history length, tokens/item)",
        "Print the paper's Table 1 for a prepared run folder (tokens per item counted with "
        "the given tokenizer) and the run's accounting: rows in, out and rejected.",
        reads="<run_dir>/prepared/",
        writes="nothing",
        example="trsr data stats --run-dir runs/demo --tokenizer smollm2-135m-instruct",
    )
    stats.add_argument(
        "--tokenizer",
        default=None,
        help="'whitespace' or a model reference, e.g. smollm2-135m-instruct "
        "(default: the one used at prepare time)",
    )
    _add_config_args(stats)

    summarize = _command(
        commands, "summarize",
        "summarize each user's history (hierarchical and/or recurrent) on Ray Data",
        "Cut each user's history into blocks and summarize it with a frozen LLM (vLLM or "
        "transformers engine) as Ray Data stages: hierarchical (block summaries merged level "
        "by level, fan_in per merge) and/or recurrent (a summary updated block by block). "
        "Resumes an interrupted run where it stopped. Starts a local Ray cluster unless "
        "RAY_ADDRESS is set (ray job submit).",
        reads="<run_dir>/prepared/ (lists, or every user's sequence with --users all)",
        writes="<run_dir>/summaries/<mode>/ (or user_summaries/<mode>/): user, summary, "
        "intermediate summaries, tokens, status; _stats.json, _rejects.parquet",
        example="trsr summarize --run-dir runs/demo",
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
    _add_config_args(summarize)

    baselines = _command(
        commands, "baselines",
        "train and score the classic baselines (NCF ... CORE, popularity, random)",
        "Encode every item's text once (Ray Data, cached), train the models of section "
        "`baselines` on the training split (one Ray task per model) and score the valid/test "
        "lists in the LLM scorer's schema, so `trsr evaluate` tables them together. See "
        "README.md, section Baselines.",
        reads="<run_dir>/prepared/",
        writes="<run_dir>/embeddings/<encoder>/, <run_dir>/scores/<method>/<split>/ with _stats.json",
        example="trsr baselines --run-dir runs/demo --set 'baselines.models=[sasrec,popularity]'",
    )
    baselines.add_argument("--force", action="store_true", help="run even if outputs are up to date")
    _add_config_args(baselines)

    train = _command(
        commands, "train",
        "LoRA fine-tune the recommender on the training split (Ray Train, DeepSpeed ZeRO-2)",
        "Build one training text per training candidate (the scorer's prompt followed by the "
        "Yes/No answer) as a Ray Data job, then fine-tune a LoRA adapter with Ray Train "
        "(section `train`: DeepSpeed ZeRO-2 or torch, workers, epochs, learning rate, ...). "
        "Checkpoints every epoch (and every train.checkpoint_every_steps steps), resumes from "
        "the last one, validates each epoch on validation lists and keeps the best.",
        reads="<run_dir>/prepared/, <run_dir>/summaries/<mode>/ (the variant's)",
        writes="<run_dir>/train/<method>/: texts/, lora/ checkpoints, the best adapter, result.json",
        example="trsr train --run-dir runs/demo --variant recurrent",
    )
    train.add_argument("--variant", default=None, choices=VARIANTS,
                       help="recommender variant; default: score.prompt.variant")
    train.add_argument("--force", action="store_true", help="retrain from scratch even if up to date")
    _add_config_args(train)

    score = _command(
        commands, "score",
        "score ranking lists: p(yes) per candidate, user prefix shared (Ray Data)",
        "Score every candidate of a split's ranking lists with the recommender (the trained "
        "adapter of the variant unless score.engine.lora_adapter is set or train.enabled is "
        "false): p(yes) from the Yes/No next-token logits, one shared prompt prefix per user. "
        "With --candidates, score your own candidates for every user instead.",
        reads="<run_dir>/prepared/, summaries, the trained adapter; with --candidates also PATH "
        "and <run_dir>/user_summaries/<mode>/",
        writes="<run_dir>/scores/<method>/<split>/ (list, candidate, label, p(yes)); with "
        "--candidates <run_dir>/candidates/<method>/scores/ (user_id, item_id, score, rank) and "
        "_rejects.parquet",
        example="trsr score --run-dir runs/production --candidates candidates.csv --top-k 10",
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
        "`trsr summarize --users all`",
    )
    score.add_argument("--top-k", type=int, default=None, help="with --candidates: write only each user's best N")
    score.add_argument(
        "--output", default=None, help="with --candidates: output folder (default <run_dir>/candidates/<method>/scores)"
    )
    _add_config_args(score)

    evaluate = _command(
        commands, "evaluate",
        "Recall/MRR/NDCG@K and AUC of every scored method, with bootstrap intervals",
        "Evaluate every scored method (LLM variants and baselines) on the same ranking lists: "
        "Recall@K, MRR@K, NDCG@K (evaluate.ks) and AUC with bootstrap intervals, the run's "
        "metadata, summary health per LLM method and example users. Prints the table.",
        reads="<run_dir>/scores/, <run_dir>/summaries/, the stages' _stats.json",
        writes="<run_dir>/report/<split>.md, .json and .png",
        example="trsr evaluate --run-dir runs/demo --split valid",
    )
    evaluate.add_argument("--split", default=None, choices=["valid", "test"], help="default: evaluate.split")
    _add_config_args(evaluate)

    run = _command(
        commands, "run",
        "run the pipeline from one experiment config",
        "Run every stage of an experiment into its run folder: prepare, summarize, then for "
        "each of `variants` train and score, the baselines if with_baselines, then evaluate. "
        "A stage whose outputs exist for the same config and inputs is skipped; an "
        "interrupted stage resumes.",
        reads="the raw dataset (prepare.source.path)",
        writes="every folder of <run_dir> (README.md, 'What a run produces'); ends with the "
        "report's paths",
        example="trsr run --config jobs/configs/demo.yaml",
    )
    run.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    _add_config_args(run)

    plan = _command(
        commands, "plan",
        "the GPUs and CPUs every stage asks for, checked against a cluster",
        "Print every stage `trsr run` would start with the actors it asks for at once, and "
        "check that each fits the cluster: --cluster NODESxGPUS[:CPUS] (e.g. 12x8), else "
        "`cluster` of the recipe, else the connected (or a local) Ray cluster. Exits 2, "
        "naming the stage and the numbers, when one does not fit. Starts no work.",
        reads="the recipe only (no data)",
        writes="nothing",
        example="trsr plan --config jobs/configs/mind_cluster.yaml --cluster 12x8",
    )
    plan.add_argument("--cluster", default=None, help="declared shape: NODESxGPUS[:CPUS per node], e.g. 12x8:96")
    _add_config_args(plan)
    for name, command in commands.choices.items():
        for leaf in data_commands.choices.values() if name == "data" else [command]:
            _add_output_args(leaf)
    return parser
