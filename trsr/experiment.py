"""The experiment config: one run folder, one seed, one section per stage.

Every job reads the same YAML recipe and uses its own section, so a stage run on its
own (`trsr summarize --config x.yaml`) and the pipeline (`trsr run --config x.yaml`)
agree. Sections of stages a recipe does not use may be left out.
"""

from __future__ import annotations

from trsr.config import PrepareConfig, Section
from trsr.recommend.config import ScoreConfig
from trsr.summarize.config import SummarizeConfig


class ExperimentConfig(Section):
    # Local folder or s3://bucket/prefix holding every stage's outputs.
    run_dir: str
    # Seeds the split, negatives, candidate order, sampling and training.
    seed: int = 42
    prepare: PrepareConfig
    summarize: SummarizeConfig = SummarizeConfig()
    score: ScoreConfig = ScoreConfig()
