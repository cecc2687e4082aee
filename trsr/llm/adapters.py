"""LoRA adapters as the engines load them: a local PEFT folder.

Training writes checkpoints (`epoch-NNN/`, `step-NNNNNN/`, local or s3://) whose
`adapter/` folder is a PEFT adapter; engines load adapters from local files only, so a
remote one is copied to the trsr cache first (each engine actor fetches its own copy).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil

from trsr import storage
from trsr.errors import InputFileError
from trsr.llm.models import cache_dir

ADAPTER_DIR = "adapter"  # the PEFT adapter folder inside a training checkpoint


def copy_adapter(checkpoint_path: str, dest: str) -> str:
    """Copy the adapter of a checkpoint (an `epoch-NNN` folder, or its `adapter/`
    folder; local or s3://) to the local folder `dest`, which then is a PEFT adapter
    folder for `EngineConfig.lora_adapter` (transformers and vLLM). Returns `dest`."""
    source = str(checkpoint_path).rstrip("/")
    if not storage.exists(storage.join(source, "adapter_config.json")):
        source = storage.join(source, ADAPTER_DIR)
    if not storage.exists(storage.join(source, "adapter_config.json")):
        raise InputFileError(f"{checkpoint_path}: no LoRA adapter (adapter_config.json) in this checkpoint")
    fs = storage.fsspec_filesystem(source)
    os.makedirs(dest, exist_ok=True)
    for found in fs.ls(source, detail=False):
        name = posixpath.basename(str(found).rstrip("/"))
        path = storage.join(source, name)
        if fs.isdir(found):
            continue
        with storage.open_binary(path) as reader, open(os.path.join(dest, name), "wb") as writer:
            shutil.copyfileobj(reader, writer)
    return dest


def local_adapter(path: str) -> str:
    """A local folder holding the adapter at `path`: `path` itself, or for s3:// a copy
    under the trsr cache (engines load adapters from local files; on a cluster each
    engine actor fetches its own copy)."""
    if not storage.is_remote(path):
        return path
    dest = os.path.join(cache_dir(), "adapters", hashlib.sha256(path.encode()).hexdigest()[:16])
    return copy_adapter(path, dest)
