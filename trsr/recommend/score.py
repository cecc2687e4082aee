"""Scoring ranking lists with the LLM recommender: p(yes) per candidate (paper eq. 3).

    summaries/<mode> (variants with a summary) or prepared/lists (tallrec), one split
      -> AttachItems     CPU actor: history and candidate attributes from the catalogue
      -> ScoreStage      engine actors: one shared prompt prefix per list, one engine
                         call per batch of lists
      -> scores/<method>/<split>/   one row per candidate (SCORES + diagnostics), one
                         file per batch; _stats.json, _rejects.parquet, _manifest.json

A split is one stage of the runner (trsr.runner): streamed, resumable list by list,
with stats from the written files. `ScoreStage` is a plain class over Arrow batches
(no Ray inside): a unit test calls it directly. Its input rows are ranking lists with
their texts (PROMPT_LISTS, trsr.recommend.lists); its output has the SCORES columns
(list_id, split, user_id, candidate, label, score, method) with score = softmax over
(logp_yes, logp_no) = p(yes), plus diagnostics: position (order in the list),
logp_yes, logp_no, prompt_tokens, history_items, items_dropped, summary_words_cut,
caps_shortened, summary_status. Lists whose user has no usable summary are prompted
without one or go to the rejects (score.prompt.missing_summary, shared with training),
counted in the stats; more of them than score.prompt.max_missing_summary_share stops the
stage before it starts (`lists.check_summaries`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trsr.config import fingerprint
from trsr.schema import SCORES, SCORES_WITH_DIAGNOSTICS, SPLITS, lists_without_summary
from trsr.errors import ConfigError
from trsr.recommend import lists as ranking_lists
from trsr.recommend.config import ScoreConfig
from trsr.recommend.lists import PROMPT_LISTS, AttachItems, usable_summary
from trsr.recommend.prompt import PromptBuilder
from trsr.runner import RunContext, Step, StageJob, count_rows, run_stage, value_counts
from trsr.runs import LAYOUT, RunFolder, inputs_signature

log = logging.getLogger(__name__)
OK = ranking_lists.OK
UNUSED = ranking_lists.UNUSED



def p_yes(logp_yes: float, logp_no: float) -> float:
    """softmax over the two answer log-probabilities, the yes part (stable)."""
    d = logp_no - logp_yes
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


class ScoreStage:
    """Ranking lists (PROMPT_LISTS rows) -> one scored row per candidate (SCORES_WITH_DIAGNOSTICS)."""

    def __init__(self, config: ScoreConfig, engine=None):
        if engine is None:
            from trsr.llm.factory import build_engine

            engine = build_engine(config.engine)
        self.engine = engine
        self.config = config
        prompt = config.prompt
        if prompt.max_length > engine.max_model_len:
            raise ConfigError(
                f"score.prompt.max_length={prompt.max_length} exceeds the engine's "
                f"max_model_len={engine.max_model_len}"
            )
        self.builder = PromptBuilder(prompt, engine.tokenizer)
        ids = engine.yes_no_token_ids(prompt.yes, prompt.no)
        if ids != (self.builder.yes_id, self.builder.no_id):
            raise ConfigError(f"engine and prompt disagree on the yes/no token ids: {ids}")
        self.method = config.method_name

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {name: batch.column(name).to_pylist() for name in PROMPT_LISTS.names}
        prompts = []
        for i in range(batch.num_rows):
            candidates = columns["candidates"][i]
            attributes = columns["candidate_attributes"][i]
            labels = columns["labels"][i]
            if not (len(candidates) == len(attributes) == len(labels)) or not candidates:
                raise ValueError(
                    f"list {columns['list_id'][i]}: {len(candidates)} candidates, "
                    f"{len(attributes)} candidate attributes, {len(labels)} labels"
                )
            summary = usable_summary(columns["summary"][i], columns["summary_status"][i], self.config.prompt.has_summary)
            prompts.append(self.builder.fit(summary, columns["history"][i], attributes))
        requests = [(p.prefix, p.suffixes) for p in prompts]
        results = self.engine.yes_no_logprobs(requests, self.config.prompt.yes, self.config.prompt.no)

        out: dict[str, list[Any]] = {field.name: [] for field in SCORES_WITH_DIAGNOSTICS}
        for i, (prompt, logprobs) in enumerate(zip(prompts, results)):
            candidates = columns["candidates"][i]
            if len(logprobs) != len(candidates):
                raise AssertionError(f"engine returned {len(logprobs)} scores for {len(candidates)} candidates")
            for position, (candidate, label, (ly, ln), tokens) in enumerate(
                zip(candidates, columns["labels"][i], logprobs, prompt.tokens)
            ):
                out["list_id"].append(columns["list_id"][i])
                out["split"].append(columns["split"][i])
                out["user_id"].append(columns["user_id"][i])
                out["candidate"].append(candidate)
                out["label"].append(label)
                out["score"].append(p_yes(ly, ln))
                out["method"].append(self.method)
                out["position"].append(position)
                out["logp_yes"].append(ly)
                out["logp_no"].append(ln)
                out["prompt_tokens"].append(tokens)
                out["history_items"].append(prompt.history_items)
                out["items_dropped"].append(prompt.items_dropped)
                out["summary_words_cut"].append(prompt.summary_words_cut)
                out["caps_shortened"].append(prompt.caps_shortened)
                out["summary_status"].append(columns["summary_status"][i])
        return pa.Table.from_pydict(out, schema=SCORES_WITH_DIAGNOSTICS)


# ----------------------------------------------------------------------------- driver


def read_scores(run_dir: str, method: str, split: str) -> pa.Table:
    """The SCORES rows of one method and split, sorted by list and position."""
    folder = RunFolder(run_dir).scores(method, split)
    table = folder.read()
    if "error" in table.column_names:  # rows of failed lists: in _rejects.parquet
        table = table.filter(pc.is_null(table.column("error")))
    if "position" in table.column_names:
        table = table.sort_by([("list_id", "ascending"), ("position", "ascending")])
    else:
        table = table.sort_by([("list_id", "ascending"), ("candidate", "ascending")])
    return table.select(SCORES.names).cast(SCORES)


def resolve_adapter(config: ScoreConfig, run: RunFolder, trained: bool) -> str | None:
    """The LoRA adapter the scorer loads: score.engine.lora_adapter if set, else the
    trained adapter of this method when `trained` (train.enabled), else none (base model)."""
    if config.engine.lora_adapter:
        return config.engine.lora_adapter
    if not trained:
        return None
    return run.best_adapter(config.method_name)


def stage_fingerprint(config: ScoreConfig, run: RunFolder, split: str) -> str:
    prepared, summaries = ranking_lists.input_fingerprints(run, config.prompt)
    adapter = inputs_signature(config.engine.lora_adapter) if config.engine.lora_adapter else None
    return fingerprint(output_settings(config, exclude={"splits"}), split, prepared, summaries, adapter, LAYOUT)


def output_settings(config: ScoreConfig, exclude: set[str]) -> dict:
    """The score settings that decide what a scoring stage writes, for its fingerprint:
    the engine's resources decide where it runs, not what it computes."""
    settings = config.model_dump(mode="json", exclude=exclude)
    for key in ("actors", "num_cpus", "num_gpus"):
        settings["engine"].pop(key, None)
    return settings


