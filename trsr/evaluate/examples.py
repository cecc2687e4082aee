"""What the report shows besides the numbers: each method's family (for grouping and
colours) and a few example users (recent history, the summary, the ranked candidates).

Everything here reads a handful of rows (a few lists, their items and summaries) with
filtered scans, so it costs the same for a demo and for a million users.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.data.text import clean, render_item, shorten
from trsr.runs import RunFolder

# The order of families in the table and chart: the paper's method, then the
# baselines from strongest to trivial. A scoring stage records its family
# ("llm" in the score stage's manifest, the baselines' kind in their stats.json);
# scores written by anything else are "other".
FAMILIES = ("llm", "sequential", "ctr", "trivial", "other")
SHOWN_ITEMS = 5  # recent items and top candidates shown per example
ITEM_CHARS = 60  # per attribute value in an example line
SUMMARY_CHARS = 400


def method_family(run: RunFolder, method: str, split: str) -> str:
    details = run.scores(method, split).details()
    if details.get("family"):
        return details["family"]
    stats_path = storage.join(run.method_scores(method), "stats.json")
    if storage.exists(stats_path):
        return storage.read_json(stats_path).get("family") or "other"
    return "other"


def by_family(families: dict[str, str]) -> list[str]:
    """Methods ordered by family (FAMILIES), keeping their order within a family."""
    rank = {family: i for i, family in enumerate(FAMILIES)}
    return sorted(families, key=lambda m: rank.get(families[m], len(FAMILIES)))


def example_users(
    run: RunFolder, split: str, scores: dict[str, pa.Table], list_ids: list[str], n: int, seed: int
) -> list[dict]:
    """`n` lists drawn (seeded) from `list_ids`: the user's recent items, each LLM
    method's summary, and every method's top candidates with p(yes), the positive
    marked. [] when the prepared lists are not in the run folder (scores made elsewhere)."""
    lists_path = run.lists(split)
    if n <= 0 or not list_ids or not storage.exists(lists_path):
        return []
    chosen = sorted(np.random.default_rng(seed).choice(list_ids, size=min(n, len(list_ids)), replace=False).tolist())
    lists = _rows(lists_path, "list_id", chosen, ["list_id", "user_id", "history"])
    ranked = {method: _ranked(table, chosen) for method, table in scores.items()}
    needed = {item for row in lists.values() for item in row["history"][-SHOWN_ITEMS:]}
    needed |= {c for per_list in ranked.values() for rows in per_list.values() for c, _, _ in rows}
    texts = _item_texts(run, needed)
    summaries = _summaries(run, split, chosen, list(scores))
    out = []
    for list_id in chosen:
        row = lists.get(list_id)
        if row is None:
            continue
        out.append(
            {
                "list_id": list_id,
                "user_id": row["user_id"],
                "recent_items": [texts.get(i, i) for i in row["history"][-SHOWN_ITEMS:]],
                "summaries": {mode: s[list_id] for mode, s in summaries.items() if s.get(list_id)},
                "ranked": {
                    method: [
                        {"rank": rank, "item": texts.get(c, c), "p_yes": round(score, 4), "positive": bool(label)}
                        for rank, (c, score, label) in enumerate(per_list.get(list_id, []), start=1)
                        if rank <= SHOWN_ITEMS or label
                    ]
                    for method, per_list in ranked.items()
                },
            }
        )
    return out


def markdown_examples(examples: list[dict]) -> list[str]:
    if not examples:
        return []
    lines = ["", "## Example users", ""]
    for example in examples:
        lines += [f"### {example['user_id']} ({example['list_id']})", ""]
        recent = "; ".join(f"{i}. {text}" for i, text in enumerate(example["recent_items"], start=1))
        lines.append(f"Recent items, oldest first: {recent}")
        for mode, summary in example["summaries"].items():
            lines.append(f"\nSummary ({mode}): {summary}")
        lines.append("")
        for method, rows in example["ranked"].items():
            shown = " · ".join(
                f"{r['rank']}. " + (f"**{r['item']}** {r['p_yes']:.3f} (positive)" if r["positive"] else f"{r['item']} {r['p_yes']:.3f}")
                for r in rows
            )
            lines.append(f"- {method}: {shown}")
        lines.append("")
    return lines


def _rows(path: str, key: str, ids: list[str], columns: list[str]) -> dict[str, dict]:
    import pyarrow.dataset as ds

    filesystem, inner = storage.arrow_filesystem(path)
    table = ds.dataset(inner, filesystem=filesystem, format="parquet").to_table(
        columns=columns, filter=ds.field(key).isin(pa.array(ids, pa.string()))
    )
    return {row[key]: row for row in table.to_pylist()}


def _ranked(table: pa.Table, list_ids: list[str]) -> dict[str, list[tuple[str, float, int]]]:
    """Per list: (candidate, score, label), best first (ties by candidate id)."""
    rows = table.filter(pc.is_in(table.column("list_id"), value_set=pa.array(list_ids, pa.string())))
    out: dict[str, list] = {}
    for row in rows.select(["list_id", "candidate", "score", "label"]).to_pylist():
        out.setdefault(row["list_id"], []).append((row["candidate"], float(row["score"]), int(row["label"])))
    return {list_id: sorted(items, key=lambda t: (-t[1], t[0])) for list_id, items in out.items()}


def _item_texts(run: RunFolder, ids: set[str]) -> dict[str, str]:
    from trsr.data.catalogue import Catalogue

    if not ids or not storage.exists(run.items()):
        return {}
    catalogue = Catalogue.load(run.items(), only=ids)
    known = [i for i in sorted(ids) if i in catalogue]
    return {item: _item_text(attributes) for item, attributes in zip(known, catalogue.attributes(known))}


def _item_text(attributes: list[dict]) -> str:
    """The item's title when it has one (the short name a reader recognises), else its
    attributes as the prompts render them; ITEM_CHARS per value."""
    for attribute in attributes:
        if attribute["name"].lower() in ("title", "name") and attribute["value"]:
            return shorten(clean(attribute["value"]), ITEM_CHARS)
    return render_item(attributes, {a["name"]: ITEM_CHARS for a in attributes})


def _summaries(run: RunFolder, split: str, list_ids: list[str], methods: list[str]) -> dict[str, dict[str, str]]:
    """{mode: {list_id: summary}} of the summary modes the scored methods read."""
    modes = set()
    for method in methods:
        manifest = run.scores(method, split).manifest
        details = storage.read_json(manifest) if storage.exists(manifest) else {}
        if details.get("summary_mode"):
            modes.add(details["summary_mode"])
    out = {}
    for mode in sorted(modes):
        folder = run.summaries(mode)
        if not folder.data_files():
            continue
        rows = folder.dataset().to_table(
            columns=["list_id", "summary", "status"], filter=pc.field("list_id").isin(pa.array(list_ids, pa.string()))
        ).to_pylist()
        out[mode] = {
            r["list_id"]: _short(r["summary"]) + ("" if r["status"] == "ok" else f" [status {r['status']}: not shown to the scorer]")
            for r in rows
            if r["summary"]
        }
    return out


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 3] + "..."
