"""Dataset statistics in the layout of the paper's Table 1, plus the run's accounting."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trsr.schema import SPLITS
from trsr.data.text import render_item
from trsr.llm.tokenizer import token_counter

MAX_ITEMS_FOR_TOKENS = 5000  # tokens/item is a mean: a seeded sample is enough


def table1(
    items: pa.Table,
    samples: dict[str, pa.Table],
    tokenizer: str = "whitespace",
    seed: int = 0,
) -> dict:
    """Attributes, positives per split, mean history length, mean tokens per item.

    Tokens per item are counted on the rendered item text (what prompts contain) over
    the items that appear in the samples (histories and candidates).
    """
    flat = pc.list_flatten(items.column("attributes").combine_chunks())
    names = pc.unique(flat.field("name")) if len(flat) else pa.array([], pa.string())
    out: dict = {"attributes": len(names), "attribute_names": names.to_pylist()}
    lengths = []
    for split in SPLITS:
        table = samples.get(split)
        if table is None or table.num_rows == 0:
            out[f"positives_{split}"] = 0
            out[f"lists_{split}"] = 0
            continue
        out[f"positives_{split}"] = int(pc.sum(table.column("label")).as_py() or 0)
        out[f"lists_{split}"] = len(pc.unique(table.column("list_id")))
        positives = table.filter(pc.equal(table.column("label"), 1))
        lengths.append(pc.list_value_length(positives.column("history")).to_numpy())
    all_lengths = np.concatenate(lengths) if lengths else np.array([])
    out["avg_history_length"] = float(all_lengths.mean()) if all_lengths.size else 0.0

    used = set()
    for table in samples.values():
        used.update(pc.unique(table.column("candidate")).to_pylist())
        used.update(pc.unique(pc.list_flatten(table.column("history"))).to_pylist())
    ids = items.column("item_id").to_pylist()
    rows = [i for i, item in enumerate(ids) if item in used]
    if len(rows) > MAX_ITEMS_FOR_TOKENS:
        rows = sorted(np.random.default_rng(seed).choice(rows, MAX_ITEMS_FOR_TOKENS, replace=False))
    attributes = items.column("attributes").take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    texts = [render_item(a) for a in attributes]
    counter = token_counter(tokenizer)
    counts = counter.count(texts) if texts else []
    out["avg_tokens_per_item"] = float(np.mean(counts)) if counts else 0.0
    out["tokenizer"] = counter.name
    out["items_measured"] = len(texts)
    return out


def format_table1(stats: dict, title: str = "dataset") -> str:
    rows = [
        ("# of different attributes", f"{stats['attributes']}"),
        ("# of positive samples in the training set", f"{stats['positives_train']:,}"),
        ("# of positive samples in the validation set", f"{stats['positives_valid']:,}"),
        ("# of positive samples in the test set", f"{stats['positives_test']:,}"),
        ("Avg. # of historical user behavior sequence", f"{stats['avg_history_length']:.2f}"),
        (f"Avg. # of tokens corresponding to an item ({stats['tokenizer']})",
         f"{stats['avg_tokens_per_item']:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'description':<{width}}  {title}", f"{'-' * width}  {'-' * max(len(title), 8)}"]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def format_accounting(accounting: dict) -> str:
    """The closing lines of a prepare run: users and rows in, out and rejected."""
    convert = accounting["convert"]
    protocol = accounting["protocol"]
    lines = [
        f"rows: {convert.get('rows_in', 0):,} read, {convert.get('rows_rejected', 0):,} rejected",
        f"users: {convert['users_in']:,} in = {convert['users_out']:,} converted + "
        f"{convert['users_rejected']:,} rejected",
        f"converted users: {protocol['users_in']:,} = "
        + " + ".join(f"{n:,} {split}" for split, n in protocol["users_per_split"].items())
        + "".join(f" + {n:,} excluded ({reason})" for reason, n in protocol["excluded"].items()),
    ]
    if convert.get("unknown_item_occurrences"):
        lines.append(
            f"unknown item ids removed from sequences: {convert['unknown_item_occurrences']:,}"
        )
    return "\n".join(lines)
