"""Scoring ranking lists with the LLM recommender: p(yes) per candidate (paper eq. 3).

    samples/<split> (one row per candidate)  + items + summaries/<mode>
      -> build_lists      driver: one row per ranking list (LISTS schema)
      -> ScoreStage       engine actors (Ray Data map_batches): one shared prompt
                          prefix per list, one engine call per batch
      -> scores/<method>/<split>.parquet (SCORES), stats.json, _manifest.json

`ScoreStage` is a plain class over Arrow batches (no Ray inside): a unit test calls it
directly. Each input row is one ranking list:

    list_id, split, user_id
    summary          the user's preference summary (null when missing)
    summary_status   "ok", "missing", or the summarizer's status ("empty", ...);
                     a summary is used only when "ok", otherwise the summary line is empty
    history          attributes of the history items, oldest first (the driver ships
                     only the K most recent for the summary variants)
    candidates       candidate item ids, in the list's (shuffled) order
    candidate_attributes, labels   per candidate

Output: the SCORES columns (list_id, split, user_id, candidate, label, score, method)
with score = softmax over (logp_yes, logp_no) = p(yes), plus diagnostics the job turns
into stats and does not write: position (order in the list), logp_yes, logp_no,
prompt_tokens, history_items, items_dropped, summary_words_cut, caps_shortened.
Users without a usable summary are scored all the same and counted in the stats.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.config import fingerprint
from trsr.data.schema import ATTRIBUTE, SCORES, SPLITS, conform
from trsr.errors import ConfigError, TrsrError
from trsr.recommend.config import ScoreConfig
from trsr.recommend.prompt import PromptBuilder, RecommendPromptConfig
from trsr.runs import RunFolder, inputs_signature

if TYPE_CHECKING:
    from trsr.experiment import ExperimentConfig

log = logging.getLogger(__name__)
STAGE = "scores"
OK = "ok"
MISSING = "missing"
UNUSED = "unused"  # tallrec: no summary in the prompt

LISTS = pa.schema(
    [
        pa.field("list_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("summary", pa.string()),
        pa.field("summary_status", pa.string(), nullable=False),
        pa.field("history", pa.list_(pa.list_(ATTRIBUTE)), nullable=False),
        pa.field("candidates", pa.list_(pa.string()), nullable=False),
        pa.field("candidate_attributes", pa.list_(pa.list_(ATTRIBUTE)), nullable=False),
        pa.field("labels", pa.list_(pa.int8()), nullable=False),
    ]
)

DIAGNOSTICS = [
    pa.field("position", pa.int16()),
    pa.field("logp_yes", pa.float64()),
    pa.field("logp_no", pa.float64()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("history_items", pa.int16()),
    pa.field("items_dropped", pa.int16()),
    pa.field("summary_words_cut", pa.int32()),
    pa.field("caps_shortened", pa.bool_()),
]
STAGE_OUTPUT = pa.schema(list(SCORES) + DIAGNOSTICS)


def p_yes(logp_yes: float, logp_no: float) -> float:
    """softmax over the two answer log-probabilities, the yes part (stable)."""
    d = logp_no - logp_yes
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


def usable_summary(summary: str | None, status: str, prompt: RecommendPromptConfig) -> str | None:
    """The summary a prompt shows: only a summary with status "ok", and none for tallrec."""
    return summary if status == OK and prompt.has_summary else None


class ScoreStage:
    """Ranking lists (LISTS rows) -> one scored row per candidate (STAGE_OUTPUT)."""

    def __init__(self, config: ScoreConfig, engine=None):
        if engine is None:
            from trsr.llm.engine import build_engine

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
        columns = {name: batch.column(name).to_pylist() for name in LISTS.names}
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
            summary = usable_summary(columns["summary"][i], columns["summary_status"][i], self.config.prompt)
            prompts.append(self.builder.fit(summary, columns["history"][i], attributes))
        requests = [(p.prefix, p.suffixes) for p in prompts]
        results = self.engine.yes_no_logprobs(requests, self.config.prompt.yes, self.config.prompt.no)

        out: dict[str, list[Any]] = {field.name: [] for field in STAGE_OUTPUT}
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
        return pa.Table.from_pydict(out, schema=STAGE_OUTPUT)


# ----------------------------------------------------------------------------- driver


def scores_path(run_dir: str, method: str, split: str) -> str:
    return storage.join(RunFolder(run_dir).stage_dir(STAGE), method, f"{split}.parquet")


def read_scores(run_dir: str, method: str, split: str) -> pa.Table:
    return storage.read_parquet(scores_path(run_dir, method, split))


def load_summaries(run_dir: str, mode: str) -> dict[tuple[str, str], tuple[str | None, str]]:
    """(user_id, split) -> (summary, status) from summaries/<mode>/."""
    from trsr.summarize.job import read_summaries, summary_dir

    folder = summary_dir(run_dir, mode)
    if not storage.exists(folder):
        raise TrsrError(
            f"{folder}: not found; run `trsr summarize` with {mode} among summarize.modes "
            "first (or score with prompt.variant=tallrec, which uses no summary)"
        )
    table = read_summaries(run_dir, mode)
    out: dict[tuple[str, str], tuple[str | None, str]] = {}
    for user, split, summary, status in zip(
        table.column("user_id").to_pylist(),
        table.column("split").to_pylist(),
        table.column("summary").to_pylist(),
        table.column("status").to_pylist(),
    ):
        if (user, split) in out:
            raise TrsrError(f"{folder}: more than one summary for user {user!r} in split {split!r}")
        out[(user, split)] = (summary, status or MISSING)
    return out


def build_lists(
    samples: pa.Table,
    items: pa.Table,
    summaries: dict[tuple[str, str], tuple[str | None, str]] | None,
    history_items: int | None,
) -> pa.Table:
    """SAMPLES rows -> one LISTS row per ranking list, candidates in position order.

    `summaries` None: the prompt takes no summary (status "unused"). `history_items`:
    keep only that many most recent history items (None: all).
    """
    samples = samples.sort_by([("list_id", "ascending"), ("position", "ascending")])
    needed = pa.concat_arrays(
        [pc.list_flatten(samples.column("history")).combine_chunks(), samples.column("candidate").combine_chunks()]
    ).unique()
    items = items.filter(pc.is_in(items.column("item_id"), value_set=needed))
    attributes = dict(zip(items.column("item_id").to_pylist(), items.column("attributes").to_pylist()))
    missing = set(needed.to_pylist()) - set(attributes)
    if missing:
        raise TrsrError(f"{len(missing)} item(s) of the samples are not in items.parquet, e.g. {sorted(missing)[:5]}")

    rows: dict[str, dict[str, Any]] = {}
    for list_id, split, user, history, candidate, label in zip(
        samples.column("list_id").to_pylist(),
        samples.column("split").to_pylist(),
        samples.column("user_id").to_pylist(),
        samples.column("history").to_pylist(),
        samples.column("candidate").to_pylist(),
        samples.column("label").to_pylist(),
    ):
        row = rows.get(list_id)
        if row is None:
            shown = history if history_items is None else (history[-history_items:] if history_items else [])
            if summaries is None:
                summary, status = None, UNUSED
            else:
                summary, status = summaries.get((user, split), (None, MISSING))
            row = rows[list_id] = dict(
                list_id=list_id,
                split=split,
                user_id=user,
                summary=summary,
                summary_status=status,
                history=[attributes[item] for item in shown],
                candidates=[],
                candidate_attributes=[],
                labels=[],
                _history=history,
            )
        elif row["user_id"] != user or row["split"] != split or row["_history"] != history:
            raise TrsrError(f"list {list_id}: its rows disagree on user, split or history")
        row["candidates"].append(candidate)
        row["candidate_attributes"].append(attributes[candidate])
        row["labels"].append(label)
    for row in rows.values():
        del row["_history"]
    return pa.Table.from_pylist(list(rows.values()), schema=LISTS)


def check_complete(scores: pa.Table, lists: pa.Table, where: str) -> None:
    """Every candidate of every list scored exactly once; no list lost or duplicated."""
    expected = Counter()
    for list_id, candidates, labels in zip(
        lists.column("list_id").to_pylist(),
        lists.column("candidates").to_pylist(),
        lists.column("labels").to_pylist(),
    ):
        expected.update((list_id, c, l) for c, l in zip(candidates, labels))
    got = Counter(
        zip(
            scores.column("list_id").to_pylist(),
            scores.column("candidate").to_pylist(),
            scores.column("label").to_pylist(),
        )
    )
    if got != expected:
        lost = expected - got
        extra = got - expected
        lost_lists = sorted({key[0] for key in lost})
        extra_lists = sorted({key[0] for key in extra})
        raise AssertionError(
            f"{where}: {sum(lost.values())} candidate(s) not scored (lists {lost_lists[:5]}), "
            f"{sum(extra.values())} unexpected or duplicated (lists {extra_lists[:5]})"
        )
    bad = pc.sum(pc.invert(pc.and_(pc.greater(scores.column("score"), 0.0), pc.less(scores.column("score"), 1.0)))).as_py()
    if bad:
        log.warning("%s: %d score(s) at exactly 0 or 1 (float saturation)", where, bad)


def stage_inputs(experiment: "ExperimentConfig", run: RunFolder) -> tuple[str | None, str | None]:
    """Fingerprints of the prepared data and (for summary variants) the summaries; clear
    errors when a stage the score or train stage needs has not run."""
    if not storage.exists(run.manifest("prepared")):
        raise TrsrError(
            f"{run.manifest('prepared')}: not found; run `trsr data prepare` into {run.root} first"
        )
    prepared = storage.read_json(run.manifest("prepared")).get("fingerprint")
    mode = experiment.score.prompt.mode
    summaries = None
    if mode is not None:
        from trsr.summarize.job import summary_dir

        if not storage.exists(summary_dir(run.root, mode)):
            raise TrsrError(
                f"{summary_dir(run.root, mode)}: not found; run `trsr summarize` with {mode} among "
                f"summarize.modes first (variant {experiment.score.prompt.variant} reads {mode} summaries; "
                "variant tallrec needs none)"
            )
        if storage.exists(run.manifest("summaries")):
            summaries = storage.read_json(run.manifest("summaries")).get("fingerprint")
        else:  # summaries written by other means: fingerprint the files themselves
            summaries = fingerprint(inputs_signature(summary_dir(run.root, mode)))
    return prepared, summaries


def resolve_adapter(experiment: "ExperimentConfig") -> str | None:
    """The LoRA adapter the scorer loads: score.engine.lora_adapter if set, else the
    trained adapter of this method when train.enabled, else none (base model)."""
    config: ScoreConfig = experiment.score
    if config.engine.lora_adapter:
        return config.engine.lora_adapter
    train = getattr(experiment, "train", None)
    if train is None or not train.enabled:
        return None
    from trsr.recommend.sft import trained_adapter

    return trained_adapter(experiment.run_dir, config.method_name)


def stage_fingerprint(experiment: "ExperimentConfig", run: RunFolder, split: str) -> str:
    config: ScoreConfig = experiment.score
    prepared, summaries = stage_inputs(experiment, run)
    adapter = inputs_signature(config.engine.lora_adapter) if config.engine.lora_adapter else None
    return fingerprint(config, split, prepared, summaries, adapter)


def score(experiment: "ExperimentConfig", split: str | None = "test", force: bool = False) -> dict:
    """Score `split` (None: every split in score.splits); return stats per split.

    Writes <run_dir>/scores/<method>/<split>.parquet (SCORES). A split whose config and
    inputs are unchanged since its last run is skipped unless `force`.
    """

    from trsr.ray_utils import init_ray, map_table, require_resources

    config: ScoreConfig | None = getattr(experiment, "score", None)
    if not isinstance(config, ScoreConfig):
        raise ConfigError("the experiment config has no `score` section (ScoreConfig)")
    splits = [split] if split is not None else list(config.splits)
    for name in splits:
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; one of {SPLITS}")
    run = RunFolder(experiment.run_dir)
    stage_inputs(experiment, run)
    config.prompt.check_min_history(experiment.prepare.protocol.min_history)
    from trsr.llm.models import resolve

    resolve(config.engine.model)  # an unknown model fails here, not inside an actor
    adapter = resolve_adapter(experiment)
    if adapter != config.engine.lora_adapter:
        config = config.model_copy(update={"engine": config.engine.model_copy(update={"lora_adapter": adapter})})
        experiment = experiment.model_copy(update={"score": config})
    method = config.method_name
    folder = storage.join(run.stage_dir(STAGE), method)
    manifest_path = storage.join(folder, "_manifest.json")
    stats_path = storage.join(folder, "stats.json")
    manifest = storage.read_json(manifest_path) if storage.exists(manifest_path) else {"splits": {}}
    all_stats = storage.read_json(stats_path) if storage.exists(stats_path) else {}

    engine = config.engine
    result: dict = {}
    summaries = None
    for name in splits:
        key = stage_fingerprint(experiment, run, name)
        out = scores_path(run.root, method, name)
        done = manifest["splits"].get(name, {})
        if not force and done.get("fingerprint") == key and storage.exists(out) and name in all_stats:
            result[name] = dict(all_stats[name], skipped=True)
            continue
        samples = storage.read_parquet(run.samples(name))
        if config.prompt.mode is not None and summaries is None:
            summaries = load_summaries(run.root, config.prompt.mode)
        lists = build_lists(
            samples,
            storage.read_parquet(run.items()),
            summaries if config.prompt.mode is not None else None,
            config.prompt.k,
        )
        lists_in_split = lists.num_rows
        if config.max_lists is not None:
            lists = lists.slice(0, config.max_lists)

        init_ray()
        require_resources(
            f"score ({method}, {name}: {engine.actors} engine actor(s))",
            gpus=engine.num_gpus * engine.actors,
            cpus=engine.num_cpus * engine.actors,
        )
        started = time.perf_counter()
        scored = map_table(
            lists, ScoreStage, rows_per_batch=config.users_per_batch, constructor_kwargs={"config": config},
            actors=engine.actors, num_cpus=engine.num_cpus, num_gpus=engine.num_gpus, schema=STAGE_OUTPUT,
        )
        seconds = time.perf_counter() - started
        check_complete(scored, lists, out)
        scored = scored.sort_by([("list_id", "ascending"), ("position", "ascending")])
        storage.write_parquet(conform(scored, SCORES, out), out)

        stats = split_stats(scored, lists, lists_in_split, seconds)
        stats.update(method=method, split=name, path=out, adapter=config.engine.lora_adapter)
        all_stats[name] = stats
        storage.write_json(all_stats, stats_path)
        manifest["splits"][name] = {"fingerprint": key, "finished_at": time.time()}
        manifest.update(stage=f"{STAGE}/{method}", method=method)
        storage.write_json(manifest, manifest_path)
        log.info("score %s %s: %s", method, name, stats)
        result[name] = dict(stats, skipped=False)
    return result


def split_stats(scored: pa.Table, lists: pa.Table, lists_in_split: int, seconds: float) -> dict:
    per_list = scored.filter(pc.equal(scored.column("position"), 0))
    statuses = Counter(lists.column("summary_status").to_pylist())
    tokens = scored.column("prompt_tokens")
    shown = per_list.column("history_items")
    return {
        "lists": lists.num_rows,
        "lists_in_split": lists_in_split,
        "candidates": scored.num_rows,
        "summary_status": dict(sorted(statuses.items())),
        "lists_without_summary": sum(n for s, n in statuses.items() if s not in (OK, UNUSED)),
        "lists_summary_cut": int(pc.sum(pc.greater(per_list.column("summary_words_cut"), 0)).as_py() or 0),
        "lists_items_dropped": int(pc.sum(pc.greater(per_list.column("items_dropped"), 0)).as_py() or 0),
        "lists_caps_shortened": int(pc.sum(per_list.column("caps_shortened")).as_py() or 0),
        "history_items": {
            "min": pc.min(shown).as_py(),
            "mean": round(pc.mean(shown).as_py() or 0.0, 3),
            "max": pc.max(shown).as_py(),
        },
        "prompt_tokens": {"mean": round(pc.mean(tokens).as_py() or 0.0, 1), "max": pc.max(tokens).as_py()},
        "mean_score": round(pc.mean(scored.column("score")).as_py() or 0.0, 6),
        "seconds": round(seconds, 2),
        "lists_per_s": round(lists.num_rows / seconds, 4) if seconds else None,
        "candidates_per_s": round(scored.num_rows / seconds, 2) if seconds else None,
    }


def describe(result: dict) -> str:
    lines = []
    for split, s in result.items():
        lines.append(
            f"score {s['method']} {split}: {s['lists']}/{s['lists_in_split']} lists, "
            f"{s['candidates']} candidates, {s['lists_without_summary']} list(s) without a summary, "
            f"{s['seconds']:.1f} s ({s['candidates_per_s']} candidates/s)"
            + (" [up to date, skipped]" if s.get("skipped") else "")
        )
    return "\n".join(lines)
