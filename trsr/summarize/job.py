"""The summarize job: prepared users -> Ray Data stages -> summaries/<mode>/ Parquet.

    positives of samples/{test,valid,train} (one row per user: user, split, history)
      -> RenderBlocks            CPU actors: blocks of N items fitted to the token budget
      -> SummarizeStage x L      engine actors: one map stage per level/step (per_step)
         (or one fused stage)    or one stage through all of them (fused)
      -> finalize                one SUMMARIES row per user
      -> summaries/<mode>/*.parquet, stats.json, _manifest.json
"""

from __future__ import annotations

import logging
import math
import time

import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.config import fingerprint
from trsr.experiment import ExperimentConfig
from trsr.errors import TrsrError
from trsr.runs import RunFolder
from trsr.summarize.config import SummarizeConfig
from trsr.summarize.prompts import load_prompts
from trsr.summarize.stages import (
    INTERMEDIATE,
    OK,
    RenderBlocks,
    SummarizeStage,
    steps_needed,
)

log = logging.getLogger(__name__)
STAGE = "summaries"
SPLIT_PRIORITY = ("test", "valid", "train")

SUMMARIES = pa.schema(
    [
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("mode", pa.string()),
        ("summary", pa.string()),
        ("intermediates", pa.list_(INTERMEDIATE)),
        ("items", pa.int32()),
        ("blocks", pa.int32()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("calls", pa.int32()),
        ("retries", pa.int32()),
        ("shortened_blocks", pa.int32()),
        ("trimmed", pa.int32()),
        ("status", pa.string()),
        ("model", pa.string()),
        ("template_hash", pa.string()),
        ("seed", pa.int64()),
    ]
)


def summary_dir(run_dir: str, mode: str) -> str:
    return storage.join(RunFolder(run_dir).stage_dir(STAGE), mode)


def select_users(run: RunFolder, max_users: int | dict | None) -> pa.Table:
    """One row per user (user_id, split, history) from the positives of each split, in
    split priority (test, valid, train) and user-id order, capped by `max_users` (a
    total, or a cap per split)."""
    parts = []
    for split in SPLIT_PRIORITY:
        path = run.samples(split)
        if not storage.exists(path):
            raise TrsrError(f"{path}: not found; run `trsr data prepare` for {run.root} first")
        table = storage.read_parquet(path, columns=["user_id", "split", "history", "label"])
        table = table.filter(pc.equal(table.column("label"), 1)).drop_columns(["label"])
        table = table.sort_by("user_id")
        if isinstance(max_users, dict) and max_users.get(split) is not None:
            table = table.slice(0, max_users[split])
        parts.append(table)
    users = pa.concat_tables(parts)
    if isinstance(max_users, int):
        users = users.slice(0, max_users)
    return users


def finalize(batch: pa.Table, mode: str, model: str, template_hash: str, seed: int) -> pa.Table:
    """Summarization state -> SUMMARIES rows (the final node is the summary)."""
    nodes = batch.column("nodes").to_pylist()
    n = batch.num_rows
    return pa.Table.from_arrays(
        [
            batch.column("user_id"),
            batch.column("split"),
            pa.array([mode] * n, pa.string()),
            pa.array([node[0] if node else "" for node in nodes], pa.string()),
            batch.column("intermediates"),
            batch.column("items"),
            pc.list_value_length(batch.column("blocks")).cast(pa.int32()),
            batch.column("tokens_in"),
            batch.column("tokens_out"),
            batch.column("calls"),
            batch.column("retries"),
            batch.column("shortened_blocks"),
            batch.column("trimmed"),
            batch.column("status"),
            pa.array([model] * n, pa.string()),
            pa.array([template_hash] * n, pa.string()),
            pa.array([seed] * n, pa.int64()),
        ],
        schema=SUMMARIES,
    )


def stage_fingerprint(experiment: ExperimentConfig, run: RunFolder) -> str:
    prepared = storage.read_json(run.manifest("prepared")).get("fingerprint")
    return fingerprint(experiment.summarize, experiment.seed, prepared)


def summarize(experiment: ExperimentConfig, force: bool = False) -> dict:
    """Run every configured mode; return stats (users, statuses, throughput)."""
    import ray

    from trsr.ray_utils import init_ray, require_resources

    config: SummarizeConfig = experiment.summarize
    run = RunFolder(experiment.run_dir)
    if not storage.exists(run.manifest("prepared")):
        raise TrsrError(
            f"{run.manifest('prepared')}: not found; run `trsr data prepare` into {run.root} first"
        )
    key = stage_fingerprint(experiment, run)
    if not force and run.is_complete(STAGE, key):
        stats = storage.read_json(run.stats(STAGE))
        stats["skipped"] = True
        return stats

    users = select_users(run, config.max_users)
    longest = int(pc.max(pc.list_value_length(users.column("history"))).as_py() or 0)
    max_blocks = math.ceil(longest / config.block_size)
    prompts = load_prompts(config.domain, config.prompts_file)

    init_ray()
    engine = config.engine
    stats: dict = {"users_in": users.num_rows, "modes": {}}
    for mode in config.modes:
        steps = steps_needed(mode, max_blocks, config.fan_in)
        stage_plan = [[s] for s in range(steps)] if config.execution == "per_step" else [list(range(steps))]
        require_resources(
            f"summarize ({mode}, {len(stage_plan)} engine stage(s) x {engine.actors} actor(s))",
            gpus=engine.num_gpus * engine.actors * len(stage_plan),
        )
        started = time.perf_counter()
        blocks_per_task = max(1, config.users_per_batch)
        dataset = ray.data.from_arrow(
            [users.slice(i, blocks_per_task) for i in range(0, users.num_rows, blocks_per_task)]
            or [users]
        )
        dataset = dataset.map_batches(
            RenderBlocks,
            fn_constructor_kwargs={"config": config, "items": run.items()},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=config.users_per_batch,
            batch_format="pyarrow",
            num_cpus=1,
        )
        for stage_steps in stage_plan:
            dataset = dataset.map_batches(
                SummarizeStage,
                fn_constructor_kwargs={
                    "config": config,
                    "mode": mode,
                    "steps": stage_steps,
                    "seed": experiment.seed,
                },
                compute=ray.data.ActorPoolStrategy(size=engine.actors),
                batch_size=config.users_per_batch,
                batch_format="pyarrow",
                num_cpus=engine.num_cpus,
                num_gpus=engine.num_gpus,
            )
        dataset = dataset.map_batches(
            finalize,
            fn_kwargs={
                "mode": mode,
                "model": engine.model,
                "template_hash": prompts.hash,
                "seed": experiment.seed,
            },
            batch_format="pyarrow",
            batch_size=None,
        )
        out = summary_dir(run.root, mode)
        _clear(out)
        filesystem, inner = storage.arrow_filesystem(out)
        dataset.write_parquet(inner, filesystem=filesystem)
        seconds = time.perf_counter() - started
        stats["modes"][mode] = _mode_stats(out, users, seconds, len(stage_plan), steps)
        log.info("summarize %s: %s", mode, stats["modes"][mode])

    storage.write_json(stats, run.stats(STAGE))
    run.mark_complete(STAGE, key, {"modes": list(config.modes)})
    stats["skipped"] = False
    return stats


def read_summaries(run_dir: str, mode: str) -> pa.Table:
    path = summary_dir(run_dir, mode)
    filesystem, inner = storage.arrow_filesystem(path)
    import pyarrow.dataset as ds

    return ds.dataset(inner, filesystem=filesystem, format="parquet").to_table().sort_by("user_id")


def _mode_stats(out: str, users: pa.Table, seconds: float, stages: int, steps: int) -> dict:
    filesystem, inner = storage.arrow_filesystem(out)
    import pyarrow.dataset as ds

    table = ds.dataset(inner, filesystem=filesystem, format="parquet").to_table()
    written = set(table.column("user_id").to_pylist())
    expected = set(users.column("user_id").to_pylist())
    if written != expected or table.num_rows != users.num_rows:
        raise AssertionError(
            f"summaries in {out}: {table.num_rows} rows for {len(expected)} users "
            f"({len(expected - written)} missing, {table.num_rows - len(written)} duplicated)"
        )
    statuses = {}
    for status in table.column("status").to_pylist():
        statuses[status] = statuses.get(status, 0) + 1
    tokens_out = int(pc.sum(table.column("tokens_out")).as_py() or 0)
    return {
        "users": table.num_rows,
        "status": dict(sorted(statuses.items())),
        "ok": statuses.get(OK, 0),
        "steps": steps,
        "engine_stages": stages,
        "calls": int(pc.sum(table.column("calls")).as_py() or 0),
        "retries": int(pc.sum(table.column("retries")).as_py() or 0),
        "trimmed": int(pc.sum(table.column("trimmed")).as_py() or 0),
        "tokens_in": int(pc.sum(table.column("tokens_in")).as_py() or 0),
        "tokens_out": tokens_out,
        "seconds": round(seconds, 2),
        "users_per_s": round(table.num_rows / seconds, 4) if seconds else None,
        "output_tokens_per_s": round(tokens_out / seconds, 2) if seconds else None,
    }


def _clear(path: str) -> None:
    fs = storage.fsspec_filesystem(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def describe(stats: dict) -> str:
    lines = []
    for mode, s in stats["modes"].items():
        lines.append(
            f"summarize {mode}: {s['users']} users ({s['ok']} ok; status {s['status']}), "
            f"{s['steps']} level(s)/step(s) in {s['engine_stages']} engine stage(s), "
            f"{s['seconds']:.1f} s, {s['users_per_s']:.3f} users/s, "
            f"{s['output_tokens_per_s']:.1f} output tokens/s"
        )
    return "\n".join(lines)
