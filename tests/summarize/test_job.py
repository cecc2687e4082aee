"""The summarize job through Ray Data: tiny model on both engines, and the real default."""

import pyarrow.compute as pc
import pytest

from trsr.config import load
from trsr.data.prepare import prepare
from trsr.experiment import ExperimentConfig
from trsr.summarize.job import read_summaries, storage_rows, summarize

pytestmark = pytest.mark.integration


def experiment(run_dir, data_dir, *overrides):
    return load(
        ExperimentConfig,
        None,
        [
            f"run_dir={run_dir}",
            "prepare.source.format=mind",
            f"prepare.source.path={data_dir}",
            "prepare.synthetic.users=40",
            "prepare.synthetic.items=200",
            "prepare.synthetic.min_history=4",
            "prepare.synthetic.max_history=12",
            "prepare.protocol.min_history=4",
            "prepare.protocol.max_history=12",
            "summarize.items_per_block=3",
            "summarize.users_per_batch=4",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("summarize-job")
    base = experiment(root / "run", root / "data")
    prepare(base.prepare, base.context())
    return root


def tiny(prepared, tiny_model, name, *overrides):
    return experiment(
        prepared / name,
        prepared / "data",
        f"summarize.engine.model={tiny_model}",
        "summarize.engine.max_model_len=1024",
        "summarize.engine.enforce_eager=true",
        "summarize.generation.max_new_tokens=8",
        "summarize.generation.retry_temperature=0",
        "summarize.max_users=10",
        *overrides,
    )


def link_prepared(prepared, name):
    """Reuse the prepared data of the module's run in another run folder."""
    import shutil

    shutil.copytree(prepared / "run" / "prepared", prepared / name / "prepared")


def summarized(table):
    return table.filter(pc.not_equal(table.column("status"), "missing"))


def test_per_step_job_on_transformers_accounts_for_every_user(prepared, tiny_model, ray_local):
    link_prepared(prepared, "hf")
    config = tiny(prepared, tiny_model, "hf", "summarize.execution=per_step")
    stats = summarize(config.summarize, config.context())
    lists = sum(storage_rows(str(prepared / "hf" / "prepared" / "lists" / f"{s}.parquet")) for s in ("train", "valid", "test"))
    for mode in ("hierarchical", "recurrent"):
        everyone = read_summaries(str(prepared / "hf"), mode)
        # Every prepared list is in the output, once; max_users of them are summarized.
        assert everyone.column("list_id").to_pylist() == sorted(set(everyone.column("list_id").to_pylist()))
        assert everyone.num_rows == lists == stats["modes"][mode]["rows_in"]
        table = summarized(everyone)
        users = table.column("user_id").to_pylist()
        assert len(users) == len(set(users)) == 10 == stats["modes"][mode]["summarized"]
        assert set(pc.unique(table.column("mode")).to_pylist()) == {mode}
        assert stats["modes"][mode]["rows_computed"] == lists and stats["modes"][mode]["rows_failed"] == 0
        # The rate counts the 10 users summarized, not the lists passed through.
        seconds = stats["modes"][mode]["seconds"]
        assert stats["modes"][mode]["users_per_s"] == pytest.approx(10 / seconds, rel=0.01, abs=1e-3)
        for row in table.to_pylist():
            blocks = -(-row["items"] // 3)
            assert row["blocks"] == blocks
            steps = [i["step"] for i in row["intermediates"]]
            if mode == "recurrent":
                assert steps == list(range(blocks))  # one update per block
            else:
                assert steps.count(0) == blocks
            assert row["status"] in ("ok", "empty", "repetitive", "echo", "over_length")
            assert row["template_hash"] and row["model"] == tiny_model
        assert sum(n for status, n in stats["modes"][mode]["status"].items() if status != "missing") == 10
        assert stats["modes"][mode]["calls"] == sum(table.column("calls").to_pylist())
    # Test users come first when max_users limits the run.
    from trsr.data.prepare import load_samples

    test_users = set(load_samples(str(prepared / "hf"), "test").column("user_id").to_pylist())
    assert test_users and test_users <= set(table.column("user_id").to_pylist())
    # Up to date: a second call skips.
    assert summarize(config.summarize, config.context())["skipped"] is True


def test_vllm_fused_job_matches_transformers(prepared, tiny_model, ray_local):
    link_prepared(prepared, "vllm")
    config = tiny(
        prepared,
        tiny_model,
        "vllm",
        "summarize.engine.backend=vllm",
        "summarize.execution=fused",
        "summarize.modes=[hierarchical]",
    )
    summarize(config.summarize, config.context())
    vllm = summarized(read_summaries(str(prepared / "vllm"), "hierarchical"))
    hf = summarized(read_summaries(str(prepared / "hf"), "hierarchical"))
    assert vllm.column("user_id").to_pylist() == hf.column("user_id").to_pylist()
    # Greedy decoding (retries too) on the same prompts: the same text on both engines.
    same = sum(a == b for a, b in zip(vllm.column("summary").to_pylist(), hf.column("summary").to_pylist()))
    assert same >= 8, f"only {same}/10 summaries agree between vLLM and transformers"


def test_default_model_writes_readable_summaries(prepared, ray_local):
    link_prepared(prepared, "smol")
    config = experiment(
        prepared / "smol",
        prepared / "data",
        "summarize.execution=fused",
        "summarize.max_users=3",
        "summarize.items_per_block=6",
        "summarize.generation.max_new_tokens=40",
    )
    stats = summarize(config.summarize, config.context())
    for mode in ("hierarchical", "recurrent"):
        table = summarized(read_summaries(str(prepared / "smol"), mode))
        assert table.num_rows == 3
        for summary in table.column("summary").to_pylist():
            words = summary.split()
            assert len(words) >= 5, summary
            alphabetic = sum(w.strip(".,;:!?'\"()").isalpha() for w in words) / len(words)
            assert alphabetic > 0.7, summary
        assert stats["modes"][mode]["output_tokens_per_s"] > 0


def test_asking_for_gpus_the_cluster_lacks_fails_fast(prepared, tiny_model, ray_local):
    import time

    from trsr.errors import ConfigError

    link_prepared(prepared, "gpu")
    config = tiny(prepared, tiny_model, "gpu", "summarize.engine.num_gpus=1")
    started = time.perf_counter()
    # per_step: every level's stage holds its own GPU actor, all of them at once.
    with pytest.raises(ConfigError, match=r"SummarizeStage 1 x 1 GPU \+ SummarizeStage 1 x 1 GPU.*needs \d GPU\(s\) but the Ray cluster has 0"):
        summarize(config.summarize, config.context())
    assert time.perf_counter() - started < 30


def test_max_users_caps_each_split_or_fills_test_first(prepared):
    from trsr.errors import ConfigError
    from trsr.runs import RunFolder
    from trsr.summarize.job import split_caps

    run = RunFolder(str(prepared / "run"))
    rows = {s: storage_rows(run.lists(s)) for s in ("test", "valid", "train")}
    assert split_caps(run, None) == {"train": None, "valid": None, "test": None}
    assert split_caps(run, {"test": None, "valid": 0, "train": 3}) == {"train": 3, "valid": 0, "test": None}
    # A total takes test lists first, then valid, then train.
    assert split_caps(run, rows["test"] + 2) == {"test": rows["test"], "valid": 2, "train": 0}
    # Progress counts the lists the caps let through (the others pass on unsummarized).
    from trsr.summarize.job import summarize_job

    capped = experiment(prepared / "run", prepared / "data", "summarize.max_users={test: null, valid: 0, train: 3}")
    job = summarize_job(capped.summarize, capped.context(), "hierarchical")
    assert job.work_total == rows["test"] + 3 and job.work_rows is not None
    every = experiment(prepared / "run", prepared / "data")
    assert summarize_job(every.summarize, every.context(), "hierarchical").work_total is None
    with pytest.raises(ConfigError, match="max_users must be positive"):
        experiment(prepared / "x", prepared / "data", "summarize.max_users={train: -1}")


def test_a_change_of_the_summarizers_behaviour_makes_earlier_summaries_stale(monkeypatch):
    from trsr.summarize import job, stages
    from trsr.summarize.config import SummarizeConfig

    config = SummarizeConfig()
    before = job.settings_fingerprint(config, 0, "recurrent")
    assert job.settings_fingerprint(config, 0, "recurrent") == before  # stable
    monkeypatch.setattr(stages, "BEHAVIOUR", stages.BEHAVIOUR + 1)
    assert job.settings_fingerprint(config, 0, "recurrent") != before
