"""Real faults in `trsr summarize` (tiny random Llama, transformers engine, real Ray):
the job's process group is killed after some blocks are committed, the rerun resumes
without recomputing them (and survives an engine actor killed on the way), and the
result equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from trsr.config import load
from trsr.data.prepare import prepare
from trsr.experiment import ExperimentConfig
from trsr.runs import RunFolder
from trsr.summarize.job import read_summaries, summarize

pytestmark = pytest.mark.integration

COMPARED = ["list_id", "summary", "status", "intermediates", "calls", "retries", "tokens_in", "tokens_out"]


def overrides(run_dir, data_dir, tiny_model) -> list[str]:
    return [
        f"run_dir={run_dir}",
        "prepare.source.format=mind",
        f"prepare.source.path={data_dir}",
        "prepare.synthetic.users=36",
        "prepare.synthetic.items=200",
        "prepare.synthetic.min_history=6",
        "prepare.synthetic.max_history=12",
        "prepare.protocol.min_history=6",
        "prepare.protocol.max_history=12",
        "summarize.modes=[recurrent]",
        "summarize.items_per_block=3",
        "summarize.execution=fused",
        "summarize.users_per_batch=2",
        f"summarize.engine.model={tiny_model}",
        "summarize.engine.backend=transformers",
        "summarize.engine.max_model_len=1024",
        "summarize.generation.max_new_tokens=12",
        # Greedy, and greedy retries: the same users give the same summaries.
        "summarize.generation.retry_temperature=0",
        "runner.progress_seconds=0",
    ]


def committed(folder) -> list[str]:
    if not os.path.isdir(folder.checkpoint):
        return []
    return [n for n in os.listdir(folder.checkpoint) if n.endswith(".parquet") and not n.endswith(".pending.parquet")]


def processes(marker: str) -> dict[int, object]:
    """This test process's descendants (its Ray cluster's workers) running `marker`."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()):
                found[child.pid] = child
        except psutil.Error:
            continue
    return found


def test_killed_summarize_resumes_without_recomputing_and_equals_an_uninterrupted_run(
    tmp_path, tiny_model, ray_local
):
    # The uninterrupted reference.
    reference = load(ExperimentConfig, None, overrides(tmp_path / "ref", tmp_path / "data", tiny_model))
    prepare(reference.prepare, reference.context())
    expected = summarize(reference.summarize, reference.context())["modes"]["recurrent"]
    assert expected["rows_computed"] == expected["rows_in"] > 20

    # The same job as a command, its process group killed after a few committed blocks.
    args = overrides(tmp_path / "run", tmp_path / "data", tiny_model)
    experiment = load(ExperimentConfig, None, args)
    prepare(experiment.prepare, experiment.context())
    folder = RunFolder(experiment.run_dir).summaries("recurrent")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(experiment.model_dump(mode="json")))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    job = subprocess.Popen(
        [sys.executable, "-m", "trsr", "summarize", "--config", str(recipe)],
        start_new_session=True,  # one process group: the job and the local Ray cluster it starts
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(committed(folder)) < 3 and job.poll() is None:
            time.sleep(0.2)
        assert job.poll() is None, "the job finished before it could be killed"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    done_before = len(committed(folder))
    assert done_before >= 3 and not folder.exists()
    from trsr import storage

    finished = set()
    for name in committed(folder):
        finished |= set(storage.read_parquet(os.path.join(folder.checkpoint, name)).column("list_id").to_pylist())

    # The rerun: an engine actor is killed on the way as well (its batch is retried).
    stale = set(processes("MapBatches(SummarizeStage)"))
    killed: list[int] = []

    def kill_an_engine_actor():
        deadline = time.time() + 300
        while time.time() < deadline and not killed and not folder.exists():
            fresh = [pid for pid in processes("MapBatches(SummarizeStage)") if pid not in stale]
            if fresh and len(committed(folder)) > done_before:
                os.kill(fresh[0], signal.SIGKILL)
                killed.append(fresh[0])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_an_engine_actor)
    killer.start()
    stats = summarize(experiment.summarize, experiment.context())["modes"]["recurrent"]
    killer.join()

    assert stats["resumed"] is True and stats["rows_reused"] > 0
    assert stats["rows_reused"] + stats["rows_computed"] == stats["rows_in"] == expected["rows_in"]
    assert killed, "no engine actor of the rerun was found to kill"
    got = read_summaries(experiment.run_dir, "recurrent")
    ids = got.column("list_id").to_pylist()
    assert len(ids) == len(set(ids)) == expected["rows_in"]  # every user exactly once
    want = read_summaries(reference.run_dir, "recurrent")
    assert got.select(COMPARED).equals(want.select(COMPARED))  # greedy: as if never interrupted
    # The engine was called for the users the rerun computed, and only for them: the
    # rerun's calls are the reference's calls of exactly the users not finished before.
    assert stats["rows_reused"] == len(finished)
    todo = want.filter(pc.invert(pc.is_in(want.column("list_id"), value_set=pa.array(sorted(finished)))))
    assert stats["computed"]["calls"] == sum(todo.column("calls").to_pylist()) < expected["calls"]
