"""Job: embed changed products and queries (text, image, audio) into product_features / query_features."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import featurize  # noqa: E402


def main(lh, args):
    return featurize.run(lh, args.run_date)


if __name__ == "__main__":
    sys.exit(run_job(job_parser("Feature materialization: text/image/audio encoders as Spark batch inference."),
                     main))
