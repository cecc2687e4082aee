"""The model side of a LoRA run, inside a Ray Train worker: the base model with LoRA,
the optimizer (DeepSpeed ZeRO-2, or torch AdamW wrapped in DDP for several workers) and
what a checkpoint restores into them. The checkpoint layout is `train_state`'s; the
loop that drives them is `train_loop`'s."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from trsr.errors import ConfigError, TrsrError
from trsr.llm.adapters import ADAPTER_DIR
from trsr.recommend.config import TrainConfig
from trsr.recommend.train_state import DEEPSPEED_DIR, DEEPSPEED_TAG, FULL_OPTIMIZER_FILE, OPTIMIZER_FILE, STATE_FILE


@dataclass
class Trainee:
    """What the train loop works with."""

    forward: Any  # what batches go through: the DeepSpeed engine, DDP or the PEFT model
    peft_model: Any  # what save_pretrained writes (the LoRA adapter only)
    optimizer: Any  # torch AdamW, or DeepSpeed's ZeRO optimizer around it
    engine: Any | None  # the DeepSpeed engine (None on the torch path)
    trainable: list  # the LoRA parameters
    pad_id: int
    dtype: Any  # the weights' dtype (bf16 on GPU, fp32 on CPU)


def lora_model(config: TrainConfig, device):
    """The base model with LoRA on `device` (seeded: every rank starts from the same
    adapter), its pad token id and its dtype."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trsr.llm.models import resolve
    from trsr.llm.tokenizer import load_tokenizer

    folder = resolve(config.model)
    pad_id = load_tokenizer(folder).pad_token_id  # the end-of-sequence token when the model has no pad
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
    return model, pad_id, dtype


def restore(checkpoint, model, run_fingerprint: str) -> tuple[dict, str]:
    """Ray Train's checkpoint into a local folder, its state (trainer_state.json) and
    its LoRA weights into `model`; returns (state, folder). The caller removes the
    folder once the optimizer state is loaded too (`trainee`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = tempfile.mkdtemp(prefix="trsr-restore-")
    checkpoint.to_directory(folder)
    with open(os.path.join(folder, STATE_FILE)) as handle:
        state = json.load(handle)
    if state.get("fingerprint") != run_fingerprint:
        raise ConfigError(
            "the checkpoint in storage comes from a different training setup; use another "
            "storage_path/run_name or resume=False"
        )
    set_peft_model_state_dict(model, load_file(os.path.join(folder, ADAPTER_DIR, "adapter_model.safetensors")))
    return state, folder


def trainee(config: TrainConfig, model, pad_id: int, dtype, world: int, device, restored: str | None, state: dict) -> Trainee:
    """The optimizer around `model` (and its state from the `restored` checkpoint folder)."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.deepspeed:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            config=deepspeed_config(config, world),
            dist_init_required=False,
        )
        if restored and int(state.get("workers", world)) == world:
            path, _ = engine.load_checkpoint(
                os.path.join(restored, DEEPSPEED_DIR),
                tag=DEEPSPEED_TAG,
                load_module_strict=False,  # frozen base weights are not in the checkpoint
                load_optimizer_states=True,
                load_lr_scheduler_states=False,  # the LR follows the texts trained (state)
            )
            if path is None:
                raise TrsrError("DeepSpeed could not load the optimizer state of the checkpoint")
        elif restored:
            # Saved by another number of workers: the ZeRO partitions differ (see
            # deepspeed_config); the LoRA weights came from adapter/ (restore).
            full = torch.load(
                os.path.join(restored, DEEPSPEED_DIR, FULL_OPTIMIZER_FILE), map_location="cpu", weights_only=True
            )
            deepspeed_load_full_state(engine, full)
        # DeepSpeed's exclude_frozen_parameters misses frozen weights that are tied
        # (named_parameters() lists a shared tensor once, under its first name): a tied
        # lm_head (SmolLM2) would go into every checkpoint. Keep the trainable ones only.
        trainable_names = {name for name, p in engine.module.named_parameters() if p.requires_grad}
        engine_state_dict = engine.module_state_dict

        def lora_state_dict(*args, **kwargs):
            full = engine_state_dict(*args, **kwargs)
            return type(full)((k, v) for k, v in full.items() if k in trainable_names)

        engine.module_state_dict = lora_state_dict
        return Trainee(engine, engine.module, engine.optimizer, engine, trainable, pad_id, dtype)
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
    )
    if restored:
        # Replicated on every rank, so it loads under any number of workers.
        saved = torch.load(os.path.join(restored, OPTIMIZER_FILE), map_location=device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Trainee(forward, model, optimizer, None, trainable, pad_id, dtype)


def deepspeed_config(config: TrainConfig, world: int) -> dict:
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
        # workers goes through FULL_OPTIMIZER_FILE instead (deepspeed_full_state).
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


def adam_steps(optimizer) -> int:
    """AdamW's step counter (DeepSpeed's ZeRO optimizer wraps the torch one): tells
    whether a resumed run really continued the optimizer state."""
    base = getattr(optimizer, "optimizer", optimizer)
    for group in base.param_groups:
        for param in group["params"]:
            found = base.state.get(param, {})
            if "step" in found:
                return int(float(found["step"]))
    return 0


def deepspeed_full_state(engine, optimizer) -> dict:
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
    return {"step": adam_steps(optimizer), "params": params}


def deepspeed_load_full_state(engine, saved: dict) -> None:
    """Load `deepspeed_full_state` into this engine's partitions (any number of workers).

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
