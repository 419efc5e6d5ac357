"""Synthetic `training_lists` rows whose grades depend on the features (tests and benchmarks).

Relevance of a candidate is a noisy function of its text embedding's similarity to the query's and of its
image embedding's first components, so a fusion ranker's validation NDCG measurably improves with training.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession

from mmrank.modalities import ModalityDims
from mmrank.lexical import N_LEX
from mmrank.ranker.batch import BATCH_KEYS, PAD_GRADE


def synthetic_lists(n_queries: int, list_size: int, dims: ModalityDims, seed: int = 0,
                    splits: tuple[float, float] = (0.7, 0.15), run_date: dt.date = dt.date(2026, 1, 1)
                    ) -> pd.DataFrame:
    """`n_queries` rows matching the `training_lists` contract (fixed list_size, flattened arrays)."""
    rng = np.random.default_rng(seed)
    w_img = rng.normal(size=dims.image).astype(np.float32)
    rows = []
    for q in range(n_queries):
        n = int(rng.integers(max(2, list_size - 4), list_size + 1))
        q_text = rng.normal(size=dims.text).astype(np.float32)
        has_q_audio = rng.random() < 0.3
        q_audio = rng.normal(size=dims.audio).astype(np.float32) * has_q_audio
        p_text = np.zeros((list_size, dims.text), np.float32)
        p_image = np.zeros((list_size, dims.image), np.float32)
        p_audio = np.zeros((list_size, dims.audio), np.float32)
        p_mask = np.zeros((list_size, 3), np.float32)
        p_text[:n] = rng.normal(size=(n, dims.text)) + 0.8 * rng.normal(size=(n, 1)) * q_text
        p_image[:n] = rng.normal(size=(n, dims.image))
        has_audio = rng.random(n) < 0.7
        p_audio[:n] = rng.normal(size=(n, dims.audio)) * has_audio[:, None]
        p_mask[:n] = np.stack([np.ones(n), np.ones(n), has_audio], axis=1)
        rel = (p_text[:n] @ q_text) / dims.text + 0.5 * (p_image[:n] @ w_img) / np.sqrt(dims.image)
        rel += 0.1 * rng.normal(size=n)
        grades = np.full(list_size, PAD_GRADE, np.float32)
        grades[:n] = np.digitize(rel, np.quantile(rel, [0.5, 0.75, 0.9]))
        u = rng.random()
        split = "train" if u < splits[0] else "validation" if u < splits[0] + splits[1] else "test"
        rows.append({
            "query_id": f"q{q:06d}", "split": split, "list_len": n,
            "product_ids": [f"p{q:06d}_{i}" for i in range(n)] + [""] * (list_size - n),
            "grades": grades, "q_text": q_text, "q_audio": q_audio,
            "q_mask": np.array([1.0, float(has_q_audio)], np.float32),
            "p_text": p_text.ravel(), "p_image": p_image.ravel(), "p_audio": p_audio.ravel(),
            "p_mask": p_mask.ravel(), "p_lex": np.zeros(list_size * N_LEX, np.float32), "run_date": run_date})
    return pd.DataFrame(rows)


def synthetic_lists_df(spark: SparkSession, n_queries: int, list_size: int, dims: ModalityDims,
                       seed: int = 0, splits: tuple[float, float] = (0.7, 0.15)) -> DataFrame:
    """`synthetic_lists` as a Spark DataFrame with the `training_lists` schema."""
    from mmrank.tables import spec

    pdf = synthetic_lists(n_queries, list_size, dims, seed, splits)
    for c in BATCH_KEYS:
        pdf[c] = pdf[c].map(lambda a: [float(x) for x in a])
    return spark.createDataFrame(pdf, schema=spec("training_lists").schema)
