#!/usr/bin/env bash
# spark-submit a job with what executors need, the way Spark documents it for Python:
#   scripts/submit.sh [spark-submit options] jobs/X.py [job options]
#   scripts/submit.sh --master spark://127.0.0.1:7077 jobs/nightly.py --run-date 2026-11-21
# - the Delta Lake package matching the installed delta-spark (--packages);
# - the mmrank package as dist/mmrank-<version>.zip (--py-files, rebuilt from the checkout every time) unless
#   the options already name --py-files;
# - with MMRANK_ENV_ARCHIVE=dist/mmrank-env.tar.gz (scripts/package.sh env), the environment as an archive
#   (--archives ...#environment) and executors' Python ./environment/bin/python, for clusters without it.
# Every option given here wins over conf/*.yaml (`--master` included): mmrank only fills in what is unset.
# Extra spark-submit options may also come in SPARK_SUBMIT_ARGS. Without --master, spark-submit's default
# (local[*]) applies. For the local cluster or local mode, the driver binds to 127.0.0.1 (SPARK_LOCAL_IP).
# MMRANK_VENV: the virtualenv to run from (default: .venv of the checkout, set up by scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${MMRANK_VENV:-}" ]]; then VENV="$MMRANK_VENV"; else bash "$ROOT/scripts/setup.sh" >/dev/null; VENV="$ROOT/.venv"; fi
export PATH="$VENV/bin:$PATH" PYSPARK_PYTHON="${PYSPARK_PYTHON:-$VENV/bin/python}"
pkg="$("$VENV/bin/python" -c 'from importlib.metadata import version as v; print("io.delta:delta-spark_2.13:" + v("delta-spark"))')"

# shellcheck disable=SC2206
args=(${SPARK_SUBMIT_ARGS:-} "$@")
master="" has_py_files=0
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --master) master="${args[i + 1]:-}" ;;
    --master=*) master="${args[i]#--master=}" ;;
    --py-files|--py-files=*) has_py_files=1 ;;
    *.py) break ;;  # the application: what follows are its own options
  esac
done
if [[ -z "$master" || "$master" == local* || "$master" == spark://127.0.0.1:* || "$master" == spark://localhost:* ]]; then
  export SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"
fi
extra=(--packages "$pkg")
((has_py_files)) || extra+=(--py-files "$(MMRANK_VENV="$VENV" bash "$ROOT/scripts/package.sh" code)")
if [[ -n "${MMRANK_ENV_ARCHIVE:-}" ]]; then
  extra+=(--archives "$MMRANK_ENV_ARCHIVE#environment" --conf spark.pyspark.python=./environment/bin/python
          --conf spark.pyspark.driver.python="$VENV/bin/python")
fi
exec spark-submit "${extra[@]}" "${args[@]}"
