"""Connecting to Ray and checking that a job's resources exist before asking for them.

A Ray Data stage that asks for GPUs a cluster does not have waits forever; the jobs
call `require_resources` first so they fail at once with a message that says what
was asked and what the cluster has.
"""

from __future__ import annotations

import logging
import os

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
    env_vars = {
        key: os.environ[key]
        for key in (
            "HF_HUB_OFFLINE",
            "TRSR_CACHE",
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_CPU_OMP_THREADS_BIND",
        )
        if key in os.environ
    }
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        log_to_driver=True,
    )
    log.info("started a local Ray cluster with %d logical CPUs", cpus)


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


def map_table(
    table,
    stage,
    *,
    rows_per_batch: int,
    constructor_kwargs: dict | None = None,
    actors: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    schema=None,
):
    """Run a stage class (Arrow table in, Arrow table out) over `table` on a Ray Data
    actor pool with the given resources, and collect its output as one table.

    The table is cut into blocks of `rows_per_batch` rows, one batch each, so the work
    spreads over the actors from the start. The output parts come back in no
    particular order: callers sort. `schema`: cast the result to it (and the empty
    result is its empty table)."""
    import pyarrow as pa
    import ray

    init_ray()
    blocks = [table.slice(i, rows_per_batch) for i in range(0, table.num_rows, rows_per_batch)] or [table]
    dataset = ray.data.from_arrow(blocks).map_batches(
        stage,
        fn_constructor_kwargs=constructor_kwargs or {},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=rows_per_batch,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    parts = [part for part in ray.get(dataset.to_arrow_refs()) if part.num_rows]
    if not parts:
        return schema.empty_table() if schema is not None else table.slice(0, 0)
    out = pa.concat_tables(parts)
    return out.cast(schema) if schema is not None else out
