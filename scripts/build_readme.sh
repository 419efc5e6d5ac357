#!/usr/bin/env bash
# Rebuild README.md's generated parts: the table contracts (from mmrank/tables.py) and "Operating it"
# (docs/operating.md). The hand-written parts live in docs/readme/*.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
{
  cat docs/readme/intro.md docs/readme/jobs.md docs/readme/cluster.md docs/readme/lifecycle.md docs/readme/reference.md docs/readme/gpu.md docs/readme/scaling.md
  .venv/bin/python -m mmrank.tables
  echo
  sed 's/^## Operating it/## Operating it/' docs/operating.md
} > README.md
