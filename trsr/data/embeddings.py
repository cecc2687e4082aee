"""Item text embeddings: every catalogue item's text, encoded once, cached as Parquet.

    prepared/items.parquet (all items, or those in some ranking list)
      -> EncodeStage   encoder actors: render_item (the same one-line text the LLM
                       sees), tokenizer + encoder, mean pooling, L2 norm
      -> <run_dir>/embeddings/<encoder>/   item_id, embedding (float32 x dim), one file
                       per batch; _stats.json (items, dim, timings), _manifest.json

A stage of the runner (trsr.runner): streamed, resumable, keyed by a fingerprint of the
encoder settings and the prepared data; an up-to-date folder is reused (baselines
trained with other settings share it). It lives in `data` because two stage packages
read the vectors: the baselines (their item input) and the report's summary probe
(trsr.evaluate.summary_probe: summaries and items in one vector space).

`EncodeStage` is a plain class over Arrow batches (no Ray inside). The runner cuts the
input into blocks of `batch_size` items in the catalogue's order, so every item is
encoded in the same batch (same padding) on every run: identical vectors.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from trsr import storage
from trsr.config import Section, fingerprint
from trsr.llm.models import DEFAULT_ENCODER
from trsr.schema import EMBEDDINGS, SPLITS
from trsr.data.text import render_item
from trsr.errors import TrsrError
from trsr.runs import LAYOUT, RunFolder

if TYPE_CHECKING:
    from trsr.runner import RunContext

log = logging.getLogger(__name__)
STAGE = "embeddings"
TEXTS = pa.schema([pa.field("item_id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False)])


class EncoderConfig(Section):
    """The pre-trained text encoder that turns every item's text into one vector."""

    # Built-in name (all-minilm-l6-v2, from a PyPI wheel), local HF folder, or hub id
    # in the local HF cache. The paper used BERT.
    model: str = DEFAULT_ENCODER
    # Items per encoder call, and the Ray Data batch size.
    batch_size: int = Field(64, ge=1)
    # Tokens per item text (longer texts are truncated).
    max_length: int = Field(128, ge=8)
    # Mean pooling over tokens (sentence-transformers style) or the [CLS] vector.
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    # Characters kept per attribute value before encoding (long descriptions).
    max_chars: int | None = Field(1000, ge=10)
    # Encoder actors and their resources.
    actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # torch threads per encoder actor (null: torch's default).
    torch_threads: int | None = Field(None, ge=1)
    # "all": every catalogue item (training negatives are drawn from the catalogue, as
    # the protocol draws test negatives); "used": only items in some ranking list or
    # history (much cheaper on huge catalogues; training negatives come from those).
    items: Literal["all", "used"] = "all"


def encoder_name(ref: str) -> str:
    """A file-name-safe name for an encoder reference (built-in name or folder name)."""
    name = Path(ref.rstrip("/")).name if ("/" in ref or "\\" in ref) else ref
    if ref.count("/") == 1 and not ref.startswith((".", "/")):  # hub id org/name
        name = ref.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "encoder"


def embeddings_folder(run_dir: str, ref: str):
    return RunFolder(run_dir).embeddings(encoder_name(ref))


def embeddings_path(run_dir: str, ref: str) -> str:
    return embeddings_folder(run_dir, ref).path


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
    """Arrow batches of items (item_id + attributes, or item_id + text) -> (item_id,
    embedding: list<float32>)."""

    def __init__(self, config: EncoderConfig):
        import torch
        from transformers import AutoModel

        from trsr.llm.models import resolve
        from trsr.llm.tokenizer import load_tokenizer

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        folder = resolve(config.model)
        self.config = config
        self.device = "cuda" if config.num_gpus > 0 else "cpu"
        self.tokenizer = load_tokenizer(folder)
        self.model = AutoModel.from_pretrained(folder).to(self.device).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        if "text" not in batch.column_names:
            batch = item_texts(batch, self.config.max_chars)
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
        return pa.table(
            {"item_id": batch.column("item_id"), "embedding": pa.array(list(array), pa.list_(pa.float32()))},
            schema=EMBEDDINGS,
        )


def _used_items(run: RunFolder) -> pa.Array:
    """Items in some ranking list (history or candidate), from a streamed scan of the
    prepared lists: the result is bounded by the catalogue, not by the users."""
    seen: set[str] = set()
    for batch in storage.scan_batches([run.lists(split) for split in SPLITS], columns=["history", "candidates"]):
        for name in ("history", "candidates"):
            seen.update(pc.unique(pc.list_flatten(batch.column(name))).to_pylist())
    return pa.array(sorted(seen), pa.string())


def embeddings_fingerprint(config: EncoderConfig, run: RunFolder) -> str:
    prepared = run.prepared_fingerprint()
    # Resources do not change the vectors; the batch size does (padding), slightly.
    settings = config.model_dump(exclude={"actors", "num_cpus", "num_gpus", "torch_threads"})
    return fingerprint(settings, prepared, LAYOUT)


def compute_embeddings(config: EncoderConfig, context: RunContext, force: bool = False) -> dict:
    """Encode the catalogue into <run_dir>/embeddings/<encoder>/ (or reuse it).

    Returns {"path", "fingerprint", "items", "dim", "seconds", "items_per_s", "skipped"}.
    """
    from trsr.runner import Step, StageJob, run_stage

    run = context.run
    key = embeddings_fingerprint(config, run)
    folder = embeddings_folder(run.root, config.model)
    where = []
    if config.items == "used":
        # The set of items in some list: bounded by the catalogue, not by the users.
        where = [("item_id", "in", _used_items(run).to_pylist())]
    job = StageJob(
        name=f"item embeddings {encoder_name(config.model)}",
        folder=folder,
        inputs=[run.items()],
        id_column="item_id",
        steps=[
            Step(
                EncodeStage, {"config": config}, EMBEDDINGS,
                actors=config.actors, num_cpus=config.num_cpus, num_gpus=config.num_gpus,
            )
        ],
        batch_rows=config.batch_size,
        fingerprint=key,
        where=where,
        unit="items",
        block_stats=lambda table: {"max:dim": len(table.column("embedding")[0]) if table.num_rows else 0},
        details={"encoder": config.model},
    )
    stats = run_stage(job, context.runner, force=force)
    if stats["rows_in"] == 0:
        raise TrsrError(f"{run.items()}: no items to encode")
    info = {
        "path": folder.path,
        "fingerprint": key,
        "encoder": config.model,
        "items": stats["rows_out"],
        "dim": stats.get("max:dim"),
        "seconds": stats["seconds"],
        "items_per_s": stats.get("rows_per_s"),
        "skipped": stats.get("skipped", False),
    }
    log.debug("item embeddings: %s", info)  # the stage runner printed its accounting line
    return info


def load_embeddings(path: str, order: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(item ids, float32 matrix [items, dim]) from an embeddings folder, in the order
    of `order` (e.g. the catalogue's; ids not encoded are left out), else by id."""
    from trsr.runs import StageFolder

    table = StageFolder(path, "embeddings").read(columns=["item_id", "embedding", "error"])
    failed = table.filter(pc.is_valid(table.column("error")))
    if failed.num_rows:
        raise TrsrError(f"{path}: {failed.num_rows} item(s) could not be encoded; see {path}/_rejects.parquet")
    table = table.sort_by("item_id")
    if order is not None:
        position = {item: i for i, item in enumerate(table.column("item_id").to_pylist())}
        table = table.take(pa.array([position[item] for item in order if item in position], pa.int64()))
    column = table.column("embedding").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return table.column("item_id").to_pylist(), values.reshape(table.num_rows, -1)
