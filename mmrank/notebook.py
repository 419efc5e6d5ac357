"""What the Databricks notebooks share: widget parameters with a local fallback, and `display`.

In a notebook, `globals()` holds Databricks' `dbutils` and `display`; run locally (or in the test suite) they
are absent and parameters come from `MMRANK_<NAME>` environment variables or the defaults.
"""
from __future__ import annotations

import datetime as dt
import os
from typing import Any, Callable


def _print_preview(obj: Any) -> None:
    print(obj.limit(20).toPandas() if hasattr(obj, "toPandas") else obj)


class NotebookParams:
    """Notebook parameters: `dbutils.widgets` on Databricks, environment variables / defaults elsewhere."""

    def __init__(self, ns: dict[str, Any]):
        self._widgets = getattr(ns.get("dbutils"), "widgets", None)
        self.display: Callable[[Any], Any] = ns.get("display") or _print_preview

    def text(self, name: str, default: str, label: str | None = None) -> str:
        if self._widgets is not None:
            self._widgets.text(name, default, label or name)
            return self._widgets.get(name)
        return os.environ.get(f"MMRANK_{name.upper()}", default)

    def common(self) -> tuple[str, str, dt.date]:
        """(config path, `k=v;k=v` overrides, run date): the parameters every notebook takes."""
        return (self.text("conf", "", "config file"), self.text("overrides", "", "overrides k=v;k=v"),
                dt.date.fromisoformat(self.text("run_date", dt.date.today().isoformat(), "run date")))
