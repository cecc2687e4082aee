"""`trsr train`: supervised fine-tuning of the recommender on a run folder's training split.

    summaries/<mode> (or prepared/lists for tallrec), the train split's first max_lists
      -> AttachItems     CPU actor: history and candidate attributes from the catalogue
      -> TrainingTexts   CPU actors: one guarded prompt + answer per candidate, built by
                         the same PromptBuilder the scorer uses (same tokens, same answer)
      -> train/<method>/texts/   (text, answer_start, list_id, ...), one file per batch:
                         a stage of the runner (trsr.runner), streamed and resumable
      -> train_lora      Ray Train (DeepSpeed ZeRO-2 or torch) reading the texts as a Ray
                         Dataset; LoRA checkpoints under train/<method>/lora/, per-epoch
                         validation on the first `valid_lists` validation lists (the best
                         epoch wins)
      -> train/<method>/result.json        loss per epoch, validation, best adapter
         train/<method>/_manifest.json     fingerprint: skip when nothing changed

The score stage then loads the best adapter (`RunFolder.best_adapter`) unless the config names
one itself (`score.engine.lora_adapter`) or training is off (`train.enabled: false`: the
base model scores zero-shot).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

import pyarrow.compute as pc

from trsr import storage
from trsr.schema import EXAMPLES
from trsr.config import fingerprint
from trsr.errors import ConfigError, TrsrError
from trsr.recommend import lists as ranking_lists
from trsr.recommend.config import SFTConfig, ScoreConfig
from trsr.recommend.lists import PROMPT_LISTS, AttachItems, usable_summary
from trsr.recommend.prompt import PromptBuilder
from trsr.runner import RunContext, Step, StageJob, run_stage, value_counts
from trsr.runs import LAYOUT, RunFolder

log = logging.getLogger(__name__)
STAGE = "train"


class TrainingTexts:
    """PROMPT_LISTS rows -> one EXAMPLES row per candidate (a CPU actor with a tokenizer)."""

    def __init__(self, config: ScoreConfig, model: str):
        from trsr.llm.tokenizer import load_tokenizer

        self.config = config
        self.builder = PromptBuilder(config.prompt, load_tokenizer(model))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list[Any]] = {name: [] for name in EXAMPLES.names}
        for row in batch.to_pylist():
            summary = usable_summary(row["summary"], row["summary_status"], self.config.prompt.has_summary)
            for position, (attributes, label) in enumerate(zip(row["candidate_attributes"], row["labels"])):
                text, answer_start, history_items = self.builder.training_example(summary, row["history"], attributes, label)
                out["answer_start"].append(answer_start)
                out["text"].append(text)
                out["list_id"].append(row["list_id"])
                out["user_id"].append(row["user_id"])
                out["position"].append(position)
                out["label"].append(label)
                out["summary_status"].append(row["summary_status"])
                out["history_items"].append(history_items)
        return pa.Table.from_pydict(out, schema=EXAMPLES)


class ValidateAdapter:
    """valid_fn for train_lora: score validation lists (PROMPT_LISTS) with the epoch's
    adapter (on the train worker, transformers backend) and return the ranking metrics."""

    def __init__(self, config: ScoreConfig, lists: pa.Table, seed: int):
        self.config = config
        self.lists = lists
        self.seed = seed

    def __call__(self, adapter_dir: str, epoch: int) -> dict[str, float]:
        from trsr.evaluate.metrics import ranking_metrics
        from trsr.llm.factory import build_engine
        from trsr.recommend.score import ScoreStage

        engine_config = self.config.engine.model_copy(
            update={"backend": "transformers", "lora_adapter": adapter_dir, "num_gpus": 0, "actors": 1}
        )
        stage = ScoreStage(self.config, engine=build_engine(engine_config))
        step = self.config.users_per_batch
        scored = pa.concat_tables([stage(self.lists.slice(i, step)) for i in range(0, self.lists.num_rows, step)])
        scored = scored.sort_by([("list_id", "ascending"), ("candidate", "ascending")])
        metrics = ranking_metrics(scored.column("list_id"), scored.column("label"), scored.column("score"), seed=self.seed)
        return {k: v for k, v in metrics.items() if k != "auc_excluded"}


def texts_job(config: SFTConfig, score_config: ScoreConfig, run: RunFolder, model: str) -> StageJob:
    """The runner's description of building the training texts of the variant."""
    method = score_config.method_name
    mode = score_config.prompt.mode
    inputs, _ = ranking_lists.source(run, mode)
    prepared, summaries = ranking_lists.input_fingerprints(run, score_config.prompt)
    keep, decline_reason = ranking_lists.summary_policy(score_config.prompt)
    return StageJob(
        name=f"training texts {method}",
        folder=run.training_texts(method),
        inputs=inputs,
        id_column="list_id",
        steps=[
            Step(AttachItems, {"items": run.items(), "history_items": score_config.prompt.k, "uses_summary": mode is not None}, PROMPT_LISTS),
            Step(TrainingTexts, {"config": score_config, "model": model}, EXAMPLES, actors=config.text_actors),
        ],
        batch_rows=config.texts_per_batch,
        fingerprint=fingerprint(score_config.prompt, model, config.max_lists, prepared, summaries, LAYOUT),
        where=ranking_lists.where("train", config.max_lists),
        columns=ranking_lists.columns(mode),
        unit="lists",
        block_stats=_texts_stats,
        units=lambda table: int(pc.sum(pc.equal(table.column("position"), 0)).as_py() or 0),
        details={"method": method},
        keep=keep,
        decline_reason=decline_reason,
    )


def _texts_stats(table: pa.Table) -> dict:
    per_list = table.filter(pc.equal(table.column("position"), 0))
    return {
        "lists": per_list.num_rows,
        "examples": table.num_rows,
        "summary_status": value_counts(per_list.column("summary_status")),
    }


