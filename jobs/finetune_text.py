"""Job: fine-tune the text encoder on the training lists (finetune.*); prints the new encoder folder, to be used
with --set features.text.path=<folder> (featurize then re-encodes products and queries with it)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import finetune_text  # noqa: E402


def parser():
    p = job_parser(__doc__)
    p.add_argument("--mode", choices=("adapter", "top", "all"), default=None, help="default: finetune.mode")
    return p


def main(lh, args):
    counts = finetune_text.run(lh, args.run_date, mode=args.mode)
    row = lh.read("runs").where(f"stage = 'finetune_text' AND run_date = DATE'{args.run_date}'").first()
    return f"finetune_text: {counts}\n{row['message'] if row else ''}"


if __name__ == "__main__":
    sys.exit(run_job(parser(), main))
