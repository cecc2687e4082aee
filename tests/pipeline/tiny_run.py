"""The tiny experiment (36 synthetic MIND users, a tiny random Llama) of the pipeline tests."""

from trsr.config import load
from trsr.experiment import ExperimentConfig


def tiny_experiment(tmp_path, tiny_model, *extra) -> ExperimentConfig:
    return load(
        ExperimentConfig,
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "prepare.source.format=mind",
            f"prepare.source.path={tmp_path / 'data'}",
            "prepare.synthetic.users=36",
            "prepare.synthetic.items=150",
            "prepare.synthetic.min_history=4",
            "prepare.synthetic.max_history=9",
            "prepare.protocol.min_history=4",
            "prepare.protocol.max_history=9",
            "summarize.items_per_block=4",
            "summarize.execution=fused",
            "summarize.users_per_batch=8",
            f"summarize.engine.model={tiny_model}",
            "summarize.engine.max_model_len=1024",
            "summarize.generation.max_new_tokens=8",
            "summarize.generation.retry_temperature=0",
            f"score.engine.model={tiny_model}",
            "score.engine.max_model_len=1024",
            "score.engine.dtype=float32",
            "score.prompt.max_length=1024",
            "score.users_per_batch=4",
            "score.splits=[test]",
            "score.prompt.max_missing_summary_share=1",  # the tiny random model's summaries are mostly flagged
            "train.epochs=1",
            "train.per_device_batch_size=4",
            "train.gradient_accumulation=1",
            "train.learning_rate=1e-3",
            "train.deepspeed=false",
            "train.max_lists=12",
            "train.valid_lists=3",
            "evaluate.bootstrap=200",
            "variants=[hierarchical, recurrent]",
            *extra,
        ],
    )
