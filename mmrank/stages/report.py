"""Stage `report`: the nightly report of a run_date (`mmrank.report.write_nightly`), after evaluate."""
from __future__ import annotations

import datetime as dt

from mmrank.lakehouse import Lakehouse
from mmrank.report import write_nightly
from mmrank.runs import StageRun
from mmrank.stages import stage


@stage("report", inputs=("runs", "metrics", "ranking_scores"))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun) -> dict[str, int]:
    """Write `<reports_dir>/<run_date>/nightly_report.md` and its plots; counts the files of the folder."""
    path = write_nightly(lh, run_date)
    rec.message = str(path)
    return {"report_files": len(list(path.parent.glob("*.png"))) + 1}