def score_job(config: ScoreConfig, run: RunFolder, split: str) -> StageJob:
    """The runner's description of scoring one split (the adapter already resolved)."""
    mode = config.prompt.mode
    inputs, _ = ranking_lists.source(run, mode)
    engine = config.engine
    method = config.method_name
    keep, decline_reason = ranking_lists.summary_policy(config.prompt)
    return StageJob(
        name=f"score {method} {split}",
        folder=run.scores(method, split),
        inputs=inputs,
        id_column="list_id",
        steps=[
            Step(AttachItems, {"items": run.items(), "history_items": config.prompt.k, "uses_summary": mode is not None}, PROMPT_LISTS),
            Step(
                ScoreStage,
                {"config": config},
                SCORES_WITH_DIAGNOSTICS,
                actors=engine.actors,
                num_cpus=engine.num_cpus,
                num_gpus=engine.num_gpus,
            ),
        ],
        batch_rows=config.users_per_batch,
        fingerprint=stage_fingerprint(config, run, split),
        where=ranking_lists.where(split, config.max_lists),
        columns=ranking_lists.columns(mode),
        unit="lists",
        block_stats=_block_stats,
        units=_lists_in,
        details={"method": method, "split": split, "model": engine.model, "adapter": engine.lora_adapter,
                 "family": "llm", "summary_mode": mode, "prepared": run.prepared_fingerprint()},
        keep=keep,
        decline_reason=decline_reason,
    )


def _lists_in(table: pa.Table) -> int:
    return int(pc.sum(pc.equal(table.column("position"), 0)).as_py() or 0)


