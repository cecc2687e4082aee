"""Configuration of the score stage (section `score` of an experiment)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from trsr.config import Section
from trsr.llm.engine import EngineConfig
from trsr.recommend.prompt import RecommendPromptConfig

_METHOD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_METHODS = {
    "hierarchical": "llm-trsr-hierarchical",
    "recurrent": "llm-trsr-recurrent",
    "summary_only": "llm-trsr-summary-only",
    "tallrec": "tallrec",
}


class ScoreConfig(Section):
    # The recommender model (set lora_adapter to the fine-tuned adapter folder).
    engine: EngineConfig = EngineConfig()
    prompt: RecommendPromptConfig = RecommendPromptConfig()
    # Name written in the scores' `method` column and the folder scores/<method>/;
    # null = from the variant (llm-trsr-hierarchical, ..., tallrec).
    method: str | None = None
    # Ranking lists per batch handed to an engine actor (one engine call per batch).
    users_per_batch: int = Field(16, ge=1)
    # Splits `trsr score` scores when no single split is asked for.
    splits: list[Literal["train", "valid", "test"]] = ["valid", "test"]
    # Score only the first N lists of a split (by list_id); null = all. For quick runs.
    max_lists: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "ScoreConfig":
        if self.prompt.max_length > self.engine.max_model_len:
            raise ValueError(
                f"prompt.max_length={self.prompt.max_length} exceeds engine.max_model_len="
                f"{self.engine.max_model_len}"
            )
        if self.method is not None and not _METHOD.match(self.method):
            raise ValueError(
                f"method {self.method!r}: use letters, digits, '.', '_' or '-' (it names a folder)"
            )
        if not self.splits:
            raise ValueError("splits: name at least one split")
        return self

    @property
    def method_name(self) -> str:
        return self.method or DEFAULT_METHODS[self.prompt.variant]
