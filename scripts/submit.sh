#!/usr/bin/env bash
# spark-submit a job with the Delta Lake package matching the installed delta-spark, from .venv:
#   scripts/submit.sh jobs/featurize.py --run-date 2026-11-21 [--set key=value ...]
# Extra spark-submit options go in SPARK_SUBMIT_ARGS, e.g. SPARK_SUBMIT_ARGS="--master local[4]".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" >/dev/null
export PATH="$ROOT/.venv/bin:$PATH" PYSPARK_PYTHON="$ROOT/.venv/bin/python"
pkg="$("$ROOT/.venv/bin/python" -c 'from mmrank.spark import delta_maven_coordinate as c; print(c())')"
# shellcheck disable=SC2086
exec spark-submit --packages "$pkg" ${SPARK_SUBMIT_ARGS:-} "$@"
