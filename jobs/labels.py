"""Derive graded, position-debiased training labels from query_log (and judgments where no log exists)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import labels  # noqa: E402


def main(lh, args):
    return labels.run(lh, args.run_date)


if __name__ == "__main__":
    sys.exit(run_job(job_parser(__doc__), main))
