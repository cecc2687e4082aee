"""`trsr evaluate`: every scored method of a run in one table, with bootstrap intervals.

    <run_dir>/scores/<method>/<split>/   (SCORES rows; LLM variants, baselines)
      -> <run_dir>/report/<split>.json   per method: mean metrics, 95% intervals, lists, users
         <run_dir>/report/<split>.md     the paper's Table 2 layout (Recall@K, MRR@K) + NDCG, AUC
         <run_dir>/report/<split>.png    bar chart with the intervals and the chance level

Every method is evaluated on the same ranking lists: when methods cover different lists
(one scored with `max_lists`, another on everything) the table uses the lists all of
them share and says how many each had. Scores are sorted by (list, candidate) before the
metrics, so the seeded tie-breaking does not depend on the order rows were written in.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from trsr import storage
from trsr.schema import SCORES, SPLITS
from trsr.errors import TrsrError
from trsr.evaluate.chart import write_chart
from trsr.evaluate.config import EvaluateConfig
from trsr.evaluate.examples import by_family, example_users, markdown_examples, method_family
from trsr.evaluate.metrics import bootstrap_ci, chance_level, mean_metrics, per_list_metrics
from trsr.evaluate.summary_probe import markdown_probe, probe_summaries
from trsr.data.embeddings import EncoderConfig
from trsr.schema import SUMMARY_UNUSED as UNUSED
from trsr.schema import lists_without_summary as count_without
from trsr.runner import RunContext
from trsr.runs import RunFolder

log = logging.getLogger(__name__)


def report_path(run_dir: str, split: str, suffix: str) -> str:
    return RunFolder(run_dir).report(f"{split}.{suffix}")


def find_methods(run_dir: str, split: str) -> list[str]:
    """Methods with complete scores of `split`, sorted by name."""
    run = RunFolder(run_dir)
    return [m for m in run.score_methods() if split in SPLITS and run.scores(m, split).exists()]


def stale_methods(run: RunFolder, methods: list[str], split: str) -> dict[str, str]:
    """The methods whose `split` scores were made from other prepared data than the
    run's now (it was prepared again with another protocol or source since), each with
    the reason: their lists may share ids with today's yet hold other candidates, so
    they are never compared. Scores that do not say (written by hand, or by an older
    trsr) are taken as they are."""
    current = run.prepared_stage.fingerprint()
    if current is None:
        return {}
    stale = {}
    for method in methods:
        folder = run.scores(method, split)
        made_from = folder.details().get("prepared")
        if made_from and made_from != current:
            stale[method] = (
                f"{folder.path}: scored from other prepared data (fingerprint {made_from}, "
                f"the run's is {current}); score {method!r} again"
            )
    return stale


def read_scores(run_dir: str, method: str, split: str) -> pa.Table:
    """The complete scores of `method` on `split` (SCORES columns; failed lists left out)."""
    folder = RunFolder(run_dir).scores(method, split)
    if not folder.exists():
        raise TrsrError(f"{folder.path}: no complete scores; score method {method!r} on split {split!r} first")
    table = folder.read()
    missing = [name for name in SCORES.names if name not in table.column_names]
    if missing:
        raise TrsrError(f"{folder.path}: missing column(s) {missing}; expected the SCORES schema {SCORES.names}")
    if "error" in table.column_names:  # lists that failed are in _rejects.parquet, not scored
        table = table.filter(pc.is_null(table.column("error")))
    table = table.select(SCORES.names)
    if table.num_rows == 0:
        raise TrsrError(f"{folder.path}: no rows")
    nan = pc.sum(pc.is_nan(table.column("score"))).as_py()
    if nan:
        raise TrsrError(f"{folder.path}: {nan} NaN score(s)")
    return table.sort_by([("list_id", "ascending"), ("candidate", "ascending")])


def evaluate(
    config: EvaluateConfig, context: RunContext, split: str | None = None, methods: list[str] | None = None,
    write: bool = True, encoder: EncoderConfig | None = None,
) -> dict:
    """Metrics of `methods` (default evaluate.methods, else every method found) on
    `split` (default evaluate.split), and the summary probe with `encoder` (the
    baselines' item encoder; default its defaults); writes the report."""
    split = split or config.split
    run_dir = context.run_dir
    run = context.run
    ks = tuple(config.ks)
    alpha = 1.0 - config.confidence
    probe = probe_summaries(
        config.summary_probe, encoder or EncoderConfig(), run, split,
        ks=ks, ties=config.ties, bootstrap=config.bootstrap, alpha=alpha, seed=context.seed,
    )
    settings = {
        "run_dir": run_dir, "split": split, "ks": list(ks), "ties": config.ties,
        "confidence": config.confidence, "bootstrap": config.bootstrap, "seed": context.seed,
    }
    chosen = bool(methods or config.methods)
    methods = methods or config.methods or find_methods(run_dir, split)
    if not methods:
        missing = (
            f"{RunFolder(run_dir).stage_dir(RunFolder.SCORES)}: no scores for split {split!r}; run `trsr score` "
            "(or `trsr baselines`) first"
        )
        if not probe:
            raise TrsrError(missing)
        # Summaries without scores (comparing summarizers): the probe alone.
        log.warning("%s; the report has the summary probe only", missing)
        result = {
            **settings, "lists": 0, "methods": {}, "chance": {}, "chance_note": "", "examples": [],
            "run": run_facts(run_dir, [], split), "summary_probe": probe,
        }
        return _write(result, write, chart=False)
    stale = stale_methods(run, methods, split)
    if stale and (chosen or len(stale) == len(methods)):
        raise TrsrError("; ".join(stale.values()))
    for reason in stale.values():
        log.warning("left out of the report: %s", reason)
    methods = [m for m in methods if m not in stale]
    families = {method: method_family(run, method, split) for method in methods}
    methods = by_family(families)
    tables = {method: read_scores(run_dir, method, split) for method in methods}

    coverage = {m: set(t.column("list_id").unique().to_pylist()) for m, t in tables.items()}
    common = set.intersection(*coverage.values())
    if not common:
        raise TrsrError(f"the methods {methods} share no ranking list on split {split!r}")
    if any(len(lists) != len(common) for lists in coverage.values()):
        log.warning(
            "methods cover different lists (%s); evaluating the %d lists all of them share",
            {m: len(v) for m, v in coverage.items()},
            len(common),
        )
    keep = pa.array(sorted(common))
    rows: dict[str, dict] = {}
    list_sizes: set[int] = set()
    for method, table in tables.items():
        table = table.filter(pc.is_in(table.column("list_id"), value_set=keep))
        per_list = per_list_metrics(
            table.column("list_id"), table.column("label"), table.column("score"),
            ks=ks, ties=config.ties, seed=context.seed,
        )
        list_sizes.update(int(s) for s in np.unique(per_list["size"]))
        means = mean_metrics(per_list)
        intervals = {}
        for name in means:
            if name in ("lists", "auc_excluded"):
                continue
            low, high = bootstrap_ci(per_list[name], n=config.bootstrap, alpha=alpha, seed=context.seed)
            intervals[name] = [low, high]
        rows[method] = {
            "metrics": {k: v for k, v in means.items() if k not in ("lists", "auc_excluded")},
            "intervals": intervals,
            "lists": int(means["lists"]),
            "lists_scored": len(coverage[method]),
            "users": len(set(table.column("user_id").to_pylist())),
            "candidates": table.num_rows,
            "lists_without_summary": lists_without_summary(run_dir, method, split),
            "family": families[method],
        }
    chance = {}
    if len(list_sizes) == 1:
        size = list_sizes.pop()
        for k in ks:
            chance.update(chance_level(size, k))
        chance["auc"] = 0.5
        chance_note = f"a random ranking of {size} candidates"
    else:
        chance_note = f"lists of different sizes {sorted(list_sizes)}: no single chance level"
    result = {
        **settings,
        "lists": len(common),
        "methods": rows,
        "chance": chance,
        "chance_note": chance_note,
        "left_out": stale,
        "run": run_facts(run_dir, list(rows), split),
        "examples": example_users(run, split, tables, sorted(common), config.examples, context.seed),
        "summary_probe": probe,
    }
    return _write(result, write, chart=config.chart)


def _write(result: dict, write: bool, chart: bool) -> dict:
    """report/<split>.json and .md (and .png with `chart`) when `write`; the result."""
    run_dir, split = result["run_dir"], result["split"]
    if write:
        storage.write_json(result, report_path(run_dir, split, "json"))
        storage.write_text(markdown(result), report_path(run_dir, split, "md"))
        if chart:
            write_chart(result, report_path(run_dir, split, "png"))
    return result


def run_facts(run_dir: str, methods: list[str], split: str) -> dict:
    """What the report says about the run behind the table: when and with which code it
    was written, on what machine, each stage's seconds (from the stages' own stats),
    each method's model and adapter, and the summaries' health by status."""
    import datetime
    import os
    import platform
    import subprocess

    import trsr

    run = RunFolder(run_dir)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(trsr.__file__)),
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    stages: dict[str, float] = {}
    summaries: dict[str, dict] = {}
    prepared = run.prepared_stage.stats().get("seconds")
    if prepared is not None:
        stages["prepare"] = prepared.get("total") if isinstance(prepared, dict) else prepared
    for mode in ("hierarchical", "recurrent"):
        stats = run.summaries(mode).stats()
        if stats:
            stages[f"summarize {mode}"] = stats.get("seconds")
            summaries[mode] = dict(sorted((stats.get("status") or {}).items()))
    models: dict[str, dict] = {}
    for method in methods:
        stages[f"train {method}"] = run.training_seconds(method)
        stats = run.scores(method, split).stats()
        if stats.get("seconds") is not None:
            stages[f"score {method}"] = stats["seconds"]
        manifest = run.scores(method, split).manifest
        details = storage.read_json(manifest) if storage.exists(manifest) else {}
        if details.get("model") or details.get("adapter"):
            models[method] = {"model": details.get("model"), "adapter": details.get("adapter")}
    return {
        "written_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "trsr": trsr.__version__,
        "commit": commit,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "stage_seconds": {k: v for k, v in stages.items() if v is not None},
        "models": models,
        "summaries": summaries,
    }


