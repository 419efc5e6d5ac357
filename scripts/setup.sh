#!/usr/bin/env bash
# Create .venv in the checkout and install the full pinned mmrank stack (idempotent).
#
# A second run with nothing changed returns in seconds: the stamp in .venv records a hash of every input.
# horovod 0.28.1 has no wheels: it is built from source once and cached (keyed by python/torch version) in
# $MMRANK_CACHE (default ~/.cache/mmrank), so fresh checkouts on the same machine reuse the build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${MMRANK_PYTHON:-python3}"
CACHE="${MMRANK_CACHE:-$HOME/.cache/mmrank}"
STAMP="$VENV/.mmrank-stamp"
want="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  echo "[setup] .venv is up to date"; exit 0
fi

log() { echo "[setup] $(date +%H:%M:%S) $*"; }

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
if ((${#need_apt[@]})); then
  log "installing system packages: ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

[[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
export PIP_CONSTRAINT="$ROOT/constraints.txt"
log "installing the pinned stack (torch is ~3 GB the first time, cached afterwards)"
"${PIP[@]}" install -U pip wheel setuptools
"${PIP[@]}" install -e "$ROOT[dev]"

if ! "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null; then
  tv="$("$VENV/bin/python" -c 'import sys,torch;print(f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}")')"
  wheeldir="$CACHE/wheels/horovod-0.28.1-$tv"
  if ! ls "$wheeldir"/horovod-*.whl >/dev/null 2>&1; then
    log "building horovod 0.28.1 from source (gloo, CPU; several minutes, once per machine)"
    # horovod's CMake forces -std=c++14; torch>=2.1 headers need C++17. A compiler wrapper appends
    # -std=gnu++17 last so it wins. Debian's cmake 3.x is used (cmake 4 rejects gloo's CMakeLists).
    wrap="$(mktemp -d)"
    printf '#!/bin/sh\nexec g++ "$@" -std=gnu++17\n' >"$wrap/cxx17"; chmod +x "$wrap/cxx17"
    mkdir -p "$wheeldir"
    CXX="$wrap/cxx17" CC=gcc PATH="/usr/bin:$PATH" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS="-j$(nproc)" \
      "${PIP[@]}" wheel --no-build-isolation --no-deps --no-binary horovod -w "$wheeldir" horovod==0.28.1
  fi
  "${PIP[@]}" install --no-deps "$wheeldir"/horovod-*.whl
  "${PIP[@]}" install "horovod==0.28.1" --no-build-isolation  # its pure-python dependencies
fi

"$VENV/bin/python" -c "import horovod.torch, petastorm, delta, torchvision, torchaudio, transformers" \
  || { echo "[setup] the stack does not import" >&2; exit 1; }
echo "$want" >"$STAMP"
log "done: $VENV"
