"""Typed configuration: sections, YAML recipes, dotted CLI overrides.

This module holds the config machinery and the data sections (sources, protocol,
prepare). Each later stage declares its section next to its code
(`trsr.summarize.config`, ...); `trsr.experiment.ExperimentConfig` composes them.

An experiment is one YAML recipe (see `jobs/configs/`): a run folder, a seed, and
one section per stage. Every job reads the same recipe and uses its own section, so
`trsr data prepare --config demo.yaml` and `trsr run --config demo.yaml` agree.

    run_dir: runs/demo            # local path or s3://bucket/prefix
    seed: 42
    prepare:
      source: {format: mind, path: data/demo-mind}
      protocol: {min_history: 10, max_history: 25}

Overrides use dotted keys and YAML values: `--set prepare.protocol.min_history=5`.
Unknown keys are errors (a typo never silently falls back to a default).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trsr.errors import ConfigError


class Section(BaseModel):
    """Base for all config sections: unknown keys are rejected, and a key that was
    renamed (`renamed_keys`: old -> new) is an error that names its new name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in cls.renamed_keys.items():
                if old in data:
                    raise ValueError(f"'{old}' was renamed to '{new}'")
        return data


# --------------------------------------------------------------------------- sources
# One class per raw format; `format` selects it. The converters live in
# trsr/data/converters/<format>.py and read exactly these fields.


class MindSource(Section):
    """MIND: `behaviors.tsv` + `news.tsv` (tab separated, no header)."""

    format: Literal["mind"] = "mind"
    path: str = Field(description="folder holding the two files")
    behaviors: str = "behaviors.tsv"
    news: str = "news.tsv"
    # Rendered in this order; any of category, subcategory, title, abstract.
    attributes: list[str] = ["category", "subcategory", "title"]


class AmazonM2Source(Section):
    """Amazon-M2 (KDD Cup 2023): sessions_train.csv + products_train.csv."""

    format: Literal["amazon_m2"] = "amazon_m2"
    path: str
    sessions: str = "sessions_train.csv"
    products: str = "products_train.csv"
    # Keep one locale (product ids are per locale); null keeps all (ids become id@locale).
    locale: str | None = "UK"
    attributes: list[str] = [
        "title", "price", "brand", "color", "size", "model", "material", "author", "desc", "locale",
    ]


class RecBoleSource(Section):
    """RecBole atomic files: `<name>.item` plus `<name>.inter` or `<name>.test.inter`."""

    format: Literal["recbole"] = "recbole"
    path: str
    # File stem; inferred when the folder holds one dataset.
    dataset: str | None = None
    # Interaction file suffix: "test.inter" (history list + next item) or "inter"
    # (user, item, timestamp rows); null picks test.inter when present.
    inter: str | None = None
    # Item columns (names without the ":type" suffix); null = every text column.
    attributes: list[str] | None = None


class GenericSource(Section):
    """Bring your own data: an interactions table and an items table.

    Files may be .csv, .tsv, .parquet or .jsonl; paths are relative to `path`.
    """

    format: Literal["generic"] = "generic"
    path: str
    interactions: str = "interactions.csv"
    items: str = "items.csv"
    user_column: str = "user_id"
    item_column: str = "item_id"
    # Orders each user's interactions; null keeps file order.
    time_column: str | None = "timestamp"
    # Id column in the items table; null = item_column.
    item_id_column: str | None = None
    # Text columns of the items table to use, in order; null = all but the id.
    attributes: list[str] | None = None


Source = Annotated[
    Union[MindSource, AmazonM2Source, RecBoleSource, GenericSource],
    Field(discriminator="format"),
]
SOURCE_FORMATS = ("mind", "amazon_m2", "recbole", "generic")


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


# ---------------------------------------------------------------------------- loading

C = TypeVar("C", bound=BaseModel)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. seed=7")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({error})") from error
        out.append((key.strip(), value))
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def build(cls: type[C], data: dict[str, Any], origin: str = "config") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            location = ".".join(str(p) for p in problem["loc"])
            lines.append(f"  {location}: {problem['msg']}")
        raise ConfigError(f"{origin}: invalid configuration\n" + "\n".join(lines)) from None


def load(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict[str, Any] | None = None) -> C:
    """Config of type `cls` from an optional YAML file, a base dict and overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml(path))
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    return build(cls, data, origin=str(path) if path else "config")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def fingerprint(*parts: Any) -> str:
    """Stable short hash of config sections (and any other JSON-able inputs)."""
    payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
