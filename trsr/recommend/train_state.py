"""A LoRA run's checkpoints in storage: the files of each checkpoint folder, and reading
back the states Ray Train registered (what a resume starts from, what a finished run
returns). The layout is described in `trsr.recommend.train`."""

from __future__ import annotations

import os
import posixpath

from trsr import storage
from trsr.llm.adapters import ADAPTER_DIR
from trsr.recommend.config import TrainConfig

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
# DeepSpeed: every parameter's optimizer state whole, for a resume with other workers.
FULL_OPTIMIZER_FILE = "optimizer_full.pt"
# Ray Train's retention score: every epoch end above every step checkpoint, newer above older.
RETENTION = "retention"
EPOCH_RETENTION = 1e12


def run_dir(storage_path: str, config: TrainConfig) -> str:
    return storage.join(absolute(storage_path), config.run_name)


def absolute(path: str) -> str:
    return str(path) if storage.is_remote(path) else os.path.abspath(path)


def registered_checkpoints(folder: str) -> set[str] | None:
    """The checkpoint folders Ray Train's snapshot of the run lists (what it resumes
    from), or None when there is no readable snapshot. A folder of a job killed while it
    was being written is not among them."""
    try:
        snapshot = storage.read_json(storage.join(folder, "checkpoint_manager_snapshot.json"))
        names = {entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]}
        latest = snapshot.get("latest_checkpoint_result") or {}
        return names | ({latest["checkpoint_dir_name"]} if latest.get("checkpoint_dir_name") else set())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_states(folder: str, prefix: str) -> list[dict]:
    fs = storage.fsspec_filesystem(folder)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    join = posixpath.join if storage.is_remote(folder) else os.path.join
    registered = registered_checkpoints(folder)
    states = []
    for found in fs.glob(join(folder, f"{prefix}-*", STATE_FILE)):
        if registered is not None and posixpath.basename(posixpath.dirname(str(found))) not in registered:
            continue
        path = found if not storage.is_remote(folder) or found.startswith("s3://") else "s3://" + found
        try:
            states.append(storage.read_json(path))
        except (OSError, ValueError):
            continue
    return states


def stored_states(folder: str) -> list[dict]:
    """trainer_state.json of each epoch-end checkpoint under a run folder, by epoch."""
    return sorted(read_states(folder, "epoch"), key=lambda s: s["epoch"])


def latest_state(folder: str) -> dict | None:
    """The state of the run's latest checkpoint, epoch end or mid-epoch step."""
    states = read_states(folder, "epoch") + read_states(folder, "step")
    if not states:
        return None
    return max(states, key=lambda s: (s["step"], s.get("kind", "epoch") == "epoch"))


def is_complete(state: dict, config: TrainConfig) -> bool:
    return state["epoch"] >= config.epochs or bool(config.max_steps and state["step"] >= config.max_steps)


def checkpoint_uri(folder: str, epoch: int) -> str:
    return storage.join(folder, f"epoch-{epoch:03d}")


def training_result(
    state: dict, folder: str, config: TrainConfig, resumed_from: int = 0, wall: float = 0.0, resumed_step: int = 0
) -> dict:
    """What train_lora returns: every epoch's record, the best epoch and its adapter, and
    the throughput of the epochs this run trained."""
    history = [dict(record, checkpoint=checkpoint_uri(folder, record["epoch"])) for record in state["history"]]
    best = history[-1]
    if config.valid_metric:
        scored = [r for r in history if config.valid_metric in r["valid"]]
        if scored:
            pick = max if config.valid_mode == "max" else min
            best = pick(scored, key=lambda r: r["valid"][config.valid_metric])
    ran = [r for r in history if r["epoch"] > resumed_from]
    tokens = sum(r["tokens"] for r in ran)
    seconds = sum(r["seconds"] for r in ran)
    return {
        "run_dir": folder,
        "history": history,
        "train_loss": [r["train_loss"] for r in history],
        "checkpoints": [r["checkpoint"] for r in history],
        "best_epoch": best["epoch"],
        "best_checkpoint": best["checkpoint"],
        "best_adapter": storage.join(best["checkpoint"], ADAPTER_DIR),
        "steps": state["step"],
        "examples": state.get("examples"),
        "dropped_overlong": state.get("dropped_overlong", 0),
        "data": state.get("data"),
        "tokens_per_s": tokens / seconds if seconds else None,
        "resumed_from_epoch": resumed_from,
        "resumed_from_step": resumed_step,
        "epochs_run": [r["epoch"] for r in ran],
        "wall_seconds": wall,
    }
