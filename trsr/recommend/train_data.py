"""Training examples -> tokenized, packed training rows (for train.py; the optimizer
steps they make: `trsr.recommend.train_steps`).

The pure functions here run inside Ray Data tasks (`trsr.recommend.train_ingest`) and
the Ray Train workers; nothing here needs Ray.

Examples
--------
Every example is a complete training text (the prompt followed by its answer) plus
where the answer starts, in one of these unambiguous forms:

- `(text: str, answer_start: int)`: `text[answer_start:]` is the answer, i.e. the answer
  word and whatever closes the turn after it (e.g. "Yes<|im_end|>\\n");
- `(prompt: str, completion: str)`: the same as `(prompt + completion, len(prompt))`;
- dicts with the keys `text` + `answer_start`, or `prompt` + `completion`;
- a Parquet file or a folder of Parquet files (local or s3://; a folder's top-level
  `*.parquet` files, anything else such as `_manifest.json` is ignored) with the columns
  `text` + `answer_start`, or `prompt` + `completion`, and optionally a group column.

A text is tokenized whole, exactly as the engines tokenize a prompt (with the
tokenizer's special tokens, unless the text already starts with the BOS token) and
nothing is appended. With loss "answer" the learned tokens are those that overlap
`text[answer_start:]` (a token that straddles the boundary, such as " Yes" after
"Answer:", counts as answer); with loss "full" (the paper) every token is learned.

Groups and prefix sharing
-------------------------
Examples may carry a group key: the candidates of one ranking list, whose texts share
the user part of the prompt. With prefix sharing, a group becomes ONE training row: the
tokens its texts have in common, then each text's remaining tokens, with a mask that
lets each continuation see the prefix and itself only (`trsr.llm.packing`). Each
prediction carries a weight, the number of texts that learn it (a prefix prediction
counts once per text), so the summed loss over the learned tokens and its gradient
equal those of the separate texts; only the work shrinks. This equality is exact with
`lora_dropout: 0` only: with dropout the shared prefix goes through the model once, with
one dropout mask for all texts of the group, where separate texts would each draw their
own (the expectation is the same, the noise is shared). Without groups (or sharing)
each text is its own row.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass
from typing import Any, Sequence, Union

from trsr.errors import ConfigError

IGNORE_INDEX = -100
Example = Union[tuple[str, int], tuple[str, str], dict]
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------- examples


def normalize_example(item: Any, index: int = 0) -> tuple[str, int]:
    """(text, answer_start) of one example in any accepted form (see module doc);
    ValueError with the example's index when it is malformed."""
    if isinstance(item, dict):
        if "text" in item and "answer_start" in item:
            item = (item["text"], item["answer_start"])
        elif "prompt" in item and "completion" in item:
            item = (item["prompt"], item["completion"])
        else:
            raise ValueError(
                f"example {index}: a dict needs the keys text + answer_start or "
                f"prompt + completion, got {sorted(item)}"
            )
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"example {index}: expected (text, answer_start) or (prompt, completion), got {item!r:.80}")
    first, second = item
    if not isinstance(first, str):
        raise ValueError(f"example {index}: the text/prompt must be a string, got {type(first).__name__}")
    if isinstance(second, str):
        text, start = first + second, len(first)
        if not second:
            raise ValueError(f"example {index}: the completion is empty")
    elif isinstance(second, numbers.Integral) and not isinstance(second, bool):
        text, start = first, int(second)
    else:
        raise ValueError(
            f"example {index}: the second element must be answer_start (int) or the "
            f"completion (str), got {type(second).__name__}"
        )
    if not 0 <= start < len(text):
        raise ValueError(
            f"example {index}: answer_start={start} is outside the text (length {len(text)}); "
            "the answer text[answer_start:] must be non-empty"
        )
    return text, start


def normalize_examples(data: Sequence[Example]) -> list[tuple[str, int]]:
    """(text, answer_start) for each example in any accepted form (see module doc)."""
    return [normalize_example(item, index) for index, item in enumerate(data)]


