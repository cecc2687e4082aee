"""`build_engine`: the engine an EngineConfig describes (trsr.llm.engine declares the
interface; the two backends implement it; this module picks one, so that the interface
does not import its implementations)."""

from __future__ import annotations

from pathlib import Path

from trsr.errors import ConfigError
from trsr.llm import adapters
from trsr.llm.engine import Engine, EngineConfig, check_resources
from trsr.llm.models import resolve


def build_engine(config: EngineConfig) -> Engine:
    """The engine `config` describes; resource and model problems fail before loading."""
    check_resources(config)
    resolve(config.model)  # ConfigError for an unknown or missing model, before heavy imports
    if config.lora_adapter is not None:
        config = config.model_copy(update={"lora_adapter": adapters.local_adapter(config.lora_adapter)})
        if not (Path(config.lora_adapter) / "adapter_config.json").is_file():
            raise ConfigError(
                f"engine.lora_adapter={config.lora_adapter!r}: not a PEFT adapter folder "
                "(no adapter_config.json)"
            )
    if config.backend == "transformers":
        from trsr.llm.hf_engine import HFEngine

        return HFEngine(config)
    if config.backend == "vllm":
        from trsr.llm.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    raise ConfigError(f"engine.backend={config.backend!r}: expected transformers or vllm")
