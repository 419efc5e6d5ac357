"""Foundations of the configuration schema: the error type, the strict section base class, path checks and
the constants other sections share."""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONF = REPO_ROOT / "conf" / "local.yaml"
VALIDATION_METRICS = ("ndcg@5", "ndcg@10", "map", "mrr")  # computed on the validation split every epoch


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names key, value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_ALLOWED_SCHEMES = ("file://", "dbfs:/", "s3://", "s3a://", "abfss://", "gs://")
_PATH_FIELDS = {"root", "raw_dir", "artifacts_dir", "reports_dir", "work_dir", "path", "weights_path",
                "catalog_file", "judgments_file", "media_base"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,2}$")


def check_path(value: str | None) -> str | None:
    """Reject config paths that could escape their folder or smuggle commands: `..` segments, control
    characters, shell metacharacters, unknown URI schemes. Existence is checked where a path is used."""
    if value is None:
        return None
    if not value.strip():
        raise ValueError("must be a non-empty path")
    if any(ord(c) < 32 for c in value) or any(c in value for c in ";|&$`<>*?"):
        raise ValueError("must not contain control characters or any of ; | & $ ` < > * ?")
    if "://" in value and not value.startswith(_ALLOWED_SCHEMES):
        raise ValueError(f"URI scheme must be one of {', '.join(_ALLOWED_SCHEMES)}")
    if ".." in Path(value.split("://", 1)[-1]).parts:
        raise ValueError("must not contain '..' segments")
    return value


class _PathChecked(_Section):
    """Sections whose path-like fields are validated with `check_path`."""

    @field_validator(*sorted(_PATH_FIELDS), mode="after", check_fields=False)
    @classmethod
    def _check_paths(cls, v: str | None) -> str | None:
        return check_path(v)
