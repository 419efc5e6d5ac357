"""`mmrank.task_start`: on Python < 3.12 `importlib.invalidate_caches()` (which PySpark calls at the start of every
task) re-read every zip archive on the path; with mmrank imported an unchanged archive is kept and a changed one
is re-read, so new modules in it are still found."""
from __future__ import annotations

import importlib
import sys
import zipfile
import zipimport

import pytest

importlib.import_module("mmrank")  # installs the cheap invalidation, as in a Spark worker


def _write(path, modules: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, src in modules.items():
            z.writestr(f"{name}.py", src)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python >= 3.12 invalidates zip directories lazily")
def test_unchanged_archives_are_kept_and_changed_ones_reread(tmp_path, monkeypatch):
    archive = str(tmp_path / "lib.zip")
    _write(archive, {"mmrank_zmod_a": "X = 1"})
    monkeypatch.syspath_prepend(archive)
    for name in ("mmrank_zmod_a", "mmrank_zmod_b"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert importlib.import_module("mmrank_zmod_a").X == 1
    importlib.invalidate_caches()  # the first one reads it (when the import read it is not known)
    reads: list[str] = []
    real = zipimport._read_directory
    monkeypatch.setattr(zipimport, "_read_directory", lambda p: reads.append(p) or real(p))
    importlib.invalidate_caches()
    importlib.invalidate_caches()
    assert archive not in reads  # unchanged: its directory is kept (Python 3.11 re-reads it every call)
    _write(archive, {"mmrank_zmod_a": "X = 1", "mmrank_zmod_b": "Y = 2"})  # rewritten with a new module
    importlib.invalidate_caches()
    assert reads.count(archive) == 1
    assert importlib.import_module("mmrank_zmod_b").Y == 2
