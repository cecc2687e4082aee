"""Shared fixtures. Tests must pass without ../shared: those that use it skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing may come from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data_dir() -> Path:
    return Path(os.environ.get("TRSR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    folder = shared_data_dir()
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (real datasets are not part of the repository)")
    return folder


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 endpoint on loopback (moto's threaded server) for the session.

    Sets the AWS_* variables that trsr.storage (s3fs), pyarrow and Ray workers read.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns its s3:// URL."""
    import uuid

    import boto3

    name = f"trsr-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


# ---------------------------------------------------------------- tiny models


def benchmark_module(name: str):
    """A script of benchmarks/ loaded as a module (benchmarks/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_llama(folder, seed: int = 0) -> str:
    """A randomly initialised, seeded Llama (head_dim 64, as vLLM's CPU backend needs)
    with the built-in SmolLM2 tokenizer, so "Yes"/"No" are single tokens and a chat
    template exists. Written as an ordinary Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trsr.llm.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        # Larger than the usual 0.02: peaked next-token distributions keep greedy
        # decoding away from near-ties that rounding could flip.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hf_engine(tiny_model):
    from trsr.llm.engine import EngineConfig
    from trsr.llm.factory import build_engine

    engine = build_engine(
        EngineConfig(backend="transformers", model=tiny_model, dtype="float32", max_model_len=256, batch_size=4)
    )
    yield engine
    engine.close()


def write_tiny_lora(model_folder: str, folder, rank: int = 8, seed: int = 1) -> str:
    """A PEFT LoRA adapter for the tiny model with random (non-zero) A and B, so it
    visibly changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random B as well as A: a real, non-identity delta
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory) -> str:
    return write_tiny_lora(tiny_model, tmp_path_factory.mktemp("tiny-lora"))


# ------------------------------------------------------------------------- Ray
@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray cluster for the session (Ray's own fixtures are not in the wheel),
    started after the S3 endpoint: its workers inherit the credentials from this
    process's environment, as on a cluster they come from the nodes' (never from a
    runtime env)."""
    import ray

    from trsr.ray_utils import init_ray

    init_ray(local_cpus=8)
    yield
    ray.shutdown()
