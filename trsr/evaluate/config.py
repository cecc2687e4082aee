"""Section `evaluate` of an experiment: which split, metrics and intervals the report has."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trsr.config import Section


class SummaryProbeConfig(Section):
    """The report's summary probe (trsr.evaluate.summary_probe): how much of the user a
    summary carries, measured without the LLM recommender."""

    enabled: bool = True
    # Lists probed per summary mode (a seeded sample of those with a usable summary):
    # encoded in the driver (amazon-games-6k: 587 lists of two modes in under 8 s on 2
    # CPU cores, the item vectors read from the baselines' embeddings).
    max_lists: int = Field(1000, ge=1)


class EvaluateConfig(Section):
    """Section `evaluate` of an experiment."""

    split: Literal["valid", "test"] = "test"
    ks: list[int] = [3, 5, 10]
    # How tied scores are ordered (see trsr.evaluate.metrics): random (seeded), pessimistic, optimistic.
    ties: Literal["random", "pessimistic", "optimistic"] = "random"
    # Bootstrap resamples of the lists for the intervals, and their confidence.
    bootstrap: int = Field(1000, ge=1)
    confidence: float = Field(0.95, gt=0, lt=1)
    # Methods (folders under scores/) in the table; null = every method found.
    methods: list[str] | None = None
    # Also draw report/<split>.png.
    chart: bool = True
    # Example users in the report (seeded draw of the lists): recent items, summaries,
    # each method's top candidates with p(yes), the positive marked; 0 = none.
    examples: int = Field(2, ge=0)
    # Summaries against the history and another user's summary, with the baselines'
    # item encoder (baselines.encoder).
    summary_probe: SummaryProbeConfig = SummaryProbeConfig()

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive integers, got {self.ks}")
        if self.methods is not None and not self.methods:
            raise ValueError("methods: name at least one method, or null for all")
        return self
