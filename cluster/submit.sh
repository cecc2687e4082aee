#!/usr/bin/env bash
# Submitting trsr jobs to a running Ray cluster from a laptop.
#
# 1. Reach the dashboard: `ray dashboard cluster/ray-cluster.aws.yaml` (autoscaler) or
#    `kubectl port-forward svc/<raycluster>-head-svc 8265` (KubeRay).
# 2. Ray 2.59+ clusters use token authentication: export the cluster's token.
set -euo pipefail
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
: "${RAY_AUTH_TOKEN:?export RAY_AUTH_TOKEN (the cluster's auth token) first}"
CONFIG="${1:-jobs/configs/mind_cluster.yaml}"
RUN_DIR="${2:-s3://YOUR_BUCKET/trsr/$(basename "$CONFIG" .yaml)}"

# Will it fit? (reads the config only; the recipe's `cluster` key or --cluster 12x8)
#   trsr plan --config "$CONFIG"
# The whole pipeline (prepare -> ... -> evaluate) into one run folder on S3:
ray job submit --runtime-env cluster/runtime_env.yaml --no-wait -- \
  python -m jobs.pipeline --config "$CONFIG" --run-dir "$RUN_DIR"

# One stage only, e.g. data preparation:
#   ray job submit --runtime-env cluster/runtime_env.yaml -- \
#     python -m jobs.prepare --config "$CONFIG" --run-dir "$RUN_DIR"
# Follow a job: ray job logs --follow <submission_id>; list: ray job list
