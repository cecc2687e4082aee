"""The whole pipeline on a tiny random model: prepare, summarize, train, score, evaluate
(both summary variants), then the same run again skipping every stage; and the clear
errors of stages run out of order or with bad configs."""

import json

import pytest

from trsr import storage
from trsr.schema import SCORES
from trsr.errors import ConfigError, TrsrError
from trsr.runs import RunFolder

from .tiny_run import tiny_experiment


def test_pipeline_trains_scores_and_evaluates_both_variants(finished_run):
    experiment, results = finished_run
    run = RunFolder(experiment.run_dir)
    test_lists = set(storage.read_parquet(run.samples("test")).column("list_id").to_pylist())
    for method in ("llm-trsr-hierarchical", "llm-trsr-recurrent"):
        trained = results[f"train {method}"]
        assert trained["examples"] == 2 * trained["lists"] == 24  # 1:1 training lists
        assert len(trained["history"]) == 1 and trained["history"][0]["valid"]["lists"] == 3
        # A list's two texts trained as one row: their shared prompt prefix ran once.
        epoch = trained["history"][0]
        assert epoch["computed_tokens"] < 0.75 * epoch["tokens"], epoch
        assert storage.exists(storage.join(trained["best_adapter"], "adapter_config.json"))
        from trsr.recommend.score import read_scores

        scores = read_scores(run.root, method, "test")
        assert scores.schema.equals(SCORES)
        assert set(scores.column("list_id").to_pylist()) == test_lists
        assert scores.num_rows == 21 * len(test_lists)
        # The scorer loaded this method's trained adapter.
        stats = results[f"score {method}"]["test"]
        assert stats["adapter"] == trained["best_adapter"]
    report = results["evaluate"]
    assert list(report["methods"]) == ["llm-trsr-hierarchical", "llm-trsr-recurrent"]
    for row in report["methods"].values():
        assert row["lists"] == len(test_lists) and row["users"] == len(test_lists)
        for name in ("recall@3", "recall@5", "recall@10", "mrr@3", "mrr@5", "mrr@10", "ndcg@10", "auc"):
            low, high = row["intervals"][name]
            assert 0.0 <= low <= row["metrics"][name] <= high <= 1.0
    assert report["chance"]["recall@3"] == pytest.approx(3 / 21)
    markdown = storage.read_bytes(storage.join(run.root, "report", "test.md")).decode()
    assert "| llm-trsr-recurrent |" in markdown and "Recall@3" in markdown and "(chance)" in markdown
    # the run behind the table: summaries' health, models, every stage's seconds
    assert "## Summaries" in markdown and "- hierarchical: " in markdown and "- recurrent: " in markdown
    seconds = report["run"]["stage_seconds"]
    for stage in ("prepare", "summarize hierarchical", "train llm-trsr-hierarchical", "score llm-trsr-recurrent"):
        assert seconds.get(stage, 0) > 0, (stage, seconds)
    assert report["run"]["models"]["llm-trsr-hierarchical"]["adapter"]
    # two example users, drawn from the test lists: each method's ranking marks exactly
    # one positive, and the summary each variant read is shown
    examples = report["examples"]
    assert len(examples) == 2 and {e["list_id"] for e in examples} <= test_lists
    for example in examples:
        assert set(example["ranked"]) == set(report["methods"])
        assert all(sum(r["positive"] for r in rows) == 1 for rows in example["ranked"].values())
        assert set(example["summaries"]) <= {"hierarchical", "recurrent"} and example["recent_items"]
    assert {row["family"] for row in report["methods"].values()} == {"llm"}
    assert "## Example users" in markdown and "(positive)" in markdown
    # `trsr run` prints the report's tables only; the rest is in the file
    from trsr.evaluate.report import markdown as render

    brief = render(report, full=False)
    assert brief.splitlines()[:12] == markdown.splitlines()[:12] and "| llm-trsr-recurrent |" in brief
    assert "## Example users" not in brief and "## Run" not in brief
    assert storage.read_bytes(storage.join(run.root, "report", "test.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(storage.read_bytes(storage.join(run.root, "report", "test.json")))["lists"] == len(test_lists)


def test_rerun_skips_every_stage_and_a_change_reruns_only_what_it_touches(finished_run, tmp_path):
    from trsr.pipeline import run_pipeline

    experiment, first = finished_run
    again = run_pipeline(experiment)
    assert again["prepare"]["skipped"] and again["summarize"]["skipped"]
    for method in ("llm-trsr-hierarchical", "llm-trsr-recurrent"):
        assert again[f"train {method}"]["skipped"] is True
        assert again[f"score {method}"]["test"]["skipped"] is True
    assert again["evaluate"]["methods"] == first["evaluate"]["methods"]

    # A change that only concerns scoring (batching) rescores without retraining.
    changed = experiment.model_copy(
        update={"score": experiment.score.model_copy(update={"users_per_batch": 2})}
    )
    third = run_pipeline(changed)
    assert third["summarize"]["skipped"] and third["train llm-trsr-recurrent"]["skipped"]
    assert third["score llm-trsr-recurrent"]["test"]["skipped"] is False


def test_new_training_texts_retrain_from_scratch_over_the_old_checkpoints(finished_run, tmp_path):
    """Training texts that changed (fewer lists here; new summaries do the same) clear
    the old LoRA checkpoints as any stage clears outputs of another fingerprint; they
    used to stop the run ("holds checkpoints of a different training setup")."""
    import shutil

    from trsr.recommend.sft import train

    experiment, first = finished_run
    shutil.copytree(experiment.run_dir, tmp_path / "run")  # the shared run stays as it is
    changed = tiny_experiment(tmp_path, experiment.score.engine.model, "train.max_lists=8", "train.valid_lists=0")
    before = first["train llm-trsr-hierarchical"]
    result = train(changed.train, changed.score, changed.context())
    assert result["skipped"] is False and result["lists"] == 8 and before["lists"] == 12
    assert result["resumed_from_epoch"] == 0 and result["epochs_run"] == [1]
    assert result["lora_dir"].startswith(str(tmp_path / "run"))
    assert train(changed.train, changed.score, changed.context())["skipped"] is True


def test_stages_out_of_order_and_bad_configs_fail_clearly(tmp_path, tiny_model, ray_local):
    from trsr.data.prepare import prepare
    from trsr.recommend.score import score
    from trsr.recommend.sft import train

    experiment = tiny_experiment(tmp_path, tiny_model)
    with pytest.raises(TrsrError, match=r"prepared/_manifest.json: not found; run `trsr data prepare`"):
        train(experiment.train, experiment.score, experiment.context())
    prepare(experiment.prepare, experiment.context())
    with pytest.raises(TrsrError, match=r"summaries/hierarchical/_manifest.json: not found; run `trsr summarize`"):
        train(experiment.train, experiment.score, experiment.context())
    tallrec = experiment.for_variant("tallrec")
    with pytest.raises(TrsrError, match=r"train/tallrec/result.json: not found; run `trsr train`"):
        score(tallrec.score, tallrec.context(), trained=tallrec.train.enabled)
    # K larger than the shortest history the protocol allows.
    deep = tallrec
    deep = deep.model_copy(update={"score": deep.score.model_copy(
        update={"prompt": deep.score.prompt.model_copy(update={"recent_items": 30})})})
    with pytest.raises(ConfigError, match="recent_items.*30.*min_history"):
        score(deep.score, deep.context(), trained=deep.train.enabled)
    # An unknown model names itself.
    with pytest.raises(ConfigError, match="no-such-model"):
        unknown = tiny_experiment(tmp_path, tiny_model, "score.engine.model=no-such-model").for_variant("tallrec")
        score(unknown.score, unknown.context(), trained=False)
    # A variant whose summaries are not produced.
    with pytest.raises(Exception, match="reads recurrent summaries but summarize.modes"):
        tiny_experiment(tmp_path, tiny_model, "summarize.modes=[hierarchical]")
