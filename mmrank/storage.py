"""The one file-system layer for everything besides the Delta tables: artifacts, checkpoints, the petastorm
cache, reports and the landing zone, on local disks or object stores.

A storage location is a plain local path or a URI (`file://`, `s3a://`, `abfss://`, `gs://`, `dbfs:/`; a
Unity Catalog volume `/Volumes/...` is a local path on Databricks nodes). URIs stay URIs: `location(p)` gives
a `pathlib.Path` for a plain local path and a `StoragePath` for a URI, and a `StoragePath` joins parts
textually, so `str()` is always the URI that was configured plus the parts (no `Path()` ever runs on a URI).
Both offer the same pathlib subset (`/`, `name`, `parent`, `exists`, `is_dir`, `mkdir`, `iterdir`, `glob`,
`read_bytes/text`, `write_bytes/text`, `unlink`), so code written against it runs on either.

I/O goes through fsspec (`s3a://` -> s3fs, `abfss://` -> adlfs, `gs://` -> gcsfs, `file://` and local paths ->
the local file system, `dbfs:/x` -> the `/dbfs/x` mount of Databricks nodes). Options for a protocol (an S3
endpoint, ...) come from `storage.fs_options` (`configure`) or fsspec's own `FSSPEC_<PROTOCOL>` environment
variables, which is how executors get them (`mmrank.spark` exports them with `spark.executorEnv`).

Writes are safe on object stores, where rename is a copy and not atomic: `write_atomic` writes one object in
one call (an object-store PUT is all or nothing; on a local disk a temporary file is `os.replace`d within its
folder). A result made of several files is committed by writing a small pointer or marker last (artifacts:
`model.json` then `LATEST`), never by renaming a folder.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator, Union

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# URI scheme -> fsspec protocol (the Hadoop spellings map to the Python implementations)
PROTOCOLS = {"file": "file", "s3": "s3", "s3a": "s3", "s3n": "s3", "abfs": "abfs", "abfss": "abfs",
             "gs": "gcs", "gcs": "gcs", "dbfs": "file"}
DBFS_MOUNT = "/dbfs"  # where Databricks nodes mount dbfs:/


def scheme(p: str | os.PathLike) -> str | None:
    """The URI scheme of `p` (`s3a`, `file`, `dbfs`, ...) or None for a plain path."""
    m = _SCHEME.match(str(p))
    return m.group(1).lower() if m and len(m.group(1)) > 1 else None  # `C:` is a drive, not a scheme


def is_uri(p: str | os.PathLike) -> bool:
    return scheme(p) is not None


def local_path(p: str | os.PathLike) -> str | None:
    """The local file-system path of `p` (a plain path, `file:` URI or `dbfs:/` on a Databricks node), or
    None when `p` lives on a remote store."""
    s = str(p)
    sch = scheme(s)
    if sch is None:
        return s
    if sch == "file":
        rest = s[len("file:"):]
        return "/" + rest.lstrip("/") if rest.startswith("/") else rest
    if sch == "dbfs":
        return DBFS_MOUNT + "/" + s[len("dbfs:"):].lstrip("/")
    return None


def spark_uri(p: str | os.PathLike) -> str:
    """`p` as Spark reports file paths (`file:/abs/path` for local files, other URIs unchanged)."""
    lp = local_path(p)
    if lp is not None and scheme(p) != "dbfs":
        return "file:" + os.path.realpath(lp)
    return str(p)


def hadoop_uri(p: str | os.PathLike) -> str:
    """`p` in the form Hadoop / Delta use for table locations: `file:/abs` for `file:` URIs (Delta tells
    `file:///x` and `file:/x` apart), plain paths and other URIs unchanged."""
    s = str(p)
    return "file:" + local_path(s) if scheme(s) == "file" else s


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base` with `parts` appended by `/` (textually for URIs)."""
    out = str(base)
    for part in parts:
        out = out.rstrip("/") + "/" + str(part).strip("/") if is_uri(out) else os.path.join(out, str(part))
    return out


_OPTIONS: dict[str, dict[str, Any]] = {}


def configure(fs_options: dict[str, dict[str, Any]]) -> None:
    """Set fsspec options per protocol (`{"s3": {"endpoint_url": ...}}`) for this process."""
    import fsspec.config

    for proto, opts in fs_options.items():
        _OPTIONS.setdefault(proto, {}).update(opts)
        fsspec.config.conf.setdefault(proto, {}).update(opts)


