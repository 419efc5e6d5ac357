"""Cheap PySpark task starts on Python < 3.12: a zip archive's directory is re-read only when the archive changed.

PySpark's worker calls `importlib.invalidate_caches()` at the start of every task. On Python 3.10 and 3.11 that
makes every `zipimporter` in `sys.path_importer_cache` re-read its archive's whole directory in pure Python
(CPython gh-103200, made lazy in 3.12): in a Spark Python worker those are `pyspark.zip` (once per imported
subpackage), the spark-core jar Spark puts on the workers' PYTHONPATH and the `--packages` jars, ~0.1-0.2 s a
task measured here, i.e. 3-8% of a 3 s encoder task and more on a GPU. `cheap_zip_invalidation` keeps each
archive's directory while the archive's size, mtime and inode are those it was read with; a changed archive is
re-read as before. Installed when `mmrank` is imported (a worker imports it with its first mmrank task).
"""
from __future__ import annotations

import os
import sys
import zipimport

_READ: dict[str, tuple[tuple[int, int, int], object]] = {}  # archive -> (stat key, the directory then cached)


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def cheap_zip_invalidation() -> None:
    """Make `zipimporter.invalidate_caches` re-read an archive only if it changed (no-op on Python >= 3.12,
    whose invalidation is lazy, and when already installed)."""
    if sys.version_info >= (3, 12) or getattr(zipimport.zipimporter.invalidate_caches, "_mmrank", False):
        return
    reread = zipimport.zipimporter.invalidate_caches

    def invalidate_caches(self) -> None:
        key, cache = _stat_key(self.archive), zipimport._zip_directory_cache
        seen = _READ.get(self.archive)
        if key is not None and seen is not None and seen[0] == key and cache.get(self.archive) is seen[1]:
            self._files = seen[1]
            return
        reread(self)
        if key is not None and self.archive in cache:
            _READ[self.archive] = (key, cache[self.archive])

    invalidate_caches._mmrank = True
    invalidate_caches.__doc__ = reread.__doc__
    zipimport.zipimporter.invalidate_caches = invalidate_caches
