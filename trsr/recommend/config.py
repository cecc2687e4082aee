"""Configuration of the recommender: sections `score` (ScoreConfig) and `train`
(SFTConfig: what to train on + TrainConfig, the LoRA run itself)."""

from __future__ import annotations

import re
from typing import Callable, Literal, get_args

from pydantic import Field, model_validator

from trsr.config import Section, fingerprint
from trsr.data.text import MIN_CHARS
from trsr.domains import Domain
from trsr.errors import ConfigError
from trsr.llm.engine import EngineConfig
from trsr.llm.models import DEFAULT_LLM

_METHOD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_METHODS = {
    "hierarchical": "llm-trsr-hierarchical",
    "recurrent": "llm-trsr-recurrent",
    "summary_only": "llm-trsr-summary-only",
    "tallrec": "tallrec",
}


Variant = Literal["hierarchical", "recurrent", "summary_only", "tallrec"]
VARIANTS: tuple[str, ...] = get_args(Variant)
SUMMARY_MODES = ("hierarchical", "recurrent")
DEFAULT_RECENT_ITEMS = 3


class RecommendPromptConfig(Section):
    """The recommender prompt: which parts, how long, which answer words."""

    # hierarchical | recurrent: that summary + K recent items; summary_only: a summary,
    # K = 0; tallrec: no summary, as many recent raw history items as fit.
    variant: Variant = "hierarchical"
    # Wording of the instruction: news (read / click on), shopping (bought / buy), generic.
    domain: Domain = "news"
    # K, the most recent history items in the prompt. null = the variant's default:
    # 3 (hierarchical, recurrent), 0 (summary_only), all that fit (tallrec, where a
    # number caps the items).
    recent_items: int | None = Field(None, ge=0)
    # Longest prompt in tokens, answer and end of turn included (paper: 2048).
    max_length: int = Field(2048, ge=32)
    # Character cap per attribute value (item and candidate), before the length guard.
    item_max_chars: int = Field(300, ge=MIN_CHARS)
    # Per-attribute caps overriding item_max_chars, e.g. {desc: 600}.
    attribute_max_chars: dict[str, int] = {}
    # The guard cuts the summary to this many words before it drops recent items.
    summary_min_words: int = Field(32, ge=0)
    # Answer words: each must be one token right after the assistant header.
    yes: str = "Yes"
    no: str = "No"
    # Which summaries/<mode> to read; null = from the variant (summary_only: hierarchical).
    summary_mode: Literal["hierarchical", "recurrent"] | None = None
    # A list whose user has no usable summary (not summarized, or its summary flagged:
    # echo, over_length, ...), for training and scoring alike: "prompt_without" = the
    # prompt's summary section is left empty (counted in the stats and warned about);
    # "reject" = neither trained on nor scored, written to the stage's _rejects.parquet
    # with the summary's status. Variants without a summary (tallrec) ignore it.
    missing_summary: Literal["prompt_without", "reject"] = "prompt_without"
    # Training and scoring stop before they start when more than this share of the lists
    # they take has no usable summary (a summarize run that covered too few users, or a
    # summarizer that fails): the error gives the counts by status.
    max_missing_summary_share: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "RecommendPromptConfig":
        if self.variant == "tallrec":
            if self.summary_mode is not None:
                raise ValueError("variant tallrec uses no summary; leave summary_mode unset")
            if self.recent_items == 0:
                raise ValueError("variant tallrec needs history items; recent_items must be > 0 or null")
        elif self.variant in SUMMARY_MODES and self.summary_mode not in (None, self.variant):
            raise ValueError(
                f"variant {self.variant} reads {self.variant} summaries; summary_mode="
                f"{self.summary_mode} contradicts it (use variant summary_only to pick freely)"
            )
        if not self.yes.strip() or not self.no.strip() or self.yes == self.no:
            raise ValueError(f"yes/no answer words must be two different words, got {self.yes!r}/{self.no!r}")
        bad = {name: cap for name, cap in self.attribute_max_chars.items() if cap < MIN_CHARS}
        if bad:
            raise ValueError(f"attribute_max_chars below {MIN_CHARS}: {bad}")
        return self

    @property
    def k(self) -> int | None:
        """Recent items in the prompt (None: all that fit, tallrec)."""
        if self.recent_items is not None:
            return self.recent_items
        if self.variant == "summary_only":
            return 0
        if self.variant == "tallrec":
            return None
        return DEFAULT_RECENT_ITEMS

    @property
    def mode(self) -> str | None:
        """The summaries/<mode> this prompt reads (None for tallrec)."""
        if self.variant == "tallrec":
            return None
        if self.variant == "summary_only":
            return self.summary_mode or "hierarchical"
        return self.variant

    @property
    def has_summary(self) -> bool:
        return self.variant != "tallrec"

    @property
    def has_items(self) -> bool:
        return self.k is None or self.k > 0

    def check_min_history(self, min_history: int | None) -> None:
        """ConfigError when K recent items exceed the protocol's shortest history
        (None: unknown, nothing to check)."""
        if self.k is not None and min_history is not None and self.k > min_history:
            raise ConfigError(
                f"recent_items={self.k} is larger than prepare.protocol.min_history="
                f"{min_history}: some users have fewer history items than the prompt asks "
                "for; lower recent_items or raise min_history"
            )


