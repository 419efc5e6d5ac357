"""Job: join labels with query/product features into fixed-size per-query lists (training_lists)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import training_lists  # noqa: E402


def main(lh, args):
    return training_lists.run(lh, args.run_date)


if __name__ == "__main__":
    sys.exit(run_job(job_parser("Build per-query training lists (split by query into train/validation/test)."),
                     main))
