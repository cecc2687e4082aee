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
import json, os, ray
from trsr.ray_utils import init_ray
init_ray(local_cpus=2)
@ray.remote
def seen():
    return os.environ.get("AWS_SECRET_ACCESS_KEY")
print(json.dumps({"runtime_env": ray.get_runtime_context().runtime_env, "worker": ray.get(seen.remote())}))
ray.shutdown()
"""


@pytest.mark.integration
def test_local_workers_inherit_credentials_that_the_runtime_env_does_not_carry():
    secret = f"fake-{uuid.uuid4().hex}"
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=secret, AWS_ACCESS_KEY_ID="fake-id", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
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
