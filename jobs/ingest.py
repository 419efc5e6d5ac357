"""Ingest a source into products, queries, query_log and judgments: the generated sample, the fashion catalog,
your own catalog + judgments files, or upstream Delta tables (see docs/data.md); default: ingest.source."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import ingest  # noqa: E402


def _scale(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI, e.g. 1,3") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r}: LO must be below HI")
    return lo, hi


def parser():
    p = job_parser(__doc__)
    p.add_argument("--source", choices=tuple(ingest.SOURCES), default=None,
                   help="default: ingest.source from the config (delta: the ingest.delta tables)")
    p.add_argument("--catalog", help="byo: catalog CSV/Parquet (product_id, title, ...)")
    p.add_argument("--judgments", help="byo: judgments CSV/Parquet (query_id or query, product_id, grade)")
    p.add_argument("--name", help="byo: source name (default: catalog file name)")
    p.add_argument("--grade-scale", type=_scale, metavar="LO,HI",
                   help="byo: the judgments' grade scale, lowest = irrelevant (e.g. 1,3); mapped onto 0..3. "
                        "Default: ingest.grade_scale, else the file's own range with a warning")
    p.add_argument("--limit", type=int, help="fashion: ingest only the first N products (by id)")
    return p


def main(lh, args):
    kw = {}
    if args.source == "byo":
        if not args.catalog:
            raise SystemExit("--source byo needs --catalog PATH")
        kw = {"catalog": args.catalog, "judgments": args.judgments, "name": args.name,
              "grade_scale": args.grade_scale}
    elif args.source == "fashion":
        kw = {"limit": args.limit}
    return ingest.run(lh, args.run_date, source=args.source, **kw)  # None: the configured source


if __name__ == "__main__":
    sys.exit(run_job(parser(), main))
