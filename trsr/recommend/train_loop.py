"""The Ray Train worker function of a LoRA run (started by `train_lora` on every
worker): steps over this worker's shard, the LR schedule, logging, checkpoints and
validation. `trsr.recommend.train` says what it does and why."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

from trsr.errors import ConfigError, TrsrError
from trsr.llm.adapters import ADAPTER_DIR
from trsr.recommend.config import TrainConfig, ValidFn
from trsr.recommend.train_data import TrainingRow, mix_seed
from trsr.recommend.train_steps import StepFiller, collate, micro_batches, weighted_loss_sum
from trsr.recommend.train_model import adam_steps, deepspeed_full_state, lora_model, restore, trainee
from trsr.recommend.train_state import DEEPSPEED_DIR, DEEPSPEED_TAG, EPOCH_RETENTION, FULL_OPTIMIZER_FILE
from trsr.recommend.train_state import OPTIMIZER_FILE, RETENTION, STATE_FILE

log = logging.getLogger("trsr.recommend.train")


def planned_steps(texts_per_epoch: int, config: TrainConfig) -> float:
    """Optimizer steps the LR schedule plans for, in effective batches (may be fractional)."""
    texts = config.epochs * texts_per_epoch
    if config.max_steps:
        texts = min(texts, config.max_steps * config.effective_batch_size)
    return texts / config.effective_batch_size


def lr_factor(step: int, total: float, config: TrainConfig, position: float | None = None) -> float:
    """Multiplier of the learning rate before optimizer step `step + 1` (0-based), of
    `total` planned steps; `position`: the steps' worth of texts trained so far (texts /
    effective batch; default `step`). Warmup counts steps, the decay follows texts."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    remaining = total - config.warmup_steps
    if remaining <= 0:
        return 1.0
    done = step if position is None else position
    return max(0.0, (total - done) / remaining)


def _log(rank: int, message: str) -> None:
    # In Ray Train workers trsr's records go to the console through trsr.worker_logs
    # (the workers' set-up hook); a print would reach only the workers' log file.
    if rank == 0:
        log.info("train: %s", message)


