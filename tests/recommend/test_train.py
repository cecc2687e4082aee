"""LoRA fine-tuning (trsr.recommend.train): labels, batching, and Ray Train runs on the
tiny random Llama (plain torch and DeepSpeed ZeRO-2, 1 and 2 workers, resume, S3)."""

from __future__ import annotations

import json
import os
import random

import pytest

from trsr.errors import ConfigError
from trsr.recommend.train import (
    IGNORE_INDEX,
    TrainConfig,
    copy_adapter,
    encode_examples,
    lr_factor,
    normalize_examples,
    shard_batches,
    tokenize_example,
    train_lora,
)

NOUNS = ["apple", "car", "shirt", "lamp", "book", "chair", "phone", "hat", "cup", "desk"]


def toy_examples(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion): the answer is " Yes" for blue items and " No" for red ones.

    The random tiny model prefers " Yes" for red (AUC 0 before training), so a high AUC
    afterwards can only come from what the adapter learned."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        liked = i % 2 == 0
        prompt = f"item: {'blue' if liked else 'red'} {rng.choice(NOUNS)}\nDoes the user like it? Answer:"
        out.append((prompt, " Yes" if liked else " No"))
    return out


def auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def held_out_auc(model: str, adapter: str | None, examples) -> float:
    from trsr.llm.engine import EngineConfig, build_engine

    config = EngineConfig(
        backend="transformers", model=model, dtype="float32", max_model_len=64, batch_size=8,
        lora_adapter=adapter,
    )
    with build_engine(config) as engine:
        # (prefix, [suffix]): the engine scores the next token after prefix + suffix.
        out = engine.yes_no_logprobs([(p[:5], [p[5:]]) for p, _ in examples], yes=" Yes", no=" No")
    return auc([yes - no for ((yes, no),) in out], [a == " Yes" for _, a in examples])


def small(model: str, **overrides) -> TrainConfig:
    base = dict(
        model=model, max_length=64, per_device_batch_size=2, gradient_accumulation=2,
        lr_schedule="constant", learning_rate=5e-3, epochs=1, log_every=2,
    )
    base.update(overrides)
    return TrainConfig(**base)


# ------------------------------------------------------------------ no Ray needed