def validation_lists(score_config: ScoreConfig, run: RunFolder, n: int) -> pa.Table:
    """The first `n` validation lists (PROMPT_LISTS), read in the driver: `n` is a small
    config value (train.valid_lists), and only their items are loaded."""
    import pyarrow.dataset as ds

    from trsr.data.catalogue import Catalogue
    from trsr.runner import arrow_where

    mode = score_config.prompt.mode
    inputs, _ = ranking_lists.source(run, mode)
    filesystem, _ = storage.arrow_filesystem(inputs[0])
    dataset = ds.dataset([storage.arrow_filesystem(p)[1] for p in inputs], filesystem=filesystem, format="parquet")
    keep, _ = ranking_lists.summary_policy(score_config.prompt)
    table = dataset.to_table(
        columns=ranking_lists.columns(mode), filter=arrow_where([*ranking_lists.where("valid", n), *keep])
    ).sort_by("list_id")
    if table.num_rows == 0:
        return PROMPT_LISTS.empty_table()
    needed = pc.unique(pa.concat_arrays([pc.list_flatten(table.column(c)).combine_chunks() for c in ("history", "candidates")]))
    catalogue = Catalogue.load(run.items(), only=needed.to_pylist())
    return AttachItems(catalogue, score_config.prompt.k, mode is not None)(table)


def train(config: SFTConfig, score_config: ScoreConfig, context: RunContext, force: bool = False) -> dict:
    """Fine-tune the recommender for score_config.prompt.variant (the scorer's model,
    prompt and summaries); returns the result.

    Writes train/<method>/ (texts/, LoRA checkpoints, result.json). Skipped when the
    config and inputs match the last run (unless `force`, which also retrains from scratch).
    """
    from trsr.recommend.train import train_lora

    if not config.enabled:
        raise ConfigError("train.enabled is false: nothing to train (the score stage uses the base model)")
    method = score_config.method_name
    run = context.run
    stage = run.training(method)
    folder = stage.path
    lora = config.lora_config(score_config)
    if lora.max_length > score_config.engine.max_model_len:
        raise ConfigError(
            f"train.max_length={lora.max_length} exceeds score.engine.max_model_len={score_config.engine.max_model_len}"
        )
    prepared, summaries_fp = ranking_lists.input_fingerprints(run, score_config.prompt)
    score_config.prompt.check_min_history(run.prepared_min_history())
    from trsr.llm.models import resolve

    resolve(lora.model)  # an unknown model fails here, not inside a Ray actor
    settings = config.model_dump(mode="json", exclude={"workers", "cpus_per_worker", "use_gpu", "text_actors", "max_failures", "log_every"})
    key = fingerprint(settings, score_config.prompt, lora.model, prepared, summaries_fp, context.seed, LAYOUT)
    result_path = storage.join(folder, "result.json")
    if not force and stage.is_complete(key) and storage.exists(result_path):
        return dict(storage.read_json(result_path), skipped=True)

    started = time.perf_counter()
    # The stage rule (StageFolder.begin): anything of another fingerprint here, texts
    # and LoRA checkpoints alike, is cleared (new summaries or settings retrain from
    # scratch); an unfinished run of this fingerprint resumes from its checkpoints.
    resume = stage.begin(key, force=force)
    texts = texts_job(config, score_config, run, lora.model)
    ranking_lists.check_summaries(texts.name, texts.inputs, texts.where, score_config.prompt)
    texts_stats = run_stage(texts, context.runner, force=force)
    if texts_stats.get("examples", 0) == 0:
        raise TrsrError(f"{run.lists('train')}: no training lists")

    valid_fn = None
    valid_lists = 0
    if config.valid_lists:
        valid = validation_lists(score_config, run, config.valid_lists)
        valid_lists = valid.num_rows
        if valid_lists:
            valid_fn = ValidateAdapter(score_config, valid, context.seed)
        else:
            lora = lora.model_copy(update={"valid_metric": None})

    lora = lora.model_copy(update={"seed": context.seed + lora.seed})
    # Grouped by list: the candidates of a list share the user part of the prompt.
    trained = train_lora(
        lora, texts.folder.path, valid_fn, storage_path=folder, resume=resume, group_column="list_id"
    )
    result = {
        "method": method,
        "variant": score_config.prompt.variant,
        "model": lora.model,
        "examples": texts_stats["examples"],
        "lists": texts_stats["lists"],
        "summary_status": dict(sorted(texts_stats.get("summary_status", {}).items())),
        "valid_lists": valid_lists,
        "examples_path": texts.folder.path,
        "seconds": round(time.perf_counter() - started, 2),
        **{k: v for k, v in trained.items() if k not in ("run_dir", "examples")},
        "lora_dir": trained["run_dir"],
    }
    storage.write_json(result, result_path)
    stage.finish(key, texts_stats, method=method)
    return dict(result, skipped=False)


def describe(result: dict) -> str:
    losses = ", ".join(f"{x:.4f}" for x in result["train_loss"])
    best = result["history"][result["best_epoch"] - 1] if result.get("history") else {}
    valid = best.get("valid") or {}
    shown = ", ".join(f"{k}={v:.3f}" for k, v in valid.items() if k in ("auc", "mrr@10", "recall@3"))
    tps = result.get("tokens_per_s")
    return (
        f"train {result['method']}: {result['examples']} examples from {result['lists']} lists, "
        f"loss per epoch [{losses}], best epoch {result['best_epoch']}"
        + (f" ({shown} on {result['valid_lists']} validation lists)" if shown else "")
        + (f", {tps:.0f} tokens/s" if tps else "")
        + (" [up to date, skipped]" if result.get("skipped") else "")
    )