def example_digest(text: str, answer_start: int, group: str | None = None) -> int:
    """A 64-bit content hash of one example (its group included when grouped)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{len(text)}:{answer_start}:".encode())
    digest.update(text.encode())
    if group is not None:
        digest.update(b"\x00group\x00" + group.encode())
    return int.from_bytes(digest.digest(), "little")


def order_key(seed: int, key: str | int) -> int:
    """Where a row (a group, or an ungrouped text by its digest) goes in the run's fixed,
    seeded order: a 63-bit hash of (seed, key), the same in every process."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, step): stable across processes."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def combine_digests(digests: Sequence[int]) -> int:
    """An order-independent digest of a multiset of example digests (sum mod 2^64)."""
    return sum(int(d) for d in digests) & _MASK64


# ------------------------------------------------------------------------ tokenizing


def _encode_with_offsets(tokenizer, text: str):
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(encoded["input_ids"]), list(encoded["offset_mapping"])


def _first_answer_token(offsets, answer_start: int) -> int:
    for index, (_, end) in enumerate(offsets):
        if end > answer_start:
            return index
    return len(offsets)


def label_start(tokenizer, text: str, answer_start: int) -> tuple[list[int], int]:
    """(token ids of text, index of the first token that overlaps text[answer_start:])."""
    ids, offsets = _encode_with_offsets(tokenizer, text)
    return ids, _first_answer_token(offsets, answer_start)


def label_starts(tokenizer, examples: Sequence[tuple[str, int]]) -> list[tuple[list[int], int]]:
    """`label_start` of many examples, tokenized in batches (one call per BOS mode)."""
    bos = tokenizer.bos_token
    out: list[Any] = [None] * len(examples)
    for special in (True, False):
        chosen = [i for i, (text, _) in enumerate(examples) if (not (bos and text.startswith(bos))) == special]
        if not chosen:
            continue
        encoded = tokenizer(
            [examples[i][0] for i in chosen], add_special_tokens=special, return_offsets_mapping=True
        )
        for i, ids, offsets in zip(chosen, encoded["input_ids"], encoded["offset_mapping"]):
            out[i] = (list(ids), _first_answer_token(offsets, examples[i][1]))
    return out


def check_encoded(ids: Sequence[int], start: int, loss: str, index: Any) -> None:
    """ConfigError when nothing of the example would be learned as it should."""
    if start >= len(ids):
        raise ConfigError(f"example {index}: no token overlaps the answer")
    if loss == "answer" and start == 0:
        raise ConfigError(
            f"example {index}: the answer starts at the first token, so nothing predicts it; "
            "the text must hold a prompt before the answer"
        )


def tokenize_example(tokenizer, text: str, answer_start: int, loss: str = "full") -> dict[str, list[int]]:
    """input_ids and labels (IGNORE_INDEX = not learned) of one training text.

    labels are aligned with input_ids (a causal LM shifts them): with loss "full" they
    are the input ids; with "answer" the tokens before the answer are masked."""
    if loss not in ("full", "answer"):
        raise ValueError(f"loss {loss!r}: expected full or answer")
    ids, start = label_start(tokenizer, text, answer_start)
    first = 0 if loss == "full" else start
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * first + [int(i) for i in ids[first:]]}
# ---------------------------------------------------------------------- training rows


@dataclass
class TrainingRow:
    """One row of a micro-batch: a group's shared prefix, then each text's own tokens.

    Position p predicts `targets[p]` with weight `weights[p]`: the number of the group's
    texts that learn that next token (0: nothing is learned there)."""

    ids: Any  # int32 numpy arrays, all of the row's length
    positions: Any  # position id of each token (restarting after the prefix per text)
    segments: Any  # 0: shared prefix, i: the rest of the group's i-th text
    targets: Any
    weights: Any  # float32
    texts: int  # examples in the row
    text_tokens: int  # their tokens counted separately (what the row saves on)


