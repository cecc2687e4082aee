"""Prefix sharing inside one row: a shared prefix followed by several continuations.

A row holds segments: segment 0 is a prefix that several texts share, segment i >= 1 is
the rest of text i. Token q may attend to token k when k comes no later than q and k
belongs to the prefix or to q's own segment, so every continuation sees exactly
"prefix + itself", as if it were its own text; position ids restart after the prefix
for each continuation. The scorer packs the suffixes of a ranking list this way after a
cached prefix, the trainer packs a list's training texts this way (one forward and
backward pass through the prefix instead of one per text). Both are exact only when the
model's attention honours a custom 4D mask as given (`prefix_sharing_exact`).
"""

from __future__ import annotations

PAD_SEGMENT = -1  # padding tokens: they attend to themselves only, nothing attends to them


def prefix_sharing_exact(model_config, longest: int) -> bool:
    """Whether a custom 4D mask is applied as given: SDPA or eager attention, and no
    sliding window within `longest` positions (a window would need its own masking)."""
    if getattr(model_config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    return not within_sliding_window(model_config, longest)


def within_sliding_window(model_config, longest: int) -> bool:
    """Whether sequences of `longest` positions reach past the model's sliding window."""
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    window = getattr(text, "sliding_window", None)
    return isinstance(window, int) and window > 0 and longest > window


def segment_allowed(segments, first_query: int = 0):
    """allowed[..., q, k] (bool) for segment ids of shape [..., T] (see module doc).

    Rows are the queries from position `first_query` on (the scorer asks only for its
    suffix tokens after a cached prefix). Padding (PAD_SEGMENT) attends to itself only,
    so no row of the mask is empty."""
    import torch

    length = segments.shape[-1]
    keys = torch.arange(length, device=segments.device)
    queries = keys[first_query:]
    causal = keys[None, :] <= queries[:, None]
    key, query = segments[..., None, :], segments[..., first_query:, None]
    real = (key != PAD_SEGMENT) & (query != PAD_SEGMENT)
    itself = keys[None, :] == queries[:, None]
    return (causal & real & ((key == 0) | (key == query))) | itself


def additive_mask(allowed, dtype):
    """The float mask transformers' attention adds to the scores: 0 or the dtype's minimum."""
    import torch

    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
