"""Resolve trsr[gpu] for the cluster image and write cluster/requirements-gpu.lock.

    make lock-gpu        (= .venv/bin/python cluster/lock_gpu.py)

The GPU image (cluster/Dockerfile) installs exactly these pins, with hashes (pip's
hash-checking mode), then trsr itself without dependencies. The lock is resolved here,
on any machine with access to PyPI, for the image's platform: CPython 3.11 on x86_64
Linux with glibc <= 2.35 (Ubuntu 22.04, the CUDA base image), wheels only. pip resolves
with `install --dry-run --report` (no download of the wheels, no CUDA needed).

DeepSpeed publishes no wheels (an sdist that the image builds): a wheels-only resolution
cannot take it, so its own requirements go into the resolution in its place and it is
pinned to the version this machine's environment runs (the one the CPU tests use),
with the sdist's hash from PyPI.

tests/test_cluster_files.py checks the committed lock offline: it parses, pins every
package of pyproject's dependencies + the gpu extra within their ranges, and nothing
twice.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "cluster" / "requirements-gpu.lock"
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 35  # Ubuntu 22.04
SOURCE_ONLY = {"deepspeed"}
INDEX = "https://pypi.org/simple"
SYSTEM_CERTS = "/etc/ssl/certs/ca-certificates.crt"  # behind a TLS proxy, the system's


def wanted() -> list[Requirement]:
    """pyproject's dependencies + the gpu extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]


def platforms() -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 16, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def source_only_pins() -> dict[str, tuple[str, list[Requirement], str]]:
    """name -> (version installed here, its own requirements, sdist sha256 on PyPI)."""
    pins = {}
    for name in SOURCE_ONLY:
        version = metadata.version(name)
        requires = [Requirement(r) for r in metadata.requires(name) or []]
        requires = [r for r in requires if r.marker is None or "extra" not in str(r.marker)]
        sdist = f"{name}-{version}.tar.gz#sha256="
        with urllib.request.urlopen(f"{INDEX}/{name}/", timeout=60) as response:
            page = response.read().decode()
        found = re.search(re.escape(sdist) + r"([0-9a-f]{64})", page)
        if not found:
            raise SystemExit(f"{INDEX}/{name}/ lists no {sdist[:-8]}")
        pins[name] = (version, requires, found.group(1))
    return pins


def resolve() -> list[tuple[str, str, str]]:
    pins = source_only_pins()
    lines = [str(r) for r in wanted() if r.name.lower() not in SOURCE_ONLY]
    for _, requires, _ in pins.values():
        lines += [str(r) for r in requires]
    with tempfile.TemporaryDirectory() as folder:
        req = Path(folder) / "req.in"
        req.write_text("\n".join(lines) + "\n")
        report = Path(folder) / "report.json"
        # --isolated: this machine's pip configuration (extra indexes, local wheels,
        # constraints) must not shape the image's lock; only PyPI does.
        command = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--index-url", INDEX,
                   "--report", str(report), "--python-version", PYTHON_VERSION, "--implementation", "cp",
                   "--only-binary=:all:", "-r", str(req)]
        if os.path.exists(SYSTEM_CERTS):
            command += ["--cert", SYSTEM_CERTS]
        for tag in platforms():
            command += ["--platform", tag]
        subprocess.run(command, check=True)
        installs = json.loads(report.read_text())["install"]
    out = [
        (i["metadata"]["name"].lower(), i["metadata"]["version"], i["download_info"]["archive_info"]["hashes"]["sha256"])
        for i in installs
    ]
    out += [(name, version, sha) for name, (version, _, sha) in pins.items()]
    return sorted(out)


def main() -> int:
    pinned = resolve()
    header = [
        "# trsr[gpu] for the cluster image (cluster/Dockerfile): CPython 3.11, x86_64 Linux,",
        f"# glibc <= 2.{GLIBC_MINOR}, wheels only (deepspeed: sdist). Written by cluster/lock_gpu.py",
        "# (`make lock-gpu`); do not edit. Install: pip install --require-hashes -r <this file>",
    ]
    body = [f"{name}=={version} \\\n    --hash=sha256:{sha}" for name, version, sha in pinned]
    LOCK.write_text("\n".join(header + body) + "\n")
    print(f"{len(pinned)} packages pinned in {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
