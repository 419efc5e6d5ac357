"""The README matches the code: table contracts, job list, set-up commands."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mmrank.config import REPO_ROOT
from mmrank.tables import contracts_markdown

README = (REPO_ROOT / "README.md").read_text()
JOBS = sorted(p.name for p in (REPO_ROOT / "jobs").glob("*.py"))


def test_readme_table_contracts_match_code():
    assert contracts_markdown() in README, "regenerate with: .venv/bin/python -m mmrank.tables"


def test_readme_names_every_job_and_makefile_targets():
    for job in JOBS:
        assert f"jobs/{job}" in README, f"README does not mention jobs/{job}"
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w[\w-]*)", README, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README uses `make {target}`, not in Makefile"


@pytest.mark.parametrize("job", JOBS)
def test_every_job_has_help(job):
    out = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / job), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--conf" in out.stdout and "--set" in out.stdout
