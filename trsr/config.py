"""Typed configuration: sections, YAML recipes, dotted CLI overrides.

This module holds the config machinery. Each stage declares its section next to its
code (`trsr.data.config`, `trsr.summarize.config`, ...; each source's class next to
its converter); `trsr.experiment.ExperimentConfig` composes them.

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
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

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
         base: dict[str, Any] | None = None, origin: str | None = None) -> C:
    """Config of type `cls` from an optional YAML file, a base dict and overrides;
    errors name `origin` (default: the file)."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_yaml(path))
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    return build(cls, data, origin=origin or (str(path) if path else "config"))


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
