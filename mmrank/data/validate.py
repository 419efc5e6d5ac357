"""Row validation shared by every ingestion source: each rule is (reason, condition); a row's reason is the
first rule it breaks (None = valid). Media bytes are checked by decoding them (PIL / soundfile) in batches
inside `mapInPandas`. Rows with a reason go to `quarantine`; all other rows land.
"""
from __future__ import annotations

import io
from typing import Iterable, Iterator

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

Rule = tuple["str | Column", Column]


def blank(c: str | Column) -> Column:
    """Null, empty or whitespace-only text."""
    col = F.col(c) if isinstance(c, str) else c
    return col.isNull() | (F.trim(col) == "")


def first_reason(rules: Iterable[tuple[str | Column, Column]]) -> Column:
    """The reason of the first rule whose condition is true, else null (a reason may be a Column)."""
    return F.coalesce(*[F.when(cond, reason if isinstance(reason, Column) else F.lit(reason))
                        for reason, cond in rules], F.lit(None).cast("string"))


def id_rules(id_col: str) -> list[Rule]:
    return [("null_id", blank(id_col))]


def text_rules(cols: Iterable[str], max_chars: int) -> list[Rule]:
    """Over-long text is quarantined, never silently truncated."""
    return [(f"text_too_long:{c}", F.length(c) > max_chars) for c in cols]


def type_rules(raw_and_typed: dict[str, Column]) -> list[Rule]:
    """`{column: typed expression}`: a value present in the raw text that does not parse is a wrong type."""
    return [(f"bad_type:{c}", ~blank(c) & typed.isNull()) for c, typed in raw_and_typed.items()]


def media_rules(kind: str) -> list[Rule]:
    """Referenced `<kind>_uri` whose file is missing, or whose bytes failed `check_<kind>`."""
    return [(f"{kind}_missing", F.col(f"{kind}_uri").isNotNull() & F.col(f"{kind}_bytes").isNull()),
            (F.concat(F.lit(f"{kind}_"), F.col(f"{kind}_error")), F.col(f"{kind}_error").isNotNull())]


def with_duplicates(df: DataFrame, keys: list[str], reason_col: str = "reason") -> DataFrame:
    """Duplicate-key policy: every row of a key that occurs more than once is quarantined (`duplicate_id`);
    rows already rejected for another reason keep that reason. Nothing guesses which duplicate is right."""
    n = F.count(F.lit(1)).over(Window.partitionBy(*keys))
    has_key = F.lit(True)
    for k in keys:
        has_key = has_key & F.col(k).isNotNull()
    return df.withColumn(reason_col, F.coalesce(F.col(reason_col), F.when(has_key & (n > 1), F.lit("duplicate_id"))))


# ---- media decoding (plain Python: testable without Spark) -----------------------------------------------
def _size_problem(b: bytes, max_bytes: int) -> str | None:
    return "empty" if len(b) == 0 else "too_large" if len(b) > max_bytes else None


def check_image(b: bytes | None, max_bytes: int) -> str | None:
    """None if `b` is a decodable image header, else a short reason ('empty', 'too_large', 'corrupt: ...')."""
    if b is None:
        return None
    if problem := _size_problem(b, max_bytes):
        return problem
    from PIL import Image

    try:
        with Image.open(io.BytesIO(b)) as im:
            im.verify()
    except Exception as e:  # any decoder failure is a data problem, not a crash
        return f"corrupt: {type(e).__name__}"
    return None


def check_audio(b: bytes | None, max_bytes: int) -> str | None:
    """None if `b` is a readable audio file with at least one frame, else a short reason."""
    if b is None:
        return None
    if problem := _size_problem(b, max_bytes):
        return problem
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(b))
    except Exception as e:
        return f"corrupt: {type(e).__name__}"
    return "empty" if info.frames == 0 else None


_CHECKS = {"image": check_image, "audio": check_audio}


def check_media(df: DataFrame, kinds: Iterable[str], max_bytes: int) -> DataFrame:
    """Add `<kind>_error` (string, null = fine) for each kind's `<kind>_bytes` column, decoded in batches."""
    kinds = list(kinds)
    schema = StructType(list(df.schema.fields) + [StructField(f"{k}_error", StringType(), True) for k in kinds])

    def decode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            for k in kinds:
                pdf[f"{k}_error"] = [_CHECKS[k](b, max_bytes) for b in pdf[f"{k}_bytes"]]
            yield pdf

    return df.mapInPandas(decode, schema)


def payload(df: DataFrame, exclude: Iterable[str] = ()) -> Column:
    """JSON excerpt of a row for the quarantine table; binary columns become their length."""
    skip = set(exclude)
    parts = []
    for f in df.schema.fields:
        if f.name in skip:
            continue
        if f.dataType.typeName() == "binary":
            parts.append(F.length(f.name).alias(f"{f.name}_len"))
        else:
            parts.append(F.col(f.name))
    return F.to_json(F.struct(*parts))


def quarantine_rows(df: DataFrame, table: str, keys: Iterable[str], reason_col: str = "reason") -> DataFrame:
    """`record_id, reason, payload` for rows with a reason; record_id is `<table>:<key>[|<key>...]`."""
    bad = df.where(F.col(reason_col).isNotNull())
    rid = F.concat_ws("|", *[F.coalesce(F.col(k).cast("string"), F.lit("<null>")) for k in keys])
    return bad.select(F.concat(F.lit(f"{table}:"), rid).alias("record_id"), F.col(reason_col).alias("reason"),
                      payload(df, exclude=(reason_col,)).alias("payload"))


def safe_name(s: str) -> str:
    """A source name usable in ids and table values: lower-case letters, digits, '-' and '_'."""
    import re

    out = re.sub(r"[^a-z0-9_-]+", "-", s.strip().lower()).strip("-")
    if not out:
        raise ValueError(f"name {s!r} has no usable characters")
    return out
