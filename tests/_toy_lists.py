"""Tiny labels / product_features / query_features tables with a learnable signal, for list/eval tests."""
from __future__ import annotations

import datetime as dt

import numpy as np

from mmrank.lakehouse import Lakehouse

RUN_DATE = dt.date(2026, 11, 21)
DIMS = {"text": 8, "image": 6, "audio": 4}


def _feat_rows(key: str, ident: str, modality: str, emb: np.ndarray) -> dict:
    return {key: ident, "modality": modality, "embedding": [float(x) for x in emb], "dim": len(emb),
            "encoder": "toy", "encoder_version": "1", "content_hash": "h", "run_date": RUN_DATE}


def write_toy(lh: Lakehouse, n_queries: int = 24, n_cands: int = 12, seed: int = 0,
              no_image: set[str] = frozenset(), extra: dict[str, tuple[int, int]] | None = None) -> None:
    """Queries q000.. with `n_cands` labelled candidates each (grade from text+image similarity).

    `no_image`: product ids written without an image row. `extra`: query id -> (n candidates, n relevant),
    overriding the default size. Query `q_nofeat` has labels but no features (quarantine case).
    Every 4th query is a voice query (audio only, no text embedding).
    """
    rng = np.random.default_rng(seed)
    spark = lh.spark
    sizes = {f"q{i:03d}": (n_cands, None) for i in range(n_queries)} | dict(extra or {})
    labels, pf, qf = [], [], []
    for qi, (qid, (n, n_rel)) in enumerate(sorted(sizes.items())):
        q = {m: rng.normal(size=d) for m, d in DIMS.items()}
        if qi % 4 == 3:
            qf.append(_feat_rows("query_id", qid, "audio", q["audio"]))
        else:
            qf.append(_feat_rows("query_id", qid, "text", q["text"]))
        for j in range(n):
            pid = f"{qid}_p{j:02d}"
            p = {m: rng.normal(size=d) + (0.8 * q[m] if j % 3 == 0 else 0) for m, d in DIMS.items()}
            rel = j < n_rel if n_rel is not None else j % 3 == 0
            grade = float(rng.integers(1, 4)) if rel else 0.0
            labels.append({"query_id": qid, "product_id": pid, "label": grade, "weight": 1.0,
                           "impressions": 1, "clicks": 0, "carts": 0, "purchases": 0,
                           "source": "judgments", "run_date": RUN_DATE})
            for m in DIMS:
                if not (m == "image" and pid in no_image):
                    pf.append(_feat_rows("product_id", pid, m, p[m]))
    labels.append({"query_id": "q_nofeat", "product_id": "q000_p00", "label": 1.0, "weight": 1.0,
                   "impressions": 1, "clicks": 0, "carts": 0, "purchases": 0, "source": "judgments",
                   "run_date": RUN_DATE})
    for name, rows in (("labels", labels), ("product_features", pf), ("query_features", qf)):
        lh.ensure(name)
        lh.overwrite(name, spark.createDataFrame(rows, schema=lh.read(name).schema))
