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

Every command that works on a run folder takes --config RECIPE.yaml (written into the
run folder as config.yaml), or --run-dir alone once the folder holds one, and --set
key=value overrides (dotted keys, YAML values), e.g. --set prepare.protocol.min_history=5.
Every command takes -q/-v and --json (the result as JSON on stdout, progress on stderr).
Each handler returns (result, text): the text is printed, or the result with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Sequence

from trsr.cli_parser import build_parser
from trsr.data.config import SyntheticConfig
from trsr.experiment import ExperimentConfig, load_run_config, save_run_config
from trsr.config import load
from trsr import worker_logs
from trsr.errors import TrsrError
from trsr.ray_utils import VERBOSE_ENV, quiet_logs

Result = tuple[Any, str | None]


def _experiment(args: argparse.Namespace, extra: Sequence[str] = (), save: bool = True,
                defaults: bool = False) -> ExperimentConfig:
    """The experiment of a command: --config (then saved into its run folder unless
    `save` is false), else the config the --run-dir folder holds; --run-dir always names
    the run folder."""
    overrides = list(extra) + list(args.overrides)
    if args.config or defaults:  # defaults: no recipe, the config's defaults + overrides
        if args.run_dir:
            overrides.insert(0, f"run_dir={args.run_dir}")
        experiment = load(ExperimentConfig, args.config, overrides)
        if save:
            save_run_config(experiment)
    elif args.run_dir:
        experiment = load_run_config(args.run_dir, overrides)
    else:
        raise TrsrError(
            f"trsr {args.command}: give --config RECIPE.yaml, or --run-dir of a run folder that "
            "holds its config (written there by any command given --config)"
        )
    if save:
        worker_logs.log_to_run_folder(experiment.run_dir)
    return experiment


def _variant_experiment(args: argparse.Namespace) -> ExperimentConfig:
    experiment = _experiment(args)
    return experiment.for_variant(args.variant) if args.variant else experiment


def _cmd_generate(args: argparse.Namespace) -> Result:
    from trsr.data.synthetic import generate_mind

    fields = {name: getattr(args, name) for name in SyntheticConfig.model_fields}
    summary = generate_mind(SyntheticConfig(**fields), args.output)
    return summary, json.dumps(summary, indent=2, default=str)


def _cmd_prepare(args: argparse.Namespace) -> Result:
    from trsr.data.prepare import describe, prepare

    if args.config is None and not (args.format and args.input and args.run_dir):
        raise TrsrError(
            "trsr data prepare: give FORMAT, --input and --run-dir, or --config "
            "(see `trsr data prepare --help`)"
        )
    extra = [f"prepare.source.{key}={value}" for key, value in (("format", args.format), ("path", args.input)) if value]
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    # FORMAT --input --run-dir without a recipe: the defaults, saved as the folder's recipe
    experiment = _experiment(args, extra, defaults=args.config is None)
    stats = prepare(experiment.prepare, experiment.context(), force=args.force)
    note = " (up to date, skipped)" if stats.get("skipped") else ""
    return stats, f"{describe(stats)}\n\nprepared data in {experiment.run_dir}/prepared{note}"


def _cmd_stats(args: argparse.Namespace) -> Result:
    from trsr import storage
    from trsr.data.prepare import describe
    from trsr.schema import SPLITS
    from trsr.data.stats import table1
    from trsr.runs import RunFolder

    # Only the folder is needed: a folder prepared by hand (no config.yaml) works too.
    run_dir = args.run_dir if args.run_dir and not args.config else _experiment(args).run_dir
    run = RunFolder(run_dir)
    path = run.prepared_stage.stats_path
    if not storage.exists(path):
        raise TrsrError(f"{path}: not found; run `trsr data prepare` into {run_dir} first")
    stats = storage.read_json(path)
    if args.tokenizer and args.tokenizer != stats["table1"].get("tokenizer"):
        samples = {split: storage.read_parquet(run.samples(split)) for split in SPLITS}
        stats["table1"] = table1(storage.read_parquet(run.items()), samples, args.tokenizer, stats["seed"])
    return stats, describe(stats)


def _cmd_summarize(args: argparse.Namespace) -> Result:
    from trsr.summarize.job import describe, summarize

    experiment = _experiment(args, [f"summarize.users={args.users}"] if args.users else [])
    stats = summarize(experiment.summarize, experiment.context(), force=args.force, update=args.update)
    text = describe(stats)
    if stats.get("skipped"):
        where = "user_summaries" if experiment.summarize.users == "all" else "summaries"
        text = f"summaries in {experiment.run_dir}/{where} are up to date (skipped)\n{text}"
    return stats, text


def _cmd_baselines(args: argparse.Namespace) -> Result:
    from trsr.baselines.job import describe, run_baselines

    experiment = _experiment(args)
    result = run_baselines(experiment.baselines, experiment.context(), force=args.force)
    return result, describe(result)


def _cmd_train(args: argparse.Namespace) -> Result:
    from trsr.recommend.sft import describe, train

    experiment = _variant_experiment(args)
    result = train(experiment.train, experiment.score, experiment.context(), force=args.force)
    return result, describe(result)


def _cmd_score(args: argparse.Namespace) -> Result:
    from trsr.recommend.score import describe, score

    if args.candidates:
        from trsr.recommend import candidates

        experiment = _variant_experiment(args)
        result = candidates.score_candidates(
            experiment.score, experiment.context(), args.candidates, output=args.output, top_k=args.top_k,
            force=args.force, trained=experiment.train.enabled,
        )
        return result, candidates.describe(result)
    if args.top_k is not None or args.output is not None:
        raise TrsrError("--top-k and --output apply to --candidates scoring only")
    experiment = _variant_experiment(args)
    result = score(experiment.score, experiment.context(), split=args.split, force=args.force,
                   trained=experiment.train.enabled)
    return result, describe(result)


def _cmd_evaluate(args: argparse.Namespace) -> Result:
    from trsr.evaluate.report import evaluate, markdown

    experiment = _experiment(args)
    result = evaluate(experiment.evaluate, experiment.context(), split=args.split, encoder=experiment.baselines.encoder)
    return result, markdown(result)


def _cmd_run(args: argparse.Namespace) -> Result:
    from trsr.pipeline import run_pipeline

    return run_pipeline(_experiment(args), force=args.force), None  # it prints as it goes


def _cmd_plan(args: argparse.Namespace) -> Result:
    from trsr import plan
    from trsr.ray_utils import ClusterShape, init_ray

    experiment = _experiment(args, save=False)  # reads the recipe only, writes nothing
    shape = args.cluster or experiment.cluster
    if shape:
        cluster = ClusterShape.parse(shape)
    else:
        init_ray()
        cluster = ClusterShape.connected()
    plans = plan.experiment_plan(experiment)
    text = f"cluster: {cluster.describe()}\n{plan.table(plans, cluster)}"
    plan.require_plan(experiment, cluster)
    result = {"cluster": cluster.describe(), "stages": [dataclasses.asdict(p) for p in plans]}
    return result, text + "\nevery stage fits"


HANDLERS = {
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
    handler = HANDLERS[(args.command, getattr(args, "data_command", None))]
    stdout = sys.stdout
    try:
        # With --json, stdout carries the JSON alone: everything the job prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result, text = handler(args)
    except TrsrError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str), file=stdout)
    elif text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
