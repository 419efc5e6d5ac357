#!/usr/bin/env bash
# Package mmrank for a cluster, as Spark documents for Python applications:
#
#   scripts/package.sh code              # dist/mmrank-<version>.zip: the package for spark-submit --py-files
#   scripts/package.sh wheel             # dist/mmrank-<version>-py3-none-any.whl (pip, Databricks libraries)
#   scripts/package.sh env [REQS] [OUT]  # OUT (dist/mmrank-env.tar.gz): a venv-pack archive of a fresh virtualenv
#                                        # holding REQS (default: mmrank's pinned dependencies), for
#                                        # spark-submit --archives OUT#environment on clusters without them
#
# Prints the path of what it built (last line). The code zip holds exactly the mmrank/ sources (no bytecode);
# the environment archive holds dependencies only: the code always travels as the zip, so a job runs the
# code it was submitted with. Executors use the archive's Python as ./environment/bin/python (venv-pack links
# the interpreter: nodes need the same base Python, e.g. /usr/bin/python3.11).
# MMRANK_VENV: the virtualenv whose Python builds things (default: .venv of the checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST="${MMRANK_DIST:-$ROOT/dist}"
if [[ -n "${MMRANK_VENV:-}" ]]; then VENV="$MMRANK_VENV"; else bash "$ROOT/scripts/setup.sh" >/dev/null; VENV="$ROOT/.venv"; fi
PY="$VENV/bin/python"
VERSION="$("$PY" -c 'import re,sys; print(re.search(r"^version = \"(.+)\"", open(sys.argv[1]).read(), re.M).group(1))' "$ROOT/pyproject.toml")"
mkdir -p "$DIST"

code() {
  local out="$DIST/mmrank-$VERSION.zip"
  "$PY" - "$ROOT" "$out" <<'EOF'
import os, sys, zipfile
from pathlib import Path

root, out = Path(sys.argv[1]), sys.argv[2]
tmp = f"{out}.{os.getpid()}.tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
    for p in sorted((root / "mmrank").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            info = zipfile.ZipInfo(str(p.relative_to(root)), date_time=(2020, 1, 1, 0, 0, 0))  # reproducible
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, p.read_bytes())
os.replace(tmp, out)
EOF
  echo "$out"
}

wheel() {
  local tmp
  tmp="$(mktemp -d)"
  cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/mmrank" "$tmp/"  # build outside the checkout
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIST" "$tmp" >&2
  rm -rf "$tmp"
  echo "$DIST/mmrank-$VERSION-py3-none-any.whl"
}

env_archive() {
  local reqs="${1:-}" out="${2:-$DIST/mmrank-env.tar.gz}" work
  work="$(mktemp -d)"
  "$PY" -m venv "$work/env"
  if [[ -z "$reqs" ]]; then  # mmrank's dependencies at their tested pins (not mmrank itself: it ships as the zip)
    reqs="$work/requirements.txt"
    "$PY" - "$ROOT/pyproject.toml" >"$reqs" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
print("\n".join(re.findall(r'"([^"]+)"', deps)))
EOF
  fi
  if [[ -s "$reqs" ]]; then
    PIP_CONSTRAINT="$ROOT/constraints.txt" "$work/env/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs" >&2
  fi
  "$VENV/bin/venv-pack" -q -p "$work/env" -o "$out.tmp.tar.gz" --force >&2
  mv -f "$out.tmp.tar.gz" "$out"
  rm -rf "$work"
  echo "$out"
}

case "${1:-}" in
  code) code ;;
  wheel) wheel ;;
  env) shift; env_archive "$@" ;;
  *) echo "usage: $0 code | wheel | env [REQUIREMENTS] [OUT]" >&2; exit 2 ;;
esac
