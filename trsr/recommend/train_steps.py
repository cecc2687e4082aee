"""Training rows -> optimizer steps: micro-batches, their tensors and the loss (for
the Ray Train workers, `trsr.recommend.train_loop`; the rows: `train_data`).

An optimizer step consumes about `effective_batch` texts, whatever the grouping: every
worker takes whole rows (groups) from its stream until its cumulative share of the
epoch's steps so far (`StepFiller`) is reached, cuts them into micro-batches of at most
`per_device_batch_size` texts (`micro_batches`; a larger group is a micro-batch of its
own), and the step's loss is the sum over all learned predictions of all workers divided
by their count (`weighted_loss_sum` / the step's all-reduced weight), so the gradient
does not depend on how the step's texts are cut into micro-batches or workers.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from trsr.recommend.train_data import TrainingRow


def micro_batches(sizes: Sequence[int], batch: int) -> list[list[int]]:
    """Rows (their text counts `sizes`, in order) cut into micro-batches of at most
    `batch` texts; a row is never split, a row larger than `batch` stands alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for row, size in enumerate(sizes):
        if current and filled + size > batch:
            batches.append(current)
            current, filled = [], 0
        current.append(row)
        filled += size
    if current:
        batches.append(current)
    return batches


class StepFiller:
    """One worker's part of each optimizer step, taken from its stream of rows.

    Step k of the epoch (1-based) takes whole rows while the worker's texts of the epoch
    stay within k x `share` (its cumulative share: effective batch / workers), and at
    least one row while any is left, so a step's texts average the share whatever the
    group sizes and a group is never split. `texts` and `steps` start from a resumed
    position; `rows` counts the rows handed out."""

    def __init__(self, rows: Iterator, share: float, *, texts: float = 0.0, steps: int = 0):
        self._rows = iter(rows)
        self._next: Any = None
        self._done = False
        self.share = share
        self.texts = texts
        self.steps = steps
        self.rows = 0

    def _peek(self):
        if self._next is None and not self._done:
            try:
                self._next = next(self._rows)
            except StopIteration:
                self._done = True
        return self._next

    def next_step(self) -> list:
        self.steps += 1
        quota = self.steps * self.share
        taken: list = []
        while True:
            row = self._peek()
            if row is None or (taken and self.texts + row.texts > quota + 1e-9):
                break
            taken.append(row)
            self._next = None
            self.texts += row.texts
            self.rows += 1
        return taken

    def close(self) -> None:
        close = getattr(self._rows, "close", None)
        if close is not None:
            close()


def collate(rows: Sequence[TrainingRow], pad_id: int, device, mask_dtype) -> dict:
    """Tensors of one micro-batch: the model's inputs (right padded) + targets/weights.

    Rows that share a prefix need the 4D segment mask; rows of single texts get the
    ordinary 2D padding mask (any attention kernel handles it)."""
    import numpy as np
    import torch

    from trsr.llm.packing import PAD_SEGMENT, additive_mask, segment_allowed

    length = max(len(r.ids) for r in rows)
    shape = (len(rows), length)
    ids = np.full(shape, pad_id, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    segments = np.full(shape, PAD_SEGMENT, dtype=np.int64)
    targets = np.zeros(shape, dtype=np.int64)
    weights = np.zeros(shape, dtype=np.float32)
    for i, row in enumerate(rows):
        n = len(row.ids)
        ids[i, :n], positions[i, :n], segments[i, :n] = row.ids, row.positions, row.segments
        targets[i, :n], weights[i, :n] = row.targets, row.weights
    segments_t = torch.from_numpy(segments)
    if (segments > 0).any():
        mask = additive_mask(segment_allowed(segments_t), mask_dtype)[:, None]
    else:
        mask = (segments_t != PAD_SEGMENT).long()
    weights_t = torch.from_numpy(weights)
    # Logits only where something is learned (the LM head over 49k words is a fifth of a
    # small model's work per token): the union of those positions over the rows.
    keep = torch.nonzero(weights_t.sum(0) > 0).flatten()
    return {
        "inputs": {
            "input_ids": torch.from_numpy(ids).to(device),
            "attention_mask": mask.to(device),
            "position_ids": torch.from_numpy(positions).to(device),
            "logits_to_keep": keep.to(device),
        },
        "targets": torch.from_numpy(targets)[:, keep].to(device),
        "weights": weights_t[:, keep].to(device),
        "tokens": int((segments != PAD_SEGMENT).sum()),
        "texts": sum(r.texts for r in rows),
    }


def weighted_loss(logits, targets, weights):
    """Mean next-token cross-entropy over the learned predictions (weights = counts)."""
    return weighted_loss_sum(logits, targets, weights) / weights.sum().clamp_min(1e-9)


def weighted_loss_sum(logits, targets, weights):
    """Sum of the next-token cross-entropy over the learned predictions (weights =
    counts); divided by the step's total weight it is the step's mean loss."""
    import torch

    losses = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="none"
    )
    return (losses * weights.flatten()).sum()
