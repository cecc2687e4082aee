"""The resource plan of an experiment: what every stage asks of the Ray cluster, checked
against a cluster's shape before any work starts.

A streaming stage runs all of its actor pools at the same time (summarize: the block
renderer, one engine pool per engine stage and the finalizer), Ray Train starts all of
its workers at once, and an actor or worker never spans two nodes. So a stage fits a
cluster when all of its actors, packed onto the nodes by GPUs and CPUs, fit at once.
Without this check a recipe that cannot be scheduled is found out only when its stage
starts (after the stages before it have spent their GPU hours) or, in Ray Data, as a
pool that waits forever for actors.

    trsr plan --config jobs/configs/mind_cluster.yaml --cluster 12x8   # declared shape
    trsr plan --config X.yaml                                          # the connected cluster

`trsr run` checks its plan against `cluster` of the recipe when it names one, else
against the connected Ray cluster, before the first stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trsr.errors import ConfigError
from trsr.ray_utils import ClusterShape


@dataclass(frozen=True)
class ActorGroup:
    """`pools` x `count` actors (or workers, or queued tasks) that each reserve `gpus`
    and `cpus`."""

    what: str
    count: int
    gpus: float
    cpus: float
    # True: all of them run at once (actor pools, Ray Train's workers); False: tasks
    # that queue (the baselines, one per model): one of them must fit.
    together: bool = True
    pools: int = 1  # identical pools (summarize per_step: one per level or step)

    @property
    def total(self) -> int:
        return self.pools * self.count

    def describe(self) -> str:
        pools = f"{self.pools} pools x " if self.pools > 1 else ""
        res = f"{self.gpus:g} GPU, {self.cpus:g} CPU" if self.gpus else f"{self.cpus:g} CPU"
        return f"{pools}{self.count} x {self.what} ({res})"


@dataclass(frozen=True)
class StagePlan:
    name: str
    groups: tuple[ActorGroup, ...]
    note: str = ""

    @property
    def gpus(self) -> float:
        return sum(g.total * g.gpus for g in self.groups if g.together) + max(
            [g.gpus for g in self.groups if not g.together], default=0.0
        )

    @property
    def cpus(self) -> float:
        return sum(g.total * g.cpus for g in self.groups if g.together) + max(
            [g.cpus for g in self.groups if not g.together], default=0.0
        )


# ------------------------------------------------------------------------------ plan


def _engine(what: str, engine, pools: int = 1) -> ActorGroup:
    return ActorGroup(what, engine.actors, engine.num_gpus, engine.num_cpus, pools=pools)


def summarize_plan(experiment, mode: str) -> StagePlan:
    """Summarize in `mode`: the block renderer, the engine pools, the finalizer. The
    engine stages are counted for the longest history the protocol keeps
    (prepare.protocol.max_history), as summarize_job counts them for the data."""
    from trsr.summarize.stages import steps_needed

    config = experiment.summarize
    max_blocks = math.ceil(experiment.prepare.protocol.max_history / config.items_per_block)
    steps = steps_needed(mode, max_blocks, config.fan_in)
    pools = steps if config.execution == "per_step" else 1
    unit = "level" if mode == "hierarchical" else "step"
    return StagePlan(
        f"summarize {mode}",
        (
            ActorGroup("RenderBlocks", 1, 0.0, 1.0),
            _engine(f"SummarizeStage (one pool per {unit})" if pools > 1 else "SummarizeStage", config.engine, pools),
            ActorGroup("Finalize", 1, 0.0, 0.25),
        ),
        note=f"{config.execution}, {steps} {unit}s",
    )


def variant_plans(experiment) -> list[StagePlan]:
    """Training texts, LoRA training and scoring of the experiment's variant."""
    score = experiment.score
    method = score.method_name
    plans = []
    train = experiment.train
    if train.enabled and not score.engine.lora_adapter:
        plans.append(
            StagePlan(
                f"training texts {method}",
                (ActorGroup("AttachItems", 1, 0.0, 1.0), ActorGroup("TrainingTexts", train.text_actors, 0.0, 1.0)),
            )
        )
        plans.append(
            StagePlan(
                f"train {method}",
                (ActorGroup("Ray Train worker", train.workers, 1.0 if train.use_gpu else 0.0, train.cpus_per_worker),),
                note="DeepSpeed ZeRO-2" if train.deepspeed else "torch",
            )
        )
    plans.append(
        StagePlan(
            f"score {method}",
            (ActorGroup("AttachItems", 1, 0.0, 1.0), _engine("ScoreStage", score.engine)),
            note=score.engine.backend,
        )
    )
    return plans


def baselines_plans(experiment) -> list[StagePlan]:
    config = experiment.baselines
    return [
        StagePlan("item embeddings", (ActorGroup("ItemEncoder", config.encoder.actors, config.encoder.num_gpus, config.encoder.num_cpus),)),
        StagePlan(
            "baselines",
            (ActorGroup("model task (queued, one per model)", len(config.models), config.gpus_per_model, config.cpus_per_model, together=False),),
        ),
    ]


