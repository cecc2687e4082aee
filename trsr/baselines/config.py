"""Configuration of the baselines stage (section `baselines` of an experiment).

    baselines:
      models: [ncf, din, dien, gru4rec, narm, sasrec, core, popularity, random]
      encoder: all-minilm-l6-v2      # item text encoder (built-in name, HF folder, hub id)
      epochs: 8
      device: cpu                    # or cuda (then gpus_per_model > 0)
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from trsr.config import Section
from trsr.data.embeddings import EncoderConfig

# Models that learn from item text embeddings, and how they are trained:
#   "ctr"         score(history, candidate) -> logit, binary cross-entropy per candidate
#   "sequential"  a user vector from the history, score = <user, item>, softmax
#                 cross-entropy over the positive and sampled negatives
NEURAL_MODELS = {
    "ncf": "ctr",
    "din": "ctr",
    "dien": "ctr",
    "gru4rec": "sequential",
    "narm": "sequential",
    "sasrec": "sequential",
    "core": "sequential",
}
# Models without training by gradient descent (no embeddings needed).
SIMPLE_MODELS = ("popularity", "random")
MODELS = tuple(NEURAL_MODELS) + SIMPLE_MODELS
MIN_BATCH = 8  # smallest batch min_steps_per_epoch lowers to


class BaselinesConfig(Section):
    # Which models to train and score; each writes scores/<method>/{valid,test}.parquet.
    models: list[str] = list(MODELS)
    encoder: EncoderConfig = EncoderConfig()
    # Add a learned ID embedding to each item's projected text embedding (items never
    # seen in training get none). Methods are then named "<model>_id".
    use_id_embeddings: bool = False
    # Training (shared by every neural model).
    epochs: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # Examples per optimizer step, lowered for a model whose training set is small so
    # that every epoch still makes `min_steps_per_epoch` steps (never below 8): 458
    # demo lists in batches of 512 made one Adam step per epoch and left the CTR models
    # at chance. The batch each model used is in its stats.json.
    batch_size: int = Field(512, ge=1)
    min_steps_per_epoch: int = Field(100, ge=1)
    dim: int = Field(64, ge=4)
    dropout: float = Field(0.2, ge=0, lt=1)
    # Most recent history items a model sees.
    max_history: int = Field(25, ge=1)
    # Sequential models: every prefix of a training user's sequence (history + target)
    # predicts its next item, against this many uniform negatives drawn per batch and
    # shared by its examples (softmax over 1 + N; an example's own items are masked).
    negatives: int = Field(256, ge=1)
    # Shortest prefix used as a training example.
    min_prefix: int = Field(1, ge=1)
    # CTR models (NCF, DIN, DIEN): "lists" = the 1:1 training samples (the paper's
    # training set, as the LLM sees it); "prefixes" = the sequential models' examples,
    # with `ctr_negatives` sampled negatives per positive, binary cross-entropy.
    # "prefixes" by default: 1:1 lists give a CTR model one labelled pair per training
    # user, too few to learn from on small sets (demo AUC 0.44-0.48 with lists).
    ctr_training: Literal["lists", "prefixes"] = "prefixes"
    ctr_negatives: int = Field(4, ge=1)
    # Transformer models (SASRec, CORE).
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    # CORE: temperature of the cosine similarity.
    temperature: float = Field(0.07, gt=0)
    # DIEN: weight of the auxiliary next-item loss on the interest extractor (0: off).
    dien_aux_weight: float = Field(0.5, ge=0)
    # Keep the epoch with the best validation value of this metric (null: the last epoch).
    select_by: str | None = "mrr@10"
    # Where models train; "cuda" needs gpus_per_model > 0 and a GPU in the cluster.
    device: Literal["cpu", "cuda"] = "cpu"
    gpus_per_model: float = Field(0.0, ge=0)
    cpus_per_model: float = Field(1.0, ge=0)
    # torch threads per model task (keep cpus_per_model x concurrent tasks <= cores).
    torch_threads: int = Field(1, ge=1)
    # null: the experiment's seed.
    seed: int | None = None
    # Splits to score (the protocol's 1:20 lists).
    splits: list[Literal["valid", "test"]] = ["valid", "test"]

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
        if not models:
            raise ValueError("name at least one model")
        if len(set(models)) != len(models):
            raise ValueError(f"models has duplicates: {models}")
        return models

    @field_validator("select_by")
    @classmethod
    def _known_metric(cls, name: str | None) -> str | None:
        allowed = {f"{m}@{k}" for m in ("recall", "mrr", "ndcg") for k in (3, 5, 10)} | {"auc"}
        if name is not None and name not in allowed:
            raise ValueError(f"select_by {name!r}: one of {sorted(allowed)} or null")
        return name

    @model_validator(mode="after")
    def _check(self) -> "BaselinesConfig":
        if self.device == "cuda" and self.gpus_per_model <= 0:
            raise ValueError("device=cuda needs gpus_per_model > 0 (e.g. 0.5 to share a GPU by two models)")
        if self.device == "cpu" and self.gpus_per_model > 0:
            raise ValueError("gpus_per_model > 0 needs device=cuda")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if not self.splits:
            raise ValueError("splits: name at least one split")
        return self

    def batch_for(self, examples: int) -> int:
        """Examples per optimizer step for a training set of `examples`."""
        wanted = math.ceil(examples / self.min_steps_per_epoch)
        return max(1, min(self.batch_size, max(wanted, MIN_BATCH)))

    def method(self, model: str) -> str:
        """The scores/<method>/ folder and `method` column for `model`."""
        if self.use_id_embeddings and model in NEURAL_MODELS:
            return f"{model}_id"
        return model