def lists_without_summary(run_dir: str, method: str, split: str) -> int | None:
    """Lists an LLM method scored without a usable summary (the score stage counts
    them by summary status); None for methods that read no summaries."""
    statuses = RunFolder(run_dir).scores(method, split).stats().get("summary_status") or {}
    if not statuses or set(statuses) == {UNUSED}:
        return None
    return count_without(statuses)


def _cell(row: dict, name: str, with_interval: bool = True) -> str:
    value = row["metrics"].get(name, math.nan)
    if not with_interval or name not in row.get("intervals", {}):
        return f"{value:.4f}"
    low, high = row["intervals"][name]
    return f"{value:.4f} [{low:.3f}, {high:.3f}]"


def markdown(result: dict, full: bool = True) -> str:
    """The paper's Table 2 layout (Recall@K then MRR@K per method), then NDCG@K and AUC;
    `full`: also the summaries' health, the run behind it and the example users (the
    report file; `trsr run` prints the tables and the report's paths)."""
    ks = result["ks"]
    pct = round(result["confidence"] * 100)
    main = [f"recall@{k}" for k in ks] + [f"mrr@{k}" for k in ks]
    extra = [f"ndcg@{k}" for k in ks] + ["auc"]
    lines = [
        f"# {result['split']} split: {result['lists']} ranking lists, {pct}% bootstrap intervals "
        f"({result['bootstrap']} resamples of the lists), ties {result['ties']}",
        "",
    ]
    if not result["methods"]:  # summaries without scores: the probe alone
        lines = [f"# {result['split']} split: no scored method yet; the summary probe only", ""]
        lines += markdown_probe(result.get("summary_probe") or {}, ks)
        return "\n".join(lines + (_run_block(result.get("run") or {}) if full else [])) + "\n"
    for names in (main, extra):
        header = ["method", "users"] + [n.replace("recall", "Recall").replace("mrr", "MRR").replace("ndcg", "NDCG").replace("auc", "AUC") for n in names]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * len(header)) + "|")
        for method, row in result["methods"].items():
            lines.append("| " + " | ".join([method, str(row["users"])] + [_cell(row, n) for n in names]) + " |")
        if result["chance"]:
            lines.append("| " + " | ".join(["(chance)", ""] + [_cell({"metrics": result["chance"]}, n, False) for n in names]) + " |")
        lines.append("")
    without = {m: r["lists_without_summary"] for m, r in result["methods"].items() if r.get("lists_without_summary") is not None}
    if without:
        lines.append(
            "Lists scored without a usable summary (prompted with the recent items only): "
            + ", ".join(f"{m} {n} of {result['methods'][m]['lists_scored']}" for m, n in without.items())
            + "."
        )
        lines.append("")
    partial = {m: r["lists_scored"] for m, r in result["methods"].items() if r["lists_scored"] != result["lists"]}
    if partial:
        lines.append(f"Lists scored per method (the table uses the {result['lists']} shared): {partial}")
    else:
        lines.append(f"Chance level: {result['chance_note']}.")
    if result.get("left_out"):
        lines.append("Left out (scored from other prepared data; score them again): " + ", ".join(result["left_out"]) + ".")
    families: dict[str, list[str]] = {}
    for method, row in result["methods"].items():
        families.setdefault(row.get("family", "other"), []).append(method)
    if len(families) > 1:
        lines.append("Methods by family: " + "; ".join(f"{f} {', '.join(m)}" for f, m in families.items()) + ".")
    probe = markdown_probe(result.get("summary_probe") or {}, ks)
    if probe:
        lines += [""] + probe
    if full:
        lines += _run_block(result.get("run") or {})
        lines += markdown_examples(result.get("examples") or [])
    return "\n".join(lines) + "\n"


