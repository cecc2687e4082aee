"""Item text embeddings: every catalogue item's text, encoded once, cached as Parquet.

    items.parquet -> render_item (the same one-line text the LLM sees)
      -> EncodeStage (Ray Data actors: tokenizer + encoder, mean pooling, L2 norm)
      -> <run_dir>/embeddings/<encoder>.parquet   item_id, embedding (float32 x dim)
         <run_dir>/embeddings/<encoder>.json      fingerprint, items, dim, timings

The cache is keyed by a fingerprint of the encoder settings and the prepared data; an
up-to-date file is reused (baselines trained with other settings share it).

`EncodeStage` is a plain class over Arrow batches (no Ray inside). The input is cut
into fixed blocks of `batch_size` items before it reaches Ray Data, so every item is
encoded in the same batch (same padding) on every run: identical vectors.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.baselines.config import EncoderConfig
from trsr.config import fingerprint
from trsr.data.schema import SPLITS
from trsr.data.text import render_item
from trsr.errors import TrsrError
from trsr.runs import RunFolder

if TYPE_CHECKING:
    from trsr.experiment import ExperimentConfig

log = logging.getLogger(__name__)
STAGE = "embeddings"
TEXTS = pa.schema([pa.field("item_id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False)])


def encoder_name(ref: str) -> str:
    """A file-name-safe name for an encoder reference (built-in name or folder name)."""
    name = Path(ref.rstrip("/")).name if ("/" in ref or "\\" in ref) else ref
    if ref.count("/") == 1 and not ref.startswith((".", "/")):  # hub id org/name
        name = ref.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "encoder"


def embeddings_path(run_dir: str, ref: str) -> str:
    return storage.join(RunFolder(run_dir).stage_dir(STAGE), f"{encoder_name(ref)}.parquet")


def _info_path(run_dir: str, ref: str) -> str:
    return storage.join(RunFolder(run_dir).stage_dir(STAGE), f"{encoder_name(ref)}.json")


def item_texts(items: pa.Table, max_chars: int | None) -> pa.Table:
    """item_id, text: one line per item from its ordered attributes (ids never appear)."""
    ids = items.column("item_id").to_pylist()
    attributes = items.column("attributes").to_pylist()
    texts = []
    for attrs in attributes:
        caps = {a["name"]: max_chars for a in attrs} if max_chars else None
        texts.append(render_item(attrs, caps))
    return pa.table({"item_id": ids, "text": texts}, schema=TEXTS)


class EncodeStage:
    """Arrow batches of (item_id, text) -> (item_id, embedding: list<float32>)."""

    def __init__(self, config: EncoderConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from trsr.llm.models import resolve

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        folder = resolve(config.model)
        self.config = config
        self.device = "cuda" if config.num_gpus > 0 else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(self.device).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        texts = batch.column("text").to_pylist()
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state.float()
        if self.config.pooling == "cls":
            vectors = hidden[:, 0]
        else:
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.config.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        array = vectors.cpu().numpy().astype(np.float32)
        dim = array.shape[1]
        flat = pa.array(array.reshape(-1), pa.float32())
        return pa.table(
            {
                "item_id": batch.column("item_id"),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            }
        )


def _used_items(run: RunFolder) -> pa.Array:
    parts = []
    for split in SPLITS:
        samples = storage.read_parquet(run.samples(split), columns=["history", "candidate"])
        parts.append(pc.list_flatten(samples.column("history")).combine_chunks())
        parts.append(samples.column("candidate").combine_chunks())
    return pa.concat_arrays(parts).unique()


def _fingerprint(config: EncoderConfig, run: RunFolder) -> str:
    prepared = storage.read_json(run.manifest("prepared")).get("fingerprint")
    # Resources do not change the vectors; the batch size does (padding), slightly.
    settings = config.model_dump(exclude={"actors", "num_cpus", "num_gpus", "torch_threads"})
    return fingerprint(settings, prepared)


def compute_embeddings(experiment: "ExperimentConfig", config: EncoderConfig, force: bool = False) -> dict:
    """Encode the catalogue into <run_dir>/embeddings/<encoder>.parquet (or reuse it).

    Returns {"path", "fingerprint", "items", "dim", "seconds", "items_per_s", "skipped"}.
    """
    from trsr.ray_utils import init_ray, map_table, require_resources

    run = RunFolder(experiment.run_dir)
    if not storage.exists(run.manifest("prepared")):
        raise TrsrError(f"{run.manifest('prepared')}: not found; run `trsr data prepare` into {run.root} first")
    key = _fingerprint(config, run)
    path = embeddings_path(run.root, config.model)
    info_path = _info_path(run.root, config.model)
    if not force and storage.exists(path) and storage.exists(info_path):
        info = storage.read_json(info_path)
        if info.get("fingerprint") == key:
            return dict(info, skipped=True)

    items = storage.read_parquet(run.items())
    if config.items == "used":
        items = items.filter(pc.is_in(items.column("item_id"), value_set=_used_items(run)))
    if items.num_rows == 0:
        raise TrsrError(f"{run.items()}: no items to encode")
    texts = item_texts(items, config.max_chars)

    init_ray()
    require_resources(
        f"item embeddings ({config.actors} encoder actor(s))",
        gpus=config.num_gpus * config.actors,
        cpus=config.num_cpus * config.actors,
    )
    started = time.perf_counter()
    encoded = map_table(
        texts, EncodeStage, rows_per_batch=config.batch_size, constructor_kwargs={"config": config},
        actors=config.actors, num_cpus=config.num_cpus, num_gpus=config.num_gpus,
    )
    seconds = time.perf_counter() - started

    # Back to the catalogue's order; every item exactly once.
    got = encoded.column("item_id").to_pylist()
    if len(got) != texts.num_rows or set(got) != set(texts.column("item_id").to_pylist()):
        raise AssertionError(f"{path}: encoded {len(got)} rows for {texts.num_rows} items")
    order = {item: i for i, item in enumerate(got)}
    encoded = encoded.take(pa.array([order[i] for i in texts.column("item_id").to_pylist()]))
    storage.write_parquet(encoded, path)
    dim = encoded.schema.field("embedding").type.list_size
    info = {
        "path": path,
        "fingerprint": key,
        "encoder": config.model,
        "items": encoded.num_rows,
        "dim": dim,
        "seconds": round(seconds, 2),
        "items_per_s": round(encoded.num_rows / max(seconds, 1e-9), 1),
    }
    storage.write_json(info, info_path)
    log.info("item embeddings: %s", info)
    return dict(info, skipped=False)


def load_embeddings(path: str) -> tuple[list[str], np.ndarray]:
    """(item ids, float32 matrix [items, dim]) from an embeddings Parquet file."""
    table = storage.read_parquet(path)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return table.column("item_id").to_pylist(), matrix
