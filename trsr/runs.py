"""The run folder: where every stage's outputs live, and the one place that decides
whether a stage is up to date.

    <run_dir>/
      config.yaml              the experiment config of the last command given --config
      prepared/                items, sequences, samples/<split>, lists/<split>, rejects
      summaries/<mode>/        one row per ranking list: the list and the user's summary
      user_summaries/<mode>/   one row per user of prepared/sequences (summarize.users: all)
      candidates/<method>/     scored candidates of your own retrieval (score --candidates)
      train/<method>/          LoRA checkpoints, result.json; texts/ (training texts)
      scores/<method>/<split>/ one row per candidate: p(yes) (LLM) or the model's score
      embeddings/<encoder>/    one vector per catalogue item (baselines)
      report/                  the evaluation

Every stage output is a `StageFolder`: its data files (Parquet, at the folder's top
level; the streaming stages write one file per committed block) next to bookkeeping
files whose names start with "_", which Parquet readers (pyarrow, Ray Data) skip:

    _manifest.json   written last: the fingerprint of the config and inputs that made
                     the outputs. The stage is complete when it matches the current one.
    _attempt.json    the fingerprint of an unfinished run whose rows may be resumed
    _checkpoint/     Ray Data's row-level checkpoint of an unfinished run
    _stats.json      the stage's counts and timings
    _rejects.parquet rows the stage could not process, with the reason

`StageFolder.begin` is the one rule for what happens to earlier files: outputs of the
same fingerprint are kept (complete: skip; unfinished: resume), anything else is
cleared before the stage writes again.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from typing import Any

import pyarrow as pa

from trsr import storage
from trsr.schema import SPLITS
from trsr.errors import TrsrError

MANIFEST = "_manifest.json"
ATTEMPT = "_attempt.json"
CHECKPOINT = "_checkpoint"
STATS = "_stats.json"
REJECTS = "_rejects.parquet"
# Part of every stage fingerprint: outputs written by an older layout of the run folder
# are recomputed rather than misread.
LAYOUT = 3


class StageFolder:
    """One stage output folder (see the module doc)."""

    def __init__(self, path: str, name: str):
        self.path = str(path)
        self.name = name  # what the stage is called in messages, e.g. "summaries/recurrent"

    def __repr__(self) -> str:
        return f"StageFolder({self.path!r})"

    def join(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    @property
    def manifest(self) -> str:
        return self.join(MANIFEST)

    @property
    def checkpoint(self) -> str:
        return self.join(CHECKPOINT)

    @property
    def stats_path(self) -> str:
        return self.join(STATS)

    @property
    def rejects(self) -> str:
        return self.join(REJECTS)

    # -- the up-to-date rule ----------------------------------------------------------
    def exists(self) -> bool:
        return storage.exists(self.manifest)

    def fingerprint(self) -> str | None:
        """The fingerprint of the complete outputs here (None: not complete)."""
        return _read_field(self.manifest, "fingerprint")

    def is_complete(self, fingerprint: str) -> bool:
        return self.fingerprint() == fingerprint

    def require(self, what: str) -> str:
        """The fingerprint of the complete outputs; a clear error when there are none."""
        found = self.fingerprint()
        if found is None:
            raise TrsrError(f"{self.manifest}: not found; {what}")
        return found

    def begin(self, fingerprint: str, force: bool = False) -> bool:
        """Prepare to write outputs for `fingerprint`; True when an unfinished earlier
        run with the same fingerprint left rows to resume from.

        Complete outputs of another fingerprint, unfinished ones of another fingerprint,
        and anything when `force`, are deleted first: a stage never mixes rows of two
        configurations."""
        attempt = _read_field(self.join(ATTEMPT), "fingerprint")
        resume = not force and attempt == fingerprint and not self.exists()
        if not resume:
            self.clear()
            storage.write_json({"fingerprint": fingerprint, "started_at": time.time()}, self.join(ATTEMPT))
        return resume

    def finish(self, fingerprint: str, stats: dict, **details: Any) -> None:
        """Record the stats, then the manifest (last: it is what makes the stage complete)."""
        storage.write_json(stats, self.stats_path)
        storage.write_json(
            {"stage": self.name, "fingerprint": fingerprint, "finished_at": time.time(), **details},
            self.manifest,
        )
        remove(self.join(ATTEMPT))
        remove(self.checkpoint)

    def stats(self) -> dict:
        return storage.read_json(self.stats_path) if storage.exists(self.stats_path) else {}

    def details(self) -> dict:
        """What `finish` recorded with the complete outputs ({} when not complete)."""
        return storage.read_json(self.manifest) if storage.exists(self.manifest) else {}

    def clear(self) -> None:
        remove(self.path)

    # -- the data ---------------------------------------------------------------------
    def data_files(self) -> list[str]:
        """The Parquet files of the output (top level; bookkeeping files excluded)."""
        fs = storage.fsspec_filesystem(self.path)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(self.path)
        if not fs.exists(self.path):
            return []
        out = []
        for entry in fs.ls(self.path, detail=True):
            name = posixpath.basename(str(entry["name"]).rstrip("/"))
            if entry["type"] == "file" and name.endswith(".parquet") and not name.startswith(("_", ".")):
                out.append(self.join(name))
        return sorted(out)

    def dataset(self):
        """A pyarrow dataset over the data files (streamed scans, filters, counts)."""
        import pyarrow.dataset as ds

        files = self.data_files()
        filesystem, _ = storage.arrow_filesystem(self.path)
        inner = [storage.arrow_filesystem(f)[1] for f in files]
        return ds.dataset(inner, filesystem=filesystem, format="parquet")

    def read(self, columns: list[str] | None = None, filter=None) -> pa.Table:
        """The output rows as one table (for outputs sized by a config, such as the
        lists of one evaluation split; streaming consumers use `dataset()`)."""
        if not self.data_files():
            raise TrsrError(f"{self.path}: no output files; run the stage that writes {self.name} first")
        return self.dataset().to_table(columns=columns, filter=filter)


class RunFolder:
    """Every path of a run folder: each stage's folder is named here and nowhere else."""

    SCORES = "scores"
    REPORT = "report"

    def __init__(self, run_dir: str):
        self.root = str(run_dir)

    def stage_dir(self, stage: str) -> str:
        return storage.join(self.root, stage)

    @property
    def config(self) -> str:
        """The experiment config the folder was last run with (`--run-dir` alone reads it)."""
        return storage.join(self.root, "config.yaml")

    # prepared data -----------------------------------------------------------------
    @property
    def prepared_stage(self) -> StageFolder:
        return StageFolder(self.stage_dir("prepared"), "prepared")

    @property
    def prepared(self) -> str:
        return self.stage_dir("prepared")

    def prepared_fingerprint(self) -> str:
        return self.prepared_stage.require(f"run `trsr data prepare` into {self.root} first")

    def prepared_min_history(self) -> int | None:
        """The shortest history the prepared protocol kept (None: prepared before it was
        recorded), for the stages whose prompts show K recent items."""
        self.prepared_fingerprint()
        return (self.prepared_stage.stats().get("protocol") or {}).get("min_history")

    def items(self) -> str:
        return storage.join(self.prepared, "items.parquet")

    def sequences(self) -> str:
        return storage.join(self.prepared, "sequences.parquet")

    def samples(self, split: str) -> str:
        _check_split(split)
        return storage.join(self.prepared, "samples", f"{split}.parquet")

    def lists(self, split: str) -> str:
        """One row per ranking list (schema LISTS), sorted by list_id."""
        _check_split(split)
        return storage.join(self.prepared, "lists", f"{split}.parquet")

    def rejects(self, stage: str) -> str:
        return storage.join(self.stage_dir(stage), "rejects.parquet")

    # stage outputs -------------------------------------------------------------------
    def summaries(self, mode: str) -> StageFolder:
        return StageFolder(storage.join(self.root, "summaries", mode), f"summaries/{mode}")

    def user_summaries(self, mode: str) -> StageFolder:
        """Every user's summary (summarize.users: all), one row per user."""
        return StageFolder(storage.join(self.root, "user_summaries", mode), f"user_summaries/{mode}")

    def training(self, method: str) -> StageFolder:
        """The LoRA run of `method` (result.json + checkpoints under lora/)."""
        return StageFolder(storage.join(self.root, "train", method), f"train/{method}")

    def best_adapter(self, method: str) -> str:
        """The best adapter of the last `trsr train` of `method` (local or s3:// path),
        from the training's result.json."""
        path = storage.join(self.training(method).path, "result.json")
        if not storage.exists(path):
            raise TrsrError(
                f"{path}: not found; run `trsr train` for {method} first, or set "
                "train.enabled=false to score with the base model, or score.engine.lora_adapter=<folder>"
            )
        return storage.read_json(path)["best_adapter"]

    def training_seconds(self, method: str) -> float | None:
        """What the training of `method` cost across its calls (None: not trained): the
        last call's wall time plus the epochs earlier calls trained. A call that finds
        the run complete has a wall time of 0; one that resumed ran only the epochs
        after `resumed_from_epoch`."""
        path = storage.join(self.training(method).path, "result.json")
        if not storage.exists(path):
            return None
        result = storage.read_json(path)
        earlier = sum(r["seconds"] for r in result["history"] if r["epoch"] <= result.get("resumed_from_epoch", 0))
        return result["wall_seconds"] + earlier

    def training_texts(self, method: str) -> StageFolder:
        return StageFolder(storage.join(self.root, "train", method, "texts"), f"train/{method}/texts")

    def scores(self, method: str, split: str) -> StageFolder:
        _check_split(split)
        return StageFolder(storage.join(self.method_scores(method), split), f"{self.SCORES}/{method}/{split}")

    def method_scores(self, method: str) -> str:
        """scores/<method>/: every split of a method (and a baseline's stats.json)."""
        return storage.join(self.root, self.SCORES, method)

    def score_methods(self) -> list[str]:
        """Methods with a scores/<method>/ folder."""
        folder = self.stage_dir(self.SCORES)
        fs = storage.fsspec_filesystem(folder)
        if not fs.exists(folder):
            return []
        return sorted(
            posixpath.basename(str(e["name"]).rstrip("/")) for e in fs.ls(folder, detail=True) if e["type"] == "directory"
        )

    def candidate_input(self, method: str) -> StageFolder:
        """`trsr score --candidates`: the candidates grouped into one row per user."""
        return StageFolder(storage.join(self.root, "candidates", method, "input"), f"candidates/{method}/input")

    def candidate_scores(self, method: str, output: str | None = None) -> StageFolder:
        """`trsr score --candidates`: the ranked candidates (`output`, else in the run folder)."""
        if output:
            return StageFolder(output, output)
        return StageFolder(storage.join(self.root, "candidates", method, "scores"), f"candidates/{method}/scores")

    def embeddings(self, encoder: str) -> StageFolder:
        return StageFolder(storage.join(self.root, "embeddings", encoder), f"embeddings/{encoder}")

    def report(self, name: str) -> str:
        return storage.join(self.root, self.REPORT, name)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")


