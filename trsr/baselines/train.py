"""One training loop for every baseline, and scoring of ranking lists.

Examples are (history, candidates [C], labels [C]) rows:

    sequential models   every prefix of a training sequence -> its next item, against
                        `negatives` uniform negatives (new ones each epoch); softmax
                        cross-entropy with the positive in column 0
    CTR models          "lists": the 1:1 training lists as they are; "prefixes": the
                        prefixes with `ctr_negatives` negatives; binary cross-entropy

After each epoch the model scores the validation lists with the project's metric code;
the epoch with the best `select_by` is kept. Same config + seed + threads = same model.
Popularity and random need no loop (`simple_scores`).
"""

from __future__ import annotations

import copy
import math
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from trsr.baselines.config import NEURAL_MODELS, BaselinesConfig
from trsr.baselines.data import BaselineData, IndexedLists, NegativeSampler, prefix_examples
from trsr.baselines.models import build_model
from trsr.evaluate.metrics import ranking_metrics
from trsr.data.protocol import stable_hash

log = logging.getLogger(__name__)
EVAL_CANDIDATES_PER_BATCH = 8192  # list rows x candidates scored per forward pass


class Examples:
    """Training examples of one model kind, served in seeded, shuffled batches.

    Each batch is (history [B, H], lengths [B], candidates [B, C], labels [B, C],
    blocked [B, C] or None). Sequential models share one set of `negatives` uniform
    negatives per batch (so each distinct item is projected once per step); a shared
    negative that belongs to an example's own sequence is blocked (its logit ignored).
    CTR models get their own `ctr_negatives` per example, or the 1:1 lists as they are.
    """

    def __init__(self, kind: str, data: BaselineData, config: BaselinesConfig):
        self.kind = kind
        self.fixed = None
        if kind == "ctr" and config.ctr_training == "lists":
            lists = data.train_lists
            self.fixed = (lists.history, lists.lengths, lists.candidates, lists.labels.astype(np.float32))
            self.size = lists.size
            return
        self.history, self.lengths, self.targets, self.owner = prefix_examples(
            data.train_sequences, config.max_history, config.min_prefix
        )
        self.sampler = NegativeSampler(data.train_sequences, data.n_items)
        self.count = config.negatives if kind == "sequential" else config.ctr_negatives
        self.size = int(self.targets.size)

    def batches(self, rng: np.random.Generator, batch_size: int):
        order = rng.permutation(self.size)
        for begin in range(0, self.size, batch_size):
            rows = order[begin : begin + batch_size]
            if self.fixed is not None:
                hist, lengths, candidates, labels = self.fixed
                yield hist[rows], lengths[rows], candidates[rows], labels[rows], None
                continue
            owner = self.owner[rows]
            if self.kind == "sequential":
                shared = rng.integers(1, self.sampler.n_items + 1, size=self.count)
                negatives = np.broadcast_to(shared, (rows.size, self.count))
                blocked = self.sampler.forbidden_mask(owner, negatives)
                blocked = np.concatenate([np.zeros((rows.size, 1), dtype=bool), blocked], axis=1)
            else:
                negatives = self.sampler.sample(rng, owner, self.count)
                blocked = None
            candidates = np.concatenate([self.targets[rows, None], negatives], axis=1)
            labels = np.zeros(candidates.shape, dtype=np.float32)
            labels[:, 0] = 1.0
            yield self.history[rows], self.lengths[rows], candidates, labels, blocked

    def __len__(self) -> int:
        return self.size


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the experiment seed and names (same in every process)."""
    return stable_hash(seed, *parts) % (2**63)


def model_seed(seed: int, name: str) -> int:
    return derive_seed(seed, "baseline", name)


def score_lists(model: torch.nn.Module, lists: IndexedLists, device: str) -> np.ndarray:
    """Scores [L, C] of every candidate slot (padding slots get garbage; never read)."""
    model.eval()
    width = max(1, lists.candidates.shape[1])
    step = max(1, EVAL_CANDIDATES_PER_BATCH // width)
    out = np.empty(lists.candidates.shape, dtype=np.float64)
    with torch.inference_mode():
        for begin in range(0, lists.size, step):
            end = begin + step
            logits = model(
                torch.tensor(lists.history[begin:end], device=device),
                torch.tensor(lists.lengths[begin:end], device=device),
                torch.tensor(lists.candidates[begin:end], device=device),
            )
            out[begin:end] = logits.double().cpu().numpy()
    return out


def row_scores(lists: IndexedLists, matrix: np.ndarray) -> np.ndarray:
    """[L, C] scores -> one score per candidate row of `lists.rows`."""
    return matrix[lists.row_list, lists.row_slot]


def evaluate(lists: IndexedLists, scores: np.ndarray, seed: int) -> dict[str, float]:
    return ranking_metrics(
        lists.rows.column("list_id"), lists.rows.column("label"), scores, seed=seed
    )


def train_model(name: str, data: BaselineData, config: BaselinesConfig, seed: int) -> tuple[torch.nn.Module, dict]:
    """Train baseline `name`; return the model at its best validation epoch and stats."""
    if name not in NEURAL_MODELS:
        raise ValueError(f"{name!r} is not a trained model")
    if data.embeddings is None:
        raise ValueError("neural baselines need item text embeddings")
    device = config.device
    mseed = model_seed(seed, name)
    torch.manual_seed(mseed)
    rng = np.random.default_rng(mseed)
    model = build_model(name, config, data.embeddings).to(device)
    kind = model.kind
    examples = Examples(kind, data, config)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    batch_size = config.batch_for(len(examples))
    valid = data.eval.get("valid")
    history_log = []
    best = (-np.inf, 0, None)
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        began = time.perf_counter()
        model.train()
        total, batches = 0.0, 0
        for hist, lengths, candidates, labels, blocked in examples.batches(rng, batch_size):
            logits = model(
                torch.from_numpy(hist).to(device),
                torch.from_numpy(lengths).to(device),
                torch.from_numpy(candidates).to(device),
            )
            target = torch.from_numpy(labels).to(device)
            if kind == "sequential":
                if blocked is not None:
                    logits = logits.masked_fill(torch.from_numpy(blocked).to(device), float("-inf"))
                loss = F.cross_entropy(logits, target.argmax(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, target)
            if model.extra_loss is not None:
                loss = loss + model.extra_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        record = {"epoch": epoch, "loss": round(total / max(batches, 1), 5), "seconds": round(time.perf_counter() - began, 2)}
        if valid is not None and config.select_by is not None:
            metrics = evaluate(valid, row_scores(valid, score_lists(model, valid, device)), seed)
            record[f"valid_{config.select_by}"] = round(metrics[config.select_by], 5)
            if metrics[config.select_by] > best[0]:
                best = (metrics[config.select_by], epoch, copy.deepcopy(model.state_dict()))
        history_log.append(record)
        log.debug("%s epoch %d: %s", name, epoch, record)  # all epochs are in the stats (history)
    chosen = config.epochs
    if best[2] is not None:
        model.load_state_dict(best[2])
        chosen = best[1]
    stats = {
        "kind": kind,
        "examples": len(examples),
        "batch_size": batch_size,
        "steps_per_epoch": math.ceil(len(examples) / batch_size),
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "epochs": history_log,
        "best_epoch": chosen,
        "final_loss": history_log[-1]["loss"],
        "train_seconds": round(time.perf_counter() - started, 2),
        "device": device,
    }
    return model, stats


def simple_scores(name: str, data: BaselineData, lists: IndexedLists, seed: int) -> np.ndarray:
    """Popularity (training-split interactions of the candidate) or seeded random scores,
    one per candidate row."""
    if name == "popularity":
        counts = data.popularity()
        return counts[lists.candidates[lists.row_list, lists.row_slot]]
    if name == "random":
        rng = np.random.default_rng(derive_seed(seed, "random", lists.split))
        return rng.random(lists.row_list.size)
    raise ValueError(f"unknown simple model {name!r}")
