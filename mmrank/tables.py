"""Table contracts: every Delta table mmrank reads or writes, its schema, keys and partitioning.

The README's "Table contracts" section is generated from `TABLES` (see `contracts_markdown`), so the
docs cannot drift from the code. Embeddings are `array<float>`; everything a nightly run writes has `run_date`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pyspark.sql.types import IntegerType, StructField, StructType, _parse_datatype_string

from mmrank.buckets import BUCKET_COLUMN, FEATURE_BUCKETS


@dataclass(frozen=True)
class TableSpec:
    """Schema (Spark DDL), merge keys, partition columns and purpose of one logical table."""

    name: str
    ddl: str
    keys: tuple[str, ...]
    doc: str
    partition_by: tuple[str, ...] = ()
    not_null: tuple[str, ...] = field(default=())
    bucket_by: str | None = None  # stored partitioned by `bucket` = crc32(this column) mod FEATURE_BUCKETS

    @property
    def schema(self) -> StructType:
        st = _parse_datatype_string(self.ddl)
        assert isinstance(st, StructType)
        return StructType([f.__class__(f.name, f.dataType, f.name not in self.not_null) for f in st.fields])

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]

    @property
    def stored_schema(self) -> StructType:
        """The schema on disk: the contract's, plus the `bucket` partition column of a bucketed table (a layout
        detail: `Lakehouse` adds it on write and drops it on read)."""
        if not self.bucket_by:
            return self.schema
        return StructType([*self.schema.fields, StructField(BUCKET_COLUMN, IntegerType(), False)])

    @property
    def stored_partitions(self) -> tuple[str, ...]:
        return (BUCKET_COLUMN,) if self.bucket_by else self.partition_by


_EMB = "array<float>"

TABLES: dict[str, TableSpec] = {t.name: t for t in [
    TableSpec(
        "products",
        "product_id string, title string, description string, brand string, category string, "
        "attributes map<string,string>, image_uri string, image_bytes binary, image_hash string, "
        "audio_uri string, audio_bytes binary, audio_hash string, source string, content_hash string, "
        "run_date date, ingested_at timestamp",
        keys=("product_id",), not_null=("product_id", "content_hash", "run_date"),
        doc="Current catalog, one row per product (MERGE on product_id; `run_date` = date of last change). "
            "Image/audio bytes are stored inline; `*_uri` keeps where they came from; `*_hash` = sha256 of the "
            "bytes (null without bytes), computed once at ingest so featurize never re-reads unchanged media."),
    TableSpec(
        "queries",
        "query_id string, query_text string, query_audio binary, audio_hash string, kind string, source string, "
        "content_hash string, run_date date",
        keys=("query_id",), not_null=("query_id", "kind", "content_hash", "run_date"),
        doc="Search queries: `kind` is `typed` (query_text) or `voice` (query_audio, a WAV clip; `audio_hash` = "
            "its sha256, computed at ingest)."),
    TableSpec(
        "query_log",
        "event_id string, session_id string, query_id string, product_id string, position int, "
        "clicked boolean, added_to_cart boolean, purchased boolean, event_ts timestamp, run_date date",
        keys=("event_id",), partition_by=("run_date",),
        not_null=("event_id", "query_id", "product_id", "position", "run_date"),
        doc="Impressions with user actions, one row per shown (query, product, position) in a session. "
            "`run_date` is the log day; re-ingesting a day replaces that day."),
    TableSpec(
        "judgments",
        "query_id string, product_id string, grade double, source string, run_date date",
        keys=("query_id", "product_id", "source"), not_null=("query_id", "product_id", "grade", "source"),
        doc="Graded relevance from people or a protocol: the generator's hidden truth (`generator_truth`), "
            "the fashion protocol (`fashion_protocol`) or a user's file (`byo:<name>`). Never derived from logs."),
    TableSpec(
        "labels",
        "query_id string, product_id string, label double, weight double, impressions long, clicks long, "
        "carts long, purchases long, source string, run_date date",
        keys=("query_id", "product_id"), not_null=("query_id", "product_id", "label", "run_date"),
        doc="Training labels per (query, product): graded from the log with inverse-propensity position-bias "
            "correction, or taken from judgments."),
    TableSpec(
        "product_features",
        f"product_id string, modality string, embedding {_EMB}, dim int, encoder string, "
        "encoder_version string, content_hash string, run_date date",
        keys=("product_id", "modality"), not_null=("product_id", "modality", "embedding", "encoder_version"),
        bucket_by="product_id",
        doc="One embedding per product and modality (`text`, `image`, `audio`); a missing modality is a "
            "missing row. MERGEd incrementally: only changed content is re-encoded. Stored in id buckets, so "
            "scoring reads only the files of the buckets it needs."),
    TableSpec(
        "query_features",
        f"query_id string, modality string, embedding {_EMB}, dim int, encoder string, "
        "encoder_version string, content_hash string, run_date date",
        keys=("query_id", "modality"), not_null=("query_id", "modality", "embedding", "encoder_version"),
        bucket_by="query_id",
        doc="One embedding per query: typed queries through the text encoder, voice queries through audio."),
    TableSpec(
        "lexical_tokens",
        "kind string, id string, field string, tokens array<string>, units array<string>, n_tokens int, "
        "content_hash string, run_date date",
        keys=("kind", "id", "field"), not_null=("kind", "id", "field", "tokens", "content_hash"),
        doc="Tokens of every product field (`title`, `brand`, `category`, `description`, `all`) and typed query "
            "(`query`) for lexical matching (`mmrank/lexical/`); `units` = number+unit tokens (`3/4in`). MERGEd "
            "incrementally like the embeddings: only changed text (or a new tokenizer) is re-tokenized."),
    TableSpec(
        "lexical_stats",
        "field string, term string, df long, n_docs long, avg_len double, run_date date",
        keys=("field", "term"), not_null=("field", "term", "df", "n_docs", "avg_len"),
        doc="BM25 corpus statistics of the catalog: document frequency of each term of the `all` and `title` "
            "fields, with the field's document count and mean length. Recomputed (one commit) when tokens change."),
    TableSpec(
        "training_lists",
        f"query_id string, split string, list_len int, product_ids array<string>, grades {_EMB}, "
        f"q_text {_EMB}, q_audio {_EMB}, q_mask {_EMB}, p_text {_EMB}, p_image {_EMB}, p_audio {_EMB}, "
        f"p_mask {_EMB}, p_lex {_EMB}, run_date date",
        keys=("query_id",), not_null=("query_id", "split", "list_len"),
        doc="One row per query: a fixed-size list (train.list_size, padded with grade -1) of candidates with "
            "grades and flattened per-modality features (`p_*` is list_size x dim, `p_mask` list_size x 3, "
            "`q_mask` 2 for text/audio, `p_lex` list_size x the lexical features of `mmrank.lexical.features`). "
            "Split by query into train/validation/test."),
    TableSpec(
        "ranking_scores",
        "run_date date, query_id string, product_id string, score float, rank int, model_version string, "
        "contrib_text float, contrib_image float, contrib_audio float",
        keys=("run_date", "query_id", "product_id"), partition_by=("run_date",),
        not_null=("run_date", "query_id", "product_id", "score", "rank", "model_version"),
        doc="What search reads: top-N products per query with score, rank (1 = best) and per-modality "
            "contributions. A re-run of a date replaces exactly that date (replaceWhere)."),
    TableSpec(
        "quarantine",
        "run_date date, stage string, record_id string, reason string, payload string",
        keys=("run_date", "stage", "record_id", "reason"), not_null=("run_date", "stage", "reason"),
        doc="Rows that could not be used, with the reason; `payload` is a truncated, redacted excerpt."),
    TableSpec(
        "runs",
        "run_id string, run_date date, stage string, status string, started_at timestamp, "
        "finished_at timestamp, duration_s double, input_versions map<string,bigint>, "
        "output_versions map<string,bigint>, counts map<string,bigint>, model_version string, "
        "config_hash string, message string",
        keys=("run_date", "stage"), not_null=("run_id", "run_date", "stage", "status"),
        doc="Run metadata per (run_date, stage): status, durations, input/output Delta versions, counts."),
    TableSpec(
        "metrics",
        "run_date date, model_version string, model_name string, dataset string, split string, "
        "metric string, k int, value double",
        keys=("run_date", "model_name", "dataset", "split", "metric", "k"),
        doc="Evaluation metrics (NDCG@k, DCG@k, MAP, MRR) per model and run."),
]}


def spec(name: str) -> TableSpec:
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    return TABLES[name]


def contracts_markdown() -> str:
    """Markdown for the README's table-contract section (checked by tests/test_docs.py)."""
    out = []
    for t in TABLES.values():
        part = f"; partitioned by `{', '.join(t.partition_by)}`" if t.partition_by else ""
        if t.bucket_by:
            part = (f"; stored partitioned by `{BUCKET_COLUMN}` = crc32(`{t.bucket_by}`) mod {FEATURE_BUCKETS}, "
                    "a column readers do not see")
        nn = f"; not null: {', '.join(t.not_null)}" if t.not_null else ""
        out.append(f"- **`{t.name}`** (key `{', '.join(t.keys)}`{part}{nn}): {t.doc}\n  `{t.ddl}`")
    return "\n".join(out)


if __name__ == "__main__":
    print(contracts_markdown())
