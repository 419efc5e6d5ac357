"""Run a command in its own process group and SIGKILL the whole group (driver, JVM, Python workers) when a
chosen line appears on its output: the crash tests' and the cluster tests' one way to kill a job mid-run."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from typing import Callable


def run_killable(cmd: list[str], *, env: dict, cwd, timeout_s: float, kill: tuple[str, float] | None = None,
                 on_line: Callable[[str], None] | None = None) -> tuple[int, str, bool]:
    """Run `cmd` (stdout+stderr merged) until it ends or `timeout_s` passes; with `kill=(pattern, delay)`,
    SIGKILL its process group `delay` s after the first line matching `pattern`. Returns (exit code, output,
    killed). A run that outlives `timeout_s` is killed too (killed stays False)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    lines: list[str] = []
    killed, t0 = False, time.monotonic()
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
            if kill is not None and re.search(kill[0], line):
                time.sleep(kill[1])
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            if time.monotonic() - t0 > timeout_s:
                break
    finally:
        if not killed and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=120)
    return rc, "".join(lines), killed
