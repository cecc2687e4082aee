"""The stage runner on real Ray Data with a cheap step: one file per block, skip when
complete, poisoned rows to rejects, a broken step fails, a killed actor restarts, and
a killed job resumes without recomputing committed rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from trsr import storage
from trsr.errors import TrsrError
from trsr.runner import ERROR, RunnerConfig, StageFailed, Step, StageJob, TooManyFailures, rows_per_block, run_stage
from trsr.runs import StageFolder

pytestmark = pytest.mark.integration

OUT = pa.schema([("id", pa.string()), ("x2", pa.int64()), ("pid", pa.int64())])


class Double:
    """A toy step: x -> 2x, with the worker's pid; rows in `poison` raise."""

    def __init__(self, poison=(), sleep: float = 0.0):
        self.poison = set(poison)
        self.sleep = sleep

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        bad = [i for i in ids if i in self.poison]
        if bad:
            raise ValueError(f"poisoned row {bad[0]}")
        time.sleep(self.sleep)
        return pa.table(
            {"id": batch.column("id"), "x2": pc.multiply(batch.column("x"), 2), "pid": [os.getpid()] * batch.num_rows},
            schema=OUT,
        )


# Ray workers cannot import this test module by name: ship its classes by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def write_input(folder, rows: int) -> str:
    path = os.path.join(folder, "input.parquet")
    storage.write_parquet(pa.table({"id": [f"r{i:03d}" for i in range(rows)], "x": list(range(rows))}), path)
    return path


def job(tmp_path, rows=40, batch=8, name="double", **step_kwargs) -> StageJob:
    return StageJob(
        name=name,
        folder=StageFolder(str(tmp_path / "out"), "out"),
        inputs=[write_input(str(tmp_path), rows)],
        id_column="id",
        steps=[Step(Double, step_kwargs, OUT)],
        batch_rows=batch,
        fingerprint="fp-1",
        unit="rows",
        block_stats=lambda t: {"x2_sum": int(pc.sum(t.column("x2")).as_py())},
    )


def output(the_job: StageJob) -> pa.Table:
    return the_job.folder.read().sort_by("id")


QUIET = RunnerConfig(progress_seconds=0)


def test_stage_writes_one_file_per_block_and_skips_when_complete(tmp_path, ray_local):
    the_job = job(tmp_path)
    stats = run_stage(the_job, QUIET)
    table = output(the_job)
    assert table.column("id").to_pylist() == [f"r{i:03d}" for i in range(40)]
    assert table.column("x2").to_pylist() == [2 * i for i in range(40)]
    assert table.column(ERROR).null_count == 40
    assert len(the_job.folder.data_files()) == 5  # 40 rows in blocks of 8: one commit each
    assert stats["rows_in"] == stats["rows_computed"] == stats["rows_out"] == 40
    assert stats["rows_reused"] == 0 and stats["x2_sum"] == 2 * sum(range(40))
    assert the_job.folder.is_complete("fp-1")
    assert not storage.exists(the_job.folder.checkpoint)  # removed once the manifest is written
    assert run_stage(the_job, QUIET)["skipped"] is True
    # Another fingerprint: the old outputs are cleared, not mixed.
    the_job.fingerprint = "fp-2"
    stats = run_stage(the_job, QUIET)
    assert stats["skipped"] is False and len(output(the_job)) == 40


