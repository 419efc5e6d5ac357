"""Configuration sections of the model side: the ranking loss, training, scoring, evaluation and MLflow
tracking."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_serializer, model_validator

from mmrank.config_base import VALIDATION_METRICS, _Section
from mmrank.modalities import PRODUCT_MODALITIES
from mmrank.registry import BACKENDS, CANDIDATE_SOURCES, FUSIONS, HEADS, LOADERS, LOSSES


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

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"{self.name}({args})" if args else self.name


class AlignConf(_Section):
    """Cross-modal alignment learned from the catalog (`mmrank/ranker/align.py`): InfoNCE on each product's own
    (text, image) and (text, audio) embeddings gives query-text <-> image / audio match features."""

    enabled: bool = True
    dim: int = Field(64, ge=4)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=2, description="pairs per step (the in-batch negatives)")
    lr: float = Field(3e-3, gt=0)
    temperature: float = Field(0.07, gt=0)
    max_pairs: int = Field(50_000, ge=2, description="products sampled at most (bounded driver memory)")


class TuneConf(_Section):
    """Bounded hyperparameter search on the validation split before training (`mmrank/ranker/tune.py`)."""

    trials: int = Field(4, ge=0, description="settings tried (0 = off); the grid below in a seeded order")
    lr: list[float] = [1e-3, 3e-3, 1e-2]
    weight_decay: list[float] = [1e-4, 1e-2]
    patience: list[int] = [5, 15]
    max_lists: int = Field(20_000, ge=2, description="train/validation lists per trial at most (seeded sample)")


class TrainConf(_Section):
    backend: str = Field("local", description="registered training backend (mmrank.distributed.backends)")
    num_proc: int = Field(2, ge=1)
    fusion: str = Field("gated", description="registered fusion (mmrank.ranker.fusion)")
    head: str = Field("mlp", description="registered scoring head (mmrank.ranker.heads): mlp | linear | logistic")
    pca_dim: int | None = Field(None, ge=1, description="PCA components per modality, fitted on the train split "
                                "and stored with the artifact; None = no PCA")
    prune_sparsity: float = Field(0.0, ge=0, lt=1, description="magnitude pruning after training: this fraction "
                                  "of every Linear weight set to 0 (the artifact stores the zeros); 0 = off")
    loss: LossSpec = Field(LossSpec(name="lambdarank"), description="registered loss, with optional args")
    modalities: list[str] = list(PRODUCT_MODALITIES)
    list_size: int = Field(20, ge=2, description="candidates per training list (padded / truncated)")
    proj_dim: int = Field(64, ge=4)
    hidden_dim: int = Field(128, ge=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    modality_dropout: float = Field(0.1, ge=0, lt=1)
    match_features: bool = Field(True, description="give the scorer the query-product cosines of the modalities "
                                 "both sides have (text, audio)")
    prior: Literal["similarity", "bm25", "none"] = Field(
        "similarity", description="score = prior_scale * prior + a learned correction that starts at 0: an "
        "untrained model ranks exactly like the prior (similarity = cosine in the query's search modality)")
    prior_scale: float = Field(10.0, gt=0, description="initial multiplier of the prior (learned, stays > 0)")
    prior_gate_z: float = Field(
        2.0, ge=0, description="with a prior: an epoch replaces the untrained model (= the prior's ranking) only "
        "when its validation gain over the prior, paired per list, is at least this many standard errors (0 = any "
        "gain). Guards small judged sets, where the best of many epochs on a few validation lists is noise")
    lexical_features: bool = Field(True, description="give the scorer the lexical match features (`lex`)")
    align: AlignConf = AlignConf()
    tune: TuneConf = TuneConf()
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(8, ge=1, description="lists per optimizer step (global, across ranks)")
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(15, ge=1, description="epochs without improvement of early_stopping_metric before stopping")
    early_stopping_metric: Literal[VALIDATION_METRICS] = Field(  # type: ignore[valid-type]
        "ndcg@10", description="validation metric for early stopping and best-weights selection")
    seed: int = 13
    torch_threads: int = Field(1, ge=1, description="intra-op threads while training (per process / rank)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training autocast; auto = bf16 on GPUs with native bf16, fp16 with loss scaling on "
        "older GPUs, fp32 on CPU")
    split: dict[str, float] = {"train": 0.7, "validation": 0.15, "test": 0.15}
    data_loader: str = Field("petastorm", description="registered data loader (mmrank.distributed.loaders)")
    shuffle_buffer: int = Field(2048, ge=1, description="lists a rank holds in memory: a shard up to this size is "
                                "read once and kept, a larger one is streamed each epoch through a shuffle buffer "
                                "of this size")
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
    _head = field_validator("head")(lambda v: HEADS.check(v))
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
    ablation: bool = Field(False, description="also train the fusion x head grid (mmrank.ranker.ablation) and "
                           "write its table (mean, sd over ablation_seeds) and the compression table")
    ablation_seeds: list[int] = Field([13, 14], min_length=1, description="model seeds of the ablation grid")
    ablation_max_epochs: int | None = Field(None, ge=1, description="max_epochs of each ablation model; "
                                            "None = train.max_epochs")


class TrackingConf(_Section):
    """MLflow runs and model registry (`mmrank.tracking`) and the promotion gate (`stages/promote.py`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    enabled: bool = Field(True, description="log runs and register models; False = no registry, scoring uses "
                          "the latest artifact and the promote stage does nothing")
    tracking_uri: str | None = Field(None, description="None = SQLite under storage.artifacts_dir "
                                     "(mlflow/mlflow.db); `databricks` = the workspace tracking server")
    registry_uri: str | None = Field(None, description="None = tracking_uri; `databricks-uc` = Unity Catalog")
    experiment: str = Field("mmrank", description="experiment name (a workspace path such as /Shared/mmrank "
                            "on Databricks)")
    model_name: str = Field("mmrank_ranker", description="registered model (catalog.schema.name in Unity "
                            "Catalog)")
    gate_metric: Literal[VALIDATION_METRICS] = Field(  # type: ignore[valid-type]
        "ndcg@10", description="validation metric the promotion gate compares")
    gate_tolerance: float = Field(0.01, ge=0, le=1, description="a new model becomes champion unless its "
                                  "gate_metric is below the champion's by more than this (absolute)")

    @field_validator("tracking_uri", "registry_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(ord(c) < 32 for c in v) or any(c in v for c in ";|&$`<>")):
            raise ValueError("must be a non-empty URI without control characters or ; | & $ ` < >")
        return v
