"""LoRA fine-tuning of the recommender LLM (paper 4.3 and 5.2.2) as a Ray Train job.

The paper fine-tunes Llama-2-7B with LoRA (rank 8), AdamW at 1e-4, batch size 1 with 64
gradient-accumulation steps, 8 epochs, max length 2048, next-token loss over the whole
prompt, and DeepSpeed ZeRO stage 2. `train_lora` runs exactly that as a Ray Train
`TorchTrainer` (any number of workers, CPU or GPU) and is resumable, also after a
crash between epochs and with another number of workers.

Input: training examples (one per (user, candidate) pair)
---------------------------------------------------------
Complete training texts (prompt + answer) with where the answer starts, optionally
grouped by ranking list, as a Python list or a Parquet file/folder (local or s3://; its
`group_column` gives the groups); the accepted forms, tokenization and prefix sharing
are described in `trsr.recommend.train_data`. The examples reach Ray Train as a Ray
Dataset (`trsr.recommend.train_ingest`): Ray Data reads, tokenizes and packs them and
Ray Train's dataset ingest streams them to the workers, split between them; the driver
only counts them (a streamed aggregate) and fingerprints them. Texts longer than
`max_length` tokens are an error (or dropped, `overlong: drop`): truncation would cut
the candidate or the answer, so the prompt builder shortens the summary or history
instead.

Training
--------
An optimizer step consumes about `effective_batch` texts (default workers x
per_device_batch_size x gradient_accumulation), whatever the grouping: each worker takes
whole groups until its cumulative share of the epoch's steps is reached and cuts them
into micro-batches of at most `per_device_batch_size` texts (a larger group is a
micro-batch of its own; workers with fewer micro-batches in a step run empty ones, so
the collectives line up). The step's loss is the mean over all its learned tokens
(summed over micro-batches and workers, divided by their all-reduced count), so its
gradient does not depend on how the texts are split into micro-batches or workers. The
log and each epoch's record state the real texts per step. With `share_prefix` a group's
shared prompt prefix goes through the model once, with the same loss and gradient as
separate texts when `lora_dropout` is 0 (with dropout the group shares one dropout mask
on the prefix; `train_data` explains). The learning rate follows `lr_schedule` (linear
decay to 0 as in transformers/TRL by default, after `warmup_steps`), planned over
epochs x texts / effective batch and advanced by the texts actually trained, so it
reaches 0 with the last text whatever the real step sizes.

Order and determinism: the groups come in a fixed, seeded order (a hash of seed and
group key: independent of input order and files); Ray Train's streaming split hands
contiguous blocks of it to the workers (deterministically, with `preserve_order`), and
each worker reshuffles its shard per epoch through a local shuffle buffer of
`shuffle_buffer` groups seeded by (seed, epoch, rank). Dropout is reseeded from (seed,
step, rank) before every step. So the same config, seed, data and number of workers give
the same losses, also across an interruption and resume. The split hands out equal
numbers of groups (the last < workers groups of an epoch are left out); a worker whose
groups hold fewer texts than another's contributes empty micro-batches once it runs
out, and the epoch ends when all are out, so every worker runs the same steps.

`deepspeed: true` builds a DeepSpeed ZeRO-2 engine (bf16 on GPU, fp32 on CPU, DeepSpeed's
config-built AdamW with `torch_adam` so no op is compiled); `false` uses plain torch
AdamW, wrapped in DDP for more than one worker (its optimizer state is the same on every
rank, so it loads under any number of workers).

Checkpoints and resuming
------------------------
Every `checkpoint_every_steps` optimizer steps (null: none) and at the end of every epoch
each worker reports to `ray.train.report` a checkpoint folder (Ray merges the workers'
folders) under `<storage_path>/<run_name>/`:

    epoch-NNN/  the end of epoch NNN         step-NNNNNN/  after global step NNNNNN
                                                           (mid-epoch)
    adapter/             PEFT `save_pretrained` of the LoRA adapter only
                         (adapter_config.json + adapter_model.safetensors)
    trainer_state.json   kind (epoch/step), completed epochs, global step, texts trained
                         (the LR schedule's position), the position inside the epoch
                         (step checkpoints: steps, rows and texts each worker consumed,
                         the epoch's loss/token sums so far), the history of finished
                         epochs, validation metrics, a fingerprint of the setup and data
    optimizer.pt         plain torch: AdamW state (rank 0; the same on every rank)
    deepspeed/state/     DeepSpeed: its checkpoint without the frozen base weights (LoRA
                         weights, each rank's ZeRO-2 optimizer partition): a resume with
                         the same number of workers loads it
    deepspeed/optimizer_full.pt  DeepSpeed: each LoRA parameter's fp32 weights and AdamW
                         moments gathered whole (rank 0): a resume with another number of
                         workers loads this into its own partitions (DeepSpeed 0.19 cannot
                         re-partition its ZeRO checkpoint with torch AdamW)

Ray Train keeps at most epochs + 1 checkpoints: every epoch end, and the most recent step
checkpoints (scored below every epoch end, so the oldest go first). When a worker fails,
Ray Train restarts the workers (`max_failures` times, default 2) and the train loop
continues from the latest checkpoint (`ray.train.get_checkpoint`): after a step
checkpoint, in the middle of its epoch, skipping the groups already trained on. Calling
`train_lora` again with the same `storage_path` and `run_name` does the same (after a
killed job); an already finished run returns at once. Raising `epochs` continues
training; the number of workers, per-device batch and accumulation (at the same
effective batch), the checkpoint cadence, failures, logging and resources may change;
anything else that shapes training (model, LoRA, optimizer, effective batch, loss,
shuffle, seed, data) is refused with a clear error, since the result would be neither
run. A resume with the same number of workers continues exactly (1 worker: the same
losses as an uninterrupted run); with another number of workers in the middle of an
epoch, each worker skips its share of the groups already trained on in that epoch (its
shard differs, so a few groups may be seen twice or not at all in that epoch).
`resume=False` deletes the earlier run folder and starts over. With `max_steps`, an
epoch cut short by the cap is still checkpointed as its epoch end (marked `partial`) and
a later call continues with the next epoch.

Validation
----------
`valid_fn(adapter_dir: str, epoch: int) -> dict[str, float]` runs after each epoch on
worker rank 0 (inside the train loop, so it can use the worker's resources; the other
workers wait at the report). Its metrics go to the history; `valid_metric` /
`valid_mode` pick the best epoch (otherwise the last epoch is the best).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from trsr import storage
from trsr.errors import ConfigError, TrsrError
from trsr.llm.packing import within_sliding_window
from trsr.recommend.config import TrainConfig, ValidFn
from trsr.recommend.train_data import Example
from trsr.recommend.train_ingest import ray_filesystem
from trsr.recommend.train_loop import train_loop
from trsr.recommend.train_state import (
    RETENTION,
    absolute,
    is_complete,
    latest_state,
    run_dir,
    stored_states,
    training_result,
)

log = logging.getLogger(__name__)

# Environment the Ray Train workers (and its controller) need from the driver.
_WORKER_ENV = (
    "HF_HUB_OFFLINE",
    "TRSR_CACHE",
    "TOKENIZERS_PARALLELISM",
    # Settings only: credentials never go into a runtime env (job metadata, and Ray's
    # runtime-env agent logs every runtime env it creates, env vars included: the
    # cluster test found the secret there). Workers get them from the nodes'
    # environment or instance roles; a local cluster's workers inherit the driver's.
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "DS_ACCELERATOR",
    "OMP_WAIT_POLICY",
)


def _worker_env(use_gpu: bool) -> dict[str, str]:
    env = {key: os.environ[key] for key in _WORKER_ENV if key in os.environ}
    if not use_gpu:
        # OpenMP threads that spin while they wait collapse when the cores are shared
        # (other workers, other jobs): measured 10x slower with 2 threads on 2 busy
        # cores. Passive waiting costs little on idle cores. An explicit setting wins.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def train_lora(
    config: TrainConfig,
    train_texts: Sequence[Example] | str,
    valid_fn: ValidFn | None = None,
    *,
    storage_path: str,
    resume: bool = True,
    groups: Sequence[str] | None = None,
    group_column: str | None = "group",
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter with Ray Train; returns the run's summary.

    `train_texts`: examples (see module doc), or a Parquet file or folder (local or
    s3://) that Ray Data reads (the driver never loads it), whose column `group_column`
    (if present) gives the groups. `groups`: a group key per example of a list (the
    ranking list), for prefix sharing (`config.share_prefix`). `valid_fn(adapter_dir,
    epoch) -> metrics` runs after each epoch. Checkpoints go to
    `<storage_path>/<run_name>/epoch-NNN/` and `step-NNNNNN/` (local or s3://). The
    summary holds `history` (per epoch: train_loss, step, texts, steps, texts_per_step,
    tokens, tokens_per_s, valid metrics, checkpoint), `train_loss` (per epoch),
    `checkpoints`, `best_epoch`, `best_checkpoint`, `best_adapter`, `tokens_per_s` (of the
    epochs this call ran), `examples` (counted by Ray Data), `data`,
    `resumed_from_epoch`, `resumed_from_step`, `epochs_run` and `wall_seconds` (this
    call; `RunFolder.training_seconds` adds the epochs earlier calls trained).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoConfig

    from trsr.llm.models import resolve
    from trsr.ray_utils import init_ray, require_resources, verbose
    from trsr.recommend import train_ingest

    if config.valid_metric and valid_fn is None:
        raise ConfigError(f"train.valid_metric={config.valid_metric!r} is set but no valid_fn was given")
    folder_of_model = resolve(config.model)
    share = config.share_prefix
    if share and within_sliding_window(AutoConfig.from_pretrained(folder_of_model), config.max_length):
        log.warning("train.share_prefix: the model's sliding window is shorter than max_length; texts train separately")
        share = False
    init_ray()
    dataset, data = train_ingest.prepare(
        train_texts, groups=groups, group_column=group_column, model=config.model, loss=config.loss,
        max_length=config.max_length, overlong=config.overlong, share_prefix=share, seed=config.seed,
    )
    if data.rows < config.workers:
        raise ConfigError(
            f"{data.texts} training examples make {data.rows} training row(s) (groups): too few for "
            f"{config.workers} workers"
        )
    run_fingerprint = config.resume_fingerprint(data.fingerprint)

    folder = run_dir(storage_path, config)
    fs = storage.fsspec_filesystem(folder)
    if not resume and fs.exists(folder):
        fs.rm(folder, recursive=True)
    previous = latest_state(folder) if fs.exists(folder) else None
    if previous is not None and previous.get("fingerprint") != run_fingerprint:
        raise ConfigError(
            f"{folder} holds checkpoints of a different training setup (fingerprint "
            f"{previous.get('fingerprint')}, this call {run_fingerprint}: model, LoRA, optimizer, "
            "effective batch, loss, shuffle, seed or data differ); resume it with the same settings "
            "(epochs, max_steps, workers, per-device batch and accumulation at the same effective "
            "batch, checkpoint cadence may change), use another storage_path or run_name, or pass "
            "resume=False to start over"
        )
    resumed_from = previous["epoch"] if previous else 0
    resumed_step = previous["step"] if previous else 0
    if previous is not None and is_complete(previous, config):
        states = stored_states(folder)
        return training_result(states[-1] if states else previous, folder, config, resumed_from, 0.0, resumed_step)

    require_resources(
        "train", gpus=config.workers if config.use_gpu else 0, cpus=config.workers * config.cpus_per_worker
    )
    if storage.is_remote(storage_path):
        filesystem, inner = ray_filesystem(absolute(storage_path))
    else:
        filesystem, inner = None, absolute(storage_path)
        os.makedirs(inner, exist_ok=True)
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    ingest = DataConfig.default_ingest_options()
    # preserve_order: the streaming split then hands out blocks in a fixed order (no
    # locality reordering), so a worker's shard is the same in every run.
    ingest.preserve_order = True
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "data": data.as_dict(),
            "valid_fn": valid_fn,
            "fingerprint": run_fingerprint,
        },
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=inner,
            storage_filesystem=filesystem,
            # All epoch ends plus the newest step checkpoints (at most epochs + 1 in all).
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.epochs + 1, checkpoint_score_attribute=RETENTION, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=config.max_failures),
            # Ray Train's own INFO lines (worker group, checkpoints reported) only with
            # --verbose; its log files under the Ray session keep every level.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            worker_runtime_env={"env_vars": _worker_env(config.use_gpu)},
        ),
    )
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started

    states = stored_states(folder)
    if not states:
        raise TrsrError(f"training finished but no checkpoint was found under {folder}")
    return training_result(states[-1], folder, config, resumed_from, wall, resumed_step)
