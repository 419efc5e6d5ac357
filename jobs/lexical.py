"""Job: tokenize changed product fields and queries into lexical_tokens; recompute the BM25 statistics."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import lexical  # noqa: E402


def main(lh, args):
    return lexical.run(lh, args.run_date)


if __name__ == "__main__":
    sys.exit(run_job(job_parser("Lexical match features: tokens per field and BM25 corpus statistics in Spark."),
                     main))