def experiment_plan(experiment) -> list[StagePlan]:
    """Every stage `trsr run` would start for `experiment`, in order (prepare runs in
    the driver and asks for nothing)."""
    plans: list[StagePlan] = []
    variants = [experiment.for_variant(v) for v in experiment.variant_names()]
    if any(v.score.prompt.mode for v in variants):
        plans += [summarize_plan(experiment, mode) for mode in experiment.summarize.modes]
    for variant in variants:
        plans += variant_plans(variant)
    if experiment.with_baselines:
        plans += baselines_plans(experiment)
    return plans


# ----------------------------------------------------------------------------- check


def _pack(groups: tuple[ActorGroup, ...], cluster: ClusterShape) -> ActorGroup | None:
    """First-fit-decreasing packing of every actor onto the nodes (GPUs, then CPUs);
    the first group that does not fit, or None."""
    free = [[g, c] for g, c in cluster.nodes]
    actors = []
    for group in groups:
        actors += [group] * (group.total if group.together else 1)
    actors.sort(key=lambda a: (a.gpus, a.cpus), reverse=True)
    for actor in actors:
        for node in free:
            if node[0] + 1e-9 >= actor.gpus and (node[1] is None or node[1] + 1e-9 >= actor.cpus):
                node[0] -= actor.gpus
                if node[1] is not None:
                    node[1] -= actor.cpus
                break
        else:
            return actor
    return None


def stage_problem(plan: StagePlan, cluster: ClusterShape) -> str | None:
    """Why `plan` cannot be scheduled on `cluster` (None: it fits)."""
    largest_gpus = max((g for g, _ in cluster.nodes), default=0.0)
    cpus = [c for _, c in cluster.nodes]
    largest_cpus = None if None in cpus else max(cpus, default=0.0)
    for group in plan.groups:
        if group.gpus > largest_gpus:
            return f"one {group.what} actor needs {group.gpus:g} GPUs, the largest node has {largest_gpus:g}"
        if largest_cpus is not None and group.cpus > largest_cpus:
            return f"one {group.what} actor needs {group.cpus:g} CPUs, the largest node has {largest_cpus:g}"
    if plan.gpus > cluster.gpus:
        parts = " + ".join(
            (f"{g.pools} engine stages x " if g.pools > 1 else "") + f"{g.count} {g.what} actors x {g.gpus:g} GPUs"
            for g in plan.groups
            if g.gpus and g.together
        )
        return f"needs {parts} = {plan.gpus:g} GPUs at once, the cluster has {cluster.gpus:g}"
    stuck = _pack(plan.groups, cluster)
    if stuck is not None:
        return (
            f"its actors do not fit the nodes at once: {stuck.what} ({stuck.gpus:g} GPUs, "
            f"{stuck.cpus:g} CPUs each) finds no node with room left"
        )
    return None


def check_plan(plans: list[StagePlan], cluster: ClusterShape) -> list[str]:
    """One message per stage that cannot be scheduled, naming the stage and the numbers."""
    problems = []
    for plan in plans:
        problem = stage_problem(plan, cluster)
        if problem:
            hint = _hint(plan)
            problems.append(f"{plan.name}: {problem}" + (f"; {hint}" if hint else ""))
    return problems


def _hint(plan: StagePlan) -> str:
    if plan.name.startswith("summarize") and "per_step" in plan.note:
        return "use summarize.execution: fused (one engine pool carries users through every level/step) or fewer summarize.engine.actors"
    if plan.name.startswith("score"):
        return "lower score.engine.actors or score.engine.num_gpus"
    if plan.name.startswith("train"):
        return "lower train.workers or train.cpus_per_worker"
    return ""


def require_plan(experiment, cluster: ClusterShape) -> list[StagePlan]:
    """The experiment's plan; ConfigError listing every stage that does not fit."""
    plans = experiment_plan(experiment)
    problems = check_plan(plans, cluster)
    if problems:
        raise ConfigError(
            f"this recipe cannot be scheduled on {cluster.describe()}:\n  " + "\n  ".join(problems)
        )
    return plans


def table(plans: list[StagePlan], cluster: ClusterShape | None = None) -> str:
    lines = [f"{'stage':<38} {'GPUs':>6} {'CPUs':>7}  actors at once"]
    for plan in plans:
        actors = ", ".join(g.describe() for g in plan.groups)
        status = ""
        if cluster is not None:
            status = "  <- does not fit" if stage_problem(plan, cluster) else ""
        lines.append(f"{plan.name:<38} {plan.gpus:>6g} {plan.cpus:>7g}  {actors}{status}")
    return "\n".join(lines)
