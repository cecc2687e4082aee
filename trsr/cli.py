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
import os
import sys
from typing import Sequence

from trsr.config import load
from trsr.cli_parser import build_parser
from trsr.data.config import SyntheticConfig
from trsr.experiment import ExperimentConfig
from trsr.errors import TrsrError
from trsr.ray_utils import VERBOSE_ENV, quiet_logs

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
    stats = prepare(experiment.prepare, experiment.context(), force=args.force)
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
    stats = summarize(experiment.summarize, experiment.context(), force=args.force, update=args.update)
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
    print(describe(run_baselines(experiment.baselines, experiment.context(), force=args.force)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trsr.recommend.sft import describe, train

    experiment = _variant_experiment(args)
    print(describe(train(experiment.train, experiment.score, experiment.context(), force=args.force)))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from trsr.recommend.score import describe, score

    if args.candidates:
        from trsr.recommend import candidates

        experiment = _variant_experiment(args)
        result = candidates.score_candidates(
            experiment.score, experiment.context(), args.candidates, output=args.output, top_k=args.top_k,
            force=args.force, trained=experiment.train.enabled,
        )
        print(candidates.describe(result))
        return 0
    if args.top_k is not None or args.output is not None:
        raise TrsrError("--top-k and --output apply to --candidates scoring only")
    experiment = _variant_experiment(args)
    print(describe(score(experiment.score, experiment.context(), split=args.split, force=args.force,
                         trained=experiment.train.enabled)))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from trsr.evaluate.report import evaluate, markdown

    experiment = load(ExperimentConfig, args.config, args.overrides)
    result = evaluate(experiment.evaluate, experiment.context(), split=args.split)
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
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by init_ray, also in the workers it starts
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_logs()
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