class ScoreConfig(Section):
    # The recommender model (set lora_adapter to the fine-tuned adapter folder).
    engine: EngineConfig = EngineConfig()
    prompt: RecommendPromptConfig = RecommendPromptConfig()
    # Name written in the scores' `method` column and the folder scores/<method>/;
    # null = from the variant (llm-trsr-hierarchical, ..., tallrec).
    method: str | None = None
    # Ranking lists per batch handed to an engine actor (one engine call per batch).
    users_per_batch: int = Field(16, ge=1)
    # Splits `trsr score` scores when no single split is asked for.
    splits: list[Literal["train", "valid", "test"]] = ["valid", "test"]
    # Score only the first N lists of a split (by list_id); null = all. For quick runs.
    max_lists: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "ScoreConfig":
        if self.prompt.max_length > self.engine.max_model_len:
            raise ValueError(
                f"prompt.max_length={self.prompt.max_length} exceeds engine.max_model_len="
                f"{self.engine.max_model_len}"
            )
        if self.method is not None and not _METHOD.match(self.method):
            raise ValueError(
                f"method {self.method!r}: use letters, digits, '.', '_' or '-' (it names a folder)"
            )
        if not self.splits:
            raise ValueError("splits: name at least one split")
        return self

    @property
    def method_name(self) -> str:
        return self.method or DEFAULT_METHODS[self.prompt.variant]


# Folder of the LoRA run under train/<method>/ (Ray Train's run name).
LORA_RUN = "lora"

# valid_fn(adapter_dir, epoch) -> metrics: validation after each epoch (train_lora).
ValidFn = Callable[[str, int], dict]


