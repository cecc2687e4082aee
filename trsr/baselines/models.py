"""Compact baselines over pre-trained item text embeddings (our own code).

Every model maps (history [B, H], lengths [B], candidates [B, C]) to logits [B, C].
Items enter as frozen text embeddings through a trainable projection (`ItemEncoder`),
optionally plus a learned ID embedding, as the paper's baselines used BERT item
embeddings instead of ID embeddings. Histories are right-padded: real items sit at
positions 0..len-1, oldest first.

    ctr          NCF, DIN, DIEN: a score per (history, candidate); trained with BCE
    sequential   GRU4Rec, NARM, SASRec, CORE: a user vector from the history, score
                 = <user, item> (CORE: cosine / temperature); softmax cross-entropy

Model notes (what each keeps of its paper):
- NCF (He et al. 2017): the user is the mean of their history's item vectors (no user
  IDs: test users are unseen); GMF (elementwise product) and MLP branches, fused.
- DIN (Zhou et al. 2018): target attention, an MLP over [h, c, h - c, h * c] weights
  each history item (no softmax, as in DIN), the weighted sum meets the candidate in an
  MLP.
- DIEN (Zhou et al. 2019): a GRU interest extractor with the auxiliary loss (its state
  at t must tell item t+1 from another item; the other item is taken from a different
  example in the batch), then an AUGRU whose update gate is scaled by attention to
  the candidate; its final state meets the candidate in an MLP.
- GRU4Rec (Hidasi et al. 2016): a GRU, the user is the last state.
- NARM (Li et al. 2017): a GRU, global (last state) + local (attention over states
  with the last state as query) encoders, a bilinear decoder.
- SASRec (Kang & McAuley 2018): a causal Transformer with learned positions, the user
  is the output at the most recent item.
- CORE (Hou et al. 2022): representation-consistent encoding, the user is a weighted
  sum of the history's own item vectors (weights from a Transformer), scored by cosine
  with a temperature, with item dropout (robust distance measuring).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trsr.baselines.config import NEURAL_MODELS, BaselinesConfig


def _valid(history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Bool [B, H]: True at real (non-padding) history positions."""
    positions = torch.arange(history.shape[1], device=history.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def _last(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """states [B, H, d] at position len-1 -> [B, d]."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
    return states.gather(1, index).squeeze(1)


def _mlp(sizes: list[int], dropout: float, final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class ItemEncoder(nn.Module):
    """Item index -> vector: frozen text embedding -> Linear (+ learned ID embedding)."""

    def __init__(self, text: np.ndarray, dim: int, use_ids: bool):
        super().__init__()
        self.register_buffer("text", torch.from_numpy(np.array(text, dtype=np.float32, copy=True)))
        self.project = nn.Linear(text.shape[1], dim)
        self.ids = None
        if use_ids:
            # Zero start: an item seen only at test time keeps its text vector alone.
            self.ids = nn.Embedding(text.shape[0], dim, padding_idx=0)
            nn.init.zeros_(self.ids.weight)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        # Project each distinct item once (a batch repeats items many times).
        unique, inverse = torch.unique(items, return_inverse=True)
        out = self.project(self.text[unique])
        if self.ids is not None:
            out = out + self.ids(unique)
        return out[inverse]


class Baseline(nn.Module):
    kind = "ctr"

    def __init__(self, config: BaselinesConfig, text: np.ndarray):
        super().__init__()
        self.dim = config.dim
        self.items = ItemEncoder(text, config.dim, config.use_id_embeddings)
        self.dropout = nn.Dropout(config.dropout)
        self.extra_loss: torch.Tensor | None = None  # set by forward when a model has one

    def forward(self, history, lengths, candidates):  # pragma: no cover - abstract
        raise NotImplementedError


class SequentialBaseline(Baseline):
    kind = "sequential"

    def user(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, history, lengths, candidates):
        user = self.user(history, lengths)  # [B, d]
        return torch.einsum("bd,bcd->bc", user, self.items(candidates))


# ------------------------------------------------------------------------ CTR models


class NCF(Baseline):
    def __init__(self, config, text):
        super().__init__(config, text)
        d = config.dim
        self.gmf_user = nn.Linear(d, d)
        self.mlp = _mlp([2 * d, 2 * d, d, d // 2], config.dropout, final_activation=True)
        self.out = nn.Linear(d + d // 2, 1)

    def forward(self, history, lengths, candidates):
        mask = _valid(history, lengths).unsqueeze(-1).float()
        user = (self.items(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, d]
        item = self.items(candidates)  # [B, C, d]
        user = self.dropout(user).unsqueeze(1).expand_as(item)
        gmf = self.gmf_user(user) * item
        mlp = self.mlp(torch.cat([user, item], -1))
        return self.out(torch.cat([gmf, mlp], -1)).squeeze(-1)


class DIN(Baseline):
    def __init__(self, config, text):
        super().__init__(config, text)
        d = config.dim
        self.attention = _mlp([4 * d, d, d // 2, 1], 0.0)
        self.head = _mlp([3 * d, 2 * d, d, 1], config.dropout)

    def forward(self, history, lengths, candidates):
        hist = self.dropout(self.items(history))  # [B, H, d]
        cand = self.items(candidates)  # [B, C, d]
        B, C, d = cand.shape
        H = hist.shape[1]
        h = hist.unsqueeze(1).expand(B, C, H, d)
        c = cand.unsqueeze(2).expand(B, C, H, d)
        weights = self.attention(torch.cat([h, c, h - c, h * c], -1)).squeeze(-1)  # [B, C, H]
        weights = weights * _valid(history, lengths).unsqueeze(1)
        interest = (weights.unsqueeze(-1) * h).sum(2) / lengths.clamp(min=1).view(B, 1, 1)
        return self.head(torch.cat([interest, cand, interest * cand], -1)).squeeze(-1)


class AUGRUCell(nn.Module):
    """GRU cell whose update gate is scaled by an attention score (DIEN)."""

    def __init__(self, dim: int):
        super().__init__()
        self.x = nn.Linear(dim, 3 * dim)
        self.h = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x, h, attention):
        xr, xu, xn = self.x(x).chunk(3, -1)
        hr, hu, hn = self.h(h).chunk(3, -1)
        reset = torch.sigmoid(xr + hr)
        update = torch.sigmoid(xu + hu) * attention.unsqueeze(-1)
        new = torch.tanh(xn + reset * hn)
        return (1.0 - update) * h + update * new


class DIEN(Baseline):
    def __init__(self, config, text):
        super().__init__(config, text)
        d = config.dim
        self.extractor = nn.GRU(d, d, batch_first=True)
        self.query = nn.Linear(d, d, bias=False)
        self.evolution = AUGRUCell(d)
        self.head = _mlp([3 * d, 2 * d, d, 1], config.dropout)
        self.aux_weight = config.dien_aux_weight

    def forward(self, history, lengths, candidates):
        valid = _valid(history, lengths)  # [B, H]
        emb = self.dropout(self.items(history))
        states, _ = self.extractor(emb)  # [B, H, d]
        self.extra_loss = self._auxiliary(states, emb, valid) if self.training and self.aux_weight > 0 else None
        cand = self.items(candidates)  # [B, C, d]
        B, C, d = cand.shape
        H = states.shape[1]
        scores = torch.einsum("bhd,bcd->bch", self.query(states), cand) / d**0.5
        scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
        attention = torch.softmax(scores, -1).reshape(B * C, H)
        seq = states.unsqueeze(1).expand(B, C, H, d).reshape(B * C, H, d)
        h = seq.new_zeros(B * C, d)
        for t in range(H):
            h = self.evolution(seq[:, t], h, attention[:, t])  # attention is 0 at padding
        h = h.view(B, C, d)
        return self.head(torch.cat([h, cand, h * cand], -1)).squeeze(-1)

    def _auxiliary(self, states, emb, valid):
        # state t predicts item t+1 against item t+1 of another example of the batch
        if states.shape[1] < 2 or states.shape[0] < 2:
            return None
        pairs = valid[:, 1:]
        other = emb.roll(1, dims=0)[:, 1:]
        pos = (states[:, :-1] * emb[:, 1:]).sum(-1)
        neg = (states[:, :-1] * other).sum(-1)
        both = pairs & valid.roll(1, dims=0)[:, 1:]
        if not both.any():
            return None
        loss = F.softplus(-pos[both]).mean() + F.softplus(neg[both]).mean()
        return self.aux_weight * loss


# ----------------------------------------------------------------- sequential models


class GRU4Rec(SequentialBaseline):
    def __init__(self, config, text):
        super().__init__(config, text)
        d = config.dim
        self.gru = nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, d)

    def user(self, history, lengths):
        states, _ = self.gru(self.dropout(self.items(history)))
        return self.out(self.dropout(_last(states, lengths)))


class NARM(SequentialBaseline):
    def __init__(self, config, text):
        super().__init__(config, text)
        d = config.dim
        self.gru = nn.GRU(d, d, batch_first=True)
        self.a1 = nn.Linear(d, d, bias=False)
        self.a2 = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, 1, bias=False)
        self.bilinear = nn.Linear(2 * d, d, bias=False)

    def user(self, history, lengths):
        states, _ = self.gru(self.dropout(self.items(history)))  # [B, H, d]
        last = _last(states, lengths)  # global encoder
        alpha = self.v(torch.sigmoid(self.a1(last).unsqueeze(1) + self.a2(states))).squeeze(-1)
        alpha = alpha * _valid(history, lengths)
        local = (alpha.unsqueeze(-1) * states).sum(1)
        return self.bilinear(self.dropout(torch.cat([last, local], -1)))


class _TransformerBlocks(nn.Module):
    """Item vectors + recency positions -> Transformer outputs [B, H, d]."""

    def __init__(self, config: BaselinesConfig, causal: bool):
        super().__init__()
        d = config.dim
        self.causal = causal
        self.positions = nn.Embedding(config.max_history, d)
        self.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(
            d, config.heads, dim_feedforward=2 * d, dropout=config.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.final = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, items, history, lengths):
        H = history.shape[1]
        steps = torch.arange(H, device=history.device).unsqueeze(0)
        recency = (lengths.unsqueeze(1) - 1 - steps).clamp(min=0)  # 0 = most recent item
        x = self.dropout(self.norm(items + self.positions(recency)))
        if self.causal:
            # Right padding: a real position never sees a later (padding) one.
            mask = torch.triu(torch.full((H, H), float("-inf"), device=x.device), diagonal=1)
            out = self.encoder(x, mask=mask)
        else:
            out = self.encoder(x, src_key_padding_mask=~_valid(history, lengths))
        return self.final(out)


class SASRec(SequentialBaseline):
    def __init__(self, config, text):
        super().__init__(config, text)
        self.blocks = _TransformerBlocks(config, causal=True)

    def user(self, history, lengths):
        return _last(self.blocks(self.items(history), history, lengths), lengths)


class CORE(SequentialBaseline):
    def __init__(self, config, text):
        super().__init__(config, text)
        self.blocks = _TransformerBlocks(config, causal=False)
        self.weight = nn.Linear(config.dim, 1)
        self.temperature = config.temperature

    def user(self, history, lengths):
        items = self.dropout(self.items(history))  # item dropout
        alpha = self.weight(self.blocks(items, history, lengths)).squeeze(-1)
        alpha = alpha.masked_fill(~_valid(history, lengths), float("-inf")).softmax(-1)
        return (alpha.unsqueeze(-1) * items).sum(1)  # in the item space (consistency)

    def forward(self, history, lengths, candidates):
        user = F.normalize(self.user(history, lengths), dim=-1)
        items = F.normalize(self.dropout(self.items(candidates)), dim=-1)
        return torch.einsum("bd,bcd->bc", user, items) / self.temperature


MODEL_CLASSES: dict[str, type[Baseline]] = {
    "ncf": NCF,
    "din": DIN,
    "dien": DIEN,
    "gru4rec": GRU4Rec,
    "narm": NARM,
    "sasrec": SASRec,
    "core": CORE,
}
assert set(MODEL_CLASSES) == set(NEURAL_MODELS)
assert all(MODEL_CLASSES[name].kind == kind for name, kind in NEURAL_MODELS.items())


def build_model(name: str, config: BaselinesConfig, text: np.ndarray) -> Baseline:
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown neural model {name!r}; one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name](config, text)
