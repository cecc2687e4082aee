"""`trsr run`: every stage of an experiment, in order, into one run folder.

Each stage skips itself when its outputs are up to date (see trsr.runs). Stages so
far: prepare. Summarize, train, score and evaluate join as they land.
"""

from __future__ import annotations

import time

from trsr.experiment import ExperimentConfig


def run_pipeline(experiment: ExperimentConfig, force: bool = False) -> dict:
    from trsr.data.prepare import describe, prepare

    started = time.perf_counter()
    results: dict = {}
    print(f"[prepare] run folder {experiment.run_dir}", flush=True)
    results["prepare"] = prepare(experiment, force=force)
    status = "up to date, skipped" if results["prepare"].get("skipped") else "done"
    print(describe(results["prepare"]))
    print(f"[prepare] {status}")
    print(f"pipeline finished in {time.perf_counter() - started:.1f} s; outputs in {experiment.run_dir}")
    return results
