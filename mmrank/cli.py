"""Shared command line for `jobs/*.py`: --conf, --set key=value, --run-date, logging, exit codes."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from typing import Callable

from mmrank.config import ConfigError, MMRankConfig, load_config
from mmrank.lakehouse import Lakehouse

JobFn = Callable[[Lakehouse, argparse.Namespace], object]


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                epilog="Runs as `python jobs/X.py ...` or `spark-submit jobs/X.py ...`.")
    p.add_argument("--conf", default=None, help="YAML config (default: conf/local.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.01 (repeatable)")
    p.add_argument("--run-date", type=dt.date.fromisoformat, default=dt.date.today(),
                   help="logical date of this run, YYYY-MM-DD (default: today)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "urllib3", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_job(parser: argparse.ArgumentParser, fn: JobFn, argv: list[str] | None = None) -> int:
    """Parse args, load and validate config, start Spark, run `fn`; return the process exit code."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    log = logging.getLogger("mmrank")
    try:
        cfg: MMRankConfig = load_config(args.conf, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mmrank.spark import get_spark

    lh = Lakehouse(get_spark(cfg), cfg)
    try:
        result = fn(lh, args)
    except Exception:
        log.exception("%s failed", parser.prog)
        return 1
    if result is not None:
        print(result)
    return 0
