"""Print the order-independent checksum (`Lakehouse.checksum`) of every contract table of a lakehouse as JSON.

    .venv/bin/python scripts/checksums.py [--conf C] [--set k=v ...] [--exclude table:col,col ...]

Two lakehouses hold the same tables when their outputs are equal; wall-clock columns are never hashed, and
`--exclude runs:run_id,config_hash` leaves out columns that legitimately differ between runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conf", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--exclude", action="append", default=[], metavar="TABLE:COL,COL")
    args = ap.parse_args(argv)
    from mmrank.config import load_config
    from mmrank.lakehouse import Lakehouse
    from mmrank.spark import get_spark
    from mmrank.tables import TABLES

    cfg = load_config(args.conf, args.overrides)
    lh = Lakehouse(get_spark(cfg), cfg)
    skip = {t: c.split(",") for t, c in (e.split(":", 1) for e in args.exclude)}
    out = {n: lh.checksum(n, exclude=skip.get(n, ())) for n in TABLES if lh.exists(n)}
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
