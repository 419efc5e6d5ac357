#!/usr/bin/env bash
# A Spark GPU discovery script that reports FAKE GPUs, for testing Spark's GPU scheduling on machines without
# one (tests/test_device_cluster.py): prints {"name": "gpu", "addresses": ["0", ..., "N-1"]} with
# N = $MMRANK_FAKE_GPUS (default 2). No GPU is touched. On a real cluster use Spark's
# examples/src/main/scripts/getGpusResources.sh (nvidia-smi) instead.
set -euo pipefail
n="${MMRANK_FAKE_GPUS:-2}"
addresses=""
for ((i = 0; i < n; i++)); do addresses+="${addresses:+, }\"$i\""; done
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
