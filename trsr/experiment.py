"""The experiment config: one run folder, one seed, one section per stage.

Every job reads the same YAML recipe and uses its own section, so a stage run on its
own (`trsr summarize --config x.yaml`) and the pipeline (`trsr run --config x.yaml`)
agree. Sections of stages a recipe does not use may be left out.

`variants` lists the recommender variants the pipeline trains, scores and evaluates
(each with its own LoRA adapter, as in the paper); `trsr train` / `trsr score` run one
variant, `score.prompt.variant` (or `--variant`).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import model_validator

from trsr import storage

from trsr.baselines.config import BaselinesConfig
from trsr.config import Section, load
from trsr.errors import ConfigError
from trsr.data.config import PrepareConfig
from trsr.evaluate.config import EvaluateConfig
from trsr.recommend.config import VARIANTS, SFTConfig, ScoreConfig, Variant
from trsr.ray_utils import ClusterShape
from trsr.runner import RunContext, RunnerConfig
from trsr.runs import RunFolder
from trsr.summarize.config import SummarizeConfig


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

    @model_validator(mode="before")
    @classmethod
    def _one_domain(cls, data: Any) -> Any:
        """summarize.domain and score.prompt.domain word the same catalogue (trsr.domains):
        the one a recipe sets is used for both; both set and different is an error."""
        if not isinstance(data, dict):
            return data
        summarize, score = data.get("summarize"), data.get("score")
        prompt = score.get("prompt") if isinstance(score, dict) else None
        ours = summarize.get("domain") if isinstance(summarize, dict) else None
        theirs = prompt.get("domain") if isinstance(prompt, dict) else None
        if ours and theirs and ours != theirs:
            raise ValueError(
                f"summarize.domain={ours} and score.prompt.domain={theirs} disagree: both word "
                "the same catalogue; set one of them (the other follows)"
            )
        if ours and not theirs and (score is None or isinstance(score, dict)) and (prompt is None or isinstance(prompt, dict)):
            data = {**data, "score": {**(score or {}), "prompt": {**(prompt or {}), "domain": ours}}}
        elif theirs and not ours and (summarize is None or isinstance(summarize, dict)):
            data = {**data, "summarize": {**(summarize or {}), "domain": theirs}}
        return data

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

    def context(self) -> RunContext:
        """The run folder, seed and runner settings every stage job takes beside its own
        section."""
        return RunContext(RunFolder(self.run_dir), self.seed, self.runner)

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


def save_run_config(experiment: ExperimentConfig) -> str:
    """Write the resolved config (every key, defaults included) into its run folder, so
    later commands can be given `--run-dir` alone. Returns the path."""
    path = RunFolder(experiment.run_dir).config
    text = yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False)
    storage.write_text("# written by trsr: the config of the last command given --config\n" + text, path)
    return path


def load_run_config(run_dir: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """The experiment config a run folder holds (save_run_config), with `overrides`; its
    run_dir is the folder given (which may have moved since)."""
    path = RunFolder(run_dir).config
    if not storage.exists(path):
        raise ConfigError(
            f"{path}: not found: {run_dir} holds no config yet; give --config RECIPE.yaml "
            "(every command given --config writes it there)"
        )
    try:
        data = yaml.safe_load(storage.read_bytes(path).decode()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return load(ExperimentConfig, None, [f"run_dir={run_dir}", *(overrides or [])], base=data, origin=path)