def pack_group(texts: Sequence[tuple[Sequence[int], int]], loss: str, share: bool = True) -> TrainingRow:
    """The training row of a group of tokenized texts `(ids, first answer token)`.

    With `share`, the prefix is the group's common tokens except the last (whose
    prediction of the next, also common, token stays in the prefix): every text keeps
    at least one token of its own. Without, the row holds one text (`texts` of length 1)."""
    import numpy as np

    if not share and len(texts) != 1:
        raise ValueError("without prefix sharing a row holds exactly one text")
    arrays = [np.asarray(ids, dtype=np.int32) for ids, _ in texts]
    lengths = [len(a) for a in arrays]
    if len(arrays) == 1:
        prefix = lengths[0]
    else:
        common = min(lengths)
        for other in arrays[1:]:
            differ = np.flatnonzero(arrays[0][:common] != other[:common])
            if differ.size:
                common = int(differ[0])
        prefix = max(common - 1, 0)

    def learned(text: int, token: int) -> bool:  # is token `token` of text `text` learned
        return token < lengths[text] and (loss == "full" or token >= texts[text][1])

    prefix_targets = np.zeros(prefix, dtype=np.int32)
    following = arrays[0][1 : prefix + 1]  # a lone text's last token predicts nothing
    prefix_targets[: len(following)] = following
    ids, positions, targets = [arrays[0][:prefix]], [np.arange(prefix)], [prefix_targets]
    segments = [np.zeros(prefix, dtype=np.int32)]
    weights = [np.array([sum(learned(t, p + 1) for t in range(len(arrays))) for p in range(prefix)], dtype=np.float32)]
    suffixes = arrays if len(arrays) > 1 else []
    for text, array in enumerate(suffixes):
        own = np.arange(prefix, lengths[text])  # token indices = position ids
        ids.append(array[prefix:])
        positions.append(own)
        segments.append(np.full(len(own), text + 1, dtype=np.int32))
        targets.append(np.append(array[prefix + 1 :], 0))
        weights.append(np.array([float(learned(text, p + 1)) for p in own], dtype=np.float32))
    return TrainingRow(
        ids=np.concatenate(ids).astype(np.int32),
        positions=np.concatenate(positions).astype(np.int32),
        segments=np.concatenate(segments).astype(np.int32),
        targets=np.concatenate(targets).astype(np.int32),
        weights=np.concatenate(weights).astype(np.float32),
        texts=len(arrays),
        text_tokens=int(sum(lengths)),
    )


@dataclass
class EncodedExamples:
    rows: list[TrainingRow]  # one per group (or per text without sharing)
    texts: int  # kept examples
    dropped: int  # examples over max_length left out (overlong: drop)
    text_tokens: int  # tokens of the kept examples, each text counted whole
    row_tokens: int  # tokens the rows hold (what one epoch computes)


def encode_examples(
    tokenizer,
    examples: Sequence[tuple[str, int]],
    *,
    loss: str,
    max_length: int,
    overlong: str = "error",
    groups: Sequence[str] | None = None,
    share_prefix: bool = True,
) -> EncodedExamples:
    """Tokenize and pack a few examples in this process (tests, benchmarks): the same
    rows `train_ingest` builds with Ray Data, in the input order."""
    if groups is not None and len(groups) != len(examples):
        raise ConfigError(f"{len(groups)} group keys for {len(examples)} training examples")
    kept: dict[Any, list[tuple[list[int], int]]] = {}
    dropped, longest = 0, 0
    for index, (ids, start) in enumerate(label_starts(tokenizer, examples)):
        check_encoded(ids, start, loss, index)
        if len(ids) > max_length:
            longest = max(longest, len(ids))
            dropped += 1
            continue
        key = groups[index] if (groups is not None and share_prefix) else index
        kept.setdefault(key, []).append((ids, start))
    if dropped and overlong == "error":
        raise ConfigError(overlong_message(dropped, len(examples), max_length, longest))
    if not kept:
        raise ConfigError(f"no training example fits max_length={max_length} tokens")
    rows = [pack_group(members, loss, share=share_prefix) for members in kept.values()]
    return EncodedExamples(
        rows=rows,
        texts=sum(r.texts for r in rows),
        dropped=dropped,
        text_tokens=sum(r.text_tokens for r in rows),
        row_tokens=sum(len(r.ids) for r in rows),
    )


def overlong_message(dropped: int, total: int, max_length: int, longest: int) -> str:
    return (
        f"{dropped} of {total} training texts are longer than max_length={max_length} tokens "
        f"(longest {longest}); shorten the prompts (summary or history, never the candidate "
        "or the answer), raise train.max_length, or set train.overlong=drop"
    )
