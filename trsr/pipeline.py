"""`trsr run`: every stage of an experiment, in order, into one run folder.

    prepare -> summarize -> for each variant: train (unless train.enabled is false)
                                              -> score (score.splits)
            -> baselines (with_baselines: true) -> evaluate (this run's methods, one table)

Each stage skips itself when its outputs are up to date for the same config and
inputs (see trsr.runs), so a rerun after a change redoes only what the change touches.
"""

from __future__ import annotations

import time
from typing import Callable

from trsr.experiment import ExperimentConfig


def _stage(name: str, run: Callable[[], dict], describe: Callable[[dict], str], results: dict) -> dict:
    started = time.perf_counter()
    print(f"[{name}] running", flush=True)
    result = run()
    results[name] = result
    print(describe(result), flush=True)
    skipped = result.get("skipped") or (result and all(isinstance(v, dict) and v.get("skipped") for v in result.values()))
    status = "up to date, skipped" if skipped else "done"
    print(f"[{name}] {status} in {time.perf_counter() - started:.1f} s", flush=True)
    return result


def check_resources(experiment: ExperimentConfig) -> None:
    """Before any work: every stage fits the declared cluster (`cluster`) or the
    connected one (trsr.plan); ConfigError naming the stages that do not."""
    from trsr.plan import require_plan
    from trsr.ray_utils import ClusterShape, init_ray

    if experiment.cluster:
        cluster = ClusterShape.parse(experiment.cluster)
    else:
        init_ray()
        cluster = ClusterShape.connected()
    require_plan(experiment, cluster)


def run_pipeline(experiment: ExperimentConfig, force: bool = False) -> dict:
    from trsr.data.prepare import describe as describe_prepare
    from trsr.data.prepare import prepare
    from trsr.evaluate.report import evaluate, markdown
    from trsr.recommend.score import describe as describe_scores
    from trsr.recommend.score import score
    from trsr.recommend.sft import describe as describe_training
    from trsr.recommend.sft import train
    from trsr.summarize.job import describe as describe_summaries
    from trsr.summarize.job import summarize

    started = time.perf_counter()
    results: dict = {}
    print(f"run folder {experiment.run_dir}", flush=True)
    check_resources(experiment)
    context = experiment.context()
    _stage("prepare", lambda: prepare(experiment.prepare, context, force=force), describe_prepare, results)
    needs_summaries = any(experiment.for_variant(v).score.prompt.mode for v in experiment.variant_names())
    if needs_summaries:
        _stage("summarize", lambda: summarize(experiment.summarize, context, force=force), describe_summaries, results)
    methods = []
    for variant in experiment.variant_names():
        variant_experiment = experiment.for_variant(variant)
        method = variant_experiment.score.method_name
        methods.append(method)
        if variant_experiment.train.enabled:
            _stage(f"train {method}", lambda: train(variant_experiment.train, variant_experiment.score, context, force=force), describe_training, results)
        _stage(f"score {method}", lambda: score(variant_experiment.score, context, split=None, force=force, trained=variant_experiment.train.enabled), describe_scores, results)
    if experiment.with_baselines:
        from trsr.baselines.job import describe as describe_baselines
        from trsr.baselines.job import run_baselines

        done = _stage("baselines", lambda: run_baselines(experiment.baselines, context, force=force), describe_baselines, results)
        methods.extend(done)  # {method: stats}
    # This run's methods (plus any named in evaluate.methods), not stale folders of
    # earlier configs.
    methods = list(dict.fromkeys((experiment.evaluate.methods or []) + methods))
    report = _stage("evaluate", lambda: evaluate(experiment.evaluate, context, methods=methods), lambda r: "", results)
    print(markdown(report), flush=True)
    print(f"pipeline finished in {time.perf_counter() - started:.1f} s; outputs in {experiment.run_dir}", flush=True)
    return results
