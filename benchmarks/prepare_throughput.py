"""Throughput of the prepare stage on a MIND-large-sized input.

    python benchmarks/prepare_throughput.py               # 2.2M rows, 100k news
    python benchmarks/prepare_throughput.py --rows 50000  # a quick run

The input is generated once with `trsr.data.synthetic.generate_mind` and cached under
benchmarks/results/cache/ (git-ignored). Each measurement runs in a fresh Python
subprocess so that neither generation nor an earlier measurement counts toward its
peak memory:

    convert   trsr.data.converters.mind.convert alone
    prepare   trsr.data.prepare.prepare (convert + protocol + Parquet + stats)

Prints a table (wall seconds, behaviour rows per second, peak RSS of the child from
getrusage) and writes benchmarks/results/prepare_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache"
OUTPUT = RESULTS / "prepare_throughput.json"

# MIND-large-like shape: ~3 impression rows per user, histories of 10-50 (mean ~30)
# news ids, 35 news shown per impression.
ROWS_PER_USER = 3
MIN_HISTORY, MAX_HISTORY = 10, 50
IMPRESSIONS = 35
TOPICS = 16


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------- child side


def child(stage: str, folder: str) -> dict:
    """Run one measurement in this (fresh) process; return its figures."""
    imported = time.perf_counter()
    from trsr.data.converters.mind import MindSource

    source = MindSource(path=folder)
    if stage == "convert":
        from trsr.data.converters.mind import convert

        started = time.perf_counter()
        converted = convert(source)
        seconds = time.perf_counter() - started
        counts = dict(converted.counts)
        extra = {"counts": counts, "rejects": len(converted.rejects)}
    elif stage == "prepare":
        from trsr.data.prepare import prepare

        from trsr.data.config import PrepareConfig
        from trsr.runner import RunContext
        from trsr.runs import RunFolder

        run_dir = tempfile.mkdtemp(prefix="trsr-bench-run-", dir=CACHE)
        try:
            started = time.perf_counter()
            stats = prepare(PrepareConfig(source=source), RunContext(RunFolder(run_dir), seed=42))
            seconds = time.perf_counter() - started
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        counts = dict(stats.get("accounting", {}).get("convert", {}))
        extra = {
            "counts": counts,
            "stage_seconds": stats.get("seconds"),
            "users_per_split": stats.get("accounting", {}).get("protocol", {}).get("users_per_split"),
        }
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    rows = counts.get("rows_in", 0)
    return {
        "stage": stage,
        "seconds": round(seconds, 3),
        "import_seconds": round(started - imported, 3),
        "rows": rows,
        "rows_per_second": round(rows / seconds) if seconds else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **extra,
    }


def measure(stage: str, folder: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--input", str(folder)]
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        tail = (process.stderr or process.stdout).strip().splitlines()[-15:]
        return {"stage": stage, "error": "\n".join(tail)}
    return json.loads(process.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ parent side


def ensure_input(rows: int, news: int, users: int | None, seed: int) -> tuple[Path, dict]:
    """The cached synthetic MIND folder for this size, generated when absent."""
    from trsr.data.config import SyntheticConfig
    from trsr.data.synthetic import generate_mind

    if users is None:
        users = math.ceil(rows / ROWS_PER_USER)
    per_user = max(1, round(rows / users))
    config = SyntheticConfig(
        users=users,
        items=news,
        topics=TOPICS,
        min_history=MIN_HISTORY,
        max_history=MAX_HISTORY,
        impressions=IMPRESSIONS,
        rows_per_user=per_user,
        seed=seed,
    )
    folder = CACHE / f"mind-u{users}x{per_user}-n{news}-h{MIN_HISTORY}-{MAX_HISTORY}-i{IMPRESSIONS}-s{seed}"
    marker = folder / "generated.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        info["cached"] = True
        return folder, info
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    stats = generate_mind(config, str(folder))
    info = {
        "config": config.model_dump(),
        "stats": {k: v for k, v in stats.items() if k != "categories"},
        "generate_seconds": round(time.perf_counter() - started, 3),
        "bytes": {p.name: p.stat().st_size for p in sorted(folder.glob("*.tsv"))},
    }
    marker.write_text(json.dumps(info, indent=2) + "\n")
    info["cached"] = False
    return folder, info


def environment() -> dict:
    import numpy
    import polars
    import pyarrow

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "polars": polars.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
    }


def table(results: list[dict]) -> str:
    lines = [f"{'stage':<10}{'rows':>12}{'wall s':>10}{'rows/s':>12}{'peak RSS MiB':>15}"]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['stage']:<10}  {r.get('skipped') or 'FAILED: ' + r['error'].splitlines()[-1]}")
            continue
        lines.append(
            f"{r['stage']:<10}{r['rows']:>12,}{r['seconds']:>10.2f}{r['rows_per_second']:>12,}"
            f"{r['peak_rss_mib']:>15,.0f}"
        )
    return "\n".join(lines)


def prepare_available() -> str | None:
    """None when trsr.data.prepare.prepare imports, else why not."""
    process = subprocess.run(
        [sys.executable, "-c", "from trsr.data.prepare import prepare"], capture_output=True, text=True
    )
    if process.returncode == 0:
        return None
    return (process.stderr.strip().splitlines() or ["import failed"])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_200_000, help="behaviour rows (default 2.2M)")
    parser.add_argument("--news", type=int, default=100_000, help="news items (default 100k)")
    parser.add_argument("--users", type=int, default=None, help=f"users (default rows/{ROWS_PER_USER})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-prepare", action="store_true", help="measure the converter only")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--child", choices=["convert", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.input)))
        return 0

    CACHE.mkdir(parents=True, exist_ok=True)
    folder, info = ensure_input(args.rows, args.news, args.users, args.seed)
    where = "cached" if info["cached"] else f"generated in {info['generate_seconds']:.1f} s"
    size = sum(info["bytes"].values()) / 2**20
    print(f"input: {folder} ({where}; {info['stats']['rows']:,} rows, "
          f"{info['stats']['users']:,} users, {info['stats']['items']:,} news, {size:,.0f} MiB)")

    results = [measure("convert", folder)]
    if args.skip_prepare:
        results.append({"stage": "prepare", "skipped": "skipped (--skip-prepare)"})
    else:
        why = prepare_available()
        if why is None:
            results.append(measure("prepare", folder))
        else:
            results.append({"stage": "prepare", "skipped": f"skipped: trsr.data.prepare unavailable ({why})"})

    print(table(results))
    report = {
        "input": {"folder": str(folder), **{k: v for k, v in info.items() if k != "cached"}},
        "environment": environment(),
        "results": results,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
