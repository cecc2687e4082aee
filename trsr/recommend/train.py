"""LoRA fine-tuning of the recommender LLM (paper 4.3 and 5.2.2) as a Ray Train job.

The paper fine-tunes Llama-2-7B with LoRA (rank 8), AdamW at 1e-4, batch size 1 with 64
gradient-accumulation steps, 8 epochs, max length 2048, next-token loss over the whole
prompt, and DeepSpeed ZeRO stage 2. `train_lora` runs exactly that as a Ray Train
`TorchTrainer` (any number of workers, CPU or GPU) and is resumable.

Input: training examples (one per (user, candidate) pair)
---------------------------------------------------------
Complete training texts (prompt + answer) with where the answer starts, optionally
grouped by ranking list; the accepted forms, tokenization, prefix sharing within a
group and the seeded batching are described in `trsr.recommend.train_data`. Texts
longer than `max_length` tokens are an error (or dropped, `overlong: drop`): truncation
would cut the candidate or the answer, so the prompt builder shortens the summary or
history instead.

Training
--------
Each epoch deals seeded, shuffled micro-batches of at most `per_device_batch_size` texts
to the workers (a group stays whole); `gradient_accumulation` micro-batches make one
optimizer step (effective batch = workers x per_device_batch_size x
gradient_accumulation); the last window of an epoch may be shorter and is averaged over
its own size. The loss of a micro-batch is the mean over its learned tokens (TRL's SFT
loss at the time of the paper); with `share_prefix` a group's shared prompt prefix goes
through the model once, with the same loss and gradient. The learning rate follows
`lr_schedule` (linear decay to 0 as in transformers/TRL by default, after
`warmup_steps`).

`deepspeed: true` builds a DeepSpeed ZeRO-2 engine (bf16 on GPU, fp32 on CPU, DeepSpeed's
config-built AdamW with `torch_adam` so no op is compiled); `false` uses plain torch
AdamW, wrapped in DDP for more than one worker.

Checkpoints and resuming
------------------------
After every epoch each worker reports to `ray.train.report` a checkpoint folder
`<storage_path>/<run_name>/epoch-NNN/` (Ray merges the workers' folders):

    adapter/             PEFT `save_pretrained` of the LoRA adapter only
                         (adapter_config.json + adapter_model.safetensors)
    trainer_state.json   epoch, global step, train loss, the whole history so far,
                         validation metrics, a fingerprint of the training setup
    optimizer.pt         plain torch: AdamW + LR-scheduler state (rank 0)
    deepspeed/state/     DeepSpeed: its checkpoint without the frozen base weights
                         (LoRA weights, each rank's ZeRO-2 optimizer partition,
                         LR-scheduler state)

Calling `train_lora` again with the same `storage_path` and `run_name` continues after
the last reported epoch (Ray Train gives the train loop that checkpoint through
`ray.train.get_checkpoint`); an already finished run returns at once. Raising `epochs`
continues training; changing anything else that shapes training (model, LoRA, optimizer,
batching, loss, seed, workers, data) is refused with a clear error, since the result
would be neither run. `resume=False` deletes the earlier run folder and starts over.
With `max_steps`, an epoch cut short by the cap is still checkpointed (marked
`partial`) and a later call continues with the next epoch.

Validation
----------
`valid_fn(adapter_dir: str, epoch: int) -> dict[str, float]` runs after each epoch on
worker rank 0 (inside the train loop, so it can use the worker's resources; the other
workers wait at the report). Its metrics go to the history; `valid_metric` /
`valid_mode` pick the best epoch (otherwise the last epoch is the best).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from typing import Any, Callable, Literal, Sequence

from pydantic import Field, model_validator

from trsr import storage
from trsr.config import Section, fingerprint
from trsr.errors import ConfigError, InputFileError, TrsrError
from trsr.llm.models import DEFAULT_LLM
from trsr.llm.packing import within_sliding_window
from trsr.recommend.train_data import (
    EncodedExamples,
    Example,
    collate,
    data_fingerprint,
    encode_examples,
    epoch_batches,
    epoch_steps,
    normalize_examples,
    read_examples,
    weighted_loss,
    worker_batches,
)

STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"

log = logging.getLogger(__name__)

# Environment the Ray Train workers (and its controller) need from the driver.
_WORKER_ENV = (
    "HF_HUB_OFFLINE",
    "TRSR_CACHE",
    "TOKENIZERS_PARALLELISM",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "DS_ACCELERATOR",
    "OMP_WAIT_POLICY",
)

ValidFn = Callable[[str, int], dict]


class TrainConfig(Section):
    """LoRA fine-tuning of the recommender (defaults: the paper's settings)."""

    # Model reference (trsr.llm.models): built-in name, HF folder, .gguf or cached hub id.
    model: str = DEFAULT_LLM
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # LoRA in the top N decoder layers only (null = every layer). The backward pass then
    # stops below them: on CPU, N = a third of the layers trains about 1.7x faster.
    lora_top_layers: int | None = Field(None, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    # "linear": warmup then linear decay to 0 (transformers/TRL default); "constant".
    lr_schedule: Literal["linear", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # Gradient clipping (transformers' default 1.0); null = none.
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(8, ge=1)
    per_device_batch_size: int = Field(1, ge=1)
    # Micro-batches per optimizer step: effective batch = workers x per_device x this.
    gradient_accumulation: int = Field(64, ge=1)
    max_length: int = Field(2048, ge=2)
    # Texts longer than max_length tokens: "error" (default) or "drop" them (counted).
    overlong: Literal["error", "drop"] = "error"
    # "full": next-token loss over the whole text (paper); "answer": the answer tokens only.
    loss: Literal["full", "answer"] = "full"
    # Grouped examples (the candidates of one list): run the shared prompt prefix through
    # the model once per group (same loss and gradient as separate texts, less work).
    share_prefix: bool = True
    # Ray Train workers (data parallel), and what each one reserves.
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    # DeepSpeed ZeRO-2 (bf16 on GPU, fp32 on CPU); false = plain torch AdamW (+ DDP).
    deepspeed: bool = True
    # CPU, torch path: forward/backward under bfloat16 autocast (weights and optimizer
    # stay fp32). 2.2-3x faster per step on CPUs with AVX512-BF16 or AMX (measured on
    # this project's 2-core EPYC); losses agree with fp32 to about 3 digits.
    cpu_bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    # Cap on optimizer steps over the whole run (demos and tests); null = no cap.
    max_steps: int | None = Field(None, ge=1)
    # Print loss, learning rate and tokens/s every this many optimizer steps (rank 0).
    log_every: int = Field(10, ge=1)
    # Metric of valid_fn that picks the best epoch, and its direction; null = last epoch.
    valid_metric: str | None = None
    valid_mode: Literal["max", "min"] = "max"
    # Folder under storage_path that holds this run's checkpoints (Ray's run name).
    run_name: str = "lora"
    # Ray Train restarts after worker failures (each resumes from the last checkpoint).
    max_failures: int = Field(0, ge=-1)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.target_modules:
            raise ValueError("target_modules is empty: LoRA needs at least one module")
        if self.cpu_bf16 and (self.use_gpu or self.deepspeed):
            raise ValueError("cpu_bf16 applies to CPU training with deepspeed: false (GPUs train in bf16 already)")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name {self.run_name!r} must be a non-empty folder name")
        return self

    @property
    def effective_batch_size(self) -> int:
        return self.workers * self.per_device_batch_size * self.gradient_accumulation

    def resume_fingerprint(self, data_fingerprint: str) -> str:
        """What a resumed run must share with the run it continues (not epochs, caps,
        logging, validation or resources)."""
        keys = (
            "model", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "lora_top_layers",
            "learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm",
            "per_device_batch_size", "gradient_accumulation", "max_length", "overlong",
            "loss", "share_prefix", "workers", "use_gpu", "deepspeed", "cpu_bf16", "seed",
        )
        return fingerprint({key: getattr(self, key) for key in keys}, data_fingerprint)


def steps_per_epoch(encoded: EncodedExamples, config: TrainConfig, epoch: int) -> int:
    return epoch_steps(
        [row.texts for row in encoded.rows], config.seed, epoch, config.workers,
        config.per_device_batch_size, config.gradient_accumulation,
    )


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of the learning rate before optimizer step `step + 1` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    remaining = total - config.warmup_steps
    if remaining <= 0:
        return 1.0
    return max(0.0, (total - step) / remaining)


# ------------------------------------------------------------------------ train loop


def _log(rank: int, message: str) -> None:
    # In Ray Train workers the root logger shows INFO (Ray Train sets it up).
    if rank == 0:
        log.info("[trsr.train] %s", message)


def _deepspeed_config(config: TrainConfig, world: int) -> dict:
    on_gpu = config.use_gpu
    return {
        "train_micro_batch_size_per_gpu": config.per_device_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation,
        "train_batch_size": config.per_device_batch_size * config.gradient_accumulation * world,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": config.weight_decay,
                # torch.optim.AdamW instead of DeepSpeed's compiled (Fused/CPU) Adam op.
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": on_gpu},
        "gradient_clipping": config.max_grad_norm or 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _train_loop(loop_config: dict) -> None:
    """Ray Train worker function (module level, so workers import it by name)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    config = TrainConfig.model_validate(loop_config["config"])
    encoded: EncodedExamples = ray.get(loop_config["encoded"])
    valid_fn: ValidFn | None = loop_config["valid_fn"]
    run_fingerprint: str = loop_config["fingerprint"]

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if world != config.workers:
        raise TrsrError(f"expected {config.workers} workers, Ray Train started {world}")
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    if not config.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    # ---- model + LoRA (seeded: every rank starts from the same adapter) ----------
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trsr.llm.models import resolve

    folder = resolve(config.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = torch.bfloat16 if config.use_gpu else torch.float32
    # SDPA honours the 4D masks of prefix-shared rows (trsr.llm.packing).
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    base.config.use_cache = False
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)
    layers = None
    if config.lora_top_layers is not None:
        total = base.config.num_hidden_layers
        if config.lora_top_layers > total:
            raise ConfigError(f"train.lora_top_layers={config.lora_top_layers} but the model has {total} layers")
        layers = list(range(total - config.lora_top_layers, total))
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- resume state ------------------------------------------------------------
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    restore_dir = None
    if checkpoint is not None:
        restore_dir = tempfile.mkdtemp(prefix="trsr-restore-")
        checkpoint.to_directory(restore_dir)
        with open(os.path.join(restore_dir, STATE_FILE)) as handle:
            state = json.load(handle)
        if state.get("fingerprint") != run_fingerprint:
            raise ConfigError(
                "the checkpoint in storage comes from a different training setup; use another "
                "storage_path/run_name or resume=False"
            )
        from safetensors.torch import load_file

        weights = load_file(os.path.join(restore_dir, ADAPTER_DIR, "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
        _log(rank, f"resuming after epoch {state['epoch']} (step {state['step']})")
    start_epoch, global_step = int(state["epoch"]) + 1, int(state["step"])
    history: list[dict] = list(state["history"])
    if start_epoch > config.epochs or (config.max_steps and global_step >= config.max_steps):
        _log(rank, "nothing to do: the run in storage is already complete")
        if restore_dir:
            shutil.rmtree(restore_dir, ignore_errors=True)
        return

    sizes = [row.texts for row in encoded.rows]
    per_epoch = steps_per_epoch(encoded, config, 1)
    total_steps = sum(steps_per_epoch(encoded, config, e) for e in range(1, config.epochs + 1))
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, config))

    # ---- engine ------------------------------------------------------------------
    if config.deepspeed:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            config=_deepspeed_config(config, world),
            lr_scheduler=schedule,
            dist_init_required=False,
        )
        if restore_dir:
            path, _ = engine.load_checkpoint(
                os.path.join(restore_dir, DEEPSPEED_DIR),
                tag=DEEPSPEED_TAG,
                load_module_strict=False,  # frozen base weights are not in the checkpoint
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if path is None:
                raise TrsrError("DeepSpeed could not load the optimizer state of the checkpoint")
        # DeepSpeed's exclude_frozen_parameters misses frozen weights that are tied
        # (named_parameters() lists a shared tensor once, under its first name): a tied
        # lm_head (SmolLM2) would go into every checkpoint. Keep the trainable ones only.
        trainable_names = {name for name, p in engine.module.named_parameters() if p.requires_grad}
        engine_state_dict = engine.module_state_dict

        def lora_state_dict(*args, **kwargs):
            full = engine_state_dict(*args, **kwargs)
            return type(full)((k, v) for k, v in full.items() if k in trainable_names)

        engine.module_state_dict = lora_state_dict
        peft_model = engine.module
        forward = engine
    else:
        optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=config.weight_decay,
        )
        scheduler = schedule(optimizer)
        if restore_dir:
            saved = torch.load(os.path.join(restore_dir, OPTIMIZER_FILE), map_location=device, weights_only=False)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        peft_model = model
        forward = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
    if restore_dir:
        shutil.rmtree(restore_dir, ignore_errors=True)

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if config.use_gpu and not config.deepspeed
        else torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.cpu_bf16)
    )
    distributed = dist.is_available() and dist.is_initialized()

    def all_sum(values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if distributed and world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    _log(
        rank,
        f"{encoded.texts} examples in {len(encoded.rows)} rows ({encoded.dropped} dropped as "
        f"over-length; {encoded.row_tokens} tokens to compute per epoch for {encoded.text_tokens} "
        f"text tokens), {world} worker(s), "
        f"{per_epoch} optimizer steps/epoch, effective batch {config.effective_batch_size}, "
        f"{'DeepSpeed ZeRO-2' if config.deepspeed else 'torch AdamW'}, loss={config.loss}, "
        f"{'bf16 autocast, ' if config.cpu_bf16 else ''}"
        f"{torch.get_num_threads()} torch threads per worker",
    )

    # ---- epochs ------------------------------------------------------------------
    for epoch in range(start_epoch, config.epochs + 1):
        forward.train()
        torch.manual_seed(config.seed * 1_000_003 + epoch * 1009 + rank)  # dropout
        batches = worker_batches(sizes, config.seed, epoch, rank, world, config.per_device_batch_size)
        windows = [batches[i : i + config.gradient_accumulation] for i in range(0, len(batches), config.gradient_accumulation)]
        # tokens: of the texts, each counted whole; computed: what the model ran.
        loss_sum, micro_count, tokens, computed, partial = 0.0, 0, 0, 0, False
        started = time.perf_counter()
        window_tokens, window_started = 0, time.perf_counter()
        for window in windows:
            size = len(window)
            for position, indices in enumerate(window):
                boundary = position == size - 1
                rows = [encoded.rows[i] for i in indices]
                batch = collate(rows, pad_id, device, mask_dtype=dtype)
                if config.deepspeed:
                    engine.set_gradient_accumulation_boundary(boundary)
                    logits = engine(**batch["inputs"]).logits
                    loss = weighted_loss(logits, batch["targets"], batch["weights"])
                    engine.backward(loss / size, scale_wrt_gas=False)
                    engine.step()
                else:
                    sync = boundary or world == 1 or not hasattr(forward, "no_sync")
                    with (torch.enable_grad() if sync else forward.no_sync()), autocast:
                        logits = forward(**batch["inputs"]).logits
                        loss = weighted_loss(logits, batch["targets"], batch["weights"])
                        (loss / size).backward()
                loss_sum += float(loss.detach())
                micro_count += 1
                used = sum(row.text_tokens for row in rows)
                tokens += used
                computed += batch["tokens"]
                window_tokens += used
            if not config.deepspeed:
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if global_step % config.log_every == 0:
                elapsed = time.perf_counter() - window_started
                _log(
                    rank,
                    f"epoch {epoch} step {global_step}: loss {loss_sum / micro_count:.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} "
                    f"{window_tokens * world / max(elapsed, 1e-9):.0f} tokens/s",
                )
                window_tokens, window_started = 0, time.perf_counter()
            if config.max_steps and global_step >= config.max_steps:
                partial = window is not windows[-1]
                break
        seconds = time.perf_counter() - started
        loss_total, count_total, tokens_total, computed_total = all_sum([loss_sum, micro_count, tokens, computed])
        seconds = max(all_sum([seconds])[0] / world, 1e-9)
        record = {
            "epoch": epoch,
            "step": global_step,
            "train_loss": loss_total / max(count_total, 1),
            "tokens": int(tokens_total),
            "seconds": seconds,
            "tokens_per_s": tokens_total / seconds,
            "computed_tokens": int(computed_total),
            "partial": partial,
            "workers": world,
            "torch_threads": torch.get_num_threads(),
            "valid": {},
        }

        # ---- checkpoint --------------------------------------------------------------
        out = tempfile.mkdtemp(prefix=f"trsr-epoch{epoch}-")
        if config.deepspeed:
            ds_dir = os.path.join(out, DEEPSPEED_DIR)
            os.makedirs(ds_dir, exist_ok=True)  # DeepSpeed creates it on rank 0 only
            engine.save_checkpoint(ds_dir, tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            peft_model.save_pretrained(os.path.join(out, ADAPTER_DIR))
            if not config.deepspeed:
                torch.save(
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                    os.path.join(out, OPTIMIZER_FILE),
                )
            if valid_fn is not None:
                forward.eval()
                metrics = valid_fn(os.path.join(out, ADAPTER_DIR), epoch)
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
                        "epoch": epoch,
                        "step": global_step,
                        "train_loss": record["train_loss"],
                        "fingerprint": run_fingerprint,
                        "config": config.model_dump(mode="json"),
                        "history": history,
                        "examples": encoded.texts,
                        "dropped_overlong": encoded.dropped,
                    },
                    handle,
                    indent=2,
                )
        metrics = {key: record[key] for key in ("epoch", "step", "train_loss", "tokens_per_s")}
        metrics.update(record["valid"])
        _log(rank, f"epoch {epoch} done: loss {record['train_loss']:.4f}, {record['tokens_per_s']:.0f} tokens/s")
        has_files = rank == 0 or config.deepspeed
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(out) if has_files else None,
            checkpoint_dir_name=f"epoch-{epoch:03d}",
        )
        shutil.rmtree(out, ignore_errors=True)
        if config.max_steps and global_step >= config.max_steps:
            break


# ---------------------------------------------------------------------------- driver


def run_dir(storage_path: str, config: TrainConfig) -> str:
    return storage.join(_absolute(storage_path), config.run_name)


def _absolute(path: str) -> str:
    return str(path) if storage.is_remote(path) else os.path.abspath(path)


def _stored_states(folder: str) -> list[dict]:
    """trainer_state.json of each epoch checkpoint under a run folder, by epoch."""
    fs = storage.fsspec_filesystem(folder)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    pattern = posixpath.join(folder, "epoch-*", STATE_FILE) if storage.is_remote(folder) else os.path.join(folder, "epoch-*", STATE_FILE)
    states = []
    for found in fs.glob(pattern):
        path = found if not storage.is_remote(folder) or found.startswith("s3://") else "s3://" + found
        try:
            states.append(storage.read_json(path))
        except (OSError, ValueError):
            continue
    return sorted(states, key=lambda s: s["epoch"])


def _complete(state: dict, config: TrainConfig) -> bool:
    return state["epoch"] >= config.epochs or bool(config.max_steps and state["step"] >= config.max_steps)


def _ray_filesystem(path: str):
    """The pyarrow filesystem (and inner path) Ray Train persists checkpoints with.

    Like `storage.arrow_filesystem`, but credentials set in this process's environment
    travel inside the (pickled) filesystem: Ray Train's controller actor also writes
    to storage and may not share the driver's environment (a cluster started before
    the variables were set). Without such variables the remote side resolves its own
    credentials (instance roles)."""
    import pyarrow.fs as pafs
    import s3fs

    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["token"] = os.environ["AWS_SESSION_TOKEN"]
    if os.environ.get("AWS_DEFAULT_REGION"):
        kwargs["client_kwargs"] = {"region_name": os.environ["AWS_DEFAULT_REGION"]}
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, **kwargs)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path[len("s3://") :]


def _checkpoint_uri(folder: str, epoch: int) -> str:
    return storage.join(folder, f"epoch-{epoch:03d}")


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
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter with Ray Train; returns the run's summary.

    `train_texts`: examples (see module doc) or a Parquet path (whose optional `group`
    column gives the groups). `groups`: a group key per example (the ranking list), for
    prefix sharing (`config.share_prefix`). `valid_fn(adapter_dir,
    epoch) -> metrics` runs after each epoch. Checkpoints go to
    `<storage_path>/<run_name>/epoch-NNN/` (local or s3://). The summary holds
    `history` (per epoch: train_loss, step, tokens, tokens_per_s, valid metrics,
    checkpoint), `train_loss` (per epoch), `checkpoints`, `best_epoch`,
    `best_checkpoint`, `best_adapter`, `tokens_per_s` (of the epochs this call ran),
    `resumed_from_epoch` and `epochs_run`.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoConfig, AutoTokenizer

    from trsr.llm.models import resolve
    from trsr.ray_utils import init_ray, require_resources

    if config.valid_metric and valid_fn is None:
        raise ConfigError(f"train.valid_metric={config.valid_metric!r} is set but no valid_fn was given")
    if isinstance(train_texts, str):
        examples, stored_groups = read_examples(train_texts)
        groups = groups if groups is not None else stored_groups
    else:
        examples = normalize_examples(train_texts)
    if not examples:
        raise ConfigError("no training examples")
    folder_of_model = resolve(config.model)
    tokenizer = AutoTokenizer.from_pretrained(folder_of_model)
    share = config.share_prefix and groups is not None
    if share and within_sliding_window(AutoConfig.from_pretrained(folder_of_model), config.max_length):
        log.warning("train.share_prefix: the model's sliding window is shorter than max_length; texts train separately")
        share = False
    encoded = encode_examples(
        tokenizer, examples, loss=config.loss, max_length=config.max_length, overlong=config.overlong,
        groups=groups, share_prefix=share,
    )
    micro_batches = len(epoch_batches([row.texts for row in encoded.rows], config.seed, 1, config.per_device_batch_size))
    if micro_batches < config.workers:
        raise ConfigError(
            f"{encoded.texts} training examples make {micro_batches} micro-batch(es) of up to "
            f"{config.per_device_batch_size}: too few for {config.workers} workers"
        )
    run_fingerprint = config.resume_fingerprint(data_fingerprint(examples, groups if share else None))

    folder = run_dir(storage_path, config)
    fs = storage.fsspec_filesystem(folder)
    previous = _stored_states(folder) if fs.exists(folder) else []
    if not resume and fs.exists(folder):
        fs.rm(folder, recursive=True)
        previous = []
    if previous and previous[-1].get("fingerprint") != run_fingerprint:
        raise ConfigError(
            f"{folder} holds checkpoints of a different training setup (model, LoRA, optimizer, "
            "batching, loss, seed, workers or data differ); resume it with the same settings "
            "(only epochs and max_steps may change), use another storage_path or run_name, or "
            "pass resume=False to start over"
        )
    resumed_from = previous[-1]["epoch"] if previous else 0
    if previous and _complete(previous[-1], config):
        return summarize_run(previous[-1], folder, config, resumed_from, 0.0)

    init_ray()
    require_resources(
        "train", gpus=config.workers if config.use_gpu else 0, cpus=config.workers * config.cpus_per_worker
    )
    if storage.is_remote(storage_path):
        filesystem, inner = _ray_filesystem(_absolute(storage_path))
    else:
        filesystem, inner = None, _absolute(storage_path)
        os.makedirs(inner, exist_ok=True)
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "encoded": ray.put(encoded),
            "valid_fn": valid_fn,
            "fingerprint": run_fingerprint,
        },
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=inner,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=config.max_failures),
            worker_runtime_env={"env_vars": _worker_env(config.use_gpu)},
        ),
    )
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started

    states = _stored_states(folder)
    if not states:
        raise TrsrError(f"training finished but no checkpoint was found under {folder}")
    return summarize_run(states[-1], folder, config, resumed_from, wall)


def summarize_run(state: dict, folder: str, config: TrainConfig, resumed_from: int = 0, wall: float = 0.0) -> dict:
    history = [dict(record, checkpoint=_checkpoint_uri(folder, record["epoch"])) for record in state["history"]]
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
        "tokens_per_s": tokens / seconds if seconds else None,
        "resumed_from_epoch": resumed_from,
        "epochs_run": [r["epoch"] for r in ran],
        "wall_seconds": wall,
    }


def copy_adapter(checkpoint_path: str, dest: str) -> str:
    """Copy the adapter of a checkpoint (an `epoch-NNN` folder, or its `adapter/`
    folder; local or s3://) to the local folder `dest`, which then is a PEFT adapter
    folder for `EngineConfig.lora_adapter` (transformers and vLLM). Returns `dest`."""
    source = str(checkpoint_path).rstrip("/")
    if not storage.exists(storage.join(source, "adapter_config.json")):
        source = storage.join(source, ADAPTER_DIR)
    if not storage.exists(storage.join(source, "adapter_config.json")):
        raise InputFileError(f"{checkpoint_path}: no LoRA adapter (adapter_config.json) in this checkpoint")
    fs = storage.fsspec_filesystem(source)
    os.makedirs(dest, exist_ok=True)
    for found in fs.ls(source, detail=False):
        name = posixpath.basename(str(found).rstrip("/"))
        path = storage.join(source, name)
        if fs.isdir(found):
            continue
        with storage.open_binary(path) as reader, open(os.path.join(dest, name), "wb") as writer:
            shutil.copyfileobj(reader, writer)
    return dest
