"""The prefix-sharing mask and when it is exact (trsr.llm.packing)."""

from __future__ import annotations

import torch

from trsr.llm.packing import PAD_SEGMENT, prefix_sharing_exact, segment_allowed


def test_each_continuation_sees_the_prefix_and_itself_only():
    # prefix of 2 tokens, continuation 1 (2 tokens), continuation 2 (1 token), 1 pad.
    segments = torch.tensor([0, 0, 1, 1, 2, PAD_SEGMENT])
    allowed = segment_allowed(segments).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # continuation 2 does not see continuation 1
        [0, 0, 0, 0, 0, 1],  # padding sees itself only, and nothing sees it
    ]
    # The rows from a position on (the scorer's suffix tokens after a cached prefix).
    assert segment_allowed(segments, first_query=2).int().tolist() == allowed[2:]


def test_prefix_sharing_is_exact_only_for_sdpa_or_eager_within_the_window():
    from transformers import LlamaConfig, MistralConfig

    llama = LlamaConfig()
    llama._attn_implementation = "sdpa"
    assert prefix_sharing_exact(llama, 4096)
    llama._attn_implementation = "flash_attention_2"
    assert not prefix_sharing_exact(llama, 16)
    mistral = MistralConfig(sliding_window=64)
    mistral._attn_implementation = "eager"
    assert prefix_sharing_exact(mistral, 64) and not prefix_sharing_exact(mistral, 65)
