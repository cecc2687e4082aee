"""LoRA fine-tuning (trsr.recommend.train): labels, batching, and Ray Train runs on the
tiny random Llama (plain torch and DeepSpeed ZeRO-2, 1 and 2 workers, resume, S3)."""

from __future__ import annotations

import json
import os
import random

import pytest

from trsr import storage
from trsr.errors import ConfigError, InputFileError
from trsr.llm.adapters import copy_adapter
from trsr.recommend.config import TrainConfig
from trsr.recommend.train import train_lora
from trsr.recommend.train_loop import lr_factor, planned_steps
from trsr.recommend.train_data import (
    IGNORE_INDEX,
    encode_examples,
    normalize_examples,
    pack_group,
    tokenize_example,
)
from trsr.recommend.train_steps import StepFiller, collate, micro_batches, weighted_loss, weighted_loss_sum
from trsr.runs import RunFolder

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
    from trsr.llm.engine import EngineConfig
    from trsr.llm.factory import build_engine

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


def test_steps_take_about_the_effective_batch_in_whole_groups():
    class Row:
        def __init__(self, texts):
            self.texts = texts

    def steps_of(sizes, share):
        filler = StepFiller(iter([Row(n) for n in sizes]), share)
        out = []
        while rows := filler.next_step():
            out.append([row.texts for row in rows])
        return out

    # The paper's setting (batch 1 x 64 accumulation, 1:1 lists = groups of 2): 64 texts a
    # step, not 64 groups; micro-batches of 1 text hold one group each.
    pairs = steps_of([2] * 100, share=64)
    assert [sum(step) for step in pairs] == [64, 64, 64, 8]
    assert micro_batches([2] * 32, batch=1) == [[i] for i in range(32)]
    # Groups of 3 and a share of 4: whole groups, 4 texts a step on average (cumulative).
    threes = steps_of([3] * 10, share=4)
    assert [sum(step) for step in threes] == [3, 3, 6, 3, 3, 6, 3, 3]
    assert sum(map(sum, threes)) == 30 and all(n == 3 for step in threes for n in step)
    # A group larger than the share is a step of its own; no step is empty while rows are left.
    assert steps_of([5, 1, 1], share=2) == [[5], [1], [1]]
    # A resumed filler continues the cumulative quota.
    resumed = StepFiller(iter([Row(3)] * 6), 4, texts=12.0, steps=3)
    assert [[row.texts for row in resumed.next_step()] for _ in range(6)] == threes[3:] + [[]]
    # Micro-batches: at most `batch` texts of whole rows, in order; a larger row alone.
    assert micro_batches([2, 3, 2, 5, 1], batch=5) == [[0, 1], [2], [3], [4]]

    linear = TrainConfig(model="x", warmup_steps=2, lr_schedule="linear")
    assert [round(lr_factor(s, 6, linear), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    # The decay follows the texts trained (in effective batches), warmup the step count.
    assert lr_factor(3, 6, linear, position=3.5) == pytest.approx(0.625)
    assert lr_factor(1, 6, linear, position=3.5) == 1.0
    assert planned_steps(30, TrainConfig(model="x", epochs=2, effective_batch=4)) == 15
    assert planned_steps(30, TrainConfig(model="x", epochs=2, effective_batch=4, max_steps=5)) == 5
    assert TrainConfig(model="x", workers=2, per_device_batch_size=2, gradient_accumulation=3).effective_batch_size == 12


def test_the_step_gradient_does_not_depend_on_how_its_texts_are_split(tiny_model):
    """Loss = sum over the step's learned predictions / their count: any cut of the step
    into micro-batches (or workers, which average and are scaled back) gives the same
    gradient. The old per-micro-batch mean did not."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = normalize_examples(toy_examples(6, seed=4))
    encoded = encode_examples(tokenizer, examples, loss="full", max_length=64, groups=["a", "a", "b", "c", "c", "c"])
    rows = encoded.rows
    total = float(sum(row.weights.sum() for row in rows))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    def grads(cuts, per_micro_mean=False):
        model.zero_grad()
        for cut in cuts:
            batch = collate([rows[i] for i in cut], tokenizer.pad_token_id or 0, "cpu", mask_dtype=torch.float32)
            logits = model(**batch["inputs"]).logits
            if per_micro_mean:
                loss = weighted_loss(logits, batch["targets"], batch["weights"]) / len(cuts)
            else:
                loss = weighted_loss_sum(logits, batch["targets"], batch["weights"]) / total
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole = grads([[0, 1, 2]])
    for name, grad in grads([[0], [1, 2]]).items():
        torch.testing.assert_close(grad, whole[name], rtol=1e-4, atol=1e-6)
    old = grads([[0], [1, 2]], per_micro_mean=True)
    assert any(not torch.allclose(old[n], whole[n], rtol=1e-3, atol=1e-6) for n in whole)


def write_examples(folder, examples, groups=None, parts=2):
    """A Parquet folder of examples in `parts` files, plus what a stage folder also holds
    (a manifest, Ray Data checkpoint and input folders) that must not be read as examples."""
    import pyarrow as pa

    from trsr import storage

    write = storage.write_parquet
    table = pa.table(
        {
            "prompt": [p for p, _ in examples],
            "completion": [c for _, c in examples],
            **({"list_id": groups} if groups is not None else {}),
        }
    )
    size = -(-table.num_rows // parts)
    for part in range(parts):
        write(table.slice(part * size, size), storage.join(folder, f"part-{part}.parquet"))
    storage.write_json({"stage": "train"}, storage.join(folder, "_manifest.json"))
    write(pa.table({"junk": [1, 2]}), storage.join(folder, "_checkpoint", "state.parquet"))
    write(pa.table({"junk": [3]}), storage.join(folder, "_input", "part-0.parquet"))
    return folder


def test_ingest_stages_pack_like_encode_examples_and_ignore_non_data_files(tiny_model, tmp_path):
    """The Ray Data stages (tokenize, pack) give the rows encode_examples gives, in an
    order that depends on the seed, not on the input order; a folder's data files are its
    top-level *.parquet files."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from trsr.recommend import train_ingest

    examples = normalize_examples(toy_examples(6, seed=5))
    groups = ["u1", "u1", "u2", "u2", "u2", "u3"]

    def packed(order, seed=0):
        table = pa.table(
            {"text": [examples[i][0] for i in order], "answer_start": [examples[i][1] for i in order],
             "group": [groups[i] for i in order]}
        )
        tokenized = train_ingest.tokenize_batch(
            table, model=tiny_model, columns=("text", "answer_start"), group_column="group", loss="full",
            max_length=64, seed=seed,
        )
        rows = tokenized.sort_by([("okey", "ascending"), ("group", "ascending")])
        out = []
        for key in dict.fromkeys(zip(rows.column("okey").to_pylist(), rows.column("group").to_pylist())):
            mask = [(k, g) == key for k, g in zip(rows.column("okey").to_pylist(), rows.column("group").to_pylist())]
            out.append(train_ingest.pack_batch(rows.filter(pa.array(mask)), loss="full"))
        return pa.concat_tables(out)

    forward, backward = packed(list(range(6))), packed(list(reversed(range(6))))
    assert forward.column("ids").to_pylist() == backward.column("ids").to_pylist()
    # The seed decides the order of the groups.
    assert len({tuple(packed(list(range(6)), seed=s).column("texts").to_pylist()) for s in range(4)}) > 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = encode_examples(tokenizer, examples, loss="full", max_length=64, groups=groups)
    # Members of a group are packed in digest order (not input order): the same rows
    # up to the order of their suffixes.
    summary = sorted(
        (texts, len(ids), round(sum(weights), 3))
        for texts, ids, weights in zip(*(forward.column(c).to_pylist() for c in ("texts", "ids", "weights")))
    )
    assert summary == sorted((r.texts, len(r.ids), round(float(r.weights.sum()), 3)) for r in expected.rows)
    assert sorted(forward.column("texts").to_pylist()) == [1, 2, 3]

    # Bad and over-long examples travel as rows to the driver's count, which fails with
    # the usual messages (one small row per block reaches the driver).
    class Blocks:  # the two Dataset methods `measure` uses, over one block
        def __init__(self, table):
            self.table = table

        def map_batches(self, fn, **kwargs):
            return Blocks(fn(self.table))

        def iter_rows(self):
            return iter(self.table.to_pylist())

    bad = pa.table({"text": ["short: Yes", "x " * 80 + "Answer: No", "oops"], "answer_start": [7, 161, 9]})
    tokenized = train_ingest.tokenize_batch(
        bad, model=tiny_model, columns=("text", "answer_start"), group_column=None, loss="full", max_length=32, seed=0,
    )
    assert tokenized.column("status").to_pylist() == [train_ingest.OK, train_ingest.OVERLONG, train_ingest.INVALID]
    rows = pa.concat_tables([train_ingest.pack_batch(tokenized.slice(i, 1), loss="full") for i in range(3)])
    with pytest.raises(InputFileError, match="1 bad training example.*answer_start=9 is outside"):
        train_ingest.measure(Blocks(rows), source="x.parquet", grouped=False, overlong="drop", max_length=32)
    rows = rows.slice(0, 2)
    with pytest.raises(ConfigError, match="1 of 2 training texts are longer than max_length=32"):
        train_ingest.measure(Blocks(rows), source="list", grouped=False, overlong="error", max_length=32)
    stats = train_ingest.measure(Blocks(rows), source="list", grouped=False, overlong="drop", max_length=32)
    assert (stats.texts, stats.rows, stats.dropped) == (1, 1, 1)

    folder = write_examples(str(tmp_path / "examples"), toy_examples(4, seed=6))
    assert [os.path.basename(f) for f in train_ingest.parquet_files(folder)] == ["part-0.parquet", "part-1.parquet"]
    assert train_ingest.parquet_files(os.path.join(folder, "part-1.parquet")) == [os.path.join(folder, "part-1.parquet")]


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
        from trsr.llm.engine import EngineConfig
        from trsr.llm.factory import build_engine

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
    """DeepSpeed (1 worker), pairs of texts as groups: 1 epoch, then asked for 2 epochs
    with resume=True."""
    storage_path = str(tmp_path_factory.mktemp("resume"))
    examples, groups = toy_examples(16, seed=2), [f"list{i // 2}" for i in range(16)]
    first = train_lora(small(tiny_model, epochs=1), examples, storage_path=storage_path, groups=groups)
    second = train_lora(small(tiny_model, epochs=2), examples, storage_path=storage_path, groups=groups)
    return storage_path, examples, groups, first, second


@pytest.mark.integration
def test_resume_continues_after_the_last_epoch(resumed_run, tiny_model, tmp_path):
    storage_path, examples, groups, first, second = resumed_run
    assert first["epochs_run"] == [1] and first["steps"] == 4  # 8 pairs, 4 texts (2 pairs) a step
    assert first["history"][0]["texts_per_step"] == 4 and first["data"]["rows"] == 8
    assert second["resumed_from_epoch"] == 1 and second["epochs_run"] == [2]
    assert second["steps"] == 8  # the step counter continued
    assert second["history"][0] == first["history"][0]  # epoch 1 was not run again
    assert [r["epoch"] for r in second["history"]] == [1, 2]
    assert len(second["checkpoints"]) == 2 and second["best_epoch"] == 2

    # A finished run returns at once; a different setup is refused, not mixed in.
    again = train_lora(small(tiny_model, epochs=2), examples, storage_path=storage_path, groups=groups)
    assert again["epochs_run"] == [] and again["history"] == second["history"]
    # Its cost is what the earlier calls trained, not the 0 s this call took.
    # What the training cost (the report's stage seconds) counts the epochs earlier
    # calls trained, not the 0 s of a call that finds the run complete.
    assert again["wall_seconds"] == 0.0
    run = RunFolder(str(tmp_path / "run"))
    assert run.training_seconds("m") is None  # not trained
    for result, expected in (
        (first, first["wall_seconds"]),
        (second, second["wall_seconds"] + first["history"][0]["seconds"]),
        (again, sum(r["seconds"] for r in second["history"])),
    ):
        storage.write_json(result, storage.join(run.training("m").path, "result.json"))
        assert run.training_seconds("m") == pytest.approx(expected)
    with pytest.raises(ConfigError, match="different training setup"):
        train_lora(small(tiny_model, epochs=3, lora_rank=4), examples, storage_path=storage_path, groups=groups)
    with pytest.raises(ConfigError, match="different training setup"):  # other groups: other data
        train_lora(small(tiny_model, epochs=3), examples, storage_path=storage_path)


@pytest.mark.integration
def test_deepspeed_zero2_on_two_cpu_workers_then_one_worker(tiny_model, ray_local, tmp_path):
    """2 workers train epoch 1 with DeepSpeed ZeRO-2, 1 worker resumes for epoch 2 from
    the re-partitioned optimizer state."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Pairs of texts as groups: each micro-batch is one prefix-shared row (4D mask).
    examples, groups = toy_examples(16, seed=3), [f"pair{i // 2}" for i in range(16)]
    storage_path = str(tmp_path / "runs")
    config = small(tiny_model, workers=2, deepspeed=True, epochs=1, effective_batch=8)
    result = train_lora(config, examples, storage_path=storage_path, groups=groups)
    assert result["steps"] == 2  # 16 texts / 8 per step (8 pairs: whole groups)
    assert result["examples"] == 16 and result["data"]["rows"] == 8 and result["data"]["grouped"]
    epoch = result["history"][0]
    assert epoch["computed_tokens"] < epoch["tokens"] and epoch["texts_per_step"] == 8

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

    # The same effective batch with 1 worker continues the run.
    one = small(tiny_model, workers=1, deepspeed=True, epochs=2, effective_batch=8)
    resumed = train_lora(one, examples, storage_path=storage_path, groups=groups)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_run"] == [2] and resumed["steps"] == 4
    assert resumed["history"][0] == dict(epoch, checkpoint=checkpoint)
    assert [r["workers"] for r in resumed["history"]] == [2, 1]
    # AdamW's step counter went on from the 2 partitions' state (a fresh optimizer: 2).
    assert [r["optimizer_steps"] for r in resumed["history"]] == [2, 4]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" not in os.listdir(
        os.path.join(resumed["best_checkpoint"], "deepspeed", "state")
    )
    # Another effective batch is another run.
    with pytest.raises(ConfigError, match="different training setup"):
        train_lora(small(tiny_model, workers=1, epochs=3), examples, storage_path=storage_path, groups=groups)


@pytest.mark.integration
def test_checkpoints_on_s3_match_the_resumed_local_run(resumed_run, tiny_model, s3_bucket, tmp_path, monkeypatch):
    """The same setup as `resumed_run`, 2 epochs in one go, the examples in a folder of
    Parquet files on S3 (moto; a list_id group column, and a manifest and Ray Data
    checkpoint files beside them) that only Ray Data reads, stored on S3: the same losses
    as the resumed run from a Python list (resuming is exact; the data's order and
    fingerprint do not depend on where it comes from), and the adapter comes back."""
    from trsr import storage
    from trsr.recommend import train_ingest

    _, examples, groups, _, resumed = resumed_run
    folder = write_examples(f"{s3_bucket}/examples", examples, groups)

    def driver_must_not(*args, **kwargs):
        raise AssertionError("the driver read or tokenized the training examples")

    for name in ("normalize_examples", "normalize_example", "label_starts", "pack_group"):
        monkeypatch.setattr(train_ingest, name, driver_must_not)
    monkeypatch.setattr(storage, "read_parquet", driver_must_not)
    result = train_lora(small(tiny_model, epochs=2), folder, storage_path=f"{s3_bucket}/train", group_column="list_id")
    assert result["examples"] == 16 and result["data"]["source"] == folder
    assert result["data"]["rows"] == 8 and result["history"][0]["computed_tokens"] < result["history"][0]["tokens"]
    assert result["data"]["fingerprint"] == resumed["data"]["fingerprint"]
    assert result["checkpoints"][-1].startswith(f"{s3_bucket}/train/lora/epoch-002")
    assert storage.exists(storage.join(result["best_adapter"], "adapter_config.json"))
    assert result["train_loss"] == pytest.approx(resumed["train_loss"], rel=1e-5)

    adapter = copy_adapter(result["best_checkpoint"], str(tmp_path / "adapter"))
    assert os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))


def test_cpu_bf16_autocast_learns_the_toy_task_and_lora_top_layers_limits_the_adapter(tiny_model, ray_local, tmp_path):
    """Plain torch AdamW (bf16 autocast): 2 epochs on 1 worker, then the third on 2
    workers (DDP) from the same (replicated) optimizer state."""
    import json as json_

    from safetensors import safe_open

    train, held_out = toy_examples(32, seed=0), toy_examples(20, seed=1)
    settings = dict(
        deepspeed=False, loss="answer", learning_rate=1e-2, per_device_batch_size=4, gradient_accumulation=1,
        cpu_bf16=True, lora_top_layers=1, effective_batch=4,
    )
    storage_path = str(tmp_path / "runs")
    train_lora(small(tiny_model, **settings, epochs=2), train, storage_path=storage_path)
    result = train_lora(small(tiny_model, **settings, epochs=3, workers=2), train, storage_path=storage_path)
    assert result["resumed_from_epoch"] == 2 and [r["workers"] for r in result["history"]] == [1, 1, 2]
    # The replicated AdamW state went on (a fresh optimizer would count 8 in epoch 3).
    assert [r["optimizer_steps"] for r in result["history"]] == [8, 16, 24]
    assert [r["texts_per_step"] for r in result["history"]] == [4, 4, 4]
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


# A training job run as its own process (its own Ray driver, on the test session's
# cluster). valid_fn records each call in `marks` (with the pid of the Ray Train worker
# that runs it) and blocks at its first call of each epoch until the test kills it.
KILLABLE_RUN = r"""
import json, os, sys
from trsr.recommend.config import TrainConfig
from trsr.recommend.train import train_lora

args = json.loads(sys.argv[1])
MARKS = args["marks"]


def valid_fn(adapter_dir, epoch):
    import os, time

    calls = [name for name in os.listdir(MARKS) if name.startswith(f"epoch{epoch}-")]
    with open(os.path.join(MARKS, f"epoch{epoch}-{len(calls)}"), "w") as handle:
        handle.write(str(os.getpid()))
    if not calls:
        time.sleep(3600)
    return {"calls": len(calls) + 1}


train_lora(
    TrainConfig(**args["config"]), [tuple(e) for e in args["examples"]], valid_fn, storage_path=args["storage"],
    groups=args["groups"],
)
"""


def wait_for(path, process, log_path, timeout=900.0):
    """Wait until `path` exists (the job is not timed, only kept from hanging forever)."""
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as handle:
                tail = handle.read()[-3000:]
            pytest.fail(f"{path} never appeared (job exit code {process.poll()}):\n{tail}")
        time.sleep(0.5)
    with open(path) as handle:
        return int(handle.read() or 0)


@pytest.mark.integration
def test_a_killed_run_resumes_from_its_last_step_checkpoint_exactly(resumed_run, tiny_model, tmp_path):
    """The `resumed_run` setup with a checkpoint every 2 steps, as its own process: its Ray
    Train worker is killed in epoch 1 after step-000002 (Ray Train restarts it from that
    checkpoint, max_failures), then the whole job is killed (SIGKILL to its process group)
    in epoch 2 after step-000006; train_lora again continues from step 6. The losses and
    adapter equal those of the run that was never interrupted mid-epoch."""
    import contextlib
    import signal
    import subprocess
    import sys

    import ray
    import torch
    from safetensors.torch import load_file

    _, examples, groups, _, reference = resumed_run
    runs, marks = tmp_path / "runs", tmp_path / "marks"
    marks.mkdir()
    lora = runs / "lora"
    config = small(tiny_model, epochs=2, checkpoint_every_steps=2, max_failures=1)
    args = {
        "config": config.model_dump(mode="json"), "examples": examples, "groups": groups, "storage": str(runs),
        "marks": str(marks),
    }
    log_path = tmp_path / "job.log"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            [sys.executable, "-c", KILLABLE_RUN, json.dumps(args)], stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )
    try:
        # Epoch 1 (steps 1-4) has trained: a step checkpoint after step 2, none for step 4
        # (the epoch end, whose checkpoint waits for valid_fn).
        worker = wait_for(marks / "epoch1-0", job, log_path)
        assert {p.name for p in lora.glob("step-*")} == {"step-000002"}
        assert not list(lora.glob("epoch-*"))
        with open(lora / "step-000002" / "trainer_state.json") as handle:
            state = json.load(handle)
        assert state["kind"] == "step" and state["epoch"] == 0 and state["position"]["steps"] == 2
        os.kill(worker, signal.SIGKILL)  # a worker failure: Ray Train restarts from step 2
        second = wait_for(marks / "epoch2-0", job, log_path)
        assert (marks / "epoch1-1").exists()  # epoch 1 ended again after the restart
        assert (lora / "step-000006").is_dir() and (lora / "epoch-001").is_dir()
        os.killpg(job.pid, signal.SIGKILL)  # the whole job, between step 6 and the epoch end
        job.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.kill(second, signal.SIGKILL)  # its Ray Train worker, if Ray has not yet
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=60)

    result = train_lora(config, examples, storage_path=str(runs), groups=groups)
    assert result["resumed_from_step"] == 6 and result["resumed_from_epoch"] == 1 and result["epochs_run"] == [2]
    assert [r["resumed_at_steps"] for r in result["history"]] == [[2], [6]]
    assert result["history"][0]["valid"] == {"calls": 2.0}  # epoch 1's end: after the restart
    assert result["steps"] == 8 and [r["steps"] for r in result["history"]] == [4, 4]
    assert result["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    ours = load_file(os.path.join(result["best_adapter"], "adapter_model.safetensors"))
    theirs = load_file(os.path.join(reference["best_adapter"], "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-7)
    # Ray Train keeps epochs + 1 checkpoints: both epoch ends and the newest step checkpoint.
    assert sorted(p.name for p in lora.iterdir() if p.is_dir()) == ["epoch-001", "epoch-002", "step-000006"]
