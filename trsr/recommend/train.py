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

import contextlib
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
from trsr.errors import ConfigError, TrsrError
from trsr.llm.adapters import ADAPTER_DIR
from trsr.llm.models import DEFAULT_LLM
from trsr.llm.packing import within_sliding_window
from trsr.recommend.train_data import (
    Example,
    StepFiller,
    TrainingRow,
    collate,
    micro_batches,
    mix_seed,
    weighted_loss_sum,
)
from trsr.recommend.train_ingest import ray_filesystem as _ray_filesystem

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
# DeepSpeed: every parameter's optimizer state whole, for a resume with other workers.
FULL_OPTIMIZER_FILE = "optimizer_full.pt"
# Ray Train's retention score: every epoch end above every step checkpoint, newer above older.
RETENTION = "retention"
_EPOCH_RETENTION = 1e12

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
    # Prefix-shared groups equal separate texts exactly only with 0 (train_data).
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
    # Texts per micro-batch on one worker (a group larger than this is a micro-batch alone).
    per_device_batch_size: int = Field(1, ge=1)
    # Micro-batches per worker and optimizer step: with effective_batch null, the step is
    # workers x per_device_batch_size x gradient_accumulation texts.
    gradient_accumulation: int = Field(64, ge=1)
    # Texts per optimizer step over all workers (groups are never split, so about this
    # many); null = workers x per_device_batch_size x gradient_accumulation. Set it to keep
    # the step when the number of workers changes (a resume with other workers).
    effective_batch: int | None = Field(None, ge=1)
    max_length: int = Field(2048, ge=2)
    # Texts longer than max_length tokens: "error" (default) or "drop" them (counted).
    overlong: Literal["error", "drop"] = "error"
    # "full": next-token loss over the whole text (paper); "answer": the answer tokens only.
    loss: Literal["full", "answer"] = "full"
    # Grouped examples (the candidates of one list): run the shared prompt prefix through
    # the model once per group (same loss and gradient as separate texts, less work).
    share_prefix: bool = True
    # Groups each worker reshuffles its shard within, per epoch (Ray Data's local shuffle
    # buffer; the groups arrive in a fixed seeded order); 0 = the same order every epoch.
    shuffle_buffer: int = Field(1024, ge=0)
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
    # Print loss, learning rate, texts/step and tokens/s every this many steps (rank 0).
    log_every: int = Field(10, ge=1)
    # A checkpoint every this many optimizer steps, besides every epoch end; null = at
    # epoch ends only. A failed or killed run continues from the latest one.
    checkpoint_every_steps: int | None = Field(None, ge=1)
    # Metric of valid_fn that picks the best epoch, and its direction; null = last epoch.
    valid_metric: str | None = None
    valid_mode: Literal["max", "min"] = "max"
    # Folder under storage_path that holds this run's checkpoints (Ray's run name).
    run_name: str = "lora"
    # Ray Train restarts after worker failures (each continues from the latest
    # checkpoint, a step checkpoint included); -1 = without limit.
    max_failures: int = Field(2, ge=-1)

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
        """Texts per optimizer step over all workers (about: groups are not split)."""
        if self.effective_batch is not None:
            return self.effective_batch
        return self.workers * self.per_device_batch_size * self.gradient_accumulation

    def resume_fingerprint(self, data_fingerprint: str) -> str:
        """What a resumed run must share with the run it continues (not epochs, caps,
        logging, validation, checkpoint cadence or resources such as the workers)."""
        keys = (
            "model", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "lora_top_layers",
            "learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm",
            "max_length", "overlong", "loss", "share_prefix", "shuffle_buffer", "use_gpu",
            "deepspeed", "cpu_bf16", "seed",
        )
        # Validated again with every value given, so that a default (16) and the same
        # value read back from JSON or YAML (16.0) fingerprint alike.
        checked = TrainConfig.model_validate({name: getattr(self, name) for name in TrainConfig.model_fields})
        setup = {key: getattr(checked, key) for key in keys}
        setup["effective_batch_size"] = self.effective_batch_size
        return fingerprint(setup, data_fingerprint)


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


