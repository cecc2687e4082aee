"""The experiment config: one run folder, one seed, one section per stage.

Every job reads the same YAML recipe and uses its own section, so a stage run on its
own (`trsr summarize --config x.yaml`) and the pipeline (`trsr run --config x.yaml`)
agree. Sections of stages a recipe does not use may be left out.

`variants` lists the recommender variants the pipeline trains, scores and evaluates
(each with its own LoRA adapter, as in the paper); `trsr train` / `trsr score` run one
variant, `score.prompt.variant` (or `--variant`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from trsr.baselines.config import BaselinesConfig
from trsr.config import PrepareConfig, Section
from trsr.evaluate.report import EvaluateConfig
from trsr.recommend.config import SFTConfig, ScoreConfig
from trsr.recommend.prompt import VARIANTS
from trsr.ray_utils import ClusterShape
from trsr.runner import RunnerConfig
from trsr.summarize.config import SummarizeConfig

Variant = Literal["hierarchical", "recurrent", "summary_only", "tallrec"]


class ExperimentConfig(Section):
    # Local folder or s3://bucket/prefix holding every stage's outputs.
    run_dir: str
    # Seeds the split, negatives, candidate order, sampling and training.
    seed: int = 42
    prepare: PrepareConfig
    summarize: SummarizeConfig = SummarizeConfig()
    train: SFTConfig = SFTConfig()
    score: ScoreConfig = ScoreConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    # Faults and progress of every streaming stage (summarize, training texts, score,
    # item embeddings).
    runner: RunnerConfig = RunnerConfig()
    # Recommender variants `trsr run` trains and scores; null = [score.prompt.variant].
    variants: list[Variant] | None = None
    # `trsr run` also trains and scores baselines.models, for the same table.
    with_baselines: bool = False
    # The cluster the recipe is written for, NODESxGPUS[:CPUS per node] (e.g. 12x8):
    # `trsr run` checks every stage's resources against it before any work (`trsr plan`
    # prints them). null = against the connected Ray cluster (a cluster that autoscales
    # should declare its full shape here).
    cluster: str | None = None

    @model_validator(mode="after")
    def _check_variants(self) -> "ExperimentConfig":
        if self.variants is not None:
            if not self.variants:
                raise ValueError("variants: name at least one of " + ", ".join(VARIANTS) + ", or null")
            if len(set(self.variants)) != len(self.variants):
                raise ValueError(f"variants has duplicates: {self.variants}")
            if self.score.method is not None and len(self.variants) > 1:
                raise ValueError("score.method names one method; leave it null when variants lists several")
        if self.cluster is not None:
            ClusterShape.parse(self.cluster)
        for variant in self.variants or []:
            mode = self.for_variant(variant).score.prompt.mode
            if mode is not None and mode not in self.summarize.modes:
                raise ValueError(
                    f"variant {variant} reads {mode} summaries but summarize.modes is {self.summarize.modes}"
                )
        return self

    def variant_names(self) -> list[str]:
        return list(self.variants) if self.variants is not None else [self.score.prompt.variant]

    def for_variant(self, variant: str) -> "ExperimentConfig":
        """This experiment with score.prompt.variant = `variant` (validated)."""
        if variant == self.score.prompt.variant:
            return self
        prompt = self.score.prompt.model_dump()
        prompt.update(variant=variant)
        if variant == "tallrec" or (variant in ("hierarchical", "recurrent") and prompt.get("summary_mode") not in (None, variant)):
            prompt["summary_mode"] = None
        score = self.score.model_copy(update={"prompt": type(self.score.prompt).model_validate(prompt)})
        return self.model_copy(update={"score": score})
