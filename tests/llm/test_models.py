"""Model references resolve offline, in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from trsr.errors import ConfigError
from trsr.llm.models import resolve


def test_builtin_smollm2_resolves_offline_to_an_hf_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = Path(resolve("smollm2-135m-instruct"))  # converts the GGUF once, then cached
    assert (folder / "config.json").is_file()
    assert resolve("smollm2-135m-instruct") == str(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for word in ("Yes", "No", " Yes", " No"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tokenizer.chat_template


def test_local_folder_passes_through(tiny_model):
    assert resolve(tiny_model) == tiny_model


def test_missing_gguf_and_unknown_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="GGUF file not found"):
        resolve(str(tmp_path / "absent.gguf"))
    with pytest.raises(ConfigError, match="unknown model"):
        resolve("not-a-model")
    with pytest.raises(ConfigError, match="empty"):
        resolve("")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve(str(tmp_path))


def test_uncached_hub_id_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        resolve("some-org/some-model-that-is-not-cached")