# ------------------------------------------------------------------------ train loop


def _log(rank: int, message: str) -> None:
    # In Ray Train workers the root logger shows INFO (Ray Train sets it up).
    if rank == 0:
        log.info("[trsr.train] %s", message)


def _deepspeed_config(config: TrainConfig, world: int) -> dict:
    # The train loop sets the accumulation boundaries and the LR itself (the steps have
    # texts, not a fixed count of micro-batches); these sizes only satisfy DeepSpeed's
    # consistency check.
    on_gpu = config.use_gpu
    return {
        "train_micro_batch_size_per_gpu": config.per_device_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation,
        "train_batch_size": config.per_device_batch_size * config.gradient_accumulation * world,
        # No elastic_checkpoint: DeepSpeed 0.19's engine refuses a ZeRO checkpoint of
        # another data-parallel size before its elastic restore runs, and that restore
        # asserts on torch AdamW (its step is per parameter, not per group). A change of
        # workers goes through FULL_OPTIMIZER_FILE instead (_deepspeed_full_state).
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


def _adam_steps(optimizer) -> int:
    """AdamW's step counter (DeepSpeed's ZeRO optimizer wraps the torch one): tells
    whether a resumed run really continued the optimizer state."""
    base = getattr(optimizer, "optimizer", optimizer)
    for group in base.param_groups:
        for param in group["params"]:
            found = base.state.get(param, {})
            if "step" in found:
                return int(float(found["step"]))
    return 0


def _deepspeed_full_state(engine, optimizer) -> dict:
    """Each trainable parameter's fp32 weights and AdamW moments, gathered whole from the
    ZeRO-2 partitions (DeepSpeed's tensor-fragment API; a collective, every rank calls
    it), and AdamW's step: a state that any number of workers can load."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            params[name] = {
                "fp32": safe_get_full_fp32_param(param).cpu(),
                **{key: safe_get_full_optimizer_state(param, key).cpu() for key in ("exp_avg", "exp_avg_sq")},
            }
    return {"step": _adam_steps(optimizer), "params": params}


def _deepspeed_load_full_state(engine, saved: dict) -> None:
    """Load `_deepspeed_full_state` into this engine's partitions (any number of workers).

    Torch AdamW creates its state at the first step; the state of each flat fp32
    partition is created here instead (zeros, the saved step), linked to the parameters'
    fragments as DeepSpeed does after its first step, then filled from the saved values."""
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = engine.optimizer
    base = zero.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            base.state[flat] = {
                "step": torch.tensor(float(saved["step"]), dtype=torch.float32),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
    zero._lazy_init_hp_params_optimizer_state()
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            values = saved["params"][name]
            safe_set_full_fp32_param(param, values["fp32"].to(param.device))
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, values[key].to(param.device), key)


def _train_loop(loop_config: dict) -> None:
    """Ray Train worker function (module level, so workers import it by name)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from trsr.recommend.train_ingest import shard_rows

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
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "texts_done": 0.0, "position": None}
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
        if restore_dir:
            shutil.rmtree(restore_dir, ignore_errors=True)
        return

    batch_texts = config.effective_batch_size
    total_steps = planned_steps(int(data["texts"]), config)

    # ---- engine ------------------------------------------------------------------
    if config.deepspeed:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            config=_deepspeed_config(config, world),
            dist_init_required=False,
        )
        if restore_dir and int(state.get("workers", world)) == world:
            path, _ = engine.load_checkpoint(
                os.path.join(restore_dir, DEEPSPEED_DIR),
                tag=DEEPSPEED_TAG,
                load_module_strict=False,  # frozen base weights are not in the checkpoint
                load_optimizer_states=True,
                load_lr_scheduler_states=False,  # the LR follows the texts trained (state)
            )
            if path is None:
                raise TrsrError("DeepSpeed could not load the optimizer state of the checkpoint")
        elif restore_dir:
            # Saved by another number of workers: the ZeRO partitions differ (see
            # _deepspeed_config); the LoRA weights came from adapter/ above.
            full = torch.load(
                os.path.join(restore_dir, DEEPSPEED_DIR, FULL_OPTIMIZER_FILE), map_location="cpu", weights_only=True
            )
            _deepspeed_load_full_state(engine, full)
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
        optimizer = engine.optimizer
    else:
        optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=config.weight_decay,
        )
        if restore_dir:
            # Replicated on every rank, so it loads under any number of workers.
            saved = torch.load(os.path.join(restore_dir, OPTIMIZER_FILE), map_location=device, weights_only=True)
            optimizer.load_state_dict(saved["optimizer"])
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
            full = _deepspeed_full_state(engine, optimizer)
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
            metrics[RETENTION] = _EPOCH_RETENTION + global_step
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
            "optimizer_steps": _adam_steps(optimizer),
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


