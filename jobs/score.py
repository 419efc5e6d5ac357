"""Score stage: candidate (query, product) pairs -> the champion model -> top-N per query in ranking_scores.

    python jobs/score.py --run-date 2026-11-21 [--version V] [--quantize] [--set score.candidates=impressions]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import score  # noqa: E402


def main(lh, args):
    counts = score.run(lh, args.run_date, version=args.version, quantize=True if args.quantize else None)
    return " ".join(f"{k}={v}" for k, v in counts.items())


if __name__ == "__main__":
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--version", default=None,
                        help="model artifact version (default: the registered champion, else the latest)")
    parser.add_argument("--quantize", action="store_true", help="int8 dynamic quantization (= score.quantize)")
    sys.exit(run_job(parser, main))