def train_loop(loop_config: dict) -> None:
    """Ray Train worker function (module level, so workers import it by name)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from trsr.recommend.train_shard import shard_rows

    config = TrainConfig.model_validate(loop_config["config"])
    data: dict = loop_config["data"]
    valid_fn: ValidFn | None = loop_config["valid_fn"]
    run_fingerprint: str = loop_config["fingerprint"]

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if world != config.workers:
        raise TrsrError(f"expected {config.workers} workers, Ray Train started {world}")
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


    model, pad_id, dtype = lora_model(config, device)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "texts_done": 0.0, "position": None}
    restored = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, restored = restore(checkpoint, model, run_fingerprint)
        where = state.get("position")
        _log(
            rank,
            f"resuming at step {state['step']} "
            + (f"(in epoch {where['epoch']}, after {where['steps']} of its steps)" if where else f"(after epoch {state['epoch']})")
            + (f", saved by {where['world']} worker(s)" if where and where["world"] != world else ""),
        )
    position: dict | None = state.get("position")
    start_epoch = int(position["epoch"]) if position else int(state["epoch"]) + 1
    global_step, texts_done = int(state["step"]), float(state.get("texts_done", 0.0))
    history: list[dict] = list(state["history"])
    if start_epoch > config.epochs or (config.max_steps and global_step >= config.max_steps):
        _log(rank, "nothing to do: the run in storage is already complete")
        if restored:
            shutil.rmtree(restored, ignore_errors=True)
        return

    batch_texts = config.effective_batch_size
    total_steps = planned_steps(int(data["texts"]), config)
    try:
        parts = trainee(config, model, pad_id, dtype, world, device, restored, state)
    finally:
        if restored:
            shutil.rmtree(restored, ignore_errors=True)
    engine, forward, optimizer, peft_model, trainable = (
        parts.engine, parts.forward, parts.optimizer, parts.peft_model, parts.trainable
    )


    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if config.use_gpu and not config.deepspeed
        else torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.cpu_bf16)
    )
    distributed = world > 1 and dist.is_available() and dist.is_initialized()

    def reduce(values: list[float], op: str = "sum") -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.tolist()

    def gather(value: float) -> list[float]:
        slots = [0.0] * world
        slots[rank] = float(value)
        return reduce(slots)

    def set_lr(step: int, done: float) -> float:
        lr = config.learning_rate * lr_factor(step, total_steps, config, position=done / batch_texts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    # Runs where a worker has no micro-batch left in a step: a 1-token row whose loss is
    # multiplied by 0, so the collectives (DDP, ZeRO-2 reduce per backward) line up.
    empty_row = TrainingRow(
        ids=np.array([pad_id], np.int32), positions=np.zeros(1, np.int32), segments=np.zeros(1, np.int32),
        targets=np.zeros(1, np.int32), weights=np.ones(1, np.float32), texts=0, text_tokens=0,
    )

    def fill(filler: StepFiller) -> dict:
        """This worker's rows of the next step, and the step's global size."""
        rows = filler.next_step()
        micro = micro_batches([row.texts for row in rows], config.per_device_batch_size)
        local_texts = sum(row.texts for row in rows)
        local_weight = float(sum(float(np.sum(row.weights, dtype=np.float64)) for row in rows))
        texts, weight = reduce([local_texts, local_weight])
        (count,) = reduce([len(micro)], "max")
        return {"rows": rows, "micro": micro, "local_texts": local_texts, "texts": texts, "weight": weight, "count": int(count)}

    def train_step(step: dict) -> tuple[float, int, int]:
        """Forward/backward of this worker's micro-batches, then the optimizer step.
        Returns (this worker's summed loss, text tokens, computed tokens)."""
        scale = world / max(step["weight"], 1e-9)  # DDP / ZeRO average over the workers
        loss_sum, tokens, computed = 0.0, 0, 0
        for index in range(step["count"]):
            boundary = index == step["count"] - 1
            real = index < len(step["micro"])
            rows = [step["rows"][i] for i in step["micro"][index]] if real else [empty_row]
            batch = collate(rows, pad_id, device, mask_dtype=dtype)
            factor = scale if real else 0.0
            if config.deepspeed:
                engine.set_gradient_accumulation_boundary(boundary)
                logits = engine(**batch["inputs"]).logits
                summed = weighted_loss_sum(logits, batch["targets"], batch["weights"])
                engine.backward(summed * factor, scale_wrt_gas=False)
                engine.step()
            else:
                sync = boundary or world == 1 or not hasattr(forward, "no_sync")
                with (contextlib.nullcontext() if sync else forward.no_sync()), autocast:
                    logits = forward(**batch["inputs"]).logits
                    summed = weighted_loss_sum(logits, batch["targets"], batch["weights"])
                    (summed * factor).backward()
            if real:
                loss_sum += float(summed.detach())
                tokens += sum(row.text_tokens for row in rows)
                computed += batch["tokens"]
        if not config.deepspeed:
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss_sum, tokens, computed

    def save(name: str, *, record: dict | None = None, where: dict | None = None, completed: int) -> None:
        """Write this rank's part of a checkpoint and report it (every rank calls this)."""
        out = tempfile.mkdtemp(prefix=f"trsr-{name}-")
        if config.deepspeed:
            ds_dir = os.path.join(out, DEEPSPEED_DIR)
            os.makedirs(ds_dir, exist_ok=True)  # DeepSpeed creates it on rank 0 only
            engine.save_checkpoint(ds_dir, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
            full = deepspeed_full_state(engine, optimizer)
            if rank == 0:
                torch.save(full, os.path.join(ds_dir, FULL_OPTIMIZER_FILE))
        if rank == 0:
            peft_model.save_pretrained(os.path.join(out, ADAPTER_DIR))
            if not config.deepspeed:
                torch.save({"optimizer": optimizer.state_dict()}, os.path.join(out, OPTIMIZER_FILE))
            if record is not None:
                if valid_fn is not None:
                    forward.eval()
                    metrics = valid_fn(os.path.join(out, ADAPTER_DIR), record["epoch"])
                    forward.train()
                    if not isinstance(metrics, dict):
                        raise TrsrError(f"valid_fn must return a dict of metrics, got {type(metrics).__name__}")
                    if config.valid_metric and config.valid_metric not in metrics:
                        raise ConfigError(
                            f"train.valid_metric={config.valid_metric!r} is not among the metrics "
                            f"valid_fn returned ({sorted(metrics)})"
                        )
                    record["valid"] = {key: float(value) for key, value in metrics.items()}
                history.append(record)
            with open(os.path.join(out, STATE_FILE), "w") as handle:
                json.dump(
                    {
                        "kind": "epoch" if record is not None else "step",
                        "epoch": completed,
                        "step": global_step,
                        "texts_done": texts_done,
                        "workers": world,
                        "position": where,
                        "train_loss": history[-1]["train_loss"] if history else None,
                        "fingerprint": run_fingerprint,
                        "config": config.model_dump(mode="json"),
                        "history": history,
                        "examples": data["texts"],
                        "dropped_overlong": data["dropped"],
                        "data": data,
                        # Every random draw derives from these: dropout is reseeded from
                        # (seed, step, rank) before each step, the shuffle from (seed,
                        # epoch, rank); nothing else needs storing.
                        "rng": {"seed": config.seed, "next_step": global_step + 1},
                    },
                    handle,
                    indent=2,
                )
        if record is not None:
            metrics = {key: record[key] for key in ("epoch", "step", "train_loss", "tokens_per_s", "texts_per_step")}
            metrics.update(record["valid"])
            metrics[RETENTION] = EPOCH_RETENTION + global_step
        else:
            metrics = {"epoch": where["epoch"], "step": global_step, RETENTION: float(global_step)}
        has_files = rank == 0 or config.deepspeed
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(out) if has_files else None,
            checkpoint_dir_name=name,
        )
        shutil.rmtree(out, ignore_errors=True)
        if rank == 0:
            # Ray Train's controller registers a reported checkpoint when it next polls
            # the workers; a job killed before that resumes from the one before. Wait for
            # the commit, so the latest checkpoint written is the one a restart uses (the
            # other ranks wait at the next collective).
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    _log(
        rank,
        f"{data['texts']} examples in {data['rows']} rows ({data['dropped']} dropped as over-length; "
        f"{data['row_tokens']} tokens to compute per epoch for {data['text_tokens']} text tokens; "
        f"counted by Ray Data), {world} worker(s), effective batch {batch_texts} texts "
        f"(about {data['texts'] / batch_texts:.1f} optimizer steps/epoch), micro-batches of up to "
        f"{config.per_device_batch_size} texts, {'DeepSpeed ZeRO-2' if config.deepspeed else 'torch AdamW'}, "
        f"loss={config.loss}, {'bf16 autocast, ' if config.cpu_bf16 else ''}"
        f"{torch.get_num_threads()} torch threads per worker",
    )

    # ---- epochs ------------------------------------------------------------------
    shard = ray.train.get_dataset_shard("train")
    share = batch_texts / world
    for epoch in range(start_epoch, config.epochs + 1):
        forward.train()
        resumed = position if position is not None and int(position["epoch"]) == epoch else None
        position = None
        # Global sums of the epoch so far (a resumed step checkpoint carries them).
        carried = {"loss": 0.0, "tokens": 0.0, "computed": 0.0, "seconds": 0.0, "weight": 0.0, "texts": 0.0, "steps": 0}
        resumed_at: list[int] = []
        skip, my_texts = 0, 0.0
        if resumed is not None:
            carried.update(resumed["sums"])
            resumed_at = list(resumed.get("resumed_at", [])) + [global_step]
            if int(resumed["world"]) == world:
                skip, my_texts = int(resumed["rows"][rank]), float(resumed["texts"][rank])
            else:
                # Another number of workers: another split, so each worker skips its
                # share of the groups trained on in this epoch (approximate).
                total_rows = int(sum(resumed["rows"]))
                skip = total_rows // world + (1 if rank < total_rows % world else 0)
                my_texts = float(sum(resumed["texts"])) / world
        # loss/tokens/computed: summed over the ranks at the end (rank 0 carries the past).
        local = {key: (carried[key] if rank == 0 else 0.0) for key in ("loss", "tokens", "computed")}
        weight, texts, steps = float(carried["weight"]), float(carried["texts"]), int(carried["steps"])
        rows = shard_rows(
            shard, seed=config.seed, epoch=epoch, rank=rank, shuffle_buffer=config.shuffle_buffer, skip=skip
        )
        filler = StepFiller(rows, share, texts=my_texts, steps=steps)
        partial = False
        pending = fill(filler)
        # The clock starts once the first step's rows are here: the Ray Data pipeline's
        # start-up is not training time (the later steps' waits for data are).
        started = time.perf_counter()
        window = {"loss": 0.0, "weight": 0.0, "texts": 0.0, "steps": 0, "tokens": 0, "started": started}
        while pending["texts"] > 0:
            step = pending
            torch.manual_seed(mix_seed(config.seed, global_step + 1, rank))  # dropout
            lr = set_lr(global_step, texts_done)
            loss_sum, tokens, computed = train_step(step)
            global_step += 1
            texts_done += step["texts"]
            local["loss"] += loss_sum
            local["tokens"] += tokens
            local["computed"] += computed
            weight += step["weight"]
            texts += step["texts"]
            steps += 1
            for key, value in (("loss", loss_sum), ("weight", step["weight"]), ("texts", step["texts"]), ("steps", 1), ("tokens", tokens)):
                window[key] += value
            if config.max_steps and global_step >= config.max_steps:
                partial = fill(filler)["texts"] > 0
                break
            pending = fill(filler)
            if global_step % config.log_every == 0:
                window_loss, window_tokens = reduce([window["loss"], window["tokens"]])
                elapsed = max(time.perf_counter() - window["started"], 1e-9)
                _log(
                    rank,
                    f"epoch {epoch} step {global_step}: loss {window_loss / max(window['weight'], 1e-9):.4f} "
                    f"lr {lr:.2e} {window['texts'] / window['steps']:.1f} texts/step "
                    f"{window_tokens / elapsed:.0f} tokens/s",
                )
                window = {"loss": 0.0, "weight": 0.0, "texts": 0.0, "steps": 0, "tokens": 0, "started": time.perf_counter()}
            every = config.checkpoint_every_steps
            if every and global_step % every == 0 and pending["texts"] > 0:
                # Mid-epoch: what each worker consumed (the pending step's rows excluded).
                consumed_rows = gather(skip + filler.rows - len(pending["rows"]))
                consumed_texts = gather(filler.texts - pending["local_texts"])
                sums = reduce([local["loss"], local["tokens"], local["computed"], time.perf_counter() - started])
                save(
                    f"step-{global_step:06d}",
                    completed=epoch - 1,
                    where={
                        "epoch": epoch,
                        "steps": steps,
                        "world": world,
                        "rows": [int(r) for r in consumed_rows],
                        "texts": consumed_texts,
                        "resumed_at": resumed_at,
                        "sums": {
                            "loss": sums[0], "tokens": sums[1], "computed": sums[2],
                            "seconds": carried["seconds"] + sums[3] / world,
                            "weight": weight, "texts": texts, "steps": steps,
                        },
                    },
                )
        filler.close()

        loss_total, tokens_total, computed_total, elapsed = reduce(
            [local["loss"], local["tokens"], local["computed"], time.perf_counter() - started]
        )
        seconds = max(carried["seconds"] + elapsed / world, 1e-9)
        record = {
            "epoch": epoch,
            "step": global_step,
            "train_loss": loss_total / max(weight, 1e-9),
            "texts": int(round(texts)),
            "steps": steps,
            "texts_per_step": texts / max(steps, 1),
            "tokens": int(tokens_total),
            "seconds": seconds,
            "tokens_per_s": tokens_total / seconds,
            "computed_tokens": int(computed_total),
            "partial": partial,
            "workers": world,
            "resumed_at_steps": resumed_at,
            "optimizer_steps": adam_steps(optimizer),
            "torch_threads": torch.get_num_threads(),
            "valid": {},
        }
        _log(
            rank,
            f"epoch {epoch} done: loss {record['train_loss']:.4f}, {steps} steps of "
            f"{record['texts_per_step']:.1f} texts on average, {record['tokens_per_s']:.0f} tokens/s",
        )
        save(f"epoch-{epoch:03d}", record=record, completed=epoch)
        if config.max_steps and global_step >= config.max_steps:
            break
