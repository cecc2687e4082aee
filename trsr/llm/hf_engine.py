"""The transformers backend of `Engine` (any machine; the reference for vLLM's results).

Generation: batches of `config.batch_size` prompts, left padded, greedy when
temperature is 0, otherwise sampled with torch's RNG seeded per call (forked, so the
global RNG is untouched). Stop strings end a row early and are trimmed from its text.

Scoring (`yes_no_logprobs`): each prefix runs once and its KV cache serves all its
suffixes, `config.batch_size` at a time. Fast path (SDPA or eager attention, no sliding
window in reach): the suffixes of a batch are packed into ONE row after the prefix, with
position ids restarting after the prefix for each suffix and a 4D mask that lets each
suffix see the prefix and itself only; no padding and no per-row copy of the prefix
cache. Fallback (other attention kernels, sliding windows): the prefix cache is repeated
per row for a batch of right-padded suffixes. Either way the next-token
log-probabilities are read at each suffix's last token only (`logits_to_keep`).
"""

from __future__ import annotations

from typing import Sequence

from trsr.errors import ConfigError
from trsr.llm.engine import (
    Engine,
    EngineConfig,
    Generation,
    GenerationParams,
    Prompt,
)
from trsr.llm.models import resolve
from trsr.llm.packing import additive_mask, prefix_sharing_exact, segment_allowed
from trsr.llm.tokenizer import load_tokenizer


