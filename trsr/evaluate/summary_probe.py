"""How much of the user is in the summary: the report's summary probe.

A summary's status "ok" says its text is well formed, not that it is about the user.
The probe measures that, without the LLM recommender: for a seeded sample of the
split's lists with a usable summary, every candidate is ranked by the cosine
similarity between one text vector and the candidate's vector (the baselines' item
encoder, so summaries and items live in one vector space):

    summary              the user's summary
    history mean         the mean vector of the history items the summary covers
                         (what a summary could at best condense)
    other user's summary another user's summary of the same run (a seeded derangement):
                         the same style and vocabulary, no signal about this user

A summary that carries the user's interests ranks near the history mean; one that
carries only the summarizer's habits ranks like another user's summary.
`summary / history mean` of Recall@k is the figure to compare summarizers (models,
prompts, modes) by.

Encoding runs in this process on a bounded sample (`evaluate.summary_probe.max_lists`
per mode): it is a measurement, not a stage over every user. Item vectors come from the
run's up-to-date embeddings folder when the baselines wrote one, else they are encoded
here for the sampled lists' items only.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trsr.data.embeddings import EncodeStage, EncoderConfig, embeddings_folder, embeddings_fingerprint, item_texts, load_embeddings
from trsr.evaluate.config import SummaryProbeConfig
from trsr.evaluate.metrics import bootstrap_ci, mean_metrics, per_list_metrics
from trsr.runs import RunFolder
from trsr.schema import SUMMARY_OK
from trsr import storage

log = logging.getLogger(__name__)

MODES = ("hierarchical", "recurrent")
RANKERS = {"summary": "summary", "history_mean": "history mean", "other_user": "other user's summary"}
COLUMNS = ["list_id", "history", "candidates", "labels", "summary", "status", "model", "first_position", "last_position"]


def probe_summaries(
    config: SummaryProbeConfig, encoder: EncoderConfig, run: RunFolder, split: str,
    ks: tuple[int, ...], ties: str, bootstrap: int, alpha: float, seed: int,
) -> dict:
    """{mode: probe result} for every mode with summaries of `split` ({} when none)."""
    if not config.enabled:
        return {}
    tables = {}
    for mode in MODES:
        folder = run.summaries(mode)
        if not folder.exists() or not folder.data_files():
            continue
        table = folder.read(columns=COLUMNS + ["split"], filter=pc.field("split") == split).drop(["split"])
        if table.num_rows:
            tables[mode] = table
    if not tables:
        return {}
    samples = {mode: _sample(table, config.max_lists, seed) for mode, table in tables.items()}
    needed = set()
    for sample in samples.values():
        for name in ("covered", "candidates"):
            needed.update(item for items in sample[name] for item in items)
    model = EncodeStage(encoder)
    vectors = _item_vectors(model, encoder, run, sorted(needed))
    results = {}
    for mode, sample in samples.items():
        result = {
            "model": _models(tables[mode]),
            "lists": tables[mode].num_rows,
            "usable": sample["usable"],
            "probed": len(sample["list_id"]),
        }
        if sample["list_id"]:
            rankers = _rank(model, sample, vectors, seed)
            result["rankers"] = {
                name: _metrics(sample, scores, ks, ties, bootstrap, alpha, seed) for name, scores in rankers.items()
            }
            k = 3 if 3 in ks else ks[0]
            history = result["rankers"]["history_mean"]["metrics"][f"recall@{k}"]
            summary = result["rankers"]["summary"]["metrics"][f"recall@{k}"]
            result["k"] = k
            result["recall_ratio"] = summary / history if history > 0 else math.nan
        results[mode] = result
    return results


def _sample(table: pa.Table, max_lists: int, seed: int) -> dict:
    """The seeded sample of lists with a usable summary, as Python columns; `covered`
    is the history items the summary covers."""
    usable = table.filter(pc.and_(pc.equal(table.column("status"), SUMMARY_OK), pc.is_valid(table.column("summary"))))
    usable = usable.sort_by("list_id")
    count = usable.num_rows
    if count > max_lists:
        rows = np.sort(np.random.default_rng(seed).choice(count, size=max_lists, replace=False))
        usable = usable.take(pa.array(rows, pa.int64()))
    columns = {name: usable.column(name).to_pylist() for name in usable.column_names}
    columns["covered"] = [
        history[first : last + 1] if first is not None and last is not None else history
        for history, first, last in zip(columns["history"], columns["first_position"], columns["last_position"])
    ]
    columns["usable"] = count
    return columns


def _models(table: pa.Table) -> list[str]:
    return sorted(m for m in pc.unique(table.column("model")).to_pylist() if m)


def _item_vectors(model: EncodeStage, encoder: EncoderConfig, run: RunFolder, items: list[str]) -> dict[str, np.ndarray]:
    """{item_id: vector} of `items`: from the run's up-to-date embeddings, else encoded here."""
    if not items:  # no list with a usable summary
        return {}
    folder = embeddings_folder(run.root, encoder.model)
    if folder.is_complete(embeddings_fingerprint(encoder, run)):
        ids, matrix = load_embeddings(folder.path)
        wanted = set(items)
        found = {item: matrix[i] for i, item in enumerate(ids) if item in wanted}
        if len(found) == len(wanted):
            return found
    catalogue = storage.parquet_dataset(run.items()).to_table(filter=pc.field("item_id").isin(pa.array(items, pa.string())))
    texts = item_texts(catalogue, encoder.max_chars)
    return dict(zip(texts.column("item_id").to_pylist(), _encode(model, encoder, texts)))


