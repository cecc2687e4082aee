"""The runner's config section and the context every stage job runs in."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field

from trsr.config import Section
from trsr.runs import RunFolder


class RunnerConfig(Section):
    """Section `runner`: how every streaming stage handles faults and reports progress."""

    # Fail the stage when more than this share of its input rows failed (their errors
    # are in the stage's _rejects.parquet); 0 = any failed row fails the stage.
    max_failed_share: float = Field(0.01, ge=0.0, le=1.0)
    # An engine actor that dies (killed, out of memory) is restarted this many times,
    # and a batch it was running is retried this many times (-1 = without limit).
    actor_restarts: int = Field(4, ge=-1)
    task_retries: int = Field(4, ge=-1)
    # Seconds between progress lines (0 = none).
    progress_seconds: float = Field(15.0, ge=0.0)
    # Engine batches per block (= per commit and output file). The driver's memory
    # grows with the number of blocks in flight and done (Ray Data's per-block stats
    # and bookkeeping, Ray core's task state): measured ~50 KB per block, so 1M users
    # in blocks of one 64-user batch cost it ~0.8 GB, 8 batches per block ~100 MB. A
    # crash recomputes up to one block per actor.
    block_batches: int = Field(1, ge=1)
    # At most this many blocks per stage: a larger stage gets more batches per block
    # (rows_per_block), so the driver's memory stops growing with the rows (~50 KB x
    # max_blocks, ~50 MB). A crash loses the blocks in flight: about actors / max_blocks
    # of the stage (10% with 96 actors); raise it for finer resumes, at ~50 KB a block.
    max_blocks: int = Field(1000, ge=1)
    # Seconds between returns of the driver's freed heap memory to the system while a
    # stage runs (0 = never); see DriverHeapTrimmer.
    trim_driver_heap_seconds: float = Field(5.0, ge=0.0)


@dataclass(frozen=True)
class RunContext:
    """What a stage's job function gets besides its own config section: the run folder
    it reads and writes, the experiment's seed, and how streaming stages handle faults
    and report progress. Jobs take this, not the whole experiment, so that a stage
    depends only on its own section (docs/ARCHITECTURE.md)."""

    run: RunFolder
    seed: int
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    @property
    def run_dir(self) -> str:
        return self.run.root
