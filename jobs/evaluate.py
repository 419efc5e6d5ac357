"""Job: NDCG/DCG/MAP/MRR on the test split for the trained model and the baselines -> metrics + report."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import evaluate  # noqa: E402


def main(lh, args):
    return evaluate.run(lh, args.run_date, dataset=args.dataset, baselines=args.baselines)


def parser():
    p = job_parser("Offline evaluation of the fusion ranker vs single-modality, LightGBM and similarity models.")
    p.add_argument("--dataset", default="sample", help="dataset name recorded in metrics and report files")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="train and evaluate the baseline models now (--no-baselines: skip them); "
                        "default: when due (evaluate.baselines_every_days)")
    return p


if __name__ == "__main__":
    sys.exit(run_job(parser(), main))
