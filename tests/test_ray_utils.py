"""The local Ray cluster: workers see the credentials of the process that started it,
and the job's runtime env (metadata the dashboard shows) does not carry them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

SCRIPT = """
import json, logging, os, sys, time, ray
from trsr import worker_logs
from trsr.ray_utils import init_ray
worker_logs.log_to_run_folder(sys.argv[1])
init_ray(local_cpus=2)
@ray.remote
def seen():
    print("a library's noise in a worker")
    logging.getLogger("trsr.recommend.train_loop").info("train: epoch 1 done")
    logging.getLogger("trsr.runner.failures").warning("a row failed")
    return os.environ.get("AWS_SECRET_ACCESS_KEY")
print(json.dumps({"runtime_env": ray.get_runtime_context().runtime_env, "worker": ray.get(seen.remote())}))
time.sleep(3)  # Ray's log monitor forwards worker lines about every second
ray.shutdown()
"""


@pytest.fixture(scope="module")
def local_cluster_run(tmp_path_factory):
    """One local Ray cluster started by init_ray in a fresh process, with a secret in its
    environment and a task that prints a library line and logs two trsr records."""
    secret = f"fake-{uuid.uuid4().hex}"
    run_dir = tmp_path_factory.mktemp("run")
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=secret, AWS_ACCESS_KEY_ID="fake-id", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("TRSR_VERBOSE", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return secret, run_dir, out


@pytest.mark.integration
def test_workers_lines_trsr_ones_on_the_console_all_in_the_run_folder(local_cluster_run):
    _, run_dir, out = local_cluster_run
    console = out.stdout + out.stderr
    assert "train: epoch 1 done" in out.stdout.splitlines()  # printed as is, no Ray prefix
    assert "warning: a row failed" in out.stdout.splitlines()
    assert "noise in a worker" not in console and "[trsr]" not in console
    log = (run_dir / "logs" / "workers.log").read_text()
    assert "a library's noise in a worker" in log and "[trsr] train: epoch 1 done" in log


@pytest.mark.integration
def test_local_workers_inherit_credentials_that_the_runtime_env_does_not_carry(local_cluster_run):
    secret, _, out = local_cluster_run
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert result["worker"] == secret
    assert secret not in json.dumps(result["runtime_env"]) and "fake-id" not in json.dumps(result["runtime_env"])
    assert result["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"  # settings still travel


def test_quiet_console_keeps_warnings_and_drops_the_progress_bar_notice():
    import logging

    from trsr.ray_utils import quiet_ray_data_console

    quiet_ray_data_console()
    consoles = [h for h in logging.getLogger("ray.data").handlers if "File" not in type(h).__name__]
    assert consoles, "Ray Data has a console handler"
    for handler in consoles:
        assert handler.level == logging.WARNING
        notice = logging.LogRecord("ray.data", logging.WARNING, "", 0, "Progress bars disabled. To enable ...", None, None)
        real = logging.LogRecord("ray.data", logging.WARNING, "", 0, "a real warning", None, None)
        assert handler.filter(notice) is False and bool(handler.filter(real))


def test_only_the_placement_group_cleaner_thread_crash_is_silenced(monkeypatch):
    import threading

    from trsr.ray_utils import _ignore_placement_group_cleaner_crash

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.thread.name))
    _ignore_placement_group_cleaner_crash()

    def crash():
        raise KeyError("gone")

    for name in ("PlacementGroupCleanerMonitor", "ours"):
        thread = threading.Thread(target=crash, name=name)
        thread.start()
        thread.join()
    assert seen == ["ours"]


def test_raylet_notices_go_to_the_log_file_and_its_other_messages_to_the_console(monkeypatch, tmp_path):
    import ray._private.worker as ray_worker

    from trsr import worker_logs

    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data))
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    monkeypatch.setattr(worker_logs, "_state", {"path": None, "buffer": []})
    routed_before = any(name == "trsr_route_logs" for name, _ in dispatcher.handlers)
    assert worker_logs.install()
    try:
        notice = "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.1"
        problem = "Task was killed due to the node running low on memory."
        ray_worker.print_to_stdstream({"pid": "raylet", "lines": [notice], "is_err": False}, False)
        ray_worker.print_to_stdstream({"pid": "raylet", "lines": [problem], "is_err": False}, False)
        assert [data["lines"] for data in printed] == [[problem]]  # Ray's printer: the problem only
        worker_logs.log_to_run_folder(str(tmp_path))
        assert notice in (tmp_path / "logs" / "workers.log").read_text()
    finally:
        if not routed_before:  # this session's own Ray (ray_local) keeps its routing
            dispatcher.remove_handler("trsr_route_logs")
