"""Promotion gate (stage `promote`): make the new model champion if it is not worse; or promote / roll back by hand.

    python jobs/promote.py --run-date 2026-11-21                 # the nightly gate on today's validation lists
    python jobs/promote.py --run-date 2026-11-21 --version 3     # registry version 3 (or fusion-...) is champion
    python jobs/promote.py --run-date 2026-11-21 --rollback      # the previous champion is champion again
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.cli import job_parser, run_job  # noqa: E402
from mmrank.stages import promote  # noqa: E402


def main(lh, args):
    promote.run(lh, args.run_date, version=args.version, rollback=args.rollback)
    row = lh.read("runs").where(f"run_date = DATE'{args.run_date}' AND stage = 'promote'").first()
    return row["message"]  # the decision and why


if __name__ == "__main__":
    parser = job_parser(__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--version", default=None, help="registered version number or artifact version to promote")
    group.add_argument("--rollback", action="store_true", help="make the champion's predecessor champion again")
    sys.exit(run_job(parser, main))
