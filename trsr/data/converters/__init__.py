"""Converters from each dataset's own format to the canonical tables.

`convert(source)` dispatches on `source.format` to `trsr.data.converters.<format>`,
whose `convert(source) -> ConvertedDataset` reads the raw files and whose config
class (`MindSource`, ...) declares the source's fields. Add a format by adding a
module with both, its name to SOURCE_FORMATS, and its class to the `Source` union in
`trsr.data.config`.
"""

from __future__ import annotations

import importlib

from trsr.data.converters.base import ConvertedDataset
from trsr.errors import ConfigError

SOURCE_FORMATS = ("mind", "amazon_m2", "recbole", "generic")


def convert(source) -> ConvertedDataset:
    if source.format not in SOURCE_FORMATS:
        raise ConfigError(f"source.format: unknown format {source.format!r}; one of {SOURCE_FORMATS}")
    module = importlib.import_module(f"trsr.data.converters.{source.format}")
    return module.convert(source)


__all__ = ["convert", "ConvertedDataset", "SOURCE_FORMATS"]
