"""`trsr train`: supervised fine-tuning of the recommender on a run folder's training split.

    samples/train (1:1 lists)  + items + summaries/<mode>
      -> TrainingTexts   Ray Data map: one guarded prompt + answer per candidate, built by
                         the same PromptBuilder the scorer uses (same tokens, same answer)
      -> train/<method>/examples.parquet   (text, answer_start, list_id, user_id, label, tokens)
      -> train_lora      Ray Train (DeepSpeed ZeRO-2 or torch), LoRA checkpoints per epoch
                         under train/<method>/lora/epoch-NNN/, per-epoch validation on the
                         first `valid_lists` validation lists (the best epoch wins)
      -> train/<method>/result.json        loss per epoch, validation, best adapter
         train/<method>/_manifest.json     fingerprint: skip when nothing changed

The score stage then loads the best adapter (`trained_adapter`) unless the config names
one itself (`score.engine.lora_adapter`) or training is off (`train.enabled: false`: the
base model scores zero-shot).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import Field, model_validator

from trsr import storage
from trsr.config import fingerprint
from trsr.errors import ConfigError, TrsrError
from trsr.recommend.config import ScoreConfig
from trsr.recommend.prompt import PromptBuilder
from trsr.recommend.train import TrainConfig
from trsr.runs import RunFolder

if TYPE_CHECKING:
    from trsr.experiment import ExperimentConfig

log = logging.getLogger(__name__)
STAGE = "train"
LORA_RUN = "lora"
EXAMPLES = pa.schema(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("answer_start", pa.int64(), nullable=False),
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("summary_status", pa.string(), nullable=False),
        pa.field("history_items", pa.int16(), nullable=False),
    ]
)


class SFTConfig(TrainConfig):
    """Section `train`: the LoRA run (every TrainConfig field) + what to train on."""

    # false: no fine-tuning; the score stage uses the base model zero-shot.
    enabled: bool = True
    # null = score.engine.model (the model that will score must be the one trained).
    model: str | None = None
    # null = score.prompt.max_length.
    max_length: int | None = Field(None, ge=2)
    # Train on the first N training lists by user id (the order summarize.max_users
    # follows); null = all.
    max_lists: int | None = Field(None, ge=1)
    # Validate each epoch on the first N validation lists (by user id) and keep the best
    # epoch by valid_metric; 0 = no validation, the last epoch wins.
    valid_lists: int = Field(64, ge=0)
    valid_metric: str | None = "mrr@10"
    # Examples per Ray Data batch when the training texts are built.
    texts_per_batch: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _check_valid(self) -> "SFTConfig":
        if self.valid_lists and not self.valid_metric:
            raise ValueError("valid_lists > 0 needs a valid_metric (e.g. mrr@10, auc)")
        return self

    def lora_config(self, score: ScoreConfig) -> TrainConfig:
        """The TrainConfig for train_lora, with the model and length filled in."""
        fields = {name: getattr(self, name) for name in TrainConfig.model_fields}
        fields["model"] = self.model or score.engine.model
        fields["max_length"] = self.max_length or score.prompt.max_length
        fields["run_name"] = LORA_RUN
        fields["valid_metric"] = self.valid_metric if self.valid_lists else None
        return TrainConfig(**fields)


def stage_dir(run_dir: str, method: str) -> str:
    return storage.join(RunFolder(run_dir).stage_dir(STAGE), method)


def trained_adapter(run_dir: str, method: str) -> str:
    """The best adapter of the last `trsr train` of `method` (local or s3:// path)."""
    path = storage.join(stage_dir(run_dir, method), "result.json")
    if not storage.exists(path):
        raise TrsrError(
            f"{path}: not found; run `trsr train` for {method} first, or set "
            "train.enabled=false to score with the base model, or score.engine.lora_adapter=<folder>"
        )
    return storage.read_json(path)["best_adapter"]


class TrainingTexts:
    """LISTS rows -> one EXAMPLES row per candidate (Ray Data actor; loads a tokenizer)."""

    def __init__(self, config: ScoreConfig, model: str):
        from transformers import AutoTokenizer

        from trsr.llm.models import resolve

        self.config = config
        self.builder = PromptBuilder(config.prompt, AutoTokenizer.from_pretrained(resolve(model)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from trsr.recommend.score import usable_summary

        out: dict[str, list[Any]] = {name: [] for name in EXAMPLES.names}
        for row in batch.to_pylist():
            summary = usable_summary(row["summary"], row["summary_status"], self.config.prompt)
            for attributes, label in zip(row["candidate_attributes"], row["labels"]):
                prompt = self.builder.fit(summary, row["history"], [attributes])
                text = prompt.prefix + prompt.suffixes[0]
                out["answer_start"].append(len(text))
                out["text"].append(text + self.builder.answer(label) + self.builder.end_of_turn)
                out["list_id"].append(row["list_id"])
                out["user_id"].append(row["user_id"])
                out["label"].append(label)
                out["summary_status"].append(row["summary_status"])
                out["history_items"].append(prompt.history_items)
        return pa.Table.from_pydict(out, schema=EXAMPLES)


class ValidateAdapter:
    """valid_fn for train_lora: score validation lists with the epoch's adapter (on the
    train worker, transformers backend) and return the ranking metrics."""

    def __init__(self, config: ScoreConfig, lists: pa.Table, seed: int):
        self.config = config
        self.lists = lists
        self.seed = seed

    def __call__(self, adapter_dir: str, epoch: int) -> dict[str, float]:
        from trsr.evaluate.metrics import ranking_metrics
        from trsr.llm.engine import build_engine
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


def first_lists_by_user(lists: pa.Table, n: int | None) -> pa.Table:
    lists = lists.sort_by([("user_id", "ascending"), ("list_id", "ascending")])
    return lists if n is None else lists.slice(0, n)


def build_texts(lists: pa.Table, config: ScoreConfig, model: str, per_batch: int) -> pa.Table:
    from trsr.ray_utils import map_table

    texts = map_table(
        lists, TrainingTexts, rows_per_batch=per_batch, constructor_kwargs={"config": config, "model": model},
        schema=EXAMPLES,
    )
    expected = sum(len(c) for c in lists.column("candidates").to_pylist())
    if texts.num_rows != expected:
        raise AssertionError(f"built {texts.num_rows} training texts for {expected} candidates")
    return texts.sort_by([("list_id", "ascending"), ("label", "descending")])


def train(experiment: "ExperimentConfig", force: bool = False) -> dict:
    """Fine-tune the recommender for experiment.score.prompt.variant; returns the result.

    Writes train/<method>/ (examples, LoRA checkpoints, result.json). Skipped when the
    config and inputs match the last run (unless `force`, which also retrains from scratch).
    """
    from trsr.recommend.score import build_lists, load_summaries, stage_inputs
    from trsr.recommend.train import train_lora

    config: SFTConfig = experiment.train
    score_config: ScoreConfig = experiment.score
    if not config.enabled:
        raise ConfigError("train.enabled is false: nothing to train (the score stage uses the base model)")
    method = score_config.method_name
    run = RunFolder(experiment.run_dir)
    folder = stage_dir(run.root, method)
    lora = config.lora_config(score_config)
    if lora.max_length > score_config.engine.max_model_len:
        raise ConfigError(
            f"train.max_length={lora.max_length} exceeds score.engine.max_model_len={score_config.engine.max_model_len}"
        )
    prepared, summaries_fp = stage_inputs(experiment, run)
    score_config.prompt.check_min_history(experiment.prepare.protocol.min_history)
    from trsr.llm.models import resolve

    resolve(lora.model)  # an unknown model fails here, not inside a Ray actor
    key = fingerprint(config, score_config.prompt, lora.model, prepared, summaries_fp, experiment.seed)
    manifest_path = storage.join(folder, "_manifest.json")
    result_path = storage.join(folder, "result.json")
    if not force and storage.exists(manifest_path) and storage.exists(result_path):
        if storage.read_json(manifest_path).get("fingerprint") == key:
            return dict(storage.read_json(result_path), skipped=True)

    started = time.perf_counter()
    items = storage.read_parquet(run.items())
    summaries = load_summaries(run.root, score_config.prompt.mode) if score_config.prompt.mode else None
    train_lists = first_lists_by_user(
        build_lists(storage.read_parquet(run.samples("train")), items, summaries, score_config.prompt.k),
        config.max_lists,
    )
    if train_lists.num_rows == 0:
        raise TrsrError(f"{run.samples('train')}: no training lists")
    texts = build_texts(train_lists, score_config, lora.model, config.texts_per_batch)
    examples_path = storage.join(folder, "examples.parquet")
    storage.write_parquet(texts, examples_path)
    statuses = Counter(train_lists.column("summary_status").to_pylist())

    valid_fn = None
    valid_lists = 0
    if config.valid_lists:
        valid = first_lists_by_user(
            build_lists(storage.read_parquet(run.samples("valid")), items, summaries, score_config.prompt.k),
            config.valid_lists,
        )
        valid_lists = valid.num_rows
        if valid_lists:
            valid_fn = ValidateAdapter(score_config, valid, experiment.seed)
        else:
            lora = lora.model_copy(update={"valid_metric": None})

    lora = lora.model_copy(update={"seed": experiment.seed + lora.seed})
    examples = list(zip(texts.column("text").to_pylist(), texts.column("answer_start").to_pylist()))
    # Grouped by list: the candidates of a list share the user part of the prompt.
    groups = texts.column("list_id").to_pylist()
    summary = train_lora(lora, examples, valid_fn, storage_path=folder, resume=not force, groups=groups)
    result = {
        "method": method,
        "variant": score_config.prompt.variant,
        "model": lora.model,
        "examples": texts.num_rows,
        "lists": train_lists.num_rows,
        "summary_status": dict(sorted(statuses.items())),
        "valid_lists": valid_lists,
        "examples_path": examples_path,
        "seconds": round(time.perf_counter() - started, 2),
        **{k: v for k, v in summary.items() if k != "run_dir"},
        "lora_dir": summary["run_dir"],
    }
    storage.write_json(result, result_path)
    storage.write_json({"stage": f"{STAGE}/{method}", "fingerprint": key, "finished_at": time.time()}, manifest_path)
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
