"""Training throughput of `trsr.recommend.train.train_lora` on CPU (Ray Train workers).

    python benchmarks/train_throughput.py                       # tiny + SmolLM2-135M shapes
    python benchmarks/train_throughput.py --shapes tiny --steps 4
    python benchmarks/train_throughput.py --seq-len 256 --workers 1 2
    python benchmarks/train_throughput.py --shapes smollm2 --engines torch --workers 1 \
        --cpu-bf16 both --group-size 4          # the demo's setting: bf16, lists of 1+3

Models are randomly initialised Llama-architecture folders built from a `LlamaConfig`
(no real weights; throughput does not depend on their values) with the built-in
SmolLM2 tokenizer, saved once under benchmarks/results/cache/train-bench/ (git-ignored):

    tiny        hidden 128, 2 layers, 2 heads (head_dim 64): the test model
    smollm2     SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads / 3 KV heads,
                intermediate 1536, vocab 49152, tied embeddings (135M parameters)

Every combination of shape x {DeepSpeed ZeRO-2, plain torch AdamW} x workers (x fp32 /
bf16 autocast with `--cpu-bf16`, torch only) x separate / prefix-shared texts (with
`--group-size` > 1) trains LoRA (rank 8 on q/k/v/o, the paper's setting) on synthetic
texts of `--seq-len` tokens for `--steps` optimizer steps (`--accumulation`
micro-batches of `--group-size` texts per worker and step). With `--group-size N` the
texts come in groups of N that share all but their last `--suffix-len` tokens, like the
candidates of one ranking list. The figures are text tokens per second over all workers
(each text counted whole; forward + backward + optimizer, no Ray start-up or
checkpointing), as `train_lora` reports them, and the tokens the model actually
computed (fewer with prefix sharing). The machine's cores are split between the
workers (`cpus_per_worker` = cores / workers; Ray sets each worker's torch threads).

Prints a table and writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "cache" / "train-bench"
OUTPUT = RESULTS / "train_throughput.json"

SHAPES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=64,
    ),
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
    ),
}

WORDS = (
    "news sports politics movie music travel health finance weather science game "
    "review city team player season market stock film album trip doctor study"
).split()


def model_folder(shape: str) -> str:
    """A saved, randomly initialised Llama of `shape` with the SmolLM2 tokenizer."""
    folder = CACHE / shape
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trsr.llm.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SHAPES[shape],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    staging = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=CACHE))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return str(folder)


def _words_of_tokens(tokenizer, rng: random.Random, tokens: int, tail: str) -> str:
    words: list[str] = []
    while len(tokenizer(" ".join(words) + tail)["input_ids"]) < tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def synthetic_examples(folder: str, count: int, seq_len: int, group_size: int, suffix_len: int):
    """`count` (prompt, completion) pairs of about `seq_len` tokens (prompt + answer), in
    groups of `group_size` that share all but their last `suffix_len` tokens; and the
    group key of each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(0)
    examples, groups = [], []
    own = suffix_len if group_size > 1 else 0
    for group in range(count // group_size):
        shared = _words_of_tokens(tokenizer, rng, seq_len - own, "\nAnswer: Yes")
        for member in range(group_size):
            tail = _words_of_tokens(tokenizer, rng, own, "") if own else ""
            prompt = f"{shared}\ncandidate: {tail}\nAnswer:" if own else f"{shared}\nAnswer:"
            examples.append((prompt, " Yes" if member == 0 else " No"))
            groups.append(f"g{group}")
    return examples, groups


def measure(shape: str, deepspeed: bool, workers: int, bf16: bool, shared: bool, args, storage_root: str) -> dict:
    from trsr.recommend.config import TrainConfig
    from trsr.recommend.train import train_lora

    folder = model_folder(shape)
    cores = os.cpu_count() or 1
    per_worker = args.cpus_per_worker or max(1, cores // workers)
    config = TrainConfig(
        model=folder, deepspeed=deepspeed, workers=workers, cpus_per_worker=per_worker,
        per_device_batch_size=args.group_size, gradient_accumulation=args.accumulation,
        max_length=args.seq_len + 8, epochs=1, max_steps=args.steps, log_every=1_000_000,
        learning_rate=1e-4, cpu_bf16=bf16, share_prefix=shared,
        run_name=f"{shape}-{'ds' if deepspeed else 'plain'}-{workers}-{int(bf16)}-{int(shared)}",
    )
    count = workers * args.accumulation * args.steps * args.group_size
    examples, groups = synthetic_examples(folder, count, args.seq_len, args.group_size, args.suffix_len)
    started = time.perf_counter()
    result = train_lora(config, examples, storage_path=storage_root, resume=False, groups=groups)
    wall = time.perf_counter() - started
    record = result["history"][-1]
    return {
        "shape": shape,
        "engine": "deepspeed-zero2" if deepspeed else "torch",
        "workers": workers,
        "dtype": "bf16-autocast" if bf16 else "float32",
        "texts": "shared-prefix" if shared else "separate",
        "group_size": args.group_size,
        "cpus_per_worker": per_worker,
        "torch_threads": record.get("torch_threads"),
        "seq_len": args.seq_len,
        "steps": result["steps"],
        "tokens": record["tokens"],
        "computed_tokens": record.get("computed_tokens", record["tokens"]),
        "train_seconds": round(record["seconds"], 3),
        "tokens_per_s": round(record["tokens_per_s"], 1),
        "wall_seconds": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "smollm2"], choices=sorted(SHAPES))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--engines", nargs="+", default=["deepspeed", "torch"], choices=["deepspeed", "torch"])
    parser.add_argument("--cpus-per-worker", type=int, default=None,
                        help="Ray CPUs (= torch threads) per worker; default cores / workers")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per measurement")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per worker and step")
    parser.add_argument("--cpu-bf16", choices=["off", "on", "both"], default="off",
                        help="bf16 autocast (torch engine only; DeepSpeed runs are fp32)")
    parser.add_argument("--group-size", type=int, default=1,
                        help="texts per shared-prefix group (= texts per micro-batch); > 1 also "
                        "measures prefix sharing against separate texts")
    parser.add_argument("--suffix-len", type=int, default=24, help="tokens of each text after the shared prefix")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    CACHE.mkdir(parents=True, exist_ok=True)
    from trsr.ray_utils import init_ray

    init_ray()
    load_before = os.getloadavg()
    storage_root = tempfile.mkdtemp(prefix="train-bench-", dir=CACHE)
    rows = []
    try:
        bf16_modes = {"off": [False], "on": [True], "both": [False, True]}[args.cpu_bf16]
        share_modes = [False, True] if args.group_size > 1 else [False]
        for shape in args.shapes:
            for engine in args.engines:
                for workers in args.workers:
                    for bf16 in bf16_modes if engine == "torch" else [False]:
                        for shared in share_modes:
                            row = measure(shape, engine == "deepspeed", workers, bf16, shared, args, storage_root)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(storage_root, ignore_errors=True)

    header = (
        f"{'shape':<8} {'engine':<16} {'workers':>7} {'dtype':<13} {'texts':<13} {'tokens':>7} "
        f"{'computed':>8} {'train s':>8} {'tokens/s':>9} {'wall s':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['shape']:<8} {r['engine']:<16} {r['workers']:>7} {r['dtype']:<13} {r['texts']:<13} "
            f"{r['tokens']:>7} {r['computed_tokens']:>8} {r['train_seconds']:>8.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['wall_seconds']:>7.1f}"
        )
    import deepspeed
    import ray
    import torch
    import transformers

    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": sys.version.split()[0],
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                },
                "versions": {
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "deepspeed": deepspeed.__version__, "ray": ray.__version__,
                },
                "settings": {
                    "seq_len": args.seq_len, "cpus_per_worker": args.cpus_per_worker,
                    "steps": args.steps, "accumulation": args.accumulation,
                    "group_size": args.group_size, "suffix_len": args.suffix_len,
                    "cpu_bf16": args.cpu_bf16, "lora": "rank 8, alpha 16, q/k/v/o",
                },
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {OUTPUT}")


if __name__ == "__main__":
    main()
