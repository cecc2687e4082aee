"""`ray job submit` for real: a two-node Ray cluster on loopback, token authentication
on, the run folder on S3 (moto's server), the lines of cluster/submit.sh.

The head (`ray start --head`) and a second node (`ray start --address`) are separate
processes with their own ports, each started in its own process group with `--block`,
so that exactly the nodes started here are stopped (by their process groups), whatever
happens; never a bare `ray stop`, which would stop every Ray process on the machine.
Both nodes run on this machine, so the tiny model's folder is readable by both (on a
real cluster the weights come from a shared volume or the image: cluster/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    return [
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--min-worker-port", "0", "--max-worker-port", "0",
    ]


def ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def own_group_dies_with_us() -> None:
    """In the child before exec: its own process group (stopped as a whole), and SIGTERM
    when the test process dies, however it dies (Linux prctl PR_SET_PDEATHSIG); `ray start
    --block` stops the processes it started on SIGTERM."""
    import ctypes

    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stop(process: subprocess.Popen) -> None:
    """The node's whole process group (ray start --block and every process it started)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """Two Ray nodes (8 logical CPUs each) with token authentication; yields the env a
    laptop would use to submit (RAY_ADDRESS = the dashboard, RAY_AUTH_TOKEN) and the
    secrets that must never show up in a job's logs or metadata."""
    token = uuid.uuid4().hex + uuid.uuid4().hex
    secret = f"secret-{uuid.uuid4().hex}"
    # The nodes' environment: credentials live here (as on a real cluster's instances),
    # never in the runtime env. PATH puts this venv's python first: the job's entrypoint.
    node_env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("RAY_", "AWS_")) and key != "TRSR_VERBOSE"
    }
    node_env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
        AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="cluster-key", AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="us-east-1", HF_HUB_OFFLINE="1",
    )
    # One temp folder per node (short: Ray's socket paths are length-limited): nodes that
    # share one would also share runtime_resources/, where each node's runtime-env agent
    # deletes the job packages it no longer uses, a job's working dir included (seen).
    temp = Path(f"/tmp/trsr-{uuid.uuid4().hex[:6]}")
    gcs, dashboard = free_port(), free_port()
    logs = tmp_path_factory.mktemp("nodes")
    nodes: list[subprocess.Popen] = []
    try:
        for name, args in (
            ("head", ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                      "--include-dashboard=true", f"--ray-client-server-port={free_port()}"]),
            ("worker", [f"--address=127.0.0.1:{gcs}"]),
        ):
            log = open(logs / f"{name}.log", "w")
            nodes.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=8",
                 f"--temp-dir={temp / name}", "--disable-usage-stats", *args, *node_ports()],
                env=node_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=own_group_dies_with_us,
            ))
            if name == "head":
                wait_for_dashboard(dashboard, nodes[0], logs / "head.log")
        submit_env = {key: value for key, value in node_env.items() if not key.startswith("AWS_")}
        submit_env.update(RAY_ADDRESS=f"http://127.0.0.1:{dashboard}")
        wait_for_nodes(2, submit_env, nodes, logs)
        yield {"env": submit_env, "token": token, "secret": secret, "logs": logs, "temp": temp}
    finally:
        for node in reversed(nodes):
            stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_dashboard(port: int, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, log.read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the head's dashboard did not come up:\n{log.read_text()[-3000:]}")


def wait_for_nodes(count: int, env: dict, nodes, logs: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for node, name in zip(nodes, ("head", "worker")):
            assert node.poll() is None, (logs / f"{name}.log").read_text()[-3000:]
        out = ray_cli("list", "nodes", "--format", "json", "--filter", "state=ALIVE", env=env)
        if out.returncode == 0 and out.stdout.strip().startswith("[") and len(json.loads(out.stdout)) >= count:
            return
        time.sleep(2)
    raise AssertionError("the second node did not join")


def tiny_recipe(path: Path, bucket: str, model: str) -> Path:
    """The pipeline tests' tiny experiment, one variant, everything on S3 but the model."""
    recipe = {
        "run_dir": "runs/replaced-by-run-dir",  # the command line's --run-dir wins
        "seed": 7,
        "prepare": {
            "source": {"format": "mind", "path": f"{bucket}/raw"},
            "synthetic": {"users": 30, "items": 120, "min_history": 4, "max_history": 8},
            "protocol": {"min_history": 4, "max_history": 8},
        },
        "summarize": {
            "modes": ["hierarchical"], "items_per_block": 4, "execution": "fused", "users_per_batch": 8,
            "engine": {"model": model, "max_model_len": 1024},
            "generation": {"max_new_tokens": 8, "retry_temperature": 0},
        },
        "train": {"epochs": 1, "per_device_batch_size": 4, "gradient_accumulation": 1, "learning_rate": 1e-3,
                  "deepspeed": False, "max_lists": 8, "valid_lists": 0},
        "score": {"engine": {"model": model, "max_model_len": 1024, "dtype": "float32"},
                  "prompt": {"max_length": 1024, "max_missing_summary_share": 1, "variant": "hierarchical"},
                  "users_per_batch": 4, "splits": ["test"]},
        "evaluate": {"bootstrap": 100},
        "cluster": "2x0:8",
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def submit(cluster, recipe: Path, run_dir: str, *extra: str) -> tuple[str, str]:
    """The command of cluster/submit.sh; returns the job's final status and its logs."""
    job_id = f"trsr-{uuid.uuid4().hex[:8]}"
    out = ray_cli(
        "job", "submit", "--submission-id", job_id, "--runtime-env", "cluster/runtime_env.yaml", "--no-wait", "--",
        "python", "-m", "jobs.pipeline", "--config", str(recipe), "--run-dir", run_dir, *extra, env=cluster["env"],
    )
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.time() + 1200
    status = ""
    while time.time() < deadline:
        out = ray_cli("job", "status", job_id, env=cluster["env"])
        status = (out.stdout + out.stderr).lower()  # "Job 'x' succeeded" / "failed" / "stopped"
        if any(f"' {word}" in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = ray_cli("job", "logs", job_id, env=cluster["env"]).stdout
    return status, logs


def test_the_pipeline_submitted_to_a_two_node_cluster_writes_its_run_folder_to_s3(cluster, s3_bucket, tiny_model, tmp_path):
    import s3fs

    recipe = tiny_recipe(tmp_path / "tiny.yaml", s3_bucket, tiny_model)
    status, logs = submit(cluster, recipe, f"{s3_bucket}/run")
    assert "' succeeded" in status, status + logs[-6000:]
    # trsr's console in `ray job logs`: the plan, numbered stages, the accounting, the report.
    assert "stages: prepare, summarize, train, score, evaluate" in logs
    assert "[2/5] summarize: running" in logs
    assert "computed, 0 reused, 0 failed" in logs  # the streaming stages' accounting line
    assert "pipeline finished in" in logs and f"{s3_bucket}/run/report/test.md" in logs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    root = s3_bucket.removeprefix("s3://") + "/run"
    report = json.loads(fs.cat(f"{root}/report/test.json"))
    assert "llm-trsr-hierarchical" in report["methods"]
    assert fs.exists(f"{root}/config.yaml") and fs.glob(f"{root}/scores/llm-trsr-hierarchical/test/*.parquet")
    # The work crossed node boundaries: the job's actors ran on both nodes.
    actors = json.loads(ray_cli("list", "actors", "--format", "json", "--limit", "1000", env=cluster["env"]).stdout)
    assert len({actor["node_id"] for actor in actors if actor.get("node_id")}) == 2
    # Nothing secret in the job's logs or metadata (its runtime env, entrypoint) ...
    info = ray_cli("job", "list", env=cluster["env"]).stdout
    for text in (logs, info):
        assert cluster["secret"] not in text and cluster["token"] not in text
    # ... nor the S3 secret in any log file of either node's Ray session.
    log_files = [p for p in cluster["temp"].rglob("*") if p.is_file() and "/logs/" in str(p)]
    assert len(log_files) > 20  # raylet, gcs, workers, job driver, runtime env agent, ...
    leaking = [str(p) for p in log_files if cluster["secret"].encode() in p.read_bytes()]
    assert not leaking, leaking


def test_a_bad_recipe_comes_back_failed_with_trsrs_own_message(cluster, s3_bucket, tiny_model, tmp_path):
    recipe = tiny_recipe(tmp_path / "tiny.yaml", s3_bucket, tiny_model)
    status, logs = submit(cluster, recipe, f"{s3_bucket}/run", "--set", "prepare.protocol.min_history=0")
    assert "' failed" in status, status + logs[-3000:]
    assert "prepare.protocol.min_history" in logs and "invalid configuration" in logs


def test_without_the_token_the_cluster_refuses_a_submission(cluster, tmp_path):
    env = {key: value for key, value in cluster["env"].items() if key != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")  # not the machine's ~/.ray/auth_token
    out = ray_cli("job", "list", env=env)
    assert out.returncode != 0