class BatchSize:
    """A toy step that writes the size of the batch it was given as x2."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        return pa.table({"id": batch.column("id"), "x2": [n] * n, "pid": [os.getpid()] * n}, schema=OUT)


def test_block_batches_and_max_blocks_put_several_step_batches_in_one_block(tmp_path, ray_local):
    the_job = job(tmp_path)
    the_job.steps = [Step(BatchSize, {}, OUT)]
    stats = run_stage(the_job, RunnerConfig(progress_seconds=0, block_batches=2))
    # 40 rows, batches of 8, 2 batches per block: blocks of 16, 16 and 8 rows, one file each.
    assert sorted(storage_rows(p).num_rows for p in the_job.folder.data_files()) == [8, 16, 16]
    assert set(output(the_job).column("x2").to_pylist()) == {8}  # the step still sees batches of 8
    assert stats["rows_in"] == stats["rows_out"] == 40
    # At most 2 blocks: 3 batches per block (blocks of 24 and 16 rows), batches still of 8.
    stats = run_stage(the_job, RunnerConfig(progress_seconds=0, max_blocks=2), force=True)
    assert sorted(storage_rows(p).num_rows for p in the_job.folder.data_files()) == [16, 24]
    assert set(output(the_job).column("x2").to_pylist()) == {8} and stats["rows_out"] == 40


def test_rows_per_block_caps_the_blocks_of_a_stage_in_whole_batches():
    config = RunnerConfig(block_batches=2, max_blocks=100)
    assert rows_per_block(64, 10_000, config) == 128  # 79 blocks: under the cap
    assert rows_per_block(64, 1_000_000, config) == 64 * 157  # ceil(1M / 6,400) batches
    assert rows_per_block(64, 1_000_000, config) * 100 >= 1_000_000
    assert rows_per_block(8, 0, config) == 16


def storage_rows(path: str):
    import pyarrow.parquet as pq

    filesystem, inner = storage.arrow_filesystem(path)
    return pq.ParquetFile(filesystem.open_input_file(inner)).metadata


def test_poisoned_rows_go_to_rejects_and_the_rest_finish(tmp_path, ray_local):
    the_job = job(tmp_path, poison=["r007", "r023"])
    stats = run_stage(the_job, RunnerConfig(progress_seconds=0, max_failed_share=0.1))
    table = output(the_job)
    assert table.num_rows == 40  # every input row: in the output or failed with its reason
    failed = table.filter(pc.is_valid(table.column(ERROR)))
    assert failed.column("id").to_pylist() == ["r007", "r023"]
    assert "ValueError: poisoned row r007" in failed.column(ERROR).to_pylist()[0]
    ok = table.filter(pc.is_null(table.column(ERROR)))
    # The other rows of the poisoned rows' batches were computed all the same.
    assert {"r000", "r006", "r008", "r016", "r022", "r024"} <= set(ok.column("id").to_pylist())
    assert ok.column("x2").to_pylist() == [2 * int(i[1:]) for i in ok.column("id").to_pylist()]
    assert stats["rows_failed"] == stats["rejects"] == 2 and stats["rows_in"] == 40
    rejects = storage.read_parquet(the_job.folder.rejects)
    assert rejects.column("raw").to_pylist() == ["r007", "r023"]
    assert all("poisoned row" in reason for reason in rejects.column("reason").to_pylist())
    assert set(rejects.column("stage").to_pylist()) == {"double"}


def test_more_failed_rows_than_allowed_fail_the_stage(tmp_path, ray_local):
    the_job = job(tmp_path, poison=["r007", "r023"])
    # 3% of 40 rows: one failed row is allowed, the second stops the stage.
    with pytest.raises(TooManyFailures, match=r"double: 2 of 40 rows failed.*poisoned row r0"):
        run_stage(the_job, RunnerConfig(progress_seconds=0, max_failed_share=0.03))
    assert not the_job.folder.exists()


def test_a_batch_in_which_every_row_fails_is_a_broken_step(tmp_path, ray_local):
    the_job = job(tmp_path, rows=16, poison=[f"r{i:03d}" for i in range(16)])
    # Two batches (r000-r007, r008-r015) fail; the stage names the first row of the one
    # that failed first, which depends on scheduling.
    with pytest.raises(StageFailed, match="double failed: ValueError: poisoned row r00[08];"):
        run_stage(the_job, RunnerConfig(progress_seconds=0, max_failed_share=1.0))
    assert not the_job.folder.exists()


def test_a_killed_actor_is_restarted_and_every_row_written_once(tmp_path, ray_local):
    the_job = job(tmp_path, rows=40, batch=4, name="slow", sleep=1.0)
    killed: list[int] = []

    def kill_once():
        # The step's worker process: its pid is in the first block it wrote (a worker of
        # this test's own Ray cluster).
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            files = the_job.folder.data_files()
            if files:
                try:
                    table = storage.read_parquet(files[0], columns=["pid"])
                except (OSError, pa.ArrowInvalid):
                    # Seen before its writer finished it: try again on the next poll.
                    table = None
                if table is not None and table.num_rows:
                    pid = table.column("pid")[0].as_py()
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_once)
    killer.start()
    stats = run_stage(the_job, RunnerConfig(progress_seconds=0))
    killer.join()
    assert killed, "the step's actor was never found to kill"
    table = output(the_job)
    ids = table.column("id").to_pylist()
    assert ids == sorted(set(ids)) and len(ids) == 40  # every row exactly once
    assert table.column(ERROR).null_count == 40
    pids = set(table.column("pid").to_pylist())
    assert killed[0] in pids and len(pids) >= 2  # the restarted actor did the rest
    assert stats["rows_computed"] == 40


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import pyarrow as pa
    import ray
    from trsr.runner import RunnerConfig, Step, StageJob, run_stage
    from trsr.runs import StageFolder

    OUT = pa.schema([("id", pa.string()), ("x2", pa.int64()), ("pid", pa.int64())])

    class Double:
        def __init__(self, sleep):
            self.sleep = sleep
        def __call__(self, batch):
            time.sleep(self.sleep)
            return pa.table({"id": batch.column("id"), "x2": pa.array([2 * x for x in batch.column("x").to_pylist()]),
                             "pid": [os.getpid()] * batch.num_rows}, schema=OUT)

    if __name__ == "__main__":
        folder, source, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
        ray.init(num_cpus=4, include_dashboard=False)
        job = StageJob(name="double", folder=StageFolder(folder, "out"), inputs=[source], id_column="id",
                       steps=[Step(Double, {"sleep": sleep}, OUT)], batch_rows=4, fingerprint="fp-1")
        print(run_stage(job, RunnerConfig(progress_seconds=0)))
    """
)


