"""Throughput of the summarize job (Ray Data) against the bare engine, same prompts, same run.

    python benchmarks/summarize_throughput.py                      # 16 users, 48 tokens, both backends
    python benchmarks/summarize_throughput.py --users 4 --max-new-tokens 24 --backends transformers \\
        --execution fused                                          # a quick check

A small synthetic MIND dataset (the demo's shape) is prepared once under
benchmarks/results/cache/summarize-bench/ (git-ignored). For each backend (real default
model, greedy, `users_per_batch` = all users so one batch carries every prompt of a
level/step to the engine together) it measures, back to back:

    bare    build_engine() in this process (engine start, timed on its own), then the
            job's own batch classes, RenderBlocks and SummarizeStage, called directly
            (no Ray) on the same users (the prepared lists within summarize.max_users)
            with that engine: exactly the
            engine.generate calls the job makes. Timed: engine start, render, the
            engine.generate calls alone ("bare engine"), and the whole in-process run.
            The engine is closed before the job starts (never two engines at once).
    job     summarize(config, context, force=True) for each --execution (fused, per_step):
            wall clock of the call, Ray start-up excluded (init_ray() runs first), the
            actors' engine start included.

The bare replay's engine calls do not depend on `execution` (fused and per_step make
the same calls), so one bare run per backend serves both jobs. Greedy decoding makes
the two runs' summaries comparable text for text; the script counts the matches.

Prints a table (users, calls, output tokens, seconds, users/s, output tokens/s, job/bare
ratios) and writes benchmarks/results/summarize_throughput.json. The target of the
issue: the job keeps >= 85% of the bare engine's throughput.

Ray caps a worker's OMP_NUM_THREADS at its num_cpus when the variable is unset; the
script records what an engine actor's worker sees (`ray_worker` in the JSON), and
`--omp-threads N` exports OMP_NUM_THREADS=N before Ray starts (workers inherit it), to
measure the job without that cap; `--engine-cpus N` sets engine.num_cpus=N, which
raises the cap the way users should (the demo recipe uses 2). `--enforce-eager` sets engine.enforce_eager (vLLM
skips torch.compile: a much shorter engine start, somewhat slower decoding).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache" / "summarize-bench"
OUTPUT = RESULTS / "summarize_throughput.json"

# The demo's data shape (jobs/configs/demo.yaml): 600 users, histories of 10-25 news.
SYNTHETIC = dict(users=600, items=1200, topics=8, seed=0, min_history=10, max_history=25)
SEED = 42
TARGET = 0.85


# ------------------------------------------------------------------------ configuration


def experiment_for(args, backend: str, execution: str):
    from trsr.config import load
    from trsr.experiment import ExperimentConfig

    overrides = [
        f"run_dir={CACHE / 'run'}",
        f"seed={SEED}",
        "prepare.source.format=mind",
        f"prepare.source.path={CACHE / 'mind-synthetic'}",
        "prepare.source.attributes=[category, subcategory, title]",
        *(f"prepare.synthetic.{k}={v}" for k, v in SYNTHETIC.items()),
        f"prepare.protocol.min_history={SYNTHETIC['min_history']}",
        f"prepare.protocol.max_history={SYNTHETIC['max_history']}",
        "prepare.protocol.users={train: 0.8, valid: 0.1, test: 0.1}",
        "prepare.protocol.negatives={train: 1, valid: 20, test: 20}",
        f"summarize.modes=[{', '.join(args.modes)}]",
        "summarize.domain=news",
        "summarize.items_per_block=5",
        "summarize.fan_in=2",
        f"summarize.execution={execution}",
        f"summarize.users_per_batch={args.users}",
        f"summarize.max_users={args.users}",
        f"summarize.engine.backend={backend}",
        f"summarize.engine.model={args.model}",
        "summarize.engine.max_model_len=2048",
        f"summarize.engine.batch_size={args.engine_batch_size or args.users}",
        f"summarize.engine.enforce_eager={str(args.enforce_eager).lower()}",
        f"summarize.engine.num_cpus={args.engine_cpus}",
        "summarize.generation.temperature=0",
        f"summarize.generation.max_new_tokens={args.max_new_tokens}",
    ]
    return load(ExperimentConfig, None, overrides)


def prepare_data(args) -> dict:
    from trsr.data.prepare import prepare

    experiment = experiment_for(args, "transformers", "fused")
    started = time.perf_counter()
    stats = prepare(experiment.prepare, experiment.context())
    seconds = time.perf_counter() - started
    return {
        "run_dir": experiment.run_dir,
        "source": experiment.prepare.source.path,
        "synthetic": SYNTHETIC,
        "skipped": bool(stats.get("skipped")),
        "seconds": round(seconds, 2),
    }


# ------------------------------------------------------------------------- measurements


class TimedEngine:
    """The engine, with the time spent in its generate calls added up."""

    def __init__(self, engine):
        self.engine = engine
        self.seconds = 0.0
        self.calls = 0
        self.prompts = 0

    def generate(self, prompts, params=None):
        started = time.perf_counter()
        out = self.engine.generate(prompts, params)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        self.prompts += len(prompts)
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


def stage_plan(execution: str, steps: int) -> list[list[int]]:
    return [[s] for s in range(steps)] if execution == "per_step" else [list(range(steps))]


def run_bare(experiment) -> tuple[dict, dict]:
    """The job's engine calls made in this process, no Ray; (figures, tables by mode)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from trsr.llm.factory import build_engine
    from trsr import storage
    from trsr.runs import RunFolder
    from trsr.summarize.job import INPUT_SPLITS, split_caps
    from trsr.summarize.render import RenderBlocks
    from trsr.summarize.stages import Finalize, SummarizeStage, steps_needed

    config = experiment.summarize
    run = RunFolder(experiment.run_dir)
    caps = split_caps(run, config.max_users)
    parts = []
    for split in INPUT_SPLITS:
        table = storage.read_parquet(run.lists(split))
        if caps[split] is not None:
            table = table.filter(pc.less(table.column("list_index"), caps[split]))
        parts.append(table)
    users = pa.concat_tables(parts)
    longest = int(pc.max(pc.list_value_length(users.column("history"))).as_py() or 0)
    max_blocks = -(-longest // config.items_per_block)
    prompts = config.prompts()

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    engine = build_engine(config.engine)
    engine_start = time.perf_counter() - started
    timed = TimedEngine(engine)
    import torch

    torch_threads = torch.get_num_threads()
    tables: dict = {}
    modes: dict = {}
    render_total = pipeline_total = 0.0
    try:
        for mode in config.modes:
            steps = steps_needed(mode, max_blocks, config.fan_in)
            plan = stage_plan(config.execution, steps)
            generate_before, calls_before = timed.seconds, timed.calls
            mode_started = time.perf_counter()
            render = RenderBlocks(config, run.items())
            finalize = Finalize(mode, config.engine.model, prompts.hash, experiment.seed)
            stages = [SummarizeStage(config, mode, s, seed=experiment.seed, engine=timed) for s in plan]
            render_seconds = 0.0
            parts = []
            per = max(1, config.users_per_batch)
            for i in range(0, users.num_rows, per):
                t = time.perf_counter()
                state = render(users.slice(i, per))
                render_seconds += time.perf_counter() - t
                for stage in stages:
                    state = stage(state)
                parts.append(finalize(state))
            pipeline_seconds = time.perf_counter() - mode_started
            table = pa.concat_tables(parts).sort_by("list_id")
            tables[mode] = table
            render_total += render_seconds
            pipeline_total += pipeline_seconds
            modes[mode] = {
                "users": table.num_rows,
                "steps": steps,
                "calls": int(pc.sum(table.column("calls")).as_py() or 0),
                "engine_calls": timed.calls - calls_before,
                "tokens_in": int(pc.sum(table.column("tokens_in")).as_py() or 0),
                "tokens_out": int(pc.sum(table.column("tokens_out")).as_py() or 0),
                "generate_seconds": round(timed.seconds - generate_before, 3),
                "render_seconds": round(render_seconds, 3),
                "pipeline_seconds": round(pipeline_seconds, 3),
            }
    finally:
        engine.close()
        timed.engine = None  # drop the last reference before the job starts its own
        del engine
        gc.collect()
    users_n = users.num_rows * len(config.modes)
    figures = {
        "users": users_n,
        "calls": sum(m["calls"] for m in modes.values()),
        "engine_calls": sum(m["engine_calls"] for m in modes.values()),
        "tokens_in": sum(m["tokens_in"] for m in modes.values()),
        "tokens_out": sum(m["tokens_out"] for m in modes.values()),
        "engine_start_seconds": round(engine_start, 3),
        "generate_seconds": round(timed.seconds, 3),
        "render_seconds": round(render_total, 3),
        "pipeline_seconds": round(pipeline_total, 3),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "torch_threads": torch_threads,
        "modes": modes,
    }
    return figures, tables


def run_job(experiment) -> tuple[dict, dict]:
    """summarize(config, context, force=True), wall clock; (figures, tables by mode)."""
    import pyarrow.compute as pc

    from trsr.summarize.job import read_summaries, summarize

    load_before = os.getloadavg()[0]
    wall_start = time.time()
    started = time.perf_counter()
    stats = summarize(experiment.summarize, experiment.context(), force=True)
    seconds = time.perf_counter() - started
    try:
        breakdown = actor_breakdown(wall_start, wall_start + seconds)
    except Exception:  # noqa: BLE001 - the timeline is a diagnostic, not the measurement
        breakdown = {"error": _error()}
    tables = {
        mode: read_summaries(experiment.run_dir, mode).filter(
            pc.not_equal(read_summaries(experiment.run_dir, mode).column("status"), "missing")
        )
        for mode in experiment.summarize.modes
    }
    modes = {}
    for mode, table in tables.items():
        s = stats["modes"][mode]
        modes[mode] = {
            "users": table.num_rows,
            "status": s["status"],
            "steps": s["steps"],
            "engine_stages": s["engine_stages"],
            "calls": int(pc.sum(table.column("calls")).as_py() or 0),
            "tokens_in": int(pc.sum(table.column("tokens_in")).as_py() or 0),
            "tokens_out": int(pc.sum(table.column("tokens_out")).as_py() or 0),
            "job_seconds": s["seconds"],  # the job's own timer (dataset built -> written)
        }
    figures = {
        "users": sum(m["users"] for m in modes.values()),
        "calls": sum(m["calls"] for m in modes.values()),
        "tokens_in": sum(m["tokens_in"] for m in modes.values()),
        "tokens_out": sum(m["tokens_out"] for m in modes.values()),
        "seconds": round(seconds, 3),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "breakdown": breakdown,
        "modes": modes,
    }
    return figures, tables


def actor_breakdown(since: float, until: float) -> dict:
    """Where the job's wall clock went, from Ray's task timeline (seconds from job start).

    Per actor method (`<actor class>.__init__`, `.submit`) and task: count, total and
    longest duration, first start and last end. The engine actors' `__init__` is the
    engine start inside the job (imports, model load, vLLM compile and warm-up).
    """
    import ray

    groups: dict = {}
    for event in ray.timeline():
        category = str(event.get("cat", ""))
        if event.get("ph") != "X" or not category.startswith("task::"):
            continue
        start = event["ts"] / 1e6
        if not since - 1 <= start <= until + 1:
            continue
        seconds = event.get("dur", 0) / 1e6
        g = groups.setdefault(
            category[len("task::"):], {"count": 0, "seconds": 0.0, "longest": 0.0, "first_start": None, "last_end": None}
        )
        g["count"] += 1
        g["seconds"] += seconds
        g["longest"] = max(g["longest"], seconds)
        offset = start - since
        g["first_start"] = offset if g["first_start"] is None else min(g["first_start"], offset)
        g["last_end"] = offset + seconds if g["last_end"] is None else max(g["last_end"], offset + seconds)
    for g in groups.values():
        for key in ("seconds", "longest", "first_start", "last_end"):
            g[key] = round(g[key], 3)

    def pick(name: str, init: bool) -> list[dict]:
        return [g for k, g in groups.items() if name in k and k.endswith(".__init__") == init]

    engine_init, engine_work = pick("SummarizeStage", True), pick("SummarizeStage", False)
    summary = {"timeline": groups}
    if engine_init:
        summary["engine_actor_init_longest"] = max(g["longest"] for g in engine_init)
        summary["engine_actor_init_total"] = round(sum(g["seconds"] for g in engine_init), 3)
        summary["first_engine_init_start"] = min(g["first_start"] for g in engine_init)
        summary["last_engine_init_end"] = max(g["last_end"] for g in engine_init)
    if engine_work:
        summary["engine_actor_work_total"] = round(sum(g["seconds"] for g in engine_work), 3)
        summary["first_engine_work_start"] = min(g["first_start"] for g in engine_work)
        summary["last_engine_work_end"] = max(g["last_end"] for g in engine_work)
        summary["after_last_engine_work"] = round(until - since - summary["last_engine_work_end"], 3)
    render = pick("RenderBlocks", True) + pick("RenderBlocks", False)
    if render:
        summary["render_actor_total"] = round(sum(g["seconds"] for g in render), 3)
    return summary


def compare(job_tables: dict, bare_tables: dict) -> dict:
    """How many users got the same summary (and the same intermediates, token counts)."""
    out = {"users": 0, "summary": 0, "intermediates": 0, "tokens_out": 0, "examples": []}
    for mode, job in job_tables.items():
        bare = bare_tables.get(mode)
        if bare is None:
            continue
        by_user = {row["user_id"]: row for row in bare.to_pylist()}
        for row in job.to_pylist():
            other = by_user.get(row["user_id"])
            out["users"] += 1
            if other is None:
                continue
            same = row["summary"] == other["summary"]
            out["summary"] += int(same)
            out["intermediates"] += int(row["intermediates"] == other["intermediates"])
            out["tokens_out"] += int(row["tokens_out"] == other["tokens_out"])
            if not same and len(out["examples"]) < 2:
                out["examples"].append(
                    {"mode": mode, "user_id": row["user_id"], "job": row["summary"], "bare": other["summary"]}
                )
    return out


def ray_worker_probe(num_cpus: float) -> dict:
    """What a Ray worker with the engine actor's CPUs sees: OMP threads, torch threads."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def probe():
        import os

        import torch

        return {
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)),
        }

    return ray.get(probe.remote())


# ------------------------------------------------------------------------------ report


def rate(count: int, seconds: float | None) -> float | None:
    return round(count / seconds, 3) if seconds else None


def summarize_results(backend: str, bare: dict | None, jobs: dict) -> list[dict]:
    """Table rows: bare engine (with and without start), bare in-process run, each job."""
    rows = []
    if bare is not None and "error" not in bare:
        variants = [
            ("bare engine", bare["generate_seconds"]),
            ("bare engine + start", bare["generate_seconds"] + bare["engine_start_seconds"]),
            ("bare in-process + start", bare["pipeline_seconds"] + bare["engine_start_seconds"]),
        ]
        for name, seconds in variants:
            rows.append(
                dict(backend=backend, run=name, users=bare["users"], calls=bare["calls"],
                     tokens_out=bare["tokens_out"], seconds=round(seconds, 3),
                     users_per_s=rate(bare["users"], seconds), tokens_per_s=rate(bare["tokens_out"], seconds))
            )
    for execution, job in jobs.items():
        if "error" in job:
            rows.append(dict(backend=backend, run=f"job {execution}", error=job["error"]))
            continue
        row = dict(backend=backend, run=f"job {execution}", users=job["users"], calls=job["calls"],
                   tokens_out=job["tokens_out"], seconds=job["seconds"],
                   users_per_s=rate(job["users"], job["seconds"]),
                   tokens_per_s=rate(job["tokens_out"], job["seconds"]))
        if bare is not None and "error" not in bare:
            row["ratio"] = ratios(job, bare)
            row["match"] = job.get("match")
        rows.append(row)
    return rows


def ratios(job: dict, bare: dict) -> dict:
    """Job throughput / bare throughput (output tokens/s), against each bare figure."""
    job_rate = job["tokens_out"] / job["seconds"]

    def vs(seconds: float) -> float:
        return round(job_rate / (bare["tokens_out"] / seconds), 3)

    return {
        "vs_bare_engine": vs(bare["generate_seconds"]),
        "vs_bare_engine_with_start": vs(bare["generate_seconds"] + bare["engine_start_seconds"]),
        "vs_bare_in_process_with_start": vs(bare["pipeline_seconds"] + bare["engine_start_seconds"]),
        "users_per_s_vs_bare_engine": round(
            (job["users"] / job["seconds"]) / (bare["users"] / bare["generate_seconds"]), 3
        ),
    }


def format_table(rows: list[dict]) -> str:
    head = (f"{'backend':<13}{'run':<25}{'users':>6}{'calls':>6}{'out tok':>8}{'seconds':>9}"
            f"{'users/s':>9}{'tok/s':>8}{'job/bare':>10}{'job/(bare+start)':>18}{'same':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:<13}{r['run']:<25}FAILED: {r['error'].splitlines()[-1]}")
            continue
        ratio = r.get("ratio") or {}
        match = r.get("match")
        same = f"{match['summary']}/{match['users']}" if match else ""
        lines.append(
            f"{r['backend']:<13}{r['run']:<25}{r['users']:>6}{r['calls']:>6}{r['tokens_out']:>8}"
            f"{r['seconds']:>9.1f}{r['users_per_s']:>9.3f}{r['tokens_per_s']:>8.1f}"
            f"{_pct(ratio.get('vs_bare_engine')):>10}{_pct(ratio.get('vs_bare_engine_with_start')):>18}{same:>7}"
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return f"{100 * value:.0f}%" if value is not None else ""


def environment() -> dict:
    import pyarrow
    import ray

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "memory_gib": _mem_gib(),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    for name in ("torch", "transformers", "vllm"):
        try:
            info[name] = __import__(name).__version__
        except Exception as error:  # noqa: BLE001 - an absent backend is reported, not fatal
            info[name] = f"unavailable ({type(error).__name__})"
    try:
        import torch

        info["torch_threads_driver"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    return info


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


def _error() -> str:
    traceback.print_exc()
    return traceback.format_exc(limit=4).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16, help="users summarized (= users_per_batch); default 16")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="generation.max_new_tokens (default 48)")
    parser.add_argument("--backends", nargs="+", choices=["vllm", "transformers"], default=["vllm", "transformers"])
    parser.add_argument("--execution", nargs="+", choices=["fused", "per_step"], default=["fused", "per_step"],
                        help="job executions to measure (default both)")
    parser.add_argument("--modes", nargs="+", choices=["recurrent", "hierarchical"], default=["recurrent"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine-batch-size", type=int, default=None,
                        help="engine.batch_size (prompts per engine call); default = --users")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="engine.enforce_eager (vLLM: no torch.compile; starts faster, may decode slower)")
    parser.add_argument("--engine-cpus", type=int, default=1,
                        help="engine.num_cpus: Ray CPUs per engine actor, which Ray also makes the "
                        "actor's OMP_NUM_THREADS (torch threads); 2 on a 2-core machine uses both")
    parser.add_argument("--omp-threads", type=int, default=None,
                        help="export OMP_NUM_THREADS before Ray starts (default: leave unset, as users run it)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.omp_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.omp_threads)  # before torch / Ray start
    CACHE.mkdir(parents=True, exist_ok=True)

    prepared = prepare_data(args)
    print(f"data: {prepared['run_dir']} ({'cached' if prepared['skipped'] else 'prepared'} in "
          f"{prepared['seconds']:.1f} s)", flush=True)

    from trsr.ray_utils import init_ray

    started = time.perf_counter()
    init_ray()
    ray_init = time.perf_counter() - started
    probe_config = experiment_for(args, args.backends[0], args.execution[0]).summarize.engine
    try:
        worker = ray_worker_probe(probe_config.num_cpus)
    except Exception:  # noqa: BLE001
        worker = {"error": _error()}
    print(f"ray: started in {ray_init:.1f} s; an engine worker (num_cpus={probe_config.num_cpus:g}) sees {worker}",
          flush=True)

    results: dict = {}
    rows: list[dict] = []
    for backend in args.backends:
        entry: dict = {"bare": None, "jobs": {}}
        results[backend] = entry
        print(f"\n== {backend}: bare engine (in process, no Ray)", flush=True)
        bare_tables: dict = {}
        try:
            entry["bare"], bare_tables = run_bare(experiment_for(args, backend, args.execution[0]))
            b = entry["bare"]
            print(f"   engine start {b['engine_start_seconds']:.1f} s, generate {b['generate_seconds']:.1f} s, "
                  f"render {b['render_seconds']:.1f} s, {b['tokens_out']} output tokens", flush=True)
        except Exception:  # noqa: BLE001 - keep measuring the other runs
            entry["bare"] = {"error": _error()}
        gc.collect()
        for execution in args.execution:
            print(f"\n== {backend}: job, execution={execution}", flush=True)
            try:
                job, job_tables = run_job(experiment_for(args, backend, execution))
                if bare_tables:
                    job["match"] = compare(job_tables, bare_tables)
                entry["jobs"][execution] = job
                print(f"   {job['seconds']:.1f} s, {job['tokens_out']} output tokens, "
                      f"same summaries as bare: {job.get('match', {}).get('summary')}/{job['users']}", flush=True)
                b = job["breakdown"]
                if "engine_actor_init_longest" in b and "engine_actor_work_total" in b:
                    print(f"   timeline: engine actor __init__ starts at {b['first_engine_init_start']:.1f} s and "
                          f"takes {b['engine_actor_init_longest']:.1f} s (longest; {b['engine_actor_init_total']:.1f} s "
                          f"in all), engine batches {b['engine_actor_work_total']:.1f} s, "
                          f"{b['after_last_engine_work']:.1f} s after the last one", flush=True)
            except Exception:  # noqa: BLE001
                entry["jobs"][execution] = {"error": _error()}
        rows.extend(summarize_results(backend, entry["bare"], entry["jobs"]))

    bare_ok = {b: r["bare"] for b, r in results.items() if r["bare"] and "error" not in r["bare"]}
    comparison = {}
    if "vllm" in bare_ok and "transformers" in bare_ok:
        v, t = bare_ok["vllm"], bare_ok["transformers"]
        comparison = {
            "vllm_over_transformers_bare_tokens_per_s": round(
                (v["tokens_out"] / v["generate_seconds"]) / (t["tokens_out"] / t["generate_seconds"]), 3
            ),
            "vllm_over_transformers_bare_with_start": round(
                (v["tokens_out"] / (v["generate_seconds"] + v["engine_start_seconds"]))
                / (t["tokens_out"] / (t["generate_seconds"] + t["engine_start_seconds"])), 3
            ),
        }

    print()
    print(format_table(rows))
    for r in rows:
        if r.get("ratio"):
            verdict = "meets" if r["ratio"]["vs_bare_engine"] >= TARGET else "misses"
            print(f"{r['backend']} {r['run']}: keeps {_pct(r['ratio']['vs_bare_engine'])} of the bare engine's "
                  f"output tokens/s ({_pct(r['ratio']['vs_bare_engine_with_start'])} counting engine start); "
                  f"{verdict} the {_pct(TARGET)} target")
    if comparison:
        print(f"vLLM / transformers, bare engine output tokens/s: "
              f"{comparison['vllm_over_transformers_bare_tokens_per_s']:.2f}x "
              f"({comparison['vllm_over_transformers_bare_with_start']:.2f}x counting engine start)")

    report = {
        "config": {
            "users": args.users,
            "max_new_tokens": args.max_new_tokens,
            "backends": args.backends,
            "execution": args.execution,
            "modes": args.modes,
            "model": args.model,
            "engine_batch_size": args.engine_batch_size or args.users,
            "omp_threads": args.omp_threads,
            "engine_cpus": args.engine_cpus,
            "enforce_eager": args.enforce_eager,
            "target": TARGET,
            "summarize": experiment_for(args, args.backends[0], args.execution[0]).summarize.model_dump(mode="json"),
        },
        "data": prepared,
        "environment": environment(),
        "ray_init_seconds": round(ray_init, 2),
        "ray_worker": worker,
        "results": results,
        "table": rows,
        "vllm_vs_transformers": comparison,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    failed = any("error" in r for r in rows) or any(
        r["bare"] is not None and "error" in r["bare"] for r in results.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
