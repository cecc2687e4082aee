"""Configuration of the summarize stage (section `summarize` of an experiment)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trsr.config import Section
from trsr.domains import Domain
from trsr.llm.engine import EngineConfig, GenerationParams


class GenerationConfig(Section):
    # Summary length cap; the prompts ask for two to four sentences.
    max_new_tokens: int = Field(96, ge=8)
    # 0 = greedy (deterministic); > 0 samples with the experiment seed.
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    # A flagged output (empty, repetitive, echo, over-length, ungrounded) is retried once
    # with this.
    retry_temperature: float = Field(0.7, ge=0.0)
    # Grounding check: an output sharing fewer content words than this with what its
    # prompt gave it (items, earlier summaries) is flagged "ungrounded" and retried; a
    # final summary still ungrounded is not usable. 0 = no check.
    min_shared_words: int = Field(0, ge=0)

    def params(self, seed: int) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=seed,
        )

    def retry_params(self, seed: int) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.retry_temperature,
            top_p=0.95 if self.retry_temperature > 0 else self.top_p,
            repetition_penalty=max(self.repetition_penalty, 1.1),
            seed=seed + 1,
        )


class SummarizeConfig(Section):
    renamed_keys = {"block_size": "items_per_block"}

    # Which paradigms to run: each writes summaries/<mode>/.
    modes: list[Literal["hierarchical", "recurrent"]] = ["hierarchical", "recurrent"]
    # Prompt preset (wording): news, shopping or generic.
    domain: Domain = "news"
    # What the templates ask for: "free_form" (the paper's style: describe the user in
    # two to four sentences) or "attributes" (name the kinds, series, brands, platforms
    # and themes that recur, in the items' words: what a small model does faithfully).
    style: Literal["free_form", "attributes"] = "free_form"
    # YAML file replacing any of the templates block / merge / update.
    prompts_file: str | None = None
    # Items per block (paper: 5).
    items_per_block: int = Field(5, ge=1)
    # Hierarchical: nodes merged per call at each level; null = all at once (paper).
    fan_in: int | None = Field(2, ge=2)
    # Character cap per attribute value before the token guard shortens further.
    item_max_chars: int = Field(300, ge=24)
    attribute_max_chars: dict[str, int] = {}
    engine: EngineConfig = EngineConfig()
    generation: GenerationConfig = GenerationConfig()
    # per_step: one Ray Data map stage per level/step, each with its own engine actors;
    # fused: one stage carries a batch of users through every level/step (one engine).
    execution: Literal["per_step", "fused"] = "per_step"
    # Users per batch handed to a stage (all their prompts go to the engine together).
    users_per_batch: int = Field(32, ge=1)
    # Summarize at most this many users: a number (test first, then valid, then train),
    # or a cap per split, e.g. {test: null, valid: 0, train: 64} (null = all of that
    # split; a split left out = all). Users are taken in user-id order; null = all users.
    max_users: int | dict[Literal["train", "valid", "test"], int | None] | None = None
    # Whose histories: "protocol" = the users of the prepared ranking lists, one row per
    # list in summaries/<mode>/ (experiments: what training and `trsr score` read);
    # "all" = every user of prepared/sequences, their whole history, one row per user in
    # user_summaries/<mode>/ (production: what `trsr score --candidates` reads;
    # max_users does not apply).
    users: Literal["protocol", "all"] = "protocol"
    # Summarize only the last N blocks of each history (null = all). Blocks are anchored
    # at absolute positions (block k = items k*B .. k*B+B-1), so the window moves a whole
    # block at a time and a block's boundaries never shift.
    history_window: int | None = Field(None, ge=1)
    # per_step execution: at most this many engine stages, each running consecutive
    # levels/steps, so that a few very long histories do not multiply the stages.
    max_engine_stages: int = Field(8, ge=1)

    def prompts(self):
        """This config's PromptSet (domain preset and override file)."""
        from trsr.summarize.prompts import load_prompts

        return load_prompts(self.domain, self.prompts_file, self.style)

    @model_validator(mode="after")
    def _check_max_users(self) -> "SummarizeConfig":
        caps = self.max_users.values() if isinstance(self.max_users, dict) else [self.max_users]
        if any(cap is not None and cap < (0 if isinstance(self.max_users, dict) else 1) for cap in caps):
            raise ValueError(f"max_users must be positive (per split: >= 0), got {self.max_users}")
        return self

    @model_validator(mode="after")
    def _fits(self) -> "SummarizeConfig":
        generated = self.generation.max_new_tokens
        limit = self.engine.max_model_len
        if 2 * generated + 64 > limit:
            raise ValueError(
                f"generation.max_new_tokens={generated} leaves no room for a prompt in "
                f"engine.max_model_len={limit}"
            )
        merge_inputs = (self.fan_in or 0) * generated
        if self.fan_in and merge_inputs + generated + 128 > limit:
            raise ValueError(
                f"fan_in={self.fan_in} summaries of up to {generated} tokens do not fit "
                f"engine.max_model_len={limit}; lower fan_in or max_new_tokens"
            )
        return self
