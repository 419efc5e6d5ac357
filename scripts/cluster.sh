#!/usr/bin/env bash
# A real Spark standalone cluster on this machine: one master and MMRANK_CLUSTER_WORKERS (2) workers, each its
# own JVM started with spark-class from the installed pyspark, every daemon bound to 127.0.0.1 only.
#
#   scripts/cluster.sh start    # idempotent: daemons already running are left alone
#   scripts/cluster.sh status   # each daemon's pid and state; exit 0 only if all are up
#   scripts/cluster.sh stop     # stops the recorded pids (TERM, then KILL after 20 s)
#
# Then: scripts/submit.sh --master spark://127.0.0.1:7077 jobs/nightly.py
#
# Environment (all optional):
#   MMRANK_CLUSTER_DIR         state folder: pids/, logs/, work/ (default: .cluster in the checkout)
#   MMRANK_CLUSTER_PORT        master port (7077); MMRANK_CLUSTER_WEBUI_PORT master UI port (8080; worker i
#                              uses it + i)
#   MMRANK_CLUSTER_WORKERS     number of workers (2)
#   MMRANK_WORKER_CORES        cores per worker (1) and MMRANK_WORKER_MEMORY memory per worker (2g): sized for
#                              a 2-core machine
#   MMRANK_VENV                the virtualenv holding pyspark (default: .venv of the checkout, set up by
#                              scripts/setup.sh)
# The daemons run without PYTHONPATH and in the state folder, so executors can only import what a job ships.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${MMRANK_CLUSTER_DIR:-$ROOT/.cluster}"
PORT="${MMRANK_CLUSTER_PORT:-7077}"
UI="${MMRANK_CLUSTER_WEBUI_PORT:-8080}"
WORKERS="${MMRANK_CLUSTER_WORKERS:-2}"
CORES="${MMRANK_WORKER_CORES:-1}"
MEMORY="${MMRANK_WORKER_MEMORY:-2g}"
HOST=127.0.0.1
MASTER_URL="spark://$HOST:$PORT"

venv() {
  if [[ -n "${MMRANK_VENV:-}" ]]; then echo "$MMRANK_VENV"; else bash "$ROOT/scripts/setup.sh" >/dev/null; echo "$ROOT/.venv"; fi
}

daemons() { echo master; for ((i = 1; i <= WORKERS; i++)); do echo "worker-$i"; done; }

alive() {  # alive NAME: its recorded pid runs a Spark daemon
  local f="$DIR/pids/$1.pid" pid
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && grep -q "org.apache.spark.deploy" "/proc/$pid/cmdline" 2>/dev/null
}

wait_port() {  # wait_port PORT SECONDS
  local port="$1" deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

launch() {  # launch NAME CLASS ARGS...: one daemon JVM in the background, its pid recorded
  local name="$1"; shift
  if alive "$name"; then echo "[cluster] $name already running (pid $(cat "$DIR/pids/$name.pid"))"; return; fi
  local py sh
  py="$(venv)/bin/python"
  sh="$("$py" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
  mkdir -p "$DIR/pids" "$DIR/logs" "$DIR/work"
  # SPARK_LOCAL_IP binds every daemon, its web UI and the executors it starts to loopback; exec keeps the pid
  (cd "$DIR" && exec env -u PYTHONPATH SPARK_HOME="$sh" SPARK_LOCAL_IP="$HOST" SPARK_PUBLIC_DNS="$HOST" \
     SPARK_LOG_DIR="$DIR/logs" PYSPARK_PYTHON="$py" "$sh/bin/spark-class" "$@" >>"$DIR/logs/$name.log" 2>&1) &
  echo $! >"$DIR/pids/$name.pid"
  echo "[cluster] started $name (pid $!, log $DIR/logs/$name.log)"
}

start() {
  launch master org.apache.spark.deploy.master.Master --host "$HOST" --port "$PORT" --webui-port "$UI"
  wait_port "$PORT" 120 || { echo "[cluster] master did not open $MASTER_URL; see $DIR/logs/master.log" >&2; exit 1; }
  for ((i = 1; i <= WORKERS; i++)); do
    mkdir -p "$DIR/work/worker-$i"
    launch "worker-$i" org.apache.spark.deploy.worker.Worker "$MASTER_URL" --host "$HOST" \
      --cores "$CORES" --memory "$MEMORY" --webui-port $((UI + i)) --work-dir "$DIR/work/worker-$i"
  done
  local deadline=$((SECONDS + 120))
  for ((i = 1; i <= WORKERS; i++)); do  # registered = the worker logged it
    until grep -q "Successfully registered with master" "$DIR/logs/worker-$i.log" 2>/dev/null; do
      ((SECONDS < deadline)) || { echo "[cluster] worker-$i did not register; see $DIR/logs" >&2; exit 1; }
      alive "worker-$i" || { echo "[cluster] worker-$i exited; see $DIR/logs/worker-$i.log" >&2; exit 1; }
      sleep 0.5
    done
  done
  echo "[cluster] up: $MASTER_URL with $WORKERS worker(s) x $CORES core(s), $MEMORY"
}

stop() {
  local name pid deadline
  for name in $(daemons | tac); do
    [[ -f "$DIR/pids/$name.pid" ]] || continue
    if alive "$name"; then
      pid="$(cat "$DIR/pids/$name.pid")"
      kill -TERM "$pid"
      deadline=$((SECONDS + 20))
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      echo "[cluster] stopped $name (pid $pid)"
    fi
    rm -f "$DIR/pids/$name.pid"
  done
}

status() {
  local name ok=0
  echo "[cluster] master $MASTER_URL, state in $DIR"
  for name in $(daemons); do
    if alive "$name"; then echo "$name running pid $(cat "$DIR/pids/$name.pid")"; else echo "$name stopped"; ok=3; fi
  done
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
