"""The transformers engine on a tiny random Llama (fast: no real weights)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from trsr.errors import ConfigError
from trsr.llm.engine import (
    EngineConfig,
    GenerationParams,
    PromptTooLongError,
)
from trsr.llm.factory import build_engine

PROMPTS = [
    "Hello there, how are you today?",
    "a",
    "The user read news about electric cars, football transfers and a new budget phone. "
    "Summarize what they like in two sentences.",
    [{"role": "user", "content": "Tell me about cats."}],
    "Short one.",
]


def test_greedy_is_deterministic_and_batch_invariant(hf_engine):
    params = GenerationParams(max_new_tokens=10)
    batched = hf_engine.generate(PROMPTS, params)  # batch_size 4: two left-padded batches
    again = hf_engine.generate(PROMPTS, params)
    alone = [hf_engine.generate([prompt], params)[0] for prompt in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in again]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert all(g.text for g in batched)
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in alone]


def test_chat_template_is_applied(hf_engine):
    messages = [{"role": "user", "content": "Tell me about cats."}]
    rendered = hf_engine.render_chat(messages)
    assert "<|im_start|>user\nTell me about cats.<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")  # add_generation_prompt=True
    assert hf_engine.render_chat("plain text") == "plain text"
    params = GenerationParams(max_new_tokens=6)
    from_messages = hf_engine.generate([messages], params)[0]
    from_text = hf_engine.generate([rendered], params)[0]
    assert from_messages == from_text
    assert from_messages.prompt_tokens == hf_engine.count_tokens([rendered])[0]


def test_without_chat_template_contents_are_joined(hf_engine):
    tokenizer = hf_engine.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        text = hf_engine.render_chat([{"role": "system", "content": "A"}, {"role": "user", "content": "B"}])
    finally:
        tokenizer.chat_template = saved
    assert text == "A\n\nB"


def test_finish_reason_length(hf_engine):
    params = GenerationParams(max_new_tokens=5)
    generation = hf_engine.generate(["Once upon a time"], params)[0]
    assert generation.finish_reason == "length"
    assert generation.output_tokens == 5

    long_run = hf_engine.generate(["Once upon a time"], GenerationParams(max_new_tokens=12))[0]
    assert long_run.text.startswith(generation.text)


def test_generation_stops_at_max_model_len(hf_engine):
    # 250 tokens of prompt leave 6 of the 256-token window.
    prompt = " ".join(["cat"] * 250)
    assert hf_engine.count_tokens([prompt]) == [250]
    generation = hf_engine.generate([prompt], GenerationParams(max_new_tokens=20))[0]
    assert generation.output_tokens == 6
    assert generation.finish_reason == "length"


def test_sampling_is_seeded(hf_engine):
    params = GenerationParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    first = hf_engine.generate(PROMPTS[:3], params)
    second = hf_engine.generate(PROMPTS[:3], params)
    assert [g.text for g in first] == [g.text for g in second]
    other = hf_engine.generate(PROMPTS[:3], GenerationParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=8))
    assert [g.text for g in other] != [g.text for g in first]
    greedy = hf_engine.generate(PROMPTS[:3], GenerationParams(max_new_tokens=12))
    assert [g.text for g in greedy] != [g.text for g in first]


def reference_yes_no(engine, prefix: str, suffix: str, yes: str = "Yes", no: str = "No"):
    """One plain forward pass over the tokens of the text prefix + suffix."""
    ids = engine.encode(prefix + suffix)
    yes_id, no_id = engine.yes_no_token_ids(yes, no)
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0, -1].float()
    logprobs = logits.log_softmax(-1)
    return float(logprobs[yes_id]), float(logprobs[no_id])


SCORING = [
    (
        "<|im_start|>user\nThe user recently read: 1. Electric trucks recalled. 2. A derby "
        "ends in a draw. 3. Budget phones compared.\nWill the user read the candidate?\nCandidate: ",
        [
            "Electric SUV unveiled",
            "A",
            "",  # the next token right after the prefix
            "Stock markets fall for the third day in a row as investors worry about rates",
            "Transfer window: striker signs",
            "Recipe: lemon cake",
        ],
    ),
    ("", ["A request with an empty prefix"]),
    ("Only prefix.", []),
]


def test_yes_no_with_shared_prefix_equals_full_prompts(hf_engine):
    # The prefix ends in a space that joins the suffix's first word when tokenized as
    # one text: the shared KV part must stop before the prefix's last token.
    prefix, suffixes = SCORING[0]
    prefix_ids = hf_engine.encode(prefix)
    assert hf_engine.encode(prefix + suffixes[0])[: len(prefix_ids)] != prefix_ids
    # batch_size 4 splits the six suffixes into two batches of the prefix cache.
    scores = hf_engine.yes_no_logprobs(SCORING, "Yes", "No")
    assert [len(row) for row in scores] == [6, 1, 0]
    for (prefix, suffixes), row in zip(SCORING, scores):
        for suffix, (yes, no) in zip(suffixes, row):
            ref_yes, ref_no = reference_yes_no(hf_engine, prefix, suffix)
            assert yes == pytest.approx(ref_yes, abs=1e-4)
            assert no == pytest.approx(ref_no, abs=1e-4)
            assert isinstance(yes, float) and yes < 0 and no < 0


def test_yes_no_padded_fallback_equals_packed(hf_engine, monkeypatch):
    # The packed path (one row, 4D mask) is the default for SDPA; the padded path (prefix
    # cache repeated per row) serves other attention kernels and sliding windows.
    assert hf_engine._can_pack(200)
    packed = hf_engine.yes_no_logprobs(SCORING)
    monkeypatch.setattr(hf_engine, "_can_pack", lambda longest: False)
    padded = hf_engine.yes_no_logprobs(SCORING)
    for row, other in zip(packed, padded):
        for pair, pair_other in zip(row, other):
            assert pair == pytest.approx(pair_other, abs=1e-4)


def test_yes_no_other_single_tokens(hf_engine):
    scores = hf_engine.yes_no_logprobs(SCORING[:1], " Yes", " No")
    ref = reference_yes_no(hf_engine, SCORING[0][0], SCORING[0][1][0], " Yes", " No")
    assert scores[0][0] == pytest.approx(ref, abs=1e-4)


def test_multi_token_yes_word_is_a_clear_error(hf_engine):
    with pytest.raises(ConfigError, match="exactly one token"):
        hf_engine.yes_no_logprobs(SCORING[:1], "Absolutely yes", "No")
    with pytest.raises(ConfigError, match="same token"):
        hf_engine.yes_no_logprobs(SCORING[:1], "Yes", "Yes")


def test_over_long_prompts_are_clear_errors(hf_engine):
    long_text = " ".join(["cat"] * 300)
    with pytest.raises(PromptTooLongError, match=r"prompt 1 is 300 tokens; max_model_len=256"):
        hf_engine.generate(["fine", long_text], GenerationParams(max_new_tokens=4))
    with pytest.raises(PromptTooLongError, match=r"prefix \(150 tokens\) \+ suffix \(150 tokens\) = 300 tokens"):
        hf_engine.yes_no_logprobs([(" ".join(["cat"] * 150), ["x", " ".join(["dog"] * 150)])])


def test_lora_adapter_changes_scores_like_peft(tiny_model, tiny_lora, hf_engine):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = EngineConfig(model=tiny_model, dtype="float32", max_model_len=256, batch_size=4, lora_adapter=tiny_lora)
    engine = build_engine(config)
    scores = engine.yes_no_logprobs(SCORING[:1])
    base = hf_engine.yes_no_logprobs(SCORING[:1])
    assert scores[0][0] != pytest.approx(base[0][0], abs=1e-3)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_lora).eval()
    prefix, suffixes = SCORING[0]
    ids = engine.encode(prefix + suffixes[0])
    yes_id, no_id = engine.yes_no_token_ids("Yes", "No")
    with torch.inference_mode():
        logprobs = peft_model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    assert scores[0][0] == pytest.approx((float(logprobs[yes_id]), float(logprobs[no_id])), abs=1e-4)
    engine.close()


def test_count_tokens_and_properties(hf_engine, tiny_model):
    assert hf_engine.count_tokens(["", "Yes", "Yes No"]) == [0, 1, 2]
    assert hf_engine.max_model_len == 256
    assert hf_engine.model_name == tiny_model
    assert hf_engine.tokenizer.pad_token is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_gpus": 1}, "num_gpus=1"),
        ({"backend": "vllm", "num_gpus": 2, "tensor_parallel_size": 2}, "tensor_parallel_size=2"),
        ({"load_in_8bit": True}, "load_in_8bit"),
    ],
)
def test_gpu_asked_on_cpu_machine_fails_fast(tiny_model, overrides, message):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        build_engine(EngineConfig(model=tiny_model, **overrides))
    assert message in str(error.value) and "no CUDA device" in str(error.value)
    assert time.perf_counter() - start < 5


def test_unknown_model_reference(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        build_engine(EngineConfig(model="no-such-model"))
    with pytest.raises(ConfigError, match="no config.json"):
        build_engine(EngineConfig(model=str(tmp_path)))


def test_lora_adapter_must_be_a_peft_folder(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json"):
        build_engine(EngineConfig(model=tiny_model, lora_adapter=str(tmp_path)))


def test_engine_config_validation():
    from pydantic import ValidationError

    assert EngineConfig().backend == "transformers"
    assert EngineConfig(num_cpus=2, num_gpus=1).actor_options() == {"num_cpus": 2, "num_gpus": 1}
    with pytest.raises(ValidationError, match="extra"):
        EngineConfig(modle="x")
    with pytest.raises(ValidationError, match="needs backend: vllm"):
        EngineConfig(tensor_parallel_size=2, num_gpus=2)
    with pytest.raises(ValidationError, match="transformers only"):
        EngineConfig(backend="vllm", load_in_8bit=True)
    with pytest.raises(ValidationError, match="num_gpus >= 4"):
        EngineConfig(backend="vllm", tensor_parallel_size=4, num_gpus=1)


def test_generation_params():
    assert GenerationParams().greedy
    with pytest.raises(ValueError):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        GenerationParams(top_p=0)


def test_importing_the_interface_loads_no_backend():
    code = (
        "import sys, trsr.llm.engine, trsr.summarize.config\n"
        "assert 'vllm' not in sys.modules, 'vllm imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