def test_answer_loss_masks_the_prompt(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt, completion = "item: blue car\nDoes the user like it? Answer:", " Yes<|im_end|>"
    text = prompt + completion
    answer = tokenize_example(tokenizer, text, len(prompt), loss="answer")
    full = tokenize_example(tokenizer, text, len(prompt), loss="full")
    ids = answer["input_ids"]
    assert full["labels"] == ids == full["input_ids"]
    learned = [i for i, label in enumerate(answer["labels"]) if label != IGNORE_INDEX]
    # Exactly the answer's tokens (" Yes" and the end-of-turn token) are labels, at the end.
    assert tokenizer.decode([ids[i] for i in learned]) == completion
    assert learned == list(range(len(ids) - len(learned), len(ids)))
    assert all(label == IGNORE_INDEX for label in answer["labels"][: learned[0]])
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and learned[0] == len(prompt_ids)

    # A token that straddles the boundary ("Answer: " + "Yes" -> "Answer:", " Yes") is answer.
    straddle = tokenize_example(tokenizer, "Answer: Yes", len("Answer: "), loss="answer")
    kept = [t for t, label in zip(straddle["input_ids"], straddle["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(kept) == " Yes"


def test_example_forms_are_unambiguous():
    assert normalize_examples([("ab", "c")]) == [("abc", 2)]
    assert normalize_examples([("abc", 2)]) == [("abc", 2)]
    assert normalize_examples([{"prompt": "ab", "completion": "c"}, {"text": "abc", "answer_start": 1}]) == [
        ("abc", 2), ("abc", 1)
    ]
    for bad in ([("abc", 3)], [("abc", -1)], [("ab", "")], [("abc", 1.5)], [{"text": "abc"}], ["abc"]):
        with pytest.raises(ValueError):
            normalize_examples(bad)


def test_overlong_texts_fail_or_are_dropped(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = normalize_examples([("short prompt:", " Yes"), ("word " * 80 + "Answer:", " No")])
    with pytest.raises(ConfigError, match="longer than max_length"):
        encode_examples(tokenizer, examples, TrainConfig(model=tiny_model, max_length=32))
    kept = encode_examples(tokenizer, examples, TrainConfig(model=tiny_model, max_length=32, overlong="drop"))
    assert len(kept.ids) == 1 and kept.dropped == 1


def test_epochs_shuffle_with_the_seed_and_split_evenly_across_workers():
    shards = [shard_batches(11, seed=3, epoch=1, rank=r, world=2, batch=2) for r in range(2)]
    flat = [[i for b in shard for i in b] for shard in shards]
    assert len(flat[0]) == len(flat[1]) == 5 and not set(flat[0]) & set(flat[1])
    assert shard_batches(11, 3, 1, 0, 2, 2) == shards[0]  # seeded
    assert shard_batches(11, 3, 2, 0, 2, 2) != shards[0]  # reshuffled per epoch
    linear = TrainConfig(model="x", warmup_steps=2, lr_schedule="linear")
    assert [round(lr_factor(s, 6, linear), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


# ------------------------------------------------------------------ Ray Train runs


@pytest.mark.integration
def test_lora_learns_a_toy_task_and_validation_picks_the_best_epoch(tiny_model, ray_local, tmp_path):
    train, held_out = toy_examples(32, seed=0), toy_examples(20, seed=1)
    before = held_out_auc(tiny_model, None, held_out)

    def valid_fn(adapter_dir: str, epoch: int) -> dict:
        # Runs in the Ray Train worker: self-contained (no test-module globals).
        from trsr.llm.engine import EngineConfig, build_engine

        config = EngineConfig(backend="transformers", model=tiny_model, dtype="float32",
                              max_model_len=64, batch_size=8, lora_adapter=adapter_dir)
        with build_engine(config) as engine:
            out = engine.yes_no_logprobs([(p[:5], [p[5:]]) for p, _ in held_out], yes=" Yes", no=" No")
        scores = [yes - no for ((yes, no),) in out]
        pos = [s for s, (_, a) in zip(scores, held_out) if a == " Yes"]
        neg = [s for s, (_, a) in zip(scores, held_out) if a != " Yes"]
        value = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        return {"auc": value, "epoch_seen": epoch}

    config = small(
        tiny_model, deepspeed=False, loss="answer", learning_rate=1e-2, per_device_batch_size=4,
        gradient_accumulation=1, epochs=3, valid_metric="auc",
    )
    result = train_lora(config, train, valid_fn, storage_path=str(tmp_path / "runs"))

    losses = result["train_loss"]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], losses
    assert [r["valid"]["epoch_seen"] for r in result["history"]] == [1, 2, 3]
    best = max(result["history"], key=lambda r: r["valid"]["auc"])
    assert result["best_epoch"] == best["epoch"]
    assert result["tokens_per_s"] > 0 and result["steps"] == 3 * 8

    adapter = copy_adapter(result["best_checkpoint"], str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    after = held_out_auc(tiny_model, adapter, held_out)
    assert before < 0.3 and after >= 0.9, (before, after)
    assert after == pytest.approx(best["valid"]["auc"])


@pytest.fixture(scope="module")
def resumed_run(tiny_model, ray_local, tmp_path_factory):
    """DeepSpeed (1 worker): 1 epoch, then asked for 2 epochs with resume=True."""
    storage_path = str(tmp_path_factory.mktemp("resume"))
    examples = toy_examples(16, seed=2)
    first = train_lora(small(tiny_model, epochs=1), examples, storage_path=storage_path)
    second = train_lora(small(tiny_model, epochs=2), examples, storage_path=storage_path)
    return storage_path, examples, first, second


@pytest.mark.integration
def test_resume_continues_after_the_last_epoch(resumed_run, tiny_model):
    storage_path, examples, first, second = resumed_run
    assert first["epochs_run"] == [1] and first["steps"] == 4
    assert second["resumed_from_epoch"] == 1 and second["epochs_run"] == [2]
    assert second["steps"] == 8  # the step counter continued
    assert second["history"][0] == first["history"][0]  # epoch 1 was not run again
    assert [r["epoch"] for r in second["history"]] == [1, 2]
    assert len(second["checkpoints"]) == 2 and second["best_epoch"] == 2

    # A finished run returns at once; a different setup is refused, not mixed in.
    again = train_lora(small(tiny_model, epochs=2), examples, storage_path=storage_path)
    assert again["epochs_run"] == [] and again["history"] == second["history"]
    with pytest.raises(ConfigError, match="different training setup"):
        train_lora(small(tiny_model, epochs=3, lora_rank=4), examples, storage_path=storage_path)


@pytest.mark.integration
def test_deepspeed_zero2_on_two_cpu_workers(tiny_model, ray_local, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = small(tiny_model, workers=2, deepspeed=True, epochs=1)
    result = train_lora(config, toy_examples(16, seed=3), storage_path=str(tmp_path / "runs"))
    assert result["steps"] == 2  # 16 examples / (2 workers x 2 per device x 2 accumulation)

    checkpoint = result["best_checkpoint"]
    state_dir = os.path.join(checkpoint, "deepspeed", "state")
    files = sorted(os.listdir(state_dir))
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in files
    # Only the LoRA weights: the frozen (and tied) base weights stay out of the checkpoint.
    assert os.path.getsize(os.path.join(state_dir, "mp_rank_00_model_states.pt")) < 1_000_000
    with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
        assert json.load(handle)["history"][0]["workers"] == 2

    adapter = copy_adapter(checkpoint, str(tmp_path / "adapter"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained (B starts at 0)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.integration
def test_checkpoints_on_s3_match_the_resumed_local_run(resumed_run, tiny_model, s3_bucket, tmp_path):
    """The same setup as `resumed_run`, 2 epochs in one go, stored on S3 (moto): the
    same losses as the resumed run (resuming is exact), and the adapter comes back."""
    from trsr import storage

    _, examples, _, resumed = resumed_run
    result = train_lora(small(tiny_model, epochs=2), examples, storage_path=f"{s3_bucket}/train")
    assert result["checkpoints"][-1].startswith(f"{s3_bucket}/train/lora/epoch-002")
    assert storage.exists(storage.join(result["best_adapter"], "adapter_config.json"))
    assert result["train_loss"] == pytest.approx(resumed["train_loss"], rel=1e-5)

    adapter = copy_adapter(result["best_checkpoint"], str(tmp_path / "adapter"))
    assert os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))


def test_cpu_bf16_autocast_learns_the_toy_task_and_lora_top_layers_limits_the_adapter(tiny_model, ray_local, tmp_path):
    import json as json_

    from safetensors import safe_open

    train, held_out = toy_examples(32, seed=0), toy_examples(20, seed=1)
    config = small(
        tiny_model, deepspeed=False, loss="answer", learning_rate=1e-2, per_device_batch_size=4,
        gradient_accumulation=1, epochs=3, cpu_bf16=True, lora_top_layers=1,
    )
    result = train_lora(config, train, storage_path=str(tmp_path / "runs"))
    losses = result["train_loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    adapter = copy_adapter(result["best_checkpoint"], str(tmp_path / "adapter"))
    assert held_out_auc(tiny_model, adapter, held_out) >= 0.9
    # Only the top layer (index 1 of the tiny model's 2) carries LoRA weights.
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as handle:
        layers = {key.split("layers.")[1].split(".")[0] for key in handle.keys()}
    assert layers == {"1"}
    assert json_.load(open(os.path.join(adapter, "adapter_config.json")))["layers_to_transform"] == [1]


def test_cpu_bf16_with_deepspeed_or_gpu_is_refused(tiny_model):
    with pytest.raises(ValueError, match="cpu_bf16 applies to CPU training"):
        small(tiny_model, cpu_bf16=True)  # deepspeed defaults to true
