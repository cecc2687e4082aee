"""Scoring throughput: the shared user prefix against independent prompts, and prompt
tokens per scored candidate against a TALLRec-style prompt with the full history.

    python benchmarks/score_throughput.py                        # transformers, 12 lists
    python benchmarks/score_throughput.py --backends transformers vllm --lists 24

Data: a generated MIND-format set (histories of 15-25 items, 1:20 test lists) prepared
into benchmarks/results/cache/score-bench/ (git-ignored). Every list gets a preference
summary of `--summary-words` words (placeholder text: cost depends on length, not
content), and the prompt shows K = 3 recent items, as LLM-TRSR does.

Measured on the same lists, the same engine, one run:

    shared        trsr.recommend.score.ScoreStage, the job's code: one request per list,
                  the user prefix computed once and its 21 candidates scored from it
                  (transformers: KV cache reuse; vLLM: prefix caching + logprob_token_ids)
    independent   the same 21 full prompts per list as separate prompts, batched, no
                  sharing (vLLM: a second engine with prefix caching off)
    tallrec       TALLRec-style prompts (no summary, as many raw history items as fit
                  2048 tokens), independent, as TALLRec scores each pair

Figures: candidates/s and the speed-up of shared over independent (target >= 4x at 1:20),
and prompt tokens the model processes per scored candidate: shared (prefix once +
suffixes), independent, TALLRec (target: LLM-TRSR at least 3x fewer than TALLRec).

Prints a table and writes benchmarks/results/score_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache" / "score-bench"
OUTPUT = RESULTS / "score_throughput.json"
SEED = 7
SPEEDUP_TARGET = 4.0
TOKENS_TARGET = 3.0
SUMMARY_WORDS = (
    "The user follows several topics over the whole history, returns to some of them "
    "regularly and moved recently toward a new interest that now dominates the reading"
).split()


def experiment(args, variant: str):
    from trsr.config import load
    from trsr.experiment import ExperimentConfig

    return load(
        ExperimentConfig,
        None,
        [
            f"run_dir={CACHE / 'run'}",
            f"seed={SEED}",
            "prepare.source.format=mind",
            f"prepare.source.path={CACHE / 'mind-synthetic'}",
            "prepare.synthetic.users=300",
            "prepare.synthetic.items=2000",
            "prepare.synthetic.min_history=15",
            "prepare.synthetic.max_history=25",
            "prepare.protocol.min_history=15",
            "prepare.protocol.max_history=25",
            "prepare.protocol.negatives={train: 1, valid: 20, test: 20}",
            f"score.engine.model={args.model}",
            "score.engine.max_model_len=2048",
            f"score.engine.batch_size={args.engine_batch_size}",
            "score.prompt.max_length=2048",
            f"score.prompt.variant={variant}",
            "train.enabled=false",
        ],
    )


def ranking_lists(args):
    import pyarrow as pa

    from trsr import storage
    from trsr.data.prepare import prepare
    from trsr.recommend.lists import AttachItems
    from trsr.runs import RunFolder

    base = experiment(args, "hierarchical")
    prepare(base.prepare, base.context())
    run = RunFolder(base.run_dir)
    lists = storage.read_parquet(run.lists("test")).slice(0, args.lists)
    summary = " ".join((SUMMARY_WORDS * (args.summary_words // len(SUMMARY_WORDS) + 1))[: args.summary_words])
    with_summary = lists.append_column("summary", pa.array([summary] * lists.num_rows)).append_column(
        "status", pa.array(["ok"] * lists.num_rows)
    )
    llm = AttachItems(run.items(), 3, uses_summary=True)(with_summary)
    tallrec = AttachItems(run.items(), None, uses_summary=False)(lists)
    return base, llm, tallrec


def requests_of(stage, lists) -> list[tuple[str, list[str]]]:
    from trsr.recommend.lists import usable_summary

    out = []
    for row in lists.to_pylist():
        summary = usable_summary(row["summary"], row["summary_status"], stage.config.prompt.has_summary)
        prompt = stage.builder.fit(summary, row["history"], row["candidate_attributes"])
        out.append((prompt.prefix, list(prompt.suffixes)))
    return out


def token_counts(engine, requests) -> dict:
    encoded = engine._scoring_ids(requests)
    candidates = sum(len(s) for _, s in encoded)
    shared = sum(len(p) + sum(len(x) for x in s) for p, s in encoded)
    full = sum(len(p) * len(s) + sum(len(x) for x in s) for p, s in encoded)
    return {"candidates": candidates, "shared_per_candidate": shared / candidates, "full_per_candidate": full / candidates}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(args, backend: str, base, llm_lists, tallrec_lists) -> dict:
    from trsr.llm.factory import build_engine
    from trsr.recommend.score import ScoreStage

    config = base.score.model_copy(update={"engine": base.score.engine.model_copy(update={"backend": backend})})
    started = time.perf_counter()
    engine = build_engine(config.engine)
    start_seconds = time.perf_counter() - started
    stage = ScoreStage(config, engine=engine)
    tall = base.for_variant("tallrec").score.model_copy(update={"engine": config.engine})
    tall_stage = ScoreStage(tall, engine=engine)

    llm_requests = requests_of(stage, llm_lists)
    tall_requests = requests_of(tall_stage, tallrec_lists)
    llm_tokens = token_counts(engine, llm_requests)
    tall_tokens = token_counts(engine, tall_requests)
    candidates = llm_tokens["candidates"]
    # Independent: every full prompt is its own request (empty shared prefix).
    independent = [("", [p + s for s in suffixes]) for p, suffixes in llm_requests]
    tall_independent = [("", [p + s for s in suffixes]) for p, suffixes in tall_requests[: args.tallrec_lists]]

    engine.yes_no_logprobs(llm_requests[:1])  # warm-up (first-call allocations, compilation)
    per = args.users_per_batch
    shared_s = timed(lambda: [stage(llm_lists.slice(i, per)) for i in range(0, llm_lists.num_rows, per)])
    no_share_engine = engine
    if backend == "vllm":  # vLLM would share the prefix on its own: a second engine without it
        del engine, stage, tall_stage
        no_share_engine = build_engine(config.engine.model_copy(update={"enable_prefix_caching": False}))
        no_share_engine.yes_no_logprobs(independent[:1])
    independent_s = timed(lambda: no_share_engine.yes_no_logprobs(independent))
    tall_candidates = sum(len(s) for _, s in tall_independent)
    tall_s = timed(lambda: no_share_engine.yes_no_logprobs(tall_independent))
    return {
        "backend": backend,
        "engine_start_s": round(start_seconds, 2),
        "lists": llm_lists.num_rows,
        "candidates": candidates,
        "shared_s": round(shared_s, 3),
        "independent_s": round(independent_s, 3),
        "shared_candidates_per_s": round(candidates / shared_s, 2),
        "independent_candidates_per_s": round(candidates / independent_s, 2),
        "speedup": round(independent_s / shared_s, 2),
        "tallrec_lists": len(tall_independent),
        "tallrec_candidates_per_s": round(tall_candidates / tall_s, 2),
        "tokens_per_candidate": {
            "llm_trsr_shared": round(llm_tokens["shared_per_candidate"], 1),
            "llm_trsr_full_prompt": round(llm_tokens["full_per_candidate"], 1),
            "tallrec_full_history": round(tall_tokens["full_per_candidate"], 1),
        },
        "tallrec_over_shared": round(tall_tokens["full_per_candidate"] / llm_tokens["shared_per_candidate"], 2),
        "tallrec_over_full_prompt": round(tall_tokens["full_per_candidate"] / llm_tokens["full_per_candidate"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["transformers"], choices=["transformers", "vllm"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lists", type=int, default=12, help="1:20 test lists scored per method")
    parser.add_argument("--tallrec-lists", type=int, default=4, help="lists timed with TALLRec prompts (slow)")
    parser.add_argument("--summary-words", type=int, default=120)
    parser.add_argument("--users-per-batch", type=int, default=4, help="lists per ScoreStage call")
    parser.add_argument("--engine-batch-size", type=int, default=21, help="engine.batch_size")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE.parent))

    base, llm_lists, tallrec_lists = ranking_lists(args)
    rows = [measure(args, backend, base, llm_lists, tallrec_lists) for backend in args.backends]

    print(f"\nscoring {args.lists} lists of 21 candidates, summary {args.summary_words} words, K=3, "
          f"model {args.model}, {os.cpu_count()} cores")
    head = f"{'backend':<13}{'shared c/s':>11}{'indep. c/s':>11}{'speed-up':>9}{'TALLRec c/s':>12}" \
           f"{'tok/cand shared':>16}{'full':>7}{'TALLRec':>9}{'TALLRec/shared':>15}"
    print(head)
    print("-" * len(head))
    for r in rows:
        t = r["tokens_per_candidate"]
        print(f"{r['backend']:<13}{r['shared_candidates_per_s']:>11}{r['independent_candidates_per_s']:>11}"
              f"{r['speedup']:>8}x{r['tallrec_candidates_per_s']:>12}{t['llm_trsr_shared']:>16}"
              f"{t['llm_trsr_full_prompt']:>7}{t['tallrec_full_history']:>9}{r['tallrec_over_shared']:>14}x")
    print(f"targets: speed-up >= {SPEEDUP_TARGET}x; TALLRec tokens / LLM-TRSR tokens >= {TOKENS_TARGET}x")
    result = {
        "benchmark": "score_throughput",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": {"speedup": SPEEDUP_TARGET, "tallrec_tokens_ratio": TOKENS_TARGET},
        "rows": rows,
        "met": {r["backend"]: {"speedup": r["speedup"] >= SPEEDUP_TARGET,
                               "tokens": r["tallrec_over_shared"] >= TOKENS_TARGET} for r in rows},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
