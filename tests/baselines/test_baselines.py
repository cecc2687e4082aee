"""Baselines end to end on a small synthetic prepared run: real Ray, real torch.

One module fixture prepares 400 generated users (learnable drifting-topic structure),
encodes the items with the built-in MiniLM encoder (Ray Data) and trains all nine
baselines (Ray tasks) once; the tests read its outputs.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pyarrow.compute as pc
import pytest

from trsr import storage
from trsr.baselines.config import MODELS, NEURAL_MODELS, BaselinesConfig
from trsr.data.embeddings import compute_embeddings, embeddings_path, load_embeddings
from trsr.baselines.job import run_baselines, scores_path
from trsr.config import load
from trsr.data.prepare import prepare
from trsr.schema import SCORES
from trsr.errors import ConfigError
from trsr.evaluate.metrics import per_list_metrics
from trsr.experiment import ExperimentConfig
from trsr.runs import RunFolder

pytestmark = pytest.mark.integration

# Small and quick; batch size and CTR training are the defaults (the defaults must
# give every model enough optimizer steps on a small training set).
FAST = [
    "baselines.epochs=6",
    "baselines.lr=0.003",
    "baselines.negatives=30",
    "baselines.dim=32",
    "baselines.layers=1",
]


def experiment(run_dir, data_dir, *overrides):
    return load(
        ExperimentConfig,
        None,
        [
            f"run_dir={run_dir}",
            "prepare.source.format=mind",
            f"prepare.source.path={data_dir}",
            "prepare.synthetic.users=400",
            "prepare.synthetic.items=200",
            "prepare.protocol.users={train: 0.5, valid: 0.25, test: 0.25}",
            *FAST,
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    exp = experiment(root / "run", root / "data")
    prepare(exp.prepare, exp.context())
    started = time.perf_counter()
    result = run_baselines(exp.baselines, exp.context())
    return exp, result, time.perf_counter() - started


def _scores(exp, method, split="test"):
    return storage.read_parquet(scores_path(exp.run_dir, method, split))


def test_scores_follow_the_schema_and_cover_every_candidate_once(trained):
    exp, result, _ = trained
    run = RunFolder(exp.run_dir)
    assert list(result) == list(MODELS)
    for method in MODELS:
        for split in ("valid", "test"):
            scores = _scores(exp, method, split)
            assert scores.schema.equals(SCORES), method
            samples = storage.read_parquet(run.samples(split))
            assert scores.num_rows == samples.num_rows
            keys = set(zip(scores.column("list_id").to_pylist(), scores.column("candidate").to_pylist()))
            assert keys == set(zip(samples.column("list_id").to_pylist(), samples.column("candidate").to_pylist()))
            assert len(keys) == scores.num_rows  # every candidate exactly once
            assert pc.all(pc.equal(scores.column("method"), method)).as_py()
            assert np.isfinite(scores.column("score").to_numpy()).all()
            assert run.scores(method, split).details()["prepared"] == run.prepared_fingerprint()
        stats = storage.read_json(storage.join(run.stage_dir("scores"), method, "stats.json"))
        assert stats["test"]["lists"] == storage.read_parquet(run.samples("test")).column("list_id").unique().__len__()
        if method in NEURAL_MODELS:
            epochs = stats["training"]["epochs"]
            assert len(epochs) == 6 and all(np.isfinite(e["loss"]) for e in epochs)
            assert 1 <= stats["training"]["best_epoch"] <= 6
            training = stats["training"]
            assert training["steps_per_epoch"] >= min(100, training["examples"] // 8), training


def test_every_baseline_beats_random_on_learnable_data(trained):
    exp, result, _ = trained

    def per_list(method):
        scores = _scores(exp, method)
        return per_list_metrics(scores.column("list_id"), scores.column("label"), scores.column("score"), seed=0)

    random = per_list("random")
    lists = random["list_id"].size
    assert lists >= 50
    summary = {}
    for method in MODELS:
        if method == "random":
            continue
        metrics = per_list(method)
        summary[method] = (metrics["auc"].mean(), metrics["recall@3"].mean())
    # random sits at chance: AUC 0.5 and Recall@3 3/21 = 0.143, up to noise
    assert abs(random["auc"].mean() - 0.5) < 0.1
    # The learned models find the topic structure: well above random overall and at the top.
    for method in NEURAL_MODELS:
        auc, recall3 = summary[method]
        assert auc > random["auc"].mean() + 0.15 and auc > 0.65, (method, summary)
        assert recall3 > random["recall@3"].mean() + 0.1 and recall3 > 0.25, (method, summary)
    # Popularity is not personal: on this generator (skew inside each topic, topics
    # equally popular) it is informative but weaker.
    auc, recall3 = summary["popularity"]
    assert auc > random["auc"].mean() + 0.05 and auc > 0.55, summary


def test_small_training_sets_get_smaller_batches_not_fewer_steps():
    config = BaselinesConfig()
    assert config.batch_for(458) == 8  # the demo's 1:3 lists: 58 steps per epoch, not 1
    assert config.batch_for(7985) == 80  # the demo's prefixes: 100 steps
    assert config.batch_for(1_000_000) == 512  # large sets keep the configured batch
    assert BaselinesConfig(batch_size=4).batch_for(458) == 4
    assert BaselinesConfig(min_steps_per_epoch=1).batch_for(458) == 458


def test_up_to_date_models_are_skipped_and_embeddings_reused(trained):
    exp, _, first_seconds = trained
    started = time.perf_counter()
    again = run_baselines(exp.baselines, exp.context())
    assert all(stats["skipped"] for stats in again.values())
    assert time.perf_counter() - started < 10 < first_seconds
    info = compute_embeddings(exp.baselines.encoder, exp.context())
    assert info["skipped"] is True and info["path"] == embeddings_path(exp.run_dir, "all-minilm-l6-v2")
    catalogue = storage.read_parquet(RunFolder(exp.run_dir).items()).column("item_id").to_pylist()
    items, matrix = load_embeddings(info["path"], order=catalogue)
    assert items == catalogue and matrix.shape == (len(catalogue), 384)
    assert load_embeddings(info["path"])[0] == sorted(catalogue)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    # Another encoder setting is another fingerprint: not reused.
    other = exp.baselines.encoder.model_copy(update={"max_length": 16})
    assert compute_embeddings(other, exp.context())["skipped"] is False


def test_same_seed_same_scores_other_seed_other_scores(trained, tmp_path):
    exp, _, _ = trained
    # A copy of the run folder (prepared data + embeddings): nothing is recomputed.
    copy = tmp_path / "copy"
    for stage in ("prepared", "embeddings"):
        shutil.copytree(RunFolder(exp.run_dir).stage_dir(stage), copy / stage)
    models = "baselines.models=[dien, sasrec, random]"
    same = experiment(copy, "unused", models)
    result = run_baselines(same.baselines, same.context())
    assert not any(stats["skipped"] for stats in result.values())
    for method in ("dien", "sasrec", "random"):
        assert _scores(same, method).equals(_scores(exp, method)), method
    other = experiment(tmp_path / "copy", "unused", "baselines.models=[sasrec, random]", "baselines.seed=7")
    run_baselines(other.baselines, other.context())
    for method in ("sasrec", "random"):
        assert not _scores(other, method).column("score").equals(_scores(exp, method).column("score"))


def test_bad_configs_name_the_problem(trained):
    exp, _, _ = trained
    with pytest.raises(ConfigError, match=r"baselines.models.*unknown model\(s\) \['bert4rec'\]"):
        experiment("r", "d", "baselines.models=[sasrec, bert4rec]")
    with pytest.raises(ConfigError, match="gpus_per_model"):
        experiment("r", "d", "baselines.device=cuda")
    with pytest.raises(ConfigError, match="select_by"):
        experiment("r", "d", "baselines.select_by=recall@7")
    # Asking for a GPU on a CPU-only cluster fails at once instead of hanging.
    gpu = exp.model_copy(
        update={"baselines": BaselinesConfig(models=["random"], device="cuda", gpus_per_model=1)}
    )
    with pytest.raises(ConfigError, match="GPU"):
        run_baselines(gpu.baselines, gpu.context(), force=True)
    # No prepared data: says which command to run.
    missing = experiment("/nonexistent/run", "d")
    with pytest.raises(Exception, match="trsr data prepare"):
        run_baselines(missing.baselines, missing.context())


def test_cli_baselines(trained, tmp_path, capsys):
    from trsr.cli import main

    exp, _, _ = trained
    copy = tmp_path / "cli"
    shutil.copytree(RunFolder(exp.run_dir).stage_dir("prepared"), copy / "prepared")
    config = tmp_path / "experiment.yaml"
    config.write_text(
        f"run_dir: {copy}\nprepare:\n  source: {{format: mind, path: unused}}\n"
        "baselines:\n  models: [popularity, random]\n"
    )
    assert main(["baselines", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "popularity" in out and "random" in out and "recall@3" in out
    assert storage.exists(scores_path(str(copy), "popularity", "test"))
    assert main(["baselines", "--config", str(config), "--set", "baselines.models=[nope]"]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_pipelines_one_line_for_the_baselines_names_each_model_and_the_best():
    from trsr.baselines.job import describe_brief

    line = describe_brief({
        "ncf": {"test": {"metrics": {"recall@3": 0.37}}, "seconds": 23.8},
        "narm": {"test": {"metrics": {"recall@3": 0.54}}, "seconds": 58.3},
        "random": {"skipped": True, "test": {"metrics": {"recall@3": 0.19}}},
    })
    assert "\n" not in line and line.startswith("3 baselines (ncf 24 s, narm 58 s, random skipped)")
    assert line.endswith("best test Recall@3: narm 0.540")
