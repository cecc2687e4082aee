"""Connecting to Ray and checking that a job's resources exist before asking for them.

A Ray Data stage that asks for GPUs a cluster does not have waits forever; the jobs
call `require_resources` first so they fail at once with a message that says what
was asked and what the cluster has.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass

from trsr import worker_logs
from trsr.errors import ConfigError

log = logging.getLogger(__name__)

# Stages are actor pools that each hold a CPU slot; on a 2-core laptop a pipeline with
# several stages starves unless Ray advertises more logical CPUs than cores.
MIN_LOCAL_CPUS = 8

# Quiet by default: what the libraries print in every worker (weight-loading bars,
# vLLM's per-weight lines, Ray Train's and Ray Data's INFO lines) buries the job's
# own progress lines. `trsr --verbose` (TRSR_VERBOSE=1) keeps them all. Ray still
# writes every worker's full log under its session folder (/tmp/ray/session_*/logs).
VERBOSE_ENV = "TRSR_VERBOSE"
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",  # its per-weight dtype warnings alone are ~250 lines
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",  # library internals
}
QUIET_LOGGERS = {
    "ray.train": logging.WARNING,
    "ray.tune": logging.WARNING,
    "ray.air": logging.WARNING,
    "vllm": logging.ERROR,
    "transformers": logging.ERROR,
    "deepspeed": logging.WARNING,
    "filelock": logging.WARNING,
    # "Token authentication is enabled for this Ray cluster" at every local start.
    "ray._private.authentication": logging.ERROR,
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_logs() -> None:
    """Library loggers to warnings only, in this process (unless verbose)."""
    if verbose():
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def init_ray(local_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    _load_torch_first()
    quiet = not verbose()
    if quiet:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)  # the driver, and the local cluster's workers
        quiet_logs()
    if quiet:
        import ray.data

        quiet_ray_data_console()
        # The stage runner prints its own progress lines; Ray Data's bars (also the one
        # of its Parquet metadata sampling) are off in every pipeline of this process.
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Ray Train passes Ray Data an option Ray Data itself deprecated (Ray 2.60).
        warnings.filterwarnings("ignore", message=r".*exclude_resources.*deprecated")
    if os.environ.get("RAY_ADDRESS"):
        # A submitted job's workers are quieted by its runtime env (cluster/runtime_env.yaml).
        ray.init(log_to_driver=True, logging_level=logging.WARNING if quiet else logging.INFO)
        if quiet:
            worker_logs.install()
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
            VERBOSE_ENV,
            *QUIET_ENV,
        )
        if key in os.environ
    }
    runtime_env: dict = {"worker_process_setup_hook": "trsr.ray_utils.quiet_worker"}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    ray.init(
        num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
        logging_level=logging.WARNING if quiet else logging.INFO,
    )
    if quiet:
        worker_logs.install()  # trsr's worker lines to the console, all of them to <run_dir>/logs
    log.info("started a local Ray cluster with %d logical CPUs", cpus)


def _load_torch_first() -> None:
    """Load torch and initialise its MKL in the main thread before Ray starts its threads.

    Observed (tests/test_cluster_submit.py, Ray 2.60, torch CPU wheel): a job driver joined
    to a two-node cluster died when its training stage began, "Intel oneMKL FATAL ERROR:
    Cannot load .../torch/lib/libtorch_cpu.so" and a segfault, in 3 of 3 runs; with this
    call first, it passed. The driver imports torch for most stages anyway."""
    try:
        import torch
    except ImportError:
        return
    torch.ones(8, 8) @ torch.ones(8, 8)  # a float matmul: MKL picks its kernels now


def quiet_ray_data_console() -> None:
    """Ray Data's console handler to warnings; its log file (ray-data.log in the Ray
    session folder) keeps everything. Ray Data sets up its own handlers when imported,
    replacing levels set before, hence after the import."""
    import ray.data  # configures Ray Data's logging

    for handler in logging.getLogger(ray.data.__name__).handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)
            handler.addFilter(_no_progress_bar_notice)


def _no_progress_bar_notice(record: logging.LogRecord) -> bool:
    # The stage runner turns Ray Data's progress bars off and prints its own progress
    # lines; Ray Data warns once per process that its bars are off.
    return not record.getMessage().startswith("Progress bars disabled")


def quiet_worker() -> None:
    """Worker set-up hook (runs in every Ray worker process; the local cluster sets it,
    a submitted job sets it in its runtime env): library loggers to warnings unless
    verbose (QUIET_LOGGERS).

    The local cluster starts without Ray's dashboard (seconds and a few hundred MB less
    on a laptop), so Ray's State API is unavailable there. Ray Train's detached
    PlacementGroupCleaner polls that API every second while a training run lasts and
    logs a warning each time it cannot ("Failed to query Ray Train Controller actor
    state"), hundreds of lines per run that bury the job's own output, and a traceback
    when the cluster stops under it. On a real cluster (dashboard up) the poll succeeds."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.CRITICAL)
    _ignore_placement_group_cleaner_crash()
    worker_logs.use_in_worker()
    quiet_logs()
    if not verbose():
        quiet_ray_data_console()  # Ray Train's dataset coordinator runs Ray Data in a worker
        # Ray Train's per-report INFO line comes from a logger named by its file path,
        # which Ray Train's LoggingConfig does not reach.
        import importlib.util

        spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
        if spec is not None and spec.origin:
            logging.getLogger(spec.origin).setLevel(logging.WARNING)


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


def _ignore_placement_group_cleaner_crash() -> None:
    """Ray Train's PlacementGroupCleaner monitor thread dies with a traceback when the
    State API is unreachable (no dashboard on the local cluster, or the cluster stopping
    under it at the end of a run); the run itself is unaffected. Only that thread's
    exceptions are dropped; every other thread keeps Python's default hook."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name.startswith("PlacementGroupCleaner"):
            return
        default(args)

    threading.excepthook = hook
