"""The baselines job: train and score every selected model on the run's own protocol.

    prepared/ (train 1:1 lists, valid/test 1:20 lists) + embeddings/<encoder>/
      -> one Ray task per model (num_cpus / num_gpus from config)
      -> scores/<method>/<split>/part-0.parquet   SCORES, the LLM scorer's schema, and
                                                  _manifest.json (skip if up to date)
         scores/<method>/stats.json               training loss per epoch, time, metrics

The baselines train in one process per model on the whole (protocol-sized) training
split by design; their scores land in the same run-folder layout as the LLM scorer's.

Every candidate of every list of a scored split gets exactly one score (checked before
anything is written), so one evaluator reads baselines and LLM methods alike.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from trsr import storage
from trsr.baselines.config import NEURAL_MODELS, BaselinesConfig
from trsr.baselines.data import BaselineData, load_data
from trsr.config import fingerprint
from trsr.schema import SCORES, conform
from trsr.errors import ConfigError
from trsr.runner import RunContext
from trsr.runs import RunFolder

log = logging.getLogger(__name__)
METRICS_SHOWN = ("recall@3", "recall@5", "recall@10", "mrr@3", "mrr@5", "mrr@10", "auc")


def scores_path(run_dir: str, method: str, split: str) -> str:
    return RunFolder(run_dir).scores(method, split).join("part-0.parquet")


def model_fingerprint(config: BaselinesConfig, model: str, seed: int, prepared: str, embeddings: str | None) -> str:
    if model in NEURAL_MODELS:
        settings = config.model_dump(exclude={"models", "cpus_per_model", "gpus_per_model", "encoder", "seed"})
    else:  # popularity and random depend on the data and seed only
        settings = {"splits": config.splits}
    return fingerprint(settings, model, seed, prepared, embeddings)


def _fit_and_score(model: str, config: BaselinesConfig, seed: int, data: BaselineData) -> dict[str, Any]:
    """Runs inside a Ray task: train (if needed) and score every eval split."""
    import torch

    from trsr.baselines.train import evaluate, row_scores, score_lists, simple_scores, train_model

    torch.set_num_threads(config.torch_threads)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"baselines.device=cuda but the worker running {model} has no CUDA device")
    started = time.perf_counter()
    scores: dict[str, np.ndarray] = {}
    training: dict[str, Any] = {}
    if model in NEURAL_MODELS:
        net, training = train_model(model, data, config, seed)
        for split, lists in data.eval.items():
            scores[split] = row_scores(lists, score_lists(net, lists, config.device))
    else:
        for split, lists in data.eval.items():
            scores[split] = simple_scores(model, data, lists, seed)
    metrics = {split: evaluate(data.eval[split], s, seed) for split, s in scores.items()}
    return {
        "model": model,
        "scores": scores,
        "training": training,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 2),
    }


def check_every_sample_scored(scores: pa.Table, samples: pa.Table, where: str) -> None:
    """Every sample row scored exactly once, with a finite score."""
    key = ("list_id", "candidate", "label")
    expected = Counter(zip(*(samples.column(k).to_pylist() for k in key)))
    got = Counter(zip(*(scores.column(k).to_pylist() for k in key)))
    if got != expected or max(got.values(), default=1) != 1:
        lost, extra = expected - got, got - expected
        raise AssertionError(
            f"{where}: {sum(lost.values())} candidate(s) not scored, "
            f"{sum(extra.values())} unexpected or duplicated (lists {sorted({k[0] for k in lost + extra})[:5]})"
        )
    values = scores.column("score").to_numpy()
    if not np.isfinite(values).all():
        raise AssertionError(f"{where}: {int((~np.isfinite(values)).sum())} non-finite score(s)")


def run_baselines(config: BaselinesConfig, context: RunContext, force: bool = False) -> dict:
    """Train and score `baselines.models`; return {method: stats} (skipped ones too).

    A model whose config, seed and inputs are unchanged since its last run is skipped
    unless `force`.
    """
    import ray

    from trsr.data.embeddings import embeddings_fingerprint
    from trsr.data.embeddings import compute_embeddings, load_embeddings
    from trsr.ray_utils import init_ray, require_resources

    seed = config.seed if config.seed is not None else context.seed
    run = context.run
    prepared = run.prepared_fingerprint()
    neural = [m for m in config.models if m in NEURAL_MODELS]
    embeddings_key = embeddings_fingerprint(config.encoder, run) if neural else None

    result: dict[str, Any] = {}
    todo: dict[str, str] = {}
    for model in config.models:
        method = config.method(model)
        key = model_fingerprint(config, model, seed, prepared, embeddings_key if model in NEURAL_MODELS else None)
        stats_path = storage.join(run.method_scores(method), "stats.json")
        if not force and storage.exists(stats_path) and all(run.scores(method, s).is_complete(key) for s in config.splits):
            result[method] = dict(storage.read_json(stats_path), skipped=True)
            continue
        todo[model] = key
    if not todo:
        return result

    init_ray()
    require_resources(
        f"baselines ({len(todo)} model task(s))", gpus=config.gpus_per_model, cpus=config.cpus_per_model
    )
    embedding_info = None
    if any(m in NEURAL_MODELS for m in todo):
        embedding_info = compute_embeddings(config.encoder, context)
        catalogue = storage.read_parquet(run.items(), columns=["item_id"]).column("item_id").to_pylist()
        item_ids, matrix = load_embeddings(embedding_info["path"], order=catalogue)
        matrix = np.concatenate([np.zeros((1, matrix.shape[1]), dtype=np.float32), matrix])
    else:
        item_ids = storage.read_parquet(run.items(), columns=["item_id"]).column("item_id").to_pylist()
        matrix = None
    samples = {split: storage.read_parquet(run.samples(split)) for split in ["train", *config.splits]}
    data = load_data(samples, item_ids, matrix, config.max_history, list(config.splits))
    data_ref = ray.put(data)

    task = ray.remote(_fit_and_score)
    pending = {
        task.options(num_cpus=config.cpus_per_model, num_gpus=config.gpus_per_model, max_retries=0).remote(
            model, config, seed, data_ref
        ): model
        for model in todo
    }
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        model = pending.pop(ready[0])
        out = ray.get(ready[0])
        method = config.method(model)
        stats = _write(run.root, config, method, todo[model], prepared, out, data, samples, embedding_info)
        log.debug("baseline %s: %s", method, {s: stats[s]["metrics"] for s in config.splits})  # the stage's table shows them
        result[method] = dict(stats, skipped=False)
    return {config.method(m): result[config.method(m)] for m in config.models}


def _write(
    run_dir: str,
    config: BaselinesConfig,
    method: str,
    key: str,
    prepared: str,
    out: dict[str, Any],
    data: BaselineData,
    samples: dict[str, pa.Table],
    embedding_info: dict | None,
) -> dict:
    folder = RunFolder(run_dir).method_scores(method)
    stats: dict[str, Any] = {
        "method": method,
        "model": out["model"],
        "family": NEURAL_MODELS.get(out["model"], "trivial"),  # the report's grouping
        "seconds": out["seconds"],
        "training": out["training"],
        "encoder": config.encoder.model if out["model"] in NEURAL_MODELS else None,
        "embeddings": embedding_info["path"] if embedding_info and out["model"] in NEURAL_MODELS else None,
    }
    run = RunFolder(run_dir)
    for split in config.splits:
        lists = data.eval[split]
        stage = run.scores(method, split)
        stage.begin(key, force=True)
        path = scores_path(run_dir, method, split)
        rows = lists.rows
        table = rows.append_column("score", pa.array(out["scores"][split], pa.float64())).append_column(
            "method", pa.array([method] * rows.num_rows, pa.string())
        )
        check_every_sample_scored(table, samples[split], path)
        storage.write_parquet(conform(table, SCORES, path), path)
        metrics = out["metrics"][split]
        stats[split] = {
            "path": path,
            "lists": lists.size,
            "candidates": rows.num_rows,
            "metrics": {m: round(metrics[m], 5) for m in METRICS_SHOWN},
        }
        stage.finish(key, stats[split], method=method, split=split, prepared=prepared)
    storage.write_json(stats, storage.join(folder, "stats.json"))
    return stats


def _shown_split(stats: dict) -> str:
    return "test" if "test" in stats else "valid"


def describe_brief(result: dict) -> str:
    """One line for `trsr run` (its closing table has every metric): the models and
    their seconds, the best by Recall@3."""
    scored = {}
    for method, stats in result.items():
        split = _shown_split(stats)
        scored[method] = (stats.get(split, {}).get("metrics", {}).get("recall@3", float("nan")), split)
    best = max(scored, key=lambda m: scored[m][0]) if scored else None
    seconds = ", ".join(
        f"{m} {'skipped' if s.get('skipped') else format(s.get('seconds', 0), '.0f') + ' s'}" for m, s in result.items()
    )
    head = f"{len(result)} baselines ({seconds})"
    return head + (f"; best {scored[best][1]} Recall@3: {best} {scored[best][0]:.3f}" if best else "")


def describe(result: dict) -> str:
    """A plain-text table of the job's result (test split if scored, else valid)."""
    lines = []
    header = f"{'method':<14} {'split':<6} " + " ".join(f"{m:>9}" for m in METRICS_SHOWN) + f" {'seconds':>8}  note"
    lines.append(header)
    for method, stats in result.items():
        split = _shown_split(stats)
        metrics = stats.get(split, {}).get("metrics", {})
        cells = " ".join(f"{metrics.get(m, float('nan')):>9.4f}" for m in METRICS_SHOWN)
        note = "up to date, skipped" if stats.get("skipped") else ""
        lines.append(f"{method:<14} {split:<6} {cells} {stats.get('seconds', 0):>8.1f}  {note}")
    return "\n".join(lines)
