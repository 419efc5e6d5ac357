"""Train the fusion ranker on `training_lists` and save a model artifact (stage `train`).

    python jobs/train.py --backend horovod --set train.num_proc=2 --run-date 2026-11-21
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.registry import BACKENDS  # noqa: E402
from mmrank.stages import train  # noqa: E402


def main(lh, args):
    if args.backend:
        lh.cfg.train.backend = args.backend
    counts = train.run(lh, args.run_date, backend=args.backend, force=True)
    return " ".join(f"{k}={v}" for k, v in counts.items())


if __name__ == "__main__":
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS.names(), default=None,
                        help="override train.backend (local | horovod | torch_distributor)")
    sys.exit(run_job(parser, main))
