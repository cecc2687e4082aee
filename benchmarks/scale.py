"""Scale of the streaming stages: rows/s, driver memory and driver CPU as users grow.

    python benchmarks/scale.py                                   # all three parts
    python benchmarks/scale.py --part real --users 2000 20000    # vLLM CPU, tiny model
    python benchmarks/scale.py --part datapath --users 100000 1000000
    python benchmarks/scale.py --part prepare --users 1000000

Two parts, each stage run at two sizes, each size in a fresh process (its own Ray
cluster; peak memory of that process only):

    real       the vLLM CPU engine with a tiny random-weight Llama (2 layers, hidden 128,
               head_dim 64; the SmolLM2 tokenizer): summarize (hierarchical and
               recurrent, fused) + score (1:20 lists, the hierarchical variant)
    datapath   summarize (hierarchical) + score with FIXED-ANSWER ENGINES defined in
               this file (a fixed short summary, fixed yes/no log-probabilities, no
               model), so that what is measured is Ray Data, the stages' own CPU work
               (item lookups, prompt building and token counting), Parquet I/O and the
               driver; they are never used outside this benchmark. (With fixed answers
               the recurrent mode runs the same data path as the hierarchical one.)

Per stage: rows (users or lists) and rows/s; the driver's peak RSS while the stage
ran (sampled every 0.1 s) and its CPU seconds (all threads) per 1,000 rows; the object
store bytes spilled to disk (Ray's memory summary, before -> after). The data (a
synthetic MIND-format set: histories of 10-25 news, every user in the test split with
20 negatives) is prepared once per size under benchmarks/results/cache/scale/
(git-ignored); `prepare` measures that step (it runs in the driver by design) on its
own: seconds and peak RSS.

Targets (data-path issue): at the larger size of a part, the driver's peak RSS within
1.2x of the smaller size's, and driver CPU-seconds per user within 1.25x.

Prints a table and writes benchmarks/results/scale.json; sizes measured in earlier runs
stay in it (a size measured again replaces its entry), and the ratios compare the
smallest and the largest size of a part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache" / "scale"
OUTPUT = RESULTS / "scale.json"
DEFAULT_SIZES = {"real": [2000, 20000], "datapath": [100000, 1000000], "prepare": [1000000]}
RSS_TARGET, CPU_TARGET = 1.2, 1.25
# Engine batches per block (runner.block_batches): the driver's memory follows the
# number of blocks (Ray Data keeps per-block stats), so at these sizes 8 as in the
# cluster recipe; --block-batches 1 shows the difference.
BLOCK_BATCHES = 8
FIXED_SUMMARY = "The user reads about sports, politics and travel, mostly recent headlines."


# ----------------------------------------------------------------- fixed-answer engines


def fixed_engine(config):
    """An Engine that answers at once: FIXED_SUMMARY for every prompt and the same yes/no
    log-probabilities for every candidate. The tokenizer is real (the stages count
    tokens to fit prompts)."""
    from trsr.llm.engine import Engine, Generation

    class FixedAnswerEngine(Engine):
        def __init__(self, config):
            from transformers import AutoTokenizer

            from trsr.llm.models import resolve

            self.config = config
            self._tokenizer = AutoTokenizer.from_pretrained(resolve(config.model))

        @property
        def tokenizer(self):
            return self._tokenizer

        def generate(self, prompts, params=None):
            return [Generation(FIXED_SUMMARY, 0, 14, "stop") for _ in prompts]

        def yes_no_logprobs(self, requests, yes="Yes", no="No"):
            return [[(-0.5, -1.0)] * len(suffixes) for _, suffixes in requests]

    return FixedAnswerEngine(config)


def _fixed_steps(job):
    """The job with its engine steps on fixed-answer engines."""
    import dataclasses

    from trsr.recommend.score import ScoreStage
    from trsr.summarize.stages import SummarizeStage

    class FixedSummarizeStage(SummarizeStage):
        def __init__(self, config, mode, steps, seed=0):
            super().__init__(config, mode, steps, seed, engine=fixed_engine(config.engine))

    class FixedScoreStage(ScoreStage):
        def __init__(self, config):
            super().__init__(config, engine=fixed_engine(config.engine))

    swap = {SummarizeStage: FixedSummarizeStage, ScoreStage: FixedScoreStage}
    job.steps = [dataclasses.replace(s, stage=swap.get(s.stage, s.stage)) for s in job.steps]
    return job


# ---------------------------------------------------------------------- experiment


def tiny_model() -> str:
    """The tiny random Llama of the tests, written once under the cache."""
    folder = CACHE / "tiny-llama"
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import write_tiny_llama

        write_tiny_llama(folder)
    return str(folder)


def experiment(users: int, part: str, block_batches: int = BLOCK_BATCHES):
    """The benchmark's recipe; part "prepare" is the run folder the data is prepared in
    (the stages' run folders link to its prepared/)."""
    from trsr.config import load
    from trsr.experiment import ExperimentConfig

    model = tiny_model()
    engine = "vllm" if part == "real" else "transformers"
    return load(
        ExperimentConfig,
        None,
        [
            f"run_dir={CACHE / f'{part}-{users}'}",
            "prepare.source.format=mind",
            f"prepare.source.path={CACHE / f'data-{users}'}",
            f"prepare.synthetic.users={users}",
            "prepare.synthetic.items=5000",
            "prepare.synthetic.min_history=10",
            "prepare.synthetic.max_history=25",
            "prepare.protocol={min_history: 10, max_history: 25, users: {train: 0.0, valid: 0.0, test: 1.0}}",
            "summarize.items_per_block=5",
            "summarize.fan_in=2",
            "summarize.execution=fused",
            "summarize.users_per_batch=64",
            f"summarize.engine.backend={engine}",
            f"summarize.engine.model={model}",
            "summarize.engine.max_model_len=1024",
            "summarize.engine.batch_size=256",
            "summarize.engine.enforce_eager=true",
            "summarize.engine.num_cpus=2",
            "summarize.generation.max_new_tokens=16",
            "summarize.generation.retry_temperature=0",
            f"score.engine.backend={engine}",
            f"score.engine.model={model}",
            "score.engine.max_model_len=1024",
            "score.engine.batch_size=256",
            "score.engine.enforce_eager=true",
            "score.engine.num_cpus=2",
            "score.prompt.max_length=1024",
            "score.users_per_batch=32",
            "score.splits=[test]",
            "train.enabled=false",
            "runner.progress_seconds=60",
            f"runner.block_batches={block_batches}",
        ],
    )


# ------------------------------------------------------------------------ child side


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class RssSampler(threading.Thread):
    """The driver's resident memory, sampled every 0.1 s while a stage runs."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak / 2**20


def spilled_bytes() -> int:
    """Object store bytes spilled so far on this cluster (Ray's memory summary)."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True, units="B")
    found = re.search(r"Spilled (\d+) B", text) or re.search(r"Spilled (\d+) MiB", text)
    if not found:
        return 0
    value = int(found.group(1))
    return value if "B," in found.group(0) or found.group(0).endswith(" B") else value * 2**20


def child_prepare(users: int) -> dict:
    from trsr.data.prepare import prepare

    exp = experiment(users, "prepare")
    started = time.perf_counter()
    stats = prepare(exp.prepare, exp.context())
    return {
        "users": users,
        "lists": stats["accounting"]["protocol"]["users_per_split"]["test"],
        "seconds": round(time.perf_counter() - started, 1),
        "skipped": stats.get("skipped", False),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def write_fixed_summaries(exp) -> None:
    """The score stage's input when summarize is not run (--stages score): every list
    with FIXED_SUMMARY (status ok), written by a streamed scan of the prepared lists
    (one file per 16k lists) in minutes rather than the summarize stage's hour at 1M
    users. Only the score stage is measured then; how its input was made does not
    change what it reads."""
    import pyarrow as pa

    from trsr import storage
    from trsr.runs import RunFolder
    from trsr.schema import LISTS, SPLITS, SUMMARIES

    run = RunFolder(exp.run_dir)
    folder = run.summaries("hierarchical")
    for split in SPLITS:
        for index, batch in enumerate(storage.scan_batches([run.lists(split)], columns=list(LISTS.names))):
            n = batch.num_rows
            columns = {name: batch.column(name) for name in LISTS.names}
            for field in SUMMARIES:
                if field.name not in columns:
                    columns[field.name] = pa.nulls(n, field.type)
            columns["mode"] = pa.array(["hierarchical"] * n, pa.string())
            columns["summary"] = pa.array([FIXED_SUMMARY] * n, pa.string())
            columns["status"] = pa.array(["ok"] * n, pa.string())
            table = pa.Table.from_pydict({f.name: columns[f.name] for f in SUMMARIES}, schema=SUMMARIES)
            storage.write_parquet(table, folder.join(f"fixed-{split}-{index:05d}.parquet"))
    folder.finish("fixed-summaries (benchmark only)", {})
    storage.release_arrow_memory()


def child_stages(users: int, part: str, block_batches: int, only: list[str] | None = None) -> dict:
    import shutil

    from trsr.ray_utils import init_ray
    from trsr.recommend.score import score_job
    from trsr.runner import run_stage
    from trsr.summarize.job import summarize_job

    exp = experiment(users, part, block_batches)
    prepared = CACHE / f"prepare-{users}" / "prepared"
    run = Path(exp.run_dir)
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    os.symlink(prepared, run / "prepared")  # prepared once per size, shared by both parts
    if only and "summarize" not in only:
        write_fixed_summaries(exp)

    init_ray()
    stages = {}
    jobs = [("summarize hierarchical", lambda: summarize_job(exp.summarize, exp.context(), "hierarchical"))]
    if part == "real":
        # With fixed answers the two modes run the same data path: one is measured.
        jobs.append(("summarize recurrent", lambda: summarize_job(exp.summarize, exp.context(), "recurrent")))
    jobs.append(("score", lambda: score_job(exp.score, exp.context().run, "test")))
    if only:
        jobs = [(name, make) for name, make in jobs if name.split()[0] in only]
    for name, make in jobs:
        job = make()
        if part == "datapath":
            job = _fixed_steps(job)
        before = spilled_bytes()
        sampler = RssSampler()
        sampler.start()
        cpu, wall = time.process_time(), time.perf_counter()
        stats = run_stage(job, exp.runner, force=True)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        peak = sampler.stop()
        rows = stats["rows_computed"]
        stages[name] = {
            "rows": rows,
            "unit": job.unit,
            "seconds": round(wall, 1),
            "rows_per_s": round(rows / wall, 2),
            "driver_peak_rss_mib": round(peak, 1),
            "driver_cpu_s": round(cpu, 2),
            "driver_cpu_s_per_1000": round(1000 * cpu / rows, 3),
            "spilled_bytes": spilled_bytes() - before,
        }
        print(json.dumps({name: stages[name]}), file=sys.stderr, flush=True)
    return {"users": users, "part": part, "block_batches": block_batches, "stages": stages}


# ------------------------------------------------------------------------ parent side


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # The child's stderr (stage progress, one JSON line per finished stage) goes straight
    # through: a 1M-user run takes hours, and its finished stages should be on record
    # even if a later one fails.
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"child {args} failed with exit code {out.returncode} (its stderr is above)")
    return json.loads(lines[-1])


def merge_sizes(earlier: list[dict], measured: dict[int, dict], stages_only: bool = False) -> list[dict]:
    """Earlier results with the sizes measured now replacing theirs, by size: the sizes
    of a part can be measured in separate runs (1M users takes hours here). With
    `stages_only` (a run of some stages, --stages) only those stages of a size are
    replaced; its other stages keep their earlier figures."""
    kept = {r["users"]: r for r in earlier}
    for size, result in measured.items():
        if stages_only and size in kept:
            result = dict(kept[size], stages={**kept[size]["stages"], **result["stages"]})
        kept[size] = result
    return [kept[size] for size in sorted(kept)]


def ratios(part_results: list[dict]) -> dict:
    """Per stage, its largest measured size against its smallest: peak RSS and CPU per
    user (a stage may be missing at some sizes: --stages)."""
    out = {}
    names = dict.fromkeys(name for r in part_results for name in r["stages"])
    for name in names:
        sizes = sorted((r for r in part_results if name in r["stages"]), key=lambda r: r["users"])
        if len(sizes) < 2:
            continue
        small, large = sizes[0], sizes[-1]
        s, l = small["stages"][name], large["stages"][name]
        rss = l["driver_peak_rss_mib"] / s["driver_peak_rss_mib"]
        cpu = l["driver_cpu_s_per_1000"] / s["driver_cpu_s_per_1000"]
        out[name] = {
            "users": [small["users"], large["users"]],
            "rss_ratio": round(rss, 3),
            "cpu_per_user_ratio": round(cpu, 3),
            "rss_ok": rss <= RSS_TARGET,
            "cpu_ok": cpu <= CPU_TARGET,
        }
    return out


def table(results: dict) -> str:
    lines = [
        f"{'part':<9} {'users':>9} {'blk':>3} {'stage':<23} {'rows':>9} {'rows/s':>9} {'seconds':>8} "
        f"{'peak RSS MiB':>12} {'CPU s/1k':>9} {'spilled MiB':>11}"
    ]
    for part in ("real", "datapath"):
        for result in results.get(part, []):
            for name, s in result["stages"].items():
                lines.append(
                    f"{part:<9} {result['users']:>9,} {result.get('block_batches', 1):>3} {name:<23} {s['rows']:>9,} {s['rows_per_s']:>9.1f} "
                    f"{s['seconds']:>8.1f} {s['driver_peak_rss_mib']:>12.1f} {s['driver_cpu_s_per_1000']:>9.3f} "
                    f"{s['spilled_bytes'] / 2**20:>11.1f}"
                )
        for name, r in results.get("ratios", {}).get(part, {}).items():
            lines.append(
                f"{part:<9} {'ratio':>9} {'':>3} {name:<23} peak RSS x{r['rss_ratio']} "
                f"({'ok' if r['rss_ok'] else 'over'} <= {RSS_TARGET}), CPU/user x{r['cpu_per_user_ratio']} "
                f"({'ok' if r['cpu_ok'] else 'over'} <= {CPU_TARGET})"
            )
    for p in results.get("prepare", []):
        lines.append(
            f"prepare   {p['users']:>9,} {'':>3} {'(driver, by design)':<23} {p['lists']:>9,} "
            f"{p['users'] / max(p['seconds'], 1e-9):>9.1f} {p['seconds']:>8.1f} {p['peak_rss_mib']:>12.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["real", "datapath", "prepare", "all"], default="all")
    parser.add_argument("--users", type=int, nargs="+", help="sizes (default per part)")
    parser.add_argument("--block-batches", type=int, default=BLOCK_BATCHES, help="runner.block_batches (default 8)")
    parser.add_argument("--stages", nargs="+", choices=["summarize", "score"], help="only these stages (default: all)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, users = args.child[0], int(args.child[1])
        result = child_prepare(users) if kind == "prepare" else child_stages(users, args.child[2], int(args.child[3]), args.child[4:])
        print(json.dumps(result), flush=True)
        return 0

    CACHE.mkdir(parents=True, exist_ok=True)
    parts = ["real", "datapath", "prepare"] if args.part == "all" else [args.part]
    results: dict = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    results.setdefault("ratios", {})
    for part in parts:
        sizes = args.users or DEFAULT_SIZES[part]
        prepared = {size: run_child(["prepare", str(size)]) for size in sizes}
        if part == "prepare":
            results["prepare"] = merge_sizes(results.get("prepare", []), prepared)
            continue
        measured = {}
        for size in sizes:
            measured[size] = run_child(["stages", str(size), part, str(args.block_batches), *(args.stages or [])])
            measured[size]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            for stage in measured[size]["stages"].values():
                stage["measured_at"] = measured[size]["measured_at"]
        results[part] = merge_sizes(results.get(part, []), measured, stages_only=bool(args.stages))
        results["ratios"][part] = ratios(results[part])
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    results["written_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