class TrainConfig(Section):
    """LoRA fine-tuning of the recommender (defaults: the paper's settings)."""

    # Model reference (trsr.llm.models): built-in name, HF folder, .gguf or cached hub id.
    model: str = DEFAULT_LLM
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16, gt=0)
    # Prefix-shared groups equal separate texts exactly only with 0 (train_data).
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # LoRA in the top N decoder layers only (null = every layer). The backward pass then
    # stops below them: on CPU, N = a third of the layers trains about 1.7x faster.
    lora_top_layers: int | None = Field(None, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    # "linear": warmup then linear decay to 0 (transformers/TRL default); "constant".
    lr_schedule: Literal["linear", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # Gradient clipping (transformers' default 1.0); null = none.
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(8, ge=1)
    # Texts per micro-batch on one worker (a group larger than this is a micro-batch alone).
    per_device_batch_size: int = Field(1, ge=1)
    # Micro-batches per worker and optimizer step: with effective_batch null, the step is
    # workers x per_device_batch_size x gradient_accumulation texts.
    gradient_accumulation: int = Field(64, ge=1)
    # Texts per optimizer step over all workers (groups are never split, so about this
    # many); null = workers x per_device_batch_size x gradient_accumulation. Set it to keep
    # the step when the number of workers changes (a resume with other workers).
    effective_batch: int | None = Field(None, ge=1)
    max_length: int = Field(2048, ge=2)
    # Texts longer than max_length tokens: "error" (default) or "drop" them (counted).
    overlong: Literal["error", "drop"] = "error"
    # "full": next-token loss over the whole text (paper); "answer": the answer tokens only.
    loss: Literal["full", "answer"] = "full"
    # Grouped examples (the candidates of one list): run the shared prompt prefix through
    # the model once per group (same loss and gradient as separate texts, less work).
    share_prefix: bool = True
    # Groups each worker reshuffles its shard within, per epoch (Ray Data's local shuffle
    # buffer; the groups arrive in a fixed seeded order); 0 = the same order every epoch.
    shuffle_buffer: int = Field(1024, ge=0)
    # Ray Train workers (data parallel), and what each one reserves.
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    # DeepSpeed ZeRO-2 (bf16 on GPU, fp32 on CPU); false = plain torch AdamW (+ DDP).
    deepspeed: bool = True
    # CPU, torch path: forward/backward under bfloat16 autocast (weights and optimizer
    # stay fp32). 2.2-3x faster per step on CPUs with AVX512-BF16 or AMX (measured on
    # this project's 2-core EPYC); losses agree with fp32 to about 3 digits.
    cpu_bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    # Cap on optimizer steps over the whole run (demos and tests); null = no cap.
    max_steps: int | None = Field(None, ge=1)
    # Print loss, learning rate, texts/step and tokens/s every this many steps (rank 0).
    log_every: int = Field(10, ge=1)
    # A checkpoint every this many optimizer steps, besides every epoch end; null = at
    # epoch ends only. A failed or killed run continues from the latest one.
    checkpoint_every_steps: int | None = Field(None, ge=1)
    # Metric of valid_fn that picks the best epoch, and its direction; null = last epoch.
    valid_metric: str | None = None
    valid_mode: Literal["max", "min"] = "max"
    # Folder under storage_path that holds this run's checkpoints (Ray's run name).
    run_name: str = "lora"
    # Ray Train restarts after worker failures (each continues from the latest
    # checkpoint, a step checkpoint included); -1 = without limit.
    max_failures: int = Field(2, ge=-1)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.target_modules:
            raise ValueError("target_modules is empty: LoRA needs at least one module")
        if self.cpu_bf16 and (self.use_gpu or self.deepspeed):
            raise ValueError("cpu_bf16 applies to CPU training with deepspeed: false (GPUs train in bf16 already)")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name {self.run_name!r} must be a non-empty folder name")
        return self

    @property
    def effective_batch_size(self) -> int:
        """Texts per optimizer step over all workers (about: groups are not split)."""
        if self.effective_batch is not None:
            return self.effective_batch
        return self.workers * self.per_device_batch_size * self.gradient_accumulation

    def resume_fingerprint(self, data_fingerprint: str) -> str:
        """What a resumed run must share with the run it continues (not epochs, caps,
        logging, validation, checkpoint cadence or resources such as the workers)."""
        keys = (
            "model", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "lora_top_layers",
            "learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm",
            "max_length", "overlong", "loss", "share_prefix", "shuffle_buffer", "use_gpu",
            "deepspeed", "cpu_bf16", "seed",
        )
        # Validated again with every value given, so that a default (16) and the same
        # value read back from JSON or YAML (16.0) fingerprint alike.
        checked = TrainConfig.model_validate({name: getattr(self, name) for name in TrainConfig.model_fields})
        setup = {key: getattr(checked, key) for key in keys}
        setup["effective_batch_size"] = self.effective_batch_size
        return fingerprint(setup, data_fingerprint)


class SFTConfig(TrainConfig):
    """Section `train`: the LoRA run (every TrainConfig field) + what to train on."""

    # false: no fine-tuning; the score stage uses the base model zero-shot.
    enabled: bool = True
    # null = score.engine.model (the model that will score must be the one trained).
    model: str | None = None
    # null = score.prompt.max_length.
    max_length: int | None = Field(None, ge=2)
    # Train on the first N training lists by user id (the order summarize.max_users
    # follows); null = all.
    max_lists: int | None = Field(None, ge=1)
    # Validate each epoch on the first N validation lists (by user id) and keep the best
    # epoch by valid_metric; 0 = no validation, the last epoch wins.
    valid_lists: int = Field(64, ge=0)
    valid_metric: str | None = "mrr@10"
    # Lists per batch (and per committed block) when the training texts are built, and
    # the CPU actors that build them.
    texts_per_batch: int = Field(64, ge=1)
    text_actors: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_valid(self) -> "SFTConfig":
        if self.valid_lists and not self.valid_metric:
            raise ValueError("valid_lists > 0 needs a valid_metric (e.g. mrr@10, auc)")
        return self

    def lora_config(self, score: ScoreConfig) -> TrainConfig:
        """The TrainConfig for train_lora, with the model and length filled in."""
        fields = {name: getattr(self, name) for name in TrainConfig.model_fields}
        fields["model"] = self.model or score.engine.model
        fields["max_length"] = self.max_length or score.prompt.max_length
        fields["run_name"] = LORA_RUN
        fields["valid_metric"] = self.valid_metric if self.valid_lists else None
        return TrainConfig(**fields)