def _encode(model: EncodeStage, encoder: EncoderConfig, texts: pa.Table) -> np.ndarray:
    """Vectors of an (item_id, text) table, in batches of encoder.batch_size."""
    out = []
    for start in range(0, texts.num_rows, encoder.batch_size):
        batch = model(texts.slice(start, encoder.batch_size))
        out.append(np.asarray(batch.column("embedding").to_pylist(), dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _rank(model: EncodeStage, sample: dict, vectors: dict, seed: int) -> dict[str, list[np.ndarray]]:
    """Per ranker, one array of candidate scores per list."""
    texts = pa.table({"item_id": sample["list_id"], "text": sample["summary"]})
    summaries = _unit(_encode(model, model.config, texts))
    history = _unit(np.stack([np.mean([vectors[i] for i in items], axis=0) for items in sample["covered"]]))
    # Another user's summary for every list: a seeded shuffle, then each list takes the
    # next one's (a derangement when there are two or more lists).
    order = np.random.default_rng(seed + 1).permutation(len(summaries))
    other = np.empty_like(summaries)
    other[order] = summaries[np.roll(order, -1)]
    queries = {"summary": summaries, "history_mean": history, "other_user": other}
    candidates = [np.stack([vectors[c] for c in cands]) for cands in sample["candidates"]]
    return {name: [cand @ query[i] for i, cand in enumerate(candidates)] for name, query in queries.items()}


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def _metrics(sample: dict, scores: list[np.ndarray], ks, ties: str, bootstrap: int, alpha: float, seed: int) -> dict:
    list_ids = [lid for lid, cands in zip(sample["list_id"], sample["candidates"]) for _ in cands]
    labels = [label for labels in sample["labels"] for label in labels]
    per_list = per_list_metrics(list_ids, labels, np.concatenate(scores), ks=ks, ties=ties, seed=seed)
    means = mean_metrics(per_list)
    names = [f"recall@{k}" for k in ks] + [f"mrr@{k}" for k in ks] + ["auc"]
    intervals = {name: list(bootstrap_ci(per_list[name], n=bootstrap, alpha=alpha, seed=seed)) for name in names}
    return {"metrics": {name: means[name] for name in names}, "intervals": intervals}


def markdown_probe(probe: dict, ks: list[int]) -> list[str]:
    """The report's section: one row per mode and ranker."""
    if not probe:
        return []
    k = next((r["k"] for r in probe.values() if "k" in r), 3 if 3 in ks else ks[0])
    names = [f"recall@{k}", f"mrr@{k}"]
    lines = [
        "## How much of the user is in the summary",
        "",
        "The candidates ranked by the similarity of one text to each candidate (the baselines' item "
        "encoder, no LLM): the user's summary, the mean of the history items it covers, another user's "
        f"summary. summary / history mean of Recall@{k} near 1: the summary keeps what the history says; "
        "near the other user's: it carries no signal about the user.",
        "",
        f"| mode | summarizer | lists probed | ranker | Recall@{k} | MRR@{k} | summary / history mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, result in probe.items():
        models = ", ".join(result["model"]) or "?"
        probed = f"{result['probed']} of {result['usable']} usable ({result['lists']} lists)"
        if not result.get("rankers"):
            lines.append(f"| {mode} | {models} | {probed} | (no usable summary) | | | |")
            continue
        for name, label in RANKERS.items():
            row = result["rankers"][name]
            cells = []
            for metric in names:
                low, high = row["intervals"][metric]
                cells.append(f"{row['metrics'][metric]:.4f} [{low:.3f}, {high:.3f}]")
            ratio = f"{result['recall_ratio']:.2f}" if name == "summary" else ""
            lines.append(f"| {mode} | {models} | {probed} | {label} | " + " | ".join(cells) + f" | {ratio} |")
            mode, models, probed = "", "", ""
    lines.append("")
    return lines
