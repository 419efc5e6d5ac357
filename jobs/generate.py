"""Write the sample landing zone (embedded default): products, media, queries, voice queries, query log."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import generate  # noqa: E402


def main(lh, args):
    return generate.run(lh, args.run_date)


if __name__ == "__main__":
    sys.exit(run_job(job_parser(__doc__), main))
