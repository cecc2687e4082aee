"""The run folder: where every stage's outputs live, and when a stage can be skipped.

    <run_dir>/
      prepared/   items, sequences, samples/{train,valid,test}, rejects (.parquet),
                  stats.json, _manifest.json
      (later stages add summaries/, adapters/, scores/, report/)

Each stage writes `_manifest.json` last, holding the fingerprint of its config and
inputs. A stage whose manifest matches the current fingerprint is complete and is
skipped; anything else (no manifest, other config, changed inputs) runs again.
"""

from __future__ import annotations

import time
from typing import Any

from trsr import storage
from trsr.data.schema import SPLITS

MANIFEST = "_manifest.json"


class RunFolder:
    def __init__(self, run_dir: str):
        self.root = str(run_dir)

    def stage_dir(self, stage: str) -> str:
        return storage.join(self.root, stage)

    # prepared data -----------------------------------------------------------
    @property
    def prepared(self) -> str:
        return self.stage_dir("prepared")

    def items(self) -> str:
        return storage.join(self.prepared, "items.parquet")

    def sequences(self) -> str:
        return storage.join(self.prepared, "sequences.parquet")

    def samples(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
        return storage.join(self.prepared, "samples", f"{split}.parquet")

    def rejects(self, stage: str) -> str:
        return storage.join(self.stage_dir(stage), "rejects.parquet")

    def stats(self, stage: str) -> str:
        return storage.join(self.stage_dir(stage), "stats.json")

    # completion --------------------------------------------------------------
    def manifest(self, stage: str) -> str:
        return storage.join(self.stage_dir(stage), MANIFEST)

    def is_complete(self, stage: str, fingerprint: str) -> bool:
        path = self.manifest(stage)
        if not storage.exists(path):
            return False
        try:
            return storage.read_json(path).get("fingerprint") == fingerprint
        except (ValueError, OSError):
            return False

    def mark_complete(self, stage: str, fingerprint: str, details: dict[str, Any]) -> None:
        storage.write_json(
            {"stage": stage, "fingerprint": fingerprint, "finished_at": time.time(), **details},
            self.manifest(stage),
        )


def inputs_signature(path: str) -> list[tuple[str, int, str]]:
    """(file, size, modification stamp) of every file under `path`, for fingerprints."""
    fs = storage.fsspec_filesystem(path)
    if not fs.exists(path):
        return []
    entries = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    out = []
    for name, info in sorted(entries.items()):
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
        out.append((name, int(info.get("size") or 0), str(stamp)))
    return out
