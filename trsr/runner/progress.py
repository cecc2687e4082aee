"""The driver's side of a running stage: the rows-done counter actor, progress lines,
and returning the driver's freed heap memory to the system (`DriverHeapTrimmer`)."""

from __future__ import annotations

import threading
import time

from trsr import storage
from trsr.runner.job import StageJob


def progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self) -> None:
            self.done = 0
            self.failed = 0

        def add(self, rows: int, failed: int) -> int:
            self.done += rows
            self.failed += failed
            return self.failed

        def totals(self) -> tuple[int, int]:
            return self.done, self.failed

    return Progress.remote()


# A stage whose counts did not move prints no line for this many periods (a heartbeat
# then shows it is alive): no screens of identical lines while an engine warms up.
HEARTBEAT_PERIODS = 4


def worth_a_line(counts: tuple[int, int], last: tuple[int, int] | None, periods_since_last: float) -> bool:
    """A progress line when the counts moved since the last line, or as a heartbeat."""
    return counts != last or periods_since_last >= HEARTBEAT_PERIODS


class ProgressPrinter(threading.Thread):
    """Prints a progress line every `seconds` until stopped (driver side), skipping
    lines that would repeat the last one (worth_a_line)."""

    def __init__(self, job: StageJob, progress, total: int, seconds: float):
        super().__init__(daemon=True)
        self.job, self.progress, self.total, self.seconds = job, progress, total, seconds
        self.started = time.perf_counter()
        self.stopped = threading.Event()

    def run(self) -> None:
        import ray

        last, last_at = None, self.started
        while not self.stopped.wait(self.seconds):
            try:
                done, failed = ray.get(self.progress.totals.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a missed progress line is harmless
                continue
            now = time.perf_counter()
            if not worth_a_line((done, failed), last, (now - last_at) / self.seconds):
                continue
            last, last_at = (done, failed), now
            print(progress_line(self.job, done, failed, self.total, now - self.started), flush=True)

    def stop(self) -> None:
        self.stopped.set()


class DriverHeapTrimmer(threading.Thread):
    """Calls glibc's malloc_trim(0), and has Arrow's allocator release what it keeps,
    every `seconds` while a stage runs.

    Why home-made: Ray has no setting for it. Measured on the scale benchmark's data
    path (benchmarks/scale.py): the driver's live Python objects grow by ~10 KB per
    block, but its resident memory grew ~45 MB from 20k to 100k users in the score
    stage, and ~90% of that was memory already freed (by the streaming executor's
    threads and Ray's core worker) that glibc kept in its arenas. Trimming every few
    seconds returns it; the cost is a heap walk (milliseconds). A no-op where glibc is
    absent (macOS, musl)."""

    def __init__(self, seconds: float):
        super().__init__(daemon=True, name="trsr-heap-trim")
        self.seconds = seconds
        self.stopped = threading.Event()
        self.trim = _malloc_trim()

    def run(self) -> None:
        while not self.stopped.wait(self.seconds):
            self._release()

    def stop(self) -> None:
        self.stopped.set()
        self._release()

    def _release(self) -> None:
        storage.release_arrow_memory()  # Arrow's own allocator (mimalloc) keeps freed memory too
        if self.trim is not None:
            self.trim(0)


def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def progress_line(job: StageJob, done: int, failed: int, total: int, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    left = max(total - done, 0)
    eta = f"ETA {_duration(left / rate)}" if rate > 0 and left else "ETA -"
    share = f" ({100 * done / total:.0f}%)" if total else ""
    failed_text = f", {failed} failed" if failed else ""
    return f"[{job.name}] {done:,}/{total:,} {job.unit}{share}{failed_text}, {rate:.2f} {job.unit}/s, {eta}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