def torch_dtype(name: str, on_gpu: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class HFEngine(Engine):
    def __init__(self, config: EngineConfig):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        self.config = config
        self.folder = resolve(config.model)
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.dtype = torch_dtype(config.dtype, on_gpu)

        self._tokenizer = tokenizer = load_tokenizer(self.folder)

        kwargs = {"dtype": self.dtype}
        if config.load_in_8bit:
            if not on_gpu:
                raise ConfigError("engine.load_in_8bit needs a CUDA device (bitsandbytes); none is visible")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": self.device.index or 0}
        if config.load_format == "dummy":
            # Random weights from the config alone (throughput benchmarks), made on the device.
            model_config = AutoConfig.from_pretrained(self.folder)
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(model_config, dtype=self.dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.folder, **kwargs)
        if not config.load_in_8bit:
            model.to(self.device)
        # Stop ids: the tokenizer's EOS plus the model's generation-config EOS ids (as vLLM).
        eos = set()
        original = getattr(model, "generation_config", None)
        configured = getattr(original, "eos_token_id", None) if original is not None else None
        if isinstance(configured, int):
            eos.add(configured)
        elif configured:
            eos.update(int(i) for i in configured)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = sorted(eos)
        self.pad_id = int(tokenizer.pad_token_id)
        # A neutral generation config: the checkpoint's sampling defaults (top_k, min_p,
        # temperature...) must not leak into ours; every decoding knob is set per call.
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        if config.lora_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, config.lora_adapter, is_trainable=False)
        model.eval()
        self.model = model

    # ------------------------------------------------------------------ interface
    @property
    def tokenizer(self):
        return self._tokenizer

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams | None = None) -> list[Generation]:
        params = params or GenerationParams()
        all_ids = self._prompt_ids(prompts)
        results: list[Generation | None] = [None] * len(all_ids)
        size = self.config.batch_size
        for start in range(0, len(all_ids), size):
            chunk = list(range(start, min(start + size, len(all_ids))))
            for index, generation in zip(chunk, self._generate_batch([all_ids[i] for i in chunk], params)):
                results[index] = generation
        return results  # type: ignore[return-value]

    def yes_no_logprobs(
        self, requests: Sequence[tuple[str, Sequence[str]]], yes: str = "Yes", no: str = "No"
    ) -> list[list[tuple[float, float]]]:
        yes_id, no_id = self.yes_no_token_ids(yes, no)
        encoded = self._scoring_ids(requests)
        return [self._score_request(prefix, suffixes, yes_id, no_id) for prefix, suffixes in encoded]

    # ------------------------------------------------------------------ generation
    def _generate_batch(self, batch: list[list[int]], params: GenerationParams) -> list[Generation]:
        import torch
        from transformers import GenerationConfig

        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, longest - len(ids):] = 1
        # Each row may grow to max_model_len; the batch runs as long as the row with most room.
        limits = [min(params.max_new_tokens, self.max_model_len - len(ids)) for ids in batch]
        sampling = {}
        if not params.greedy:  # top_k=0: no top-k cut, as in vLLM (HF's default would be 50)
            sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        generation_config = GenerationConfig(
            max_new_tokens=max(limits),
            do_sample=not params.greedy,
            **sampling,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        with torch.inference_mode(), torch.random.fork_rng(devices=self._rng_devices()):
            if not params.greedy:
                torch.manual_seed(self._seed(params))
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=generation_config,
            )
        new_tokens = output[:, longest:].tolist()
        return [
            self._finish(tokens[:limit], len(ids), limit, params)
            for tokens, ids, limit in zip(new_tokens, batch, limits)
        ]

    def _finish(self, tokens: list[int], prompt_len: int, limit: int, params: GenerationParams) -> Generation:
        eos = set(self.eos_ids)
        stopped = False
        for k, token in enumerate(tokens):
            if token in eos:
                tokens, stopped = tokens[: k + 1], True
                break
        body = tokens[:-1] if stopped else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        finish = "stop" if stopped else "length"
        if not stopped and len(tokens) < limit:
            finish = "stop"  # ended early for a reason generate knows (stopping criteria)
        return Generation(text=text, prompt_tokens=prompt_len, output_tokens=len(tokens), finish_reason=finish)

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    # ------------------------------------------------------------------ scoring
    def _score_request(
        self, prefix: list[int], suffixes: list[list[int]], yes_id: int, no_id: int
    ) -> list[tuple[float, float]]:
        import torch

        if not suffixes:
            return []
        out: list[tuple[float, float] | None] = [None] * len(suffixes)
        with torch.inference_mode():
            past = None
            prefix_logprobs = None
            if prefix:
                result = self.model(
                    input_ids=torch.tensor([prefix], device=self.device),
                    use_cache=True,
                    logits_to_keep=1,
                )
                past = result.past_key_values
                prefix_logprobs = result.logits[0, -1].float().log_softmax(-1)
            # Suffixes sorted by length keep padding (and distinct read positions) small.
            order = sorted(range(len(suffixes)), key=lambda i: len(suffixes[i]))
            empty = [i for i in order if not suffixes[i]]
            for i in empty:  # the next token right after the prefix
                out[i] = (float(prefix_logprobs[yes_id]), float(prefix_logprobs[no_id]))
            todo = [i for i in order if suffixes[i]]
            size = self.config.batch_size
            longest = len(prefix) + max((len(s) for s in suffixes), default=0)
            score = self._score_packed if self._can_pack(longest) else self._score_suffixes
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                logprobs = score(len(prefix), past, [suffixes[i] for i in chunk])
                for i, row in zip(chunk, logprobs):
                    out[i] = (float(row[yes_id]), float(row[no_id]))
        return out  # type: ignore[return-value]

    def _can_pack(self, longest: int) -> bool:
        """Whether the packed path is exact: a custom 4D mask is honoured as given."""
        return prefix_sharing_exact(self.model.config, longest)

    def _score_packed(self, prefix_len: int, past, batch: list[list[int]]):
        """Next-token log-probabilities (rows x vocab), all suffixes packed in one row."""
        import copy

        import torch

        lengths = [len(ids) for ids in batch]
        ids = torch.tensor([[token for suffix in batch for token in suffix]], dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in lengths]) + prefix_len
        # Segment 0: the cached prefix, segment i: suffix i (trsr.llm.packing); the mask's
        # rows are the suffix tokens: each sees the whole prefix and its own earlier tokens.
        owner = torch.repeat_interleave(torch.arange(1, len(batch) + 1), torch.tensor(lengths))
        segments = torch.cat([torch.zeros(prefix_len, dtype=torch.long), owner])
        allowed = segment_allowed(segments, first_query=prefix_len)
        mask = additive_mask(allowed, self._compute_dtype())
        ends = torch.tensor(lengths).cumsum(0) - 1  # each suffix's last token in the row
        kwargs = {}
        if past is not None:
            kwargs["past_key_values"] = copy.deepcopy(past)  # the forward pass extends it
        result = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask[None, None].to(self.device),
            position_ids=positions[None].to(self.device),
            use_cache=past is not None,
            logits_to_keep=ends.to(self.device),
            **kwargs,
        )
        return result.logits[0].float().log_softmax(-1)

    def _compute_dtype(self):
        import torch

        for parameter in self.model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    def _score_suffixes(self, prefix_len: int, past, batch: list[list[int]]):
        """Next-token log-probabilities (rows x vocab) after prefix + each suffix (padded)."""
        import copy

        import torch

        rows, longest = len(batch), max(len(s) for s in batch)
        input_ids = torch.full((rows, longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((rows, prefix_len + longest), dtype=torch.long)
        attention[:, :prefix_len] = 1
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, prefix_len : prefix_len + len(ids)] = 1
        positions = (torch.arange(longest) + prefix_len).unsqueeze(0).expand(rows, -1)
        kwargs = {}
        if past is not None:
            # A fresh copy of the prefix cache per batch, repeated once per row: the
            # forward pass extends the copy, the prefix's own cache stays intact (and keeps
            # its bookkeeping, e.g. the cumulative length of sliding-window layers).
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(rows)
            kwargs["past_key_values"] = cache
        last = [len(ids) - 1 for ids in batch]
        keep = sorted(set(last))
        where = {position: k for k, position in enumerate(keep)}
        result = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=past is not None,
            logits_to_keep=torch.tensor(keep, device=self.device),
            **kwargs,
        )
        picked = result.logits[torch.arange(rows), torch.tensor([where[p] for p in last])]
        return picked.float().log_softmax(-1)
