"""LoRA fine-tuning (trsr.recommend.train): labels, batching, and Ray Train runs on the
tiny random Llama (plain torch and DeepSpeed ZeRO-2, 1 and 2 workers, resume, S3)."""

from __future__ import annotations

import json
import os
import random

import pytest

from trsr.errors import ConfigError
from trsr.recommend.train import TrainConfig, copy_adapter, lr_factor, train_lora
from trsr.recommend.train_data import (
    IGNORE_INDEX,
    collate,
    encode_examples,
    epoch_batches,
    normalize_examples,
    pack_group,
    tokenize_example,
    weighted_loss,
    worker_batches,
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
        encode_examples(tokenizer, examples, loss="full", max_length=32)
    kept = encode_examples(tokenizer, examples, loss="full", max_length=32, overlong="drop")
    assert kept.texts == len(kept.rows) == 1 and kept.dropped == 1


def test_epochs_shuffle_with_the_seed_and_split_evenly_across_workers():
    sizes = [1] * 11
    shards = [worker_batches(sizes, seed=3, epoch=1, rank=r, world=2, batch=2) for r in range(2)]
    flat = [[i for b in shard for i in b] for shard in shards]
    assert len(shards[0]) == len(shards[1]) == 3 and not set(flat[0]) & set(flat[1])
    assert worker_batches(sizes, 3, 1, 0, 2, 2) == shards[0]  # seeded
    assert worker_batches(sizes, 3, 2, 0, 2, 2) != shards[0]  # reshuffled per epoch
    # Groups (rows of several texts) are never split; a batch holds at most `batch` texts
    # unless one group alone is larger.
    grouped = [2, 3, 2, 5, 1, 2, 2]
    batches = epoch_batches(grouped, seed=0, epoch=1, batch=4)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(sum(grouped[i] for i in b) <= 4 or len(b) == 1 for b in batches)
    linear = TrainConfig(model="x", warmup_steps=2, lr_schedule="linear")
    assert [round(lr_factor(s, 6, linear), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_pack_group_shares_the_common_prefix_with_counted_predictions():
    # Two texts with 3 common tokens, answers from token 3 on.
    texts = [([1, 2, 3, 4, 5], 3), ([1, 2, 3, 6], 3)]
    row = pack_group(texts, loss="answer")
    # Prefix: the common tokens but the last (its prediction of token 3 is common too).
    assert row.ids.tolist() == [1, 2, 3, 4, 5, 3, 6]
    assert row.positions.tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert row.segments.tolist() == [0, 0, 1, 1, 1, 2, 2]
    learned = [(int(t), float(w)) for t, w in zip(row.targets, row.weights) if w]
    assert learned == [(4, 1.0), (5, 1.0), (6, 1.0)]  # each answer token once
    full = pack_group(texts, loss="full")
    # Full loss: the prefix predictions (tokens 2 and 3) count once per text.
    assert full.weights.tolist() == [2, 2, 1, 1, 0, 1, 0]
    assert full.targets.tolist()[:4] == [2, 3, 4, 5]
    assert row.text_tokens == 9 and row.texts == 2
    alone = pack_group([([7, 8, 9], 1)], loss="answer", share=False)
    assert alone.ids.tolist() == [7, 8, 9] and alone.weights.tolist() == [1, 1, 0]


@pytest.mark.parametrize("loss", ["answer", "full"])
def test_prefix_shared_rows_give_the_loss_and_gradients_of_separate_texts(tiny_model, loss):
    """One forward/backward pass per group (shared prefix, 4D mask) = the separate texts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(5)
    examples, groups = [], []
    for user in range(3):
        history = " ".join(rng.choice(NOUNS) for _ in range(4 + 3 * user))
        for candidate in range(2 + user):  # groups of 2, 3 and 4 texts
            prompt = f"history: {history}\ncandidate: {rng.choice(NOUNS)} {candidate}\nAnswer:"
            examples.append((prompt + (" Yes" if candidate == 0 else " No"), len(prompt)))
            groups.append(f"u{user}")
    shared = encode_examples(tokenizer, examples, loss=loss, max_length=64, groups=groups)
    separate = encode_examples(tokenizer, examples, loss=loss, max_length=64)
    assert len(shared.rows) == 3 and len(separate.rows) == 9 and shared.texts == separate.texts == 9
    assert shared.text_tokens == separate.text_tokens and shared.row_tokens < 0.7 * separate.row_tokens

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    def loss_and_grads(encoded):
        model.zero_grad()
        batch = collate(encoded.rows, tokenizer.pad_token_id or 0, "cpu", mask_dtype=torch.float32)
        value = weighted_loss(model(**batch["inputs"]).logits, batch["targets"], batch["weights"])
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return float(value.detach()), grads, batch["tokens"]

    loss_shared, grads_shared, computed = loss_and_grads(shared)
    loss_separate, grads_separate, _ = loss_and_grads(separate)
    assert computed == shared.row_tokens
    assert loss_shared == pytest.approx(loss_separate, rel=1e-5)
    for name, grad in grads_separate.items():
        torch.testing.assert_close(grads_shared[name], grad, rtol=1e-4, atol=1e-6)


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
    # Pairs of texts as groups: each micro-batch is one prefix-shared row (4D mask).
    groups = [f"pair{i // 2}" for i in range(16)]
    result = train_lora(config, toy_examples(16, seed=3), storage_path=str(tmp_path / "runs"), groups=groups)
    assert result["steps"] == 2  # 16 examples / (2 workers x 2 per device x 2 accumulation)
    epoch = result["history"][0]
    assert epoch["computed_tokens"] < epoch["tokens"]

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