def executor_env(fs_options: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The `FSSPEC_<PROTOCOL>` environment variables that give other processes the same options."""
    return {f"FSSPEC_{proto.upper()}": json.dumps(opts, sort_keys=True) for proto, opts in fs_options.items()}


def filesystem(p: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec file system, path inside it) for a location."""
    import fsspec

    lp = local_path(p)
    if lp is not None:
        return fsspec.filesystem("file"), os.path.abspath(lp)
    s = str(p)
    sch = scheme(s) or ""
    proto = PROTOCOLS.get(sch, sch)
    return fsspec.core.url_to_fs(proto + s[len(sch):])


class StoragePath:
    """A pathlib-like handle on a URI whose `str()` is exactly the URI (see the module doc)."""

    __slots__ = ("_uri",)

    def __init__(self, uri: str | os.PathLike):
        s = str(uri)
        if not is_uri(s):
            raise ValueError(f"{s!r} is not a URI; use pathlib.Path for local paths")
        head = _SCHEME.match(s).group(0)
        self._uri = head + s[len(head):].rstrip("/") if s[len(head):].strip("/") else s

    # ---- naming --------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self._uri

    def __repr__(self) -> str:
        return f"StoragePath({self._uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and other._uri == self._uri

    def __hash__(self) -> int:
        return hash(self._uri)

    def __truediv__(self, part: str) -> "StoragePath":
        return StoragePath(join(self._uri, part))

    def joinpath(self, *parts: str) -> "StoragePath":
        return StoragePath(join(self._uri, *parts))

    @property
    def name(self) -> str:
        return self._uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        n = self.name
        return n[n.rfind("."):] if "." in n.strip(".") else ""

    @property
    def stem(self) -> str:
        return self.name[: len(self.name) - len(self.suffix)]

    @property
    def parent(self) -> "StoragePath":
        head, sep, _ = self._uri.rstrip("/").rpartition("/")
        return StoragePath(head if head and not head.endswith(":/") and not head.endswith(":") else self._uri)

    def with_name(self, name: str) -> "StoragePath":
        return self.parent / name

    def __fspath__(self) -> str:
        """The local path for `file:`/`dbfs:` URIs; remote URIs have none (os.* calls fail loudly)."""
        lp = local_path(self._uri)
        if lp is None:
            raise TypeError(f"{self._uri} is on a remote store; use mmrank.storage, not local file calls")
        return lp

    def as_uri(self) -> str:
        return spark_uri(self._uri) if local_path(self._uri) is not None else self._uri

    def resolve(self) -> "StoragePath":
        return self

    # ---- I/O ---------------------------------------------------------------------------------------
    def _fs(self) -> tuple[Any, str]:
        return filesystem(self._uri)

    def exists(self) -> bool:
        fs, p = self._fs()
        return bool(fs.exists(p))

    def is_dir(self) -> bool:
        fs, p = self._fs()
        return bool(fs.isdir(p))

    def is_file(self) -> bool:
        fs, p = self._fs()
        return bool(fs.isfile(p))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Folders exist implicitly on object stores; on local disks this creates them."""
        fs, p = self._fs()
        if fs.exists(p) and not exist_ok:
            raise FileExistsError(self._uri)
        fs.makedirs(p, exist_ok=True)

    def iterdir(self) -> Iterator["StoragePath"]:
        fs, p = self._fs()
        if not fs.exists(p):
            return iter(())
        return iter([self / e.rstrip("/").rsplit("/", 1)[-1] for e in sorted(fs.ls(p, detail=False))
                     if e.rstrip("/") != p.rstrip("/")])

    def glob(self, pattern: str) -> Iterator["StoragePath"]:
        fs, p = self._fs()
        base = p.rstrip("/")
        return iter([self / m[len(base) + 1:] for m in sorted(fs.glob(base + "/" + pattern))])

    def read_bytes(self) -> bytes:
        fs, p = self._fs()
        with fs.open(p, "rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        write_atomic(self, data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        fs, p = self._fs()
        if not fs.exists(p):
            if missing_ok:
                return
            raise FileNotFoundError(self._uri)
        fs.rm(p)

    def stat(self) -> os.stat_result:
        fs, p = self._fs()
        size = int(fs.info(p).get("size") or 0)
        return os.stat_result((0, 0, 0, 0, 0, 0, size, 0, 0, 0))


PathLike = Union[Path, StoragePath]


def location(p: str | os.PathLike) -> PathLike:
    """A `pathlib.Path` for a plain local path, a `StoragePath` for a URI (kept exactly as given)."""
    if isinstance(p, (Path, StoragePath)):
        return p
    return StoragePath(p) if is_uri(p) else Path(p)


def write_atomic(p: str | os.PathLike, data: bytes) -> None:
    """Write one file so readers see the old or the new content, never a part: a single PUT on object
    stores; a temporary file in the same folder then `os.replace` on local disks."""
    lp = local_path(p)
    if lp is not None:
        os.makedirs(os.path.dirname(os.path.abspath(lp)), exist_ok=True)
        tmp = os.path.join(os.path.dirname(os.path.abspath(lp)), f".{os.path.basename(lp)}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, lp)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, path = filesystem(p)
    fs.pipe_file(path, data)


def read_bytes(p: str | os.PathLike) -> bytes:
    return location(p).read_bytes()


def exists(p: str | os.PathLike) -> bool:
    return location(p).exists()


def remove_tree(p: str | os.PathLike) -> None:
    """Delete a folder and everything under it (no error if it does not exist)."""
    fs, path = filesystem(p)
    if fs.exists(path):
        fs.rm(path, recursive=True)
