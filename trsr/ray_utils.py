"""Connecting to Ray and checking that a job's resources exist before asking for them.

A Ray Data stage that asks for GPUs a cluster does not have waits forever; the jobs
call `require_resources` first so they fail at once with a message that says what
was asked and what the cluster has.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from trsr.errors import ConfigError

log = logging.getLogger(__name__)

# Stages are actor pools that each hold a CPU slot; on a 2-core laptop a pipeline with
# several stages starves unless Ray advertises more logical CPUs than cores.
MIN_LOCAL_CPUS = 8


def init_ray(local_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        log.info("connected to Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    cpus = local_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
    # The local cluster's workers inherit this process's environment (credentials
    # included). Only settings are repeated in the runtime env, never credentials:
    # a runtime env is job metadata (shown by the dashboard and the State API).
    env_vars = {
        key: os.environ[key]
        for key in (
            "HF_HUB_OFFLINE",
            "TRSR_CACHE",
            "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION",
            "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_CPU_OMP_THREADS_BIND",
        )
        if key in os.environ
    }
    runtime_env: dict = {"worker_process_setup_hook": "trsr.ray_utils.quiet_local_ray"}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    log.info("started a local Ray cluster with %d logical CPUs", cpus)


def quiet_local_ray() -> None:
    """Worker set-up hook of the local cluster (runs in every Ray worker process).

    The local cluster starts without Ray's dashboard (seconds and a few hundred MB less
    on a laptop), so Ray's State API is unavailable there. Ray Train's detached
    PlacementGroupCleaner polls that API every second while a training run lasts and
    logs a warning each time it cannot ("Failed to query Ray Train Controller actor
    state"), hundreds of lines per run that bury the job's own output. On a real
    cluster (dashboard up) the poll succeeds and nothing is silenced."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def require_resources(what: str, gpus: float = 0.0, cpus: float = 0.0) -> None:
    """Fail fast when the cluster cannot ever satisfy a stage's request."""
    import ray

    available = ray.cluster_resources()
    have_gpus = available.get("GPU", 0.0)
    have_cpus = available.get("CPU", 0.0)
    if gpus > have_gpus:
        raise ConfigError(
            f"{what} needs {gpus:g} GPU(s) but the Ray cluster has {have_gpus:g}; "
            "set engine.num_gpus=0 (CPU) or run on a GPU cluster"
        )
    if cpus > have_cpus:
        raise ConfigError(f"{what} needs {cpus:g} CPU(s) but the Ray cluster has {have_cpus:g}")


@dataclass(frozen=True)
class ClusterShape:
    """Nodes as (GPUs, CPUs) each; CPUs None = not declared (not checked)."""

    nodes: tuple[tuple[float, float | None], ...]
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> "ClusterShape":
        """"12x8" = 12 nodes of 8 GPUs; "12x8:96" = with 96 CPUs each; "1x0:8" = one
        CPU node with 8 CPUs."""
        found = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+(?:\.\d+)?)\s*(?::\s*(\d+(?:\.\d+)?))?\s*", text or "")
        if not found or int(found.group(1)) < 1:
            raise ConfigError(
                f"cluster {text!r}: expected NODESxGPUS[:CPUS] per node, e.g. 12x8 or 12x8:96"
            )
        nodes, gpus = int(found.group(1)), float(found.group(2))
        cpus = float(found.group(3)) if found.group(3) else None
        return cls(tuple((gpus, cpus) for _ in range(nodes)), label=text.strip())

    @classmethod
    def connected(cls) -> "ClusterShape":
        """The alive nodes of the Ray cluster this process is connected to."""
        import ray

        nodes = tuple(
            (float(n["Resources"].get("GPU", 0.0)), float(n["Resources"].get("CPU", 0.0)))
            for n in ray.nodes()
            if n.get("Alive")
        )
        return cls(nodes, label="the connected Ray cluster")

    @property
    def gpus(self) -> float:
        return sum(g for g, _ in self.nodes)

    def describe(self) -> str:
        gpus = {g for g, _ in self.nodes}
        cpus = {c for _, c in self.nodes}
        shape = (
            f"{len(self.nodes)} node(s) x {next(iter(gpus)):g} GPUs" if len(gpus) == 1 else f"{len(self.nodes)} nodes, {self.gpus:g} GPUs"
        )
        if None not in cpus:
            shape += f" x {next(iter(cpus)):g} CPUs" if len(cpus) == 1 else f", {sum(c for _, c in self.nodes):g} CPUs"
        return f"{self.label} ({shape})" if self.label and self.label != shape else shape
