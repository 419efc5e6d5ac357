"""Nightly pipeline: generate -> ingest -> labels -> featurize -> training_lists -> train -> score -> evaluate
-> report for one --run-date. Resumable: stages that already succeeded for the date are skipped.

    python jobs/nightly.py --run-date 2026-11-21 [--rerun | --from-stage score] [--force-train] [--set k=v]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.nightly import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    parser = job_parser(__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run_job(parser, main))
