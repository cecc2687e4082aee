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


class Stages:
    """The console of `trsr run`: a plan line first, then `[i/N] name` as each stage
    starts and a closing line with its seconds (each stage prints its own accounting)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.done = 0
        counts: dict[str, int] = {}
        for name in names:
            kind = name.split()[0]
            counts[kind] = counts.get(kind, 0) + 1
        plan = ", ".join(kind if n == 1 else f"{kind} x{n}" for kind, n in counts.items())
        print(f"{len(names)} stages: {plan}", flush=True)

    def run(self, name: str, work: Callable[[], dict], describe: Callable[[dict], str], results: dict) -> dict:
        self.done += 1
        tag = f"[{self.done}/{len(self.names)}] {name}"
        started = time.perf_counter()
        print(f"{tag}: running", flush=True)
        result = work()
        results[name] = result
        text = describe(result)
        if text:
            print(text, flush=True)
        skipped = result.get("skipped") or (result and all(isinstance(v, dict) and v.get("skipped") for v in result.values()))
        status = "up to date, skipped" if skipped else "done"
        print(f"{tag}: {status} in {time.perf_counter() - started:.1f} s", flush=True)
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
    from trsr.evaluate.report import evaluate, markdown, report_path
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
    variants = [experiment.for_variant(v) for v in experiment.variant_names()]
    needs_summaries = any(v.score.prompt.mode for v in variants)
    names = ["prepare"] + (["summarize"] if needs_summaries else [])
    for variant in variants:
        method = variant.score.method_name
        names += ([f"train {method}"] if variant.train.enabled else []) + [f"score {method}"]
    names += (["baselines"] if experiment.with_baselines else []) + ["evaluate"]
    stages = Stages(names)

    stages.run("prepare", lambda: prepare(experiment.prepare, context, force=force), describe_prepare, results)
    if needs_summaries:
        stages.run("summarize", lambda: summarize(experiment.summarize, context, force=force), describe_summaries, results)
    methods = []
    for variant in variants:
        method = variant.score.method_name
        methods.append(method)
        if variant.train.enabled:
            stages.run(f"train {method}", lambda: train(variant.train, variant.score, context, force=force),
                       describe_training, results)
        stages.run(f"score {method}", lambda: score(variant.score, context, split=None, force=force, trained=variant.train.enabled),
                   describe_scores, results)
    if experiment.with_baselines:
        from trsr.baselines.job import describe_brief as describe_baselines
        from trsr.baselines.job import run_baselines

        done = stages.run("baselines", lambda: run_baselines(experiment.baselines, context, force=force), describe_baselines, results)
        methods.extend(done)  # {method: stats}
    # This run's methods (plus any named in evaluate.methods), not stale folders of
    # earlier configs.
    methods = list(dict.fromkeys((experiment.evaluate.methods or []) + methods))
    report = stages.run("evaluate", lambda: evaluate(experiment.evaluate, context, methods=methods, encoder=experiment.baselines.encoder), lambda r: "", results)
    print(markdown(report, full=False), flush=True)
    split = report["split"]
    print(f"pipeline finished in {time.perf_counter() - started:.1f} s; the report (these tables, the summaries' "
          "health, the run, example users): "
          + ", ".join(report_path(experiment.run_dir, split, suffix) for suffix in ("md", "json", "png")), flush=True)
    return results