def _read_field(path: str, key: str):
    if not storage.exists(path):
        return None
    try:
        return storage.read_json(path).get(key)
    except (ValueError, OSError):
        return None


def remove(path: str) -> None:
    """Delete a file or folder (local or s3://) if it exists."""
    fs = storage.fsspec_filesystem(path)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    if fs.exists(path):
        fs.rm(path, recursive=True)
    elif not storage.is_remote(path) and os.path.islink(path):
        os.unlink(path)


def inputs_signature(path: str) -> list[tuple[str, int, str]]:
    """(file, size, content stamp) of every file under `path`, for fingerprints.

    The stamp says what the bytes are, not when they were written: a digest of a local
    file's bytes, an object store's ETag (derived from the content). Modification times
    would make every stage recompute when the same data is copied, restored or synced
    to a new place (a fresh copy of the shared datasets did exactly that: the quality
    run recomputed everything from the item embeddings on). Names are relative to
    `path`, which is in the config the fingerprint also covers. Hashing reads the
    inputs once more per fingerprint; the stage it guards reads and parses them all."""
    fs = storage.fsspec_filesystem(path)
    if not fs.exists(path):
        return []
    if fs.isdir(path):
        root = str(fs.info(path)["name"]).rstrip("/")
        entries = fs.find(path, detail=True)
    else:
        root, entries = None, {path: fs.info(path)}
    out = []
    for name, info in sorted(entries.items()):
        relative = posixpath.relpath(name, root) if root else posixpath.basename(name)
        if storage.is_remote(path):
            stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
        else:
            stamp = _file_digest(name)
        out.append((relative, int(info.get("size") or 0), str(stamp)))
    return out


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