def _run_block(facts: dict) -> list[str]:
    """The report's closing sections: the summaries' health and the run behind it."""
    if not facts:
        return []
    lines = []
    if facts.get("summaries"):
        lines += ["", "## Summaries", "", "Users by summary status (ok = usable; missing = not summarized):", ""]
        for mode, counts in facts["summaries"].items():
            total = sum(counts.values())
            shown = ", ".join(f"{status} {n}" for status, n in counts.items())
            ok = counts.get("ok", 0)
            summarized = total - counts.get("missing", 0)
            lines.append(f"- {mode}: {ok} of {summarized} summarized users usable ({shown})")
    lines += ["", "## Run", ""]
    code = f"trsr {facts.get('trsr')}" + (f", commit {facts['commit']}" if facts.get("commit") else "")
    lines.append(f"- written {facts.get('written_at')} by {code} on {facts.get('machine')}")
    for method, model in (facts.get("models") or {}).items():
        lines.append(f"- {method}: model {model.get('model')}, adapter {model.get('adapter') or 'none'}")
    if facts.get("stage_seconds"):
        lines.append("- stage seconds: " + ", ".join(f"{name} {seconds:,.0f}" for name, seconds in facts["stage_seconds"].items()))
    return lines


def describe(result: dict) -> str:
    return markdown(result)

