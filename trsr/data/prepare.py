"""The prepare stage: raw dataset -> canonical Parquet + ranking lists + stats.

    (synthetic) -> convert -> protocol -> write prepared/ -> stats

It runs in the job's driver process with vectorised polars/pyarrow (a MIND-large
conversion fits comfortably in one process); Ray enters in the stages after it.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from trsr import storage
from trsr.config import fingerprint
from trsr.data.config import PrepareConfig
from trsr.data import protocol
from trsr.data.converters import convert
from trsr.data.rejects import Rejects
from trsr.schema import SPLITS
from trsr.errors import DataError
from trsr.data.stats import format_accounting, format_table1, table1
from trsr.runner import RunContext
from trsr.runs import LAYOUT, RunFolder, inputs_signature

log = logging.getLogger(__name__)
STAGE = "prepared"
# Lists are read by the streaming stages in blocks of a few dozen rows; smaller row
# groups than pyarrow's default let a reader hand out work without reading a whole file.
LISTS_ROW_GROUP = 4096


def stage_fingerprint(config: PrepareConfig, seed: int) -> str:
    return fingerprint(config, seed, inputs_signature(config.source.path), LAYOUT)


def ensure_synthetic(config: PrepareConfig) -> None:
    """Generate the synthetic MIND-format source when configured and absent."""
    if config.synthetic is None:
        return
    if config.source.format != "mind":
        raise ValueError("prepare.synthetic generates MIND format: set prepare.source.format=mind")
    folder = config.source.path
    behaviors = storage.join(folder, config.source.behaviors)
    if storage.exists(behaviors):
        return
    from trsr.data.synthetic import generate_mind

    log.info("generating synthetic MIND-format data into %s", folder)
    generate_mind(config.synthetic, folder)


def prepare(config: PrepareConfig, context: RunContext, force: bool = False) -> dict:
    """Run the prepare stage into `<run_dir>/prepared`; return its stats.

    Skipped (stats read back) when a previous run had the same config and inputs.
    """
    run = context.run
    ensure_synthetic(config)
    key = stage_fingerprint(config, context.seed)
    if not force and run.prepared_stage.is_complete(key):
        log.info("prepare: outputs in %s are up to date; skipping", run.prepared)
        stats = run.prepared_stage.stats()
        stats["skipped"] = True
        return stats

    started = time.perf_counter()
    converted = convert(config.source)
    convert_seconds = time.perf_counter() - started

    rejects = Rejects()
    rejects.extend(converted.rejects)
    result = protocol.build_samples(
        converted.sequences,
        converted.items.column("item_id"),
        config.protocol,
        context.seed,
        rejects,
    )

    _check_not_empty(config.protocol, converted, result, rejects)
    storage.write_parquet(converted.items, run.items())
    storage.write_parquet(converted.sequences, run.sequences())
    for split in SPLITS:
        storage.write_parquet(result.samples[split], run.samples(split))
        storage.write_parquet(result.lists[split], run.lists(split), row_group_rows=LISTS_ROW_GROUP)
    storage.write_parquet(rejects.table(), run.rejects(STAGE))

    counts = dict(converted.counts)
    counts.setdefault("users_in", converted.sequences.num_rows + counts.get("users_rejected", 0))
    counts.setdefault("users_rejected", 0)
    counts["users_out"] = converted.sequences.num_rows
    stats = {
        "source": config.source.model_dump(mode="json"),
        "seed": context.seed,
        # What later stages check their settings against (RunFolder.prepared_min_history).
        "protocol": config.protocol.model_dump(mode="json"),
        "table1": table1(converted.items, result.samples, config.stats_tokenizer, context.seed),
        "accounting": {
            "convert": counts,
            "protocol": {
                "users_in": result.users_in,
                "users_per_split": result.users_per_split,
                "excluded": result.excluded,
            },
        },
        "rejects": rejects.counts(),
        "items": converted.items.num_rows,
        "seconds": {"convert": round(convert_seconds, 3), "total": round(time.perf_counter() - started, 3)},
    }
    _check_accounting(stats)
    run.prepared_stage.finish(key, stats, users=result.users_per_split)
    stats["skipped"] = False
    return stats


def _check_not_empty(protocol_config, converted, result, rejects: Rejects) -> None:
    """Fail when a split the protocol asks for ends up empty, saying why: most often the
    interactions' item ids match none of the catalogue's (e.g. 786022008 against
    0786022008), which otherwise ends in a run with nothing to train or test on."""
    import pyarrow.compute as pc

    empty = [s for s in SPLITS if getattr(protocol_config.users, s) > 0 and result.users_per_split[s] == 0]
    if not empty:
        return
    lines = [
        f"prepare left the {', '.join(empty)} split(s) empty: {sum(result.users_per_split.values()):,} of "
        f"{result.users_in:,} users made a ranking list"
    ]
    if result.excluded:
        lines.append("users excluded: " + "; ".join(f"{reason}: {n:,}" for reason, n in result.excluded.items()))
    unknown = int(converted.counts.get("unknown_item_occurrences", 0))
    kept = int(pc.sum(pc.list_value_length(converted.sequences.column("item_ids"))).as_py() or 0)
    if unknown:
        table = rejects.table()
        unmatched = table.filter(pc.equal(table.column("reason"), "unknown item id")).column("item_id")
        examples = pc.unique(unmatched).slice(0, 5).to_pylist()
        catalogue = converted.items.column("item_id").slice(0, 5).to_pylist()
        lines.append(
            f"{kept:,} of {kept + unknown:,} interaction item ids matched the items table; unmatched ids "
            f"such as {examples} beside catalogue ids such as {catalogue} (leading zeros, prefixes, "
            "or another id column?)"
        )
    raise DataError(". ".join(lines))


def _check_accounting(stats: dict) -> None:
    convert_counts = stats["accounting"]["convert"]
    if convert_counts["users_in"] != convert_counts["users_out"] + convert_counts["users_rejected"]:
        raise AssertionError(f"converter accounting does not add up: {convert_counts}")


def load_samples(run_dir: str, split: str) -> pa.Table:
    return storage.read_parquet(RunFolder(run_dir).samples(split))


def describe(stats: dict) -> str:
    """Human-readable summary printed at the end of `trsr data prepare`."""
    title = stats["source"].get("format", "dataset")
    return format_table1(stats["table1"], title) + "\n\n" + format_accounting(stats["accounting"])
