"""`trsr run`: every stage of an experiment, in order, into one run folder.

Each stage skips itself when its outputs are up to date for the same config and
inputs (see trsr.runs). Stages so far: prepare, summarize. Train, score and
evaluate join as they land.
"""

from __future__ import annotations

import time

from trsr.experiment import ExperimentConfig


def run_pipeline(experiment: ExperimentConfig, force: bool = False) -> dict:
    from trsr.data.prepare import describe as describe_prepare
    from trsr.data.prepare import prepare
    from trsr.summarize.job import describe as describe_summaries
    from trsr.summarize.job import summarize

    stages = [
        ("prepare", prepare, describe_prepare),
        ("summarize", summarize, describe_summaries),
    ]
    started = time.perf_counter()
    results: dict = {}
    print(f"run folder {experiment.run_dir}", flush=True)
    for name, run_stage, describe in stages:
        stage_started = time.perf_counter()
        print(f"[{name}] running", flush=True)
        results[name] = run_stage(experiment, force=force)
        print(describe(results[name]), flush=True)
        status = "up to date, skipped" if results[name].get("skipped") else "done"
        print(f"[{name}] {status} in {time.perf_counter() - stage_started:.1f} s", flush=True)
    print(f"pipeline finished in {time.perf_counter() - started:.1f} s; outputs in {experiment.run_dir}")
    return results
