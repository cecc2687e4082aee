"""The resource plan: what each stage asks for at once, checked against cluster shapes
(no Ray, no data: the plan comes from the config alone)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trsr.config import load
from trsr.errors import ConfigError
from trsr.experiment import ExperimentConfig
from trsr.plan import ActorGroup, StagePlan, check_plan, experiment_plan, require_plan, stage_problem
from trsr.ray_utils import ClusterShape

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def recipe(name: str, *overrides: str) -> ExperimentConfig:
    return load(ExperimentConfig, CONFIGS / name, list(overrides))


def by_name(plans):
    return {p.name: p for p in plans}


def test_cluster_shapes_parse_and_bad_ones_say_the_format():
    shape = ClusterShape.parse("12x8:96")
    assert len(shape.nodes) == 12 and shape.gpus == 96 and shape.nodes[0] == (8.0, 96.0)
    assert ClusterShape.parse(" 2 x 0.5 ").nodes == ((0.5, None), (0.5, None))
    for bad in ("12", "x8", "0x8", "12x8:", "twelve"):
        with pytest.raises(ConfigError, match="NODESxGPUS"):
            ClusterShape.parse(bad)
    with pytest.raises(Exception, match="NODESxGPUS"):
        recipe("demo.yaml", "cluster=12by8")


@pytest.mark.parametrize("name", ["mind_cluster.yaml", "amazon_m2_cluster.yaml"])
def test_the_cluster_recipes_fit_their_cluster_and_use_its_gpus(name):
    experiment = recipe(name)
    cluster = ClusterShape.parse(experiment.cluster)
    plans = require_plan(experiment, cluster)
    stages = by_name(plans)
    # every stage of the method is planned: both modes, training and scoring per variant
    for stage in ("summarize hierarchical", "summarize recurrent", "train llm-trsr-hierarchical",
                  "score llm-trsr-recurrent", "training texts llm-trsr-recurrent"):
        assert stage in stages
    assert stages["summarize recurrent"].gpus == stages["summarize hierarchical"].gpus == 96
    assert stages["score llm-trsr-hierarchical"].gpus == 96
    assert 0 < stages["train llm-trsr-hierarchical"].gpus <= 96


def test_the_per_step_layout_is_refused_naming_the_stage_and_the_numbers():
    experiment = recipe("mind_cluster.yaml", "summarize.execution=per_step", "summarize.engine.actors=12")
    cluster = ClusterShape.parse("12x8")
    problems = check_plan(experiment_plan(experiment), cluster)
    # hierarchical: 4 levels x 12 x 2 = 96 fits; recurrent: 5 steps x 12 x 2 = 120 does not
    assert len(problems) == 1, problems
    assert problems[0].startswith("summarize recurrent: needs 5 engine stages x 12 SummarizeStage")
    assert "= 120 GPUs at once, the cluster has 96" in problems[0] and "fused" in problems[0]
    with pytest.raises(ConfigError, match=r"cannot be scheduled on 12x8.*\n  summarize recurrent"):
        require_plan(experiment, cluster)
    # the same layout with 9 engines per step fits (5 x 9 x 2 = 90)
    assert not check_plan(experiment_plan(recipe("mind_cluster.yaml", "summarize.execution=per_step", "summarize.engine.actors=9")), cluster)


def test_an_actor_larger_than_any_node_and_actors_that_do_not_pack_are_refused():
    two_nodes = ClusterShape.parse("2x8:16")
    wide = StagePlan("score x", (ActorGroup("ScoreStage", 1, 16.0, 1.0),))
    assert "one ScoreStage actor needs 16 GPUs, the largest node has 8" in stage_problem(wide, two_nodes)
    hungry = StagePlan("score x", (ActorGroup("ScoreStage", 1, 1.0, 32.0),))
    assert "needs 32 CPUs, the largest node has 16" in stage_problem(hungry, two_nodes)
    # 3 actors x 5 GPUs = 15 <= 16 GPUs in all, but a node holds one of them
    unpackable = StagePlan("summarize x", (ActorGroup("SummarizeStage", 3, 5.0, 1.0),))
    assert "do not fit the nodes at once" in stage_problem(unpackable, two_nodes)
    assert stage_problem(StagePlan("ok", (ActorGroup("SummarizeStage", 2, 5.0, 1.0),)), two_nodes) is None
    # CPU actors that fit only together with the others' CPUs left over
    crowded = StagePlan("texts", (ActorGroup("TrainingTexts", 30, 0.0, 1.0), ActorGroup("AttachItems", 3, 0.0, 1.0)))
    assert "do not fit" in stage_problem(crowded, two_nodes)
    # queued tasks need only one slot at a time
    queued = StagePlan("baselines", (ActorGroup("model task", 9, 0.5, 16.0, together=False),))
    assert stage_problem(queued, two_nodes) is None


def test_the_demo_fits_its_local_cluster_and_trsr_run_refuses_a_too_small_one_before_any_work(tmp_path, capsys):
    from trsr.cli import main

    plans = require_plan(recipe("demo.yaml"), ClusterShape.parse("1x0:8"))  # init_ray's local cluster
    assert by_name(plans)["summarize hierarchical"].cpus == 3.25  # renderer + 2-CPU engine + finalizer
    run_dir = tmp_path / "run"
    code = main(["run", "--config", str(CONFIGS / "demo.yaml"), "--set", f"run_dir={run_dir}", "--set", "cluster=1x0:2"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be scheduled on 1x0:2" in err
    assert "summarize hierarchical: needs" not in err  # CPU-only: the CPU message
    assert "summarize hierarchical: its actors do not fit the nodes at once" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]  # refused before prepare wrote anything
    assert main(["plan", "--config", str(CONFIGS / "demo.yaml"), "--cluster", "1x0:8"]) == 0
    assert "every stage fits" in capsys.readouterr().out