# ---------------------------------------------------------------------------- driver


def run_dir(storage_path: str, config: TrainConfig) -> str:
    return storage.join(_absolute(storage_path), config.run_name)


def _absolute(path: str) -> str:
    return str(path) if storage.is_remote(path) else os.path.abspath(path)


def _registered(folder: str) -> set[str] | None:
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


def _read_states(folder: str, prefix: str) -> list[dict]:
    fs = storage.fsspec_filesystem(folder)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    join = posixpath.join if storage.is_remote(folder) else os.path.join
    registered = _registered(folder)
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


def _stored_states(folder: str) -> list[dict]:
    """trainer_state.json of each epoch-end checkpoint under a run folder, by epoch."""
    return sorted(_read_states(folder, "epoch"), key=lambda s: s["epoch"])


def _latest_state(folder: str) -> dict | None:
    """The state of the run's latest checkpoint, epoch end or mid-epoch step."""
    states = _read_states(folder, "epoch") + _read_states(folder, "step")
    if not states:
        return None
    return max(states, key=lambda s: (s["step"], s.get("kind", "epoch") == "epoch"))


def _complete(state: dict, config: TrainConfig) -> bool:
    return state["epoch"] >= config.epochs or bool(config.max_steps and state["step"] >= config.max_steps)


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
    `resumed_from_epoch`, `resumed_from_step` and `epochs_run`.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoConfig

    from trsr.llm.models import resolve
    from trsr.ray_utils import init_ray, require_resources
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
    previous = _latest_state(folder) if fs.exists(folder) else None
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
    if previous is not None and _complete(previous, config):
        states = _stored_states(folder)
        return summarize_run(states[-1] if states else previous, folder, config, resumed_from, 0.0, resumed_step)

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
    ingest = DataConfig.default_ingest_options()
    # preserve_order: the streaming split then hands out blocks in a fixed order (no
    # locality reordering), so a worker's shard is the same in every run.
    ingest.preserve_order = True
    trainer = TorchTrainer(
        _train_loop,
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
            worker_runtime_env={"env_vars": _worker_env(config.use_gpu)},
        ),
    )
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started

    states = _stored_states(folder)
    if not states:
        raise TrsrError(f"training finished but no checkpoint was found under {folder}")
    return summarize_run(states[-1], folder, config, resumed_from, wall, resumed_step)


def summarize_run(
    state: dict, folder: str, config: TrainConfig, resumed_from: int = 0, wall: float = 0.0, resumed_step: int = 0
) -> dict:
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
        "data": state.get("data"),
        "tokens_per_s": tokens / seconds if seconds else None,
        "resumed_from_epoch": resumed_from,
        "resumed_from_step": resumed_step,
        "epochs_run": [r["epoch"] for r in ran],
        "wall_seconds": wall,
    }