def _kill_and_wait(pid: int, timeout: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def test_an_interrupted_stage_resumes_without_recomputing_committed_rows(tmp_path, ray_local):
    script = tmp_path / "stage.py"
    script.write_text(RESUME_SCRIPT)
    source = write_input(str(tmp_path), 60)
    folder = StageFolder(str(tmp_path / "out"), "out")
    process = subprocess.Popen(
        [sys.executable, str(script), folder.path, source, "0.5"],
        start_new_session=True,  # its own process group: the job and the Ray cluster it starts
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(_committed(folder)) < 3 and process.poll() is None:
            time.sleep(0.2)
        assert process.poll() is None, "the job ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    # Ray worker processes of the killed job may sit outside its process group: kill the
    # ones that wrote output (their pids are in it) and wait until they are gone, so
    # that no block of the killed run is still committed after this point.
    for pid in set(folder.read(columns=["pid"]).column("pid").to_pylist()):
        _kill_and_wait(pid)
    committed_ids = set()
    for path in _committed(folder):
        committed_ids |= set(storage.read_parquet(path).column("id").to_pylist())
    assert 0 < len(committed_ids) < 60
    before = folder.read(columns=["id", "pid"]).to_pylist()  # committed blocks (maybe a pending one)
    killed_run = {row["id"]: row["pid"] for row in before if row["id"] in committed_ids}
    assert set(killed_run) == committed_ids

    resumed_job = StageJob(
        name="double", folder=folder, inputs=[source], id_column="id",
        steps=[Step(Double, {"sleep": 0.0}, OUT)], batch_rows=4, fingerprint="fp-1",
    )
    stats = run_stage(resumed_job, QUIET)
    assert stats["resumed"] is True
    assert stats["rows_reused"] == len(committed_ids) > 0
    assert stats["rows_reused"] + stats["rows_computed"] == stats["rows_in"] == 60
    table = output(resumed_job)
    ids = table.column("id").to_pylist()
    assert ids == [f"r{i:03d}" for i in range(60)]  # every row exactly once
    # Rows committed before the kill keep the killed run's values (not recomputed); the
    # others come from this run's workers.
    pids = dict(zip(ids, table.column("pid").to_pylist()))
    assert {i: pids[i] for i in committed_ids} == killed_run
    assert not set(pids[i] for i in ids if i not in committed_ids) & set(killed_run.values())


def _committed(folder: StageFolder) -> list[str]:
    if not os.path.isdir(folder.checkpoint):
        return []
    return [
        os.path.join(folder.checkpoint, name)
        for name in os.listdir(folder.checkpoint)
        if name.endswith(".parquet") and not name.endswith(".pending.parquet")
    ]


def test_missing_rows_are_caught(tmp_path, ray_local):
    """A step that drops a row: the runner's count of the written rows catches it."""
    from trsr.runner import Step as S

    class Drop(Double):
        def __call__(self, batch):
            return super().__call__(batch).slice(1)

    the_job = job(tmp_path, rows=8, batch=4)
    the_job.steps = [S(Drop, {}, OUT)]
    with pytest.raises(TrsrError, match="8 rows in, but .* holds 6"):
        run_stage(the_job, QUIET)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_driver_heap_trimmer_returns_freed_heap_memory_to_the_system():
    import psutil

    from trsr.runner import DriverHeapTrimmer

    process = psutil.Process()
    # 200 MB of 1 KB objects (glibc's heap, not pymalloc or mmap); one in 64 stays
    # alive, so the heap cannot shrink from its top and only a trim returns the pages.
    chunks = [bytes(1000) + bytes([i % 256]) for i in range(200_000)]
    kept = chunks[::64]
    del chunks
    held = process.memory_info().rss
    trimmer = DriverHeapTrimmer(60.0)
    trimmer.start()
    trimmer.stop()
    trimmer.join(timeout=5)
    assert trimmer.trim is not None
    assert process.memory_info().rss < held - 100 * 2**20
    assert len(kept) == 3125


def test_progress_lines_are_not_repeated_but_a_stalled_stage_still_shows_a_heartbeat():
    from trsr.runner.progress import HEARTBEAT_PERIODS, worth_a_line

    assert worth_a_line((0, 0), None, 1)  # the first line
    assert not worth_a_line((0, 0), (0, 0), 1)  # the engine is still warming up: no repeat
    assert worth_a_line((0, 0), (0, 0), HEARTBEAT_PERIODS)  # ... until the heartbeat
    assert worth_a_line((32, 0), (0, 0), 1) and worth_a_line((32, 1), (32, 0), 1)  # news


def even_rows(table: pa.Table) -> int:
    """Rows of an output batch whose x2 is a multiple of 4 (even ids): the 'work'."""
    return int(pc.sum(pc.equal(pc.bit_wise_and(table.column("x2"), 3), 0)).as_py() or 0)


def test_progress_counts_the_rows_that_get_work_when_a_stage_passes_others_on(tmp_path, ray_local):
    """StageJob.work_rows / work_total (summarize: lists beyond max_users pass on
    unsummarized): the rate and ETA follow the rows that got the work; the accounting
    still covers every row."""
    the_job = job(tmp_path)
    the_job.work_rows, the_job.work_total = even_rows, 20
    stats = run_stage(the_job, QUIET)
    assert stats["rows_in"] == stats["rows_computed"] == stats["rows_out"] == 40
    assert stats["rows_per_s"] * stats["seconds"] == pytest.approx(20, abs=0.5)  # 20 rows of work, not 40
    plain = run_stage(job(tmp_path / "plain"), QUIET)
    assert plain["rows_per_s"] * plain["seconds"] == pytest.approx(40, abs=0.5)
