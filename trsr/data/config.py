"""Configuration of the prepare stage (section `prepare` of an experiment).

    prepare:
      source: {format: mind, path: data/demo-mind}
      protocol: {min_history: 10, max_history: 25}

`source.format` selects the source class; each is declared next to its converter
(`trsr.data.converters.<format>`), which reads exactly its fields.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from trsr.config import Section
from trsr.data.converters import SOURCE_FORMATS
from trsr.data.converters.amazon_m2 import AmazonM2Source
from trsr.data.converters.generic import GenericSource
from trsr.data.converters.mind import MindSource
from trsr.data.converters.recbole import RecBoleSource

Source = Annotated[
    Union[MindSource, AmazonM2Source, RecBoleSource, GenericSource],
    Field(discriminator="format"),
]

__all__ = [
    "AmazonM2Source", "GenericSource", "MindSource", "RecBoleSource", "SOURCE_FORMATS", "Source",
    "PerSplit", "NegativesPerSplit", "ProtocolConfig", "SyntheticConfig", "PrepareConfig",
]


# -------------------------------------------------------------------------- protocol


class PerSplit(Section):
    train: float = 0.8
    valid: float = 0.1
    test: float = 0.1


class NegativesPerSplit(Section):
    train: int = Field(1, ge=1)
    valid: int = Field(20, ge=1)
    test: int = Field(20, ge=1)


class ProtocolConfig(Section):
    """The paper's sampling protocol (done right: seeded, exclusions, shuffled lists)."""

    min_history: int = Field(10, ge=1)
    max_history: int = Field(25, ge=1)
    # Users with a longer history: "drop" them (paper) or keep the most recent max_history.
    long_history: Literal["drop", "truncate"] = "drop"
    # Users per split: a fraction (<= 1.0) of eligible users, or a count (> 1).
    # Leftover users are accounted for as "not sampled".
    users: PerSplit = PerSplit()
    # Negatives per positive: 1:1 for training, 1:20 for validation and test.
    negatives: NegativesPerSplit = NegativesPerSplit()

    @model_validator(mode="after")
    def _check(self) -> "ProtocolConfig":
        if self.min_history > self.max_history:
            raise ValueError(
                f"min_history ({self.min_history}) > max_history ({self.max_history})"
            )
        fractions = [v for v in (self.users.train, self.users.valid, self.users.test) if v <= 1]
        if len(fractions) == 3 and sum(fractions) > 1.0 + 1e-9:
            raise ValueError(f"users fractions add up to {sum(fractions)} > 1")
        return self


class SyntheticConfig(Section):
    """A generated MIND-format dataset with learnable structure (demo and tests)."""

    users: int = Field(600, ge=1)
    items: int = Field(1200, ge=10)
    topics: int = Field(8, ge=2)
    min_history: int = 10
    max_history: int = 25
    impressions: int = Field(10, ge=2, description="candidates shown per impression row")
    rows_per_user: int = Field(1, ge=1, description="behaviour rows per user")
    seed: int = 0


class PrepareConfig(Section):
    source: Source
    # When set, `source` (MIND format) is generated first if absent.
    synthetic: SyntheticConfig | None = None
    protocol: ProtocolConfig = ProtocolConfig()
    # Tokenizer for the stats' tokens-per-item: "whitespace", a model reference
    # (see trsr.llm.models), e.g. "smollm2-135m-instruct".
    stats_tokenizer: str = "whitespace"