def _block_stats(table: pa.Table) -> dict:
    """Additive stats of a block of scored candidates (per list: its position-0 row)."""
    per_list = table.filter(pc.equal(table.column("position"), 0))
    statuses = value_counts(per_list.column("summary_status"))
    shown = per_list.column("history_items")
    scores = table.column("score")
    return {
        "lists": per_list.num_rows,
        "candidates": table.num_rows,
        "summary_status": statuses,
        "lists_summary_cut": int(pc.sum(pc.greater(per_list.column("summary_words_cut"), 0)).as_py() or 0),
        "lists_items_dropped": int(pc.sum(pc.greater(per_list.column("items_dropped"), 0)).as_py() or 0),
        "lists_caps_shortened": int(pc.sum(per_list.column("caps_shortened")).as_py() or 0),
        "history_items_sum": int(pc.sum(shown).as_py() or 0),
        "min:history_items": pc.min(shown).as_py(),
        "max:history_items": pc.max(shown).as_py(),
        "prompt_tokens_sum": int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
        "max:prompt_tokens": pc.max(table.column("prompt_tokens")).as_py(),
        "score_sum": float(pc.sum(scores).as_py() or 0.0),
        "saturated": int(pc.sum(pc.invert(pc.and_(pc.greater(scores, 0.0), pc.less(scores, 1.0)))).as_py() or 0),
    }


def split_stats(stats: dict, lists_in_split: int) -> dict:
    """The runner's stats of a split -> the figures `trsr score` reports."""
    lists = stats.get("lists", 0)
    candidates = stats.get("candidates", 0)
    statuses = stats.get("summary_status", {})
    seconds = stats.get("seconds") or 0.0
    computed = stats.get("rows_computed", lists)
    return {
        **stats,
        "lists": lists,
        "lists_in_split": lists_in_split,
        "candidates": candidates,
        "summary_status": dict(sorted(statuses.items())),
        "lists_without_summary": lists_without_summary(statuses),
        "history_items": {
            "min": stats.get("min:history_items"),
            "mean": round(stats.get("history_items_sum", 0) / lists, 3) if lists else 0.0,
            "max": stats.get("max:history_items"),
        },
        "prompt_tokens": {
            "mean": round(stats.get("prompt_tokens_sum", 0) / candidates, 1) if candidates else 0.0,
            "max": stats.get("max:prompt_tokens"),
        },
        "mean_score": round(stats.get("score_sum", 0.0) / candidates, 6) if candidates else 0.0,
        "lists_per_s": round(computed / seconds, 4) if seconds and computed else None,
        "candidates_per_s": round(candidates * computed / max(lists, 1) / seconds, 2) if seconds and computed else None,
    }


def score(config: ScoreConfig, context: RunContext, split: str | None = "test", force: bool = False,
          trained: bool = True) -> dict:
    """Score `split` (None: every split in score.splits); return stats per split.
    `trained` (train.enabled): score with this method's trained adapter unless
    score.engine.lora_adapter names one; false: the base model.

    Writes <run_dir>/scores/<method>/<split>/ (SCORES + diagnostics). A split whose
    config and inputs are unchanged since its last run is skipped unless `force`; an
    interrupted run of the same config resumes where it stopped.
    """
    splits = [split] if split is not None else list(config.splits)
    for name in splits:
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; one of {SPLITS}")
    run = context.run
    ranking_lists.input_fingerprints(run, config.prompt)  # clear errors when an input is missing
    config.prompt.check_min_history(run.prepared_min_history())
    from trsr.llm.models import resolve

    resolve(config.engine.model)  # an unknown model fails here, not inside an actor
    adapter = resolve_adapter(config, run, trained)
    if adapter != config.engine.lora_adapter:
        config = config.model_copy(update={"engine": config.engine.model_copy(update={"lora_adapter": adapter})})
    method = config.method_name
    result: dict = {}
    for name in splits:
        job = score_job(config, run, name)
        ranking_lists.check_summaries(job.name, job.inputs, job.where, config.prompt)
        stats = run_stage(job, context.runner, force=force)
        if stats.get("saturated"):
            log.warning("score %s %s: %d score(s) at exactly 0 or 1 (float saturation)", method, name, stats["saturated"])
        lists_in_split = count_rows(job.inputs, ranking_lists.where(name, None))
        result[name] = dict(split_stats(stats, lists_in_split), method=method, split=name, path=job.folder.path, adapter=adapter)
    return result


def describe(result: dict) -> str:
    lines = []
    for split, s in result.items():
        lines.append(
            f"score {s['method']} {split}: {s['lists']}/{s['lists_in_split']} lists, "
            f"{s['candidates']} candidates, {s['lists_without_summary']} list(s) without a summary, "
            + (f"{s['rows_declined']} rejected without a summary, " if s.get("rows_declined") else "")
            + f"{s['seconds']:.1f} s ({s['candidates_per_s']} candidates/s)"
            + (" [up to date, skipped]" if s.get("skipped") else "")
        )
    return "\n".join(lines)
