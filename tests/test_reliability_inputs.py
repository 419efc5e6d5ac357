"""Issue #8, part 1: bad inputs through the REAL stage functions (ingest -> featurize, training_lists, score).

Table-driven: each stage gets ONE input holding every case of its table (one Spark run per stage, cheap on a
loaded machine), then one parametrized assertion per case plus a counts-add-up check:
valid rows in the output + quarantined rows == rows in the input, and every valid row is in the output.

Already covered elsewhere and not repeated here: corrupt/zero/unreadable media at featurize level and
over-long text (tests/test_featurize.py), malformed JSON lines, bad event types and future timestamps in the
query log of the sample source (tests/test_ingest.py: `e_future` -> `future_timestamp`).
"""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from mmrank.stages import featurize, score, training_lists
from mmrank.stages import ingest
from mmrank.testing.media import image_bytes, wav_bytes
from mmrank.lakehouse import Lakehouse
from mmrank.runs import stage_status
from tests._toy_lists import RUN_DATE as TOY_DATE
from tests._toy_lists import write_toy
from tests.conftest import make_config
from tests.test_encoders import tiny_bert_dir
from tests.test_score import build_inputs

RUN_DATE = dt.date(2026, 11, 21)
GOOD_PNG = image_bytes((200, 40, 40), size=32, seed=3)
NON_LATIN = "красные кроссовки 赤いスニーカー حذاء أحمر Ελληνικά"
HUGE = "z" * 100_000                              # 100 KB > ingest.max_text_chars (20 000): quarantined
LONG_FOR_ENCODER = "long text " * 60              # 600 chars: lands (ingest limit 20 000), > text.max_chars 500

# ---- BYO catalog cases: product_id -> (row fields, media files {column: bytes}, expected ingest reason) ------
# reason None = valid: must land in `products` (and featurize must encode every modality it carries, or
# quarantine it with a reason).
CATALOG_CASES: dict[str, tuple[dict, dict, str | None]] = {
    "ok_text": ({"title": "red wool scarf", "colour": "red"}, {}, None),
    "ok_nonlatin": ({"title": NON_LATIN, "brand": "Ünïcødé"}, {}, None),
    "ok_image_only": ({"title": ""}, {"image_path": GOOD_PNG}, None),
    "ok_audio_8k": ({"title": "chime 8k"}, {"audio_path": wav_bytes(880, sr=8000, noise=0.0)}, None),
    "ok_audio_44k": ({"title": "chime 44k"}, {"audio_path": wav_bytes(880, sr=44100, noise=0.0)}, None),
    "ok_long_for_encoder": ({"title": LONG_FOR_ENCODER}, {}, None),
    "bad_truncated_png": ({"title": "half a png"}, {"image_path": GOOD_PNG[: len(GOOD_PNG) // 2]}, "image_corrupt"),
    "bad_not_image": ({"title": "text as png"}, {"image_path": b"hello, I am not a picture"}, "image_corrupt"),
    "bad_zero_image": ({"title": "empty png"}, {"image_path": b""}, "image_empty"),
    "bad_zero_audio": ({"title": "empty wav"}, {"audio_path": b""}, "audio_empty"),
    "bad_not_audio": ({"title": "text as wav"}, {"audio_path": b"RIFF....WAVEnot audio at all" * 10},
                      "audio_corrupt"),
    "bad_huge_text": ({"title": HUGE}, {}, "text_too_long:title"),
    "bad_empty": ({"title": ""}, {}, "empty_content"),
    "bad_missing_file": ({"title": "gone"}, {"image_path": None}, "image_missing"),
    "bad_dup": ({"title": "first copy"}, {}, "duplicate_id"),
}
DUPLICATE_SECOND = {"product_id": "bad_dup", "title": "second copy"}
NULL_ID_ROW = {"product_id": None, "title": "no id at all"}
# judgments: (query text, product_id, grade, expected reason)
JUDGMENT_CASES = [
    ("red scarf", "ok_text", 3, None),
    ("red scarf", "ok_nonlatin", 0, None),
    ("красные кроссовки", "ok_nonlatin", 2, None),
    ("red scarf", "no_such_product", 1, "unknown_product_id"),
    ("red scarf", "bad_huge_text", 1, "unknown_product_id"),       # its product was quarantined
]


def _write_catalog(folder) -> tuple[str, str, int]:
    rows = []
    for pid, (fields, media, _) in CATALOG_CASES.items():
        row = {"product_id": pid, "title": "", "image_path": "", "audio_path": "", "colour": ""} | fields
        for col, data in media.items():
            ext = "png" if col == "image_path" else "wav"
            rel = f"media/{pid}.{ext}"
            if data is not None:
                (folder / "media").mkdir(exist_ok=True)
                (folder / rel).write_bytes(data)
            row[col] = rel
        rows.append(row)
    rows += [DUPLICATE_SECOND | {"image_path": "", "audio_path": "", "colour": ""},
             NULL_ID_ROW | {"image_path": "", "audio_path": "", "colour": ""}]
    pd.DataFrame(rows).replace("", None).to_parquet(folder / "shop.parquet")
    pd.DataFrame([{"query": q, "product_id": p, "grade": g} for q, p, g, _ in JUDGMENT_CASES]).to_csv(
        folder / "judg.csv", index=False)
    return str(folder / "shop.parquet"), str(folder / "judg.csv"), len(rows)


@pytest.fixture(scope="module")
def byo(spark, tmp_path_factory):
    """One BYO catalog with every case, ingested once, then featurized once (real stage functions)."""
    root = tmp_path_factory.mktemp("reliab_inputs")
    bert = tiny_bert_dir(root / "bert")
    cfg = make_config(root / "lake", f"features.text.path={bert}", "features.text.max_chars=500",
                      "features.device=cpu", "features.audio.max_seconds=1.0")
    lh = Lakehouse(spark, cfg)
    catalog, judg, n_rows = _write_catalog(root)
    counts = ingest.run(lh, RUN_DATE, source="byo", catalog=catalog, judgments=judg)
    fcounts = featurize.run(lh, RUN_DATE)
    q = lh.read("quarantine").toPandas()
    return dict(lh=lh, counts=counts, fcounts=fcounts, n_rows=n_rows,
                products={r["product_id"]: r for r in lh.read("products").collect()},
                quarantine=q, pf={(r["product_id"], r["modality"]): r for r in lh.read("product_features").collect()})


def _reasons(q: pd.DataFrame, stage: str, record_id: str) -> list[str]:
    return q.loc[(q["stage"] == stage) & (q["record_id"] == record_id), "reason"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("pid", list(CATALOG_CASES))
def test_byo_catalog_case(byo, pid):
    fields, media, expected = CATALOG_CASES[pid]
    reasons = _reasons(byo["quarantine"], "ingest_byo", f"products:{pid}")
    if expected is None:
        assert reasons == [] and pid in byo["products"], f"valid product {pid} did not land: {reasons}"
        row = byo["products"][pid]
        for col, data in media.items():            # media bytes landed unchanged (nothing resampled on disk)
            assert row[col.replace("_path", "_bytes")] == data
        if fields.get("title"):
            assert row["title"] == fields["title"]  # non-Latin text stored exactly, never transliterated
    else:
        assert pid not in byo["products"]
        assert reasons and all(r.startswith(expected) for r in reasons), reasons
        if pid == "bad_dup":                     # both rows of a duplicated id, none kept
            assert len(reasons) == 2


@pytest.mark.slow
def test_byo_null_id_extra_columns_and_counts_add_up(byo):
    lh, c, q = byo["lh"], byo["counts"], byo["quarantine"]
    assert _reasons(q, "ingest_byo", "products:<null>") == ["null_id"]
    valid = {pid for pid, (_, _, r) in CATALOG_CASES.items() if r is None}
    assert set(byo["products"]) == valid                                     # every valid row, nothing else
    assert c["products_read"] == byo["n_rows"]
    assert c["products_valid"] + c["products_quarantined"] == c["products_read"]
    assert len(byo["products"]) == c["products_valid"]
    n_prod_q = q[(q["stage"] == "ingest_byo") & q["record_id"].str.startswith("products:")].shape[0]
    assert n_prod_q == c["products_quarantined"] == byo["n_rows"] - len(valid)
    # extra catalog columns are kept in `attributes` (documented in docs/data.md); nulls dropped
    assert byo["products"]["ok_text"]["attributes"] == {"colour": "red"}
    assert not byo["products"]["ok_nonlatin"]["attributes"]
    # payloads of the quarantined 100 KB title are truncated
    assert q["payload"].fillna("").str.len().max() <= 200
    assert stage_status(lh, RUN_DATE, "ingest") == "succeeded"


@pytest.mark.slow
def test_byo_judgments_with_unknown_products(byo):
    lh, c, q = byo["lh"], byo["counts"], byo["quarantine"]
    j = lh.read("judgments").toPandas()
    good = [(p, g) for _, p, g, r in JUDGMENT_CASES if r is None]
    assert sorted(zip(j["product_id"], j["grade"])) == sorted((p, float(g)) for p, g in good)
    jq = q[(q["stage"] == "ingest_byo") & q["record_id"].str.startswith("judgments:")]
    assert sorted(jq["reason"]) == sorted(r for *_, r in JUDGMENT_CASES if r is not None)
    assert jq["record_id"].str.contains("no_such_product").sum() == 1
    assert c["judgments_read"] == len(JUDGMENT_CASES) == c["judgments_valid"] + c["judgments_quarantined"]
    # the non-Latin query is a valid query, stored verbatim
    assert "красные кроссовки" in set(lh.read("queries").toPandas()["query_text"])


@pytest.mark.slow
def test_featurize_encodes_every_valid_modality_or_quarantines_it(byo):
    lh, pf, fc, q = byo["lh"], byo["pf"], byo["fcounts"], byo["quarantine"]
    fq = q[q["stage"] == "featurize"]
    # wrong sample rates are resampled, not rejected; their embedding is close to the 16 kHz clip's
    from mmrank.encoders.registry import get_encoder

    for pid in ("ok_audio_8k", "ok_audio_44k"):
        assert (pid, "audio") in pf, f"{pid} audio was not encoded: {fq.to_dict('records')}"
    enc = get_encoder("audio", lh.cfg.features)
    refs = enc.encode([wav_bytes(f, sr=16000, noise=0.0) for f in (880, 220, 1760)])
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    for pid in ("ok_audio_8k", "ok_audio_44k"):
        e = np.asarray(pf[(pid, "audio")]["embedding"])
        sims = refs @ (e / np.linalg.norm(e))
        assert sims[0] > 0.95 and sims[0] > sims[1:].max() + 0.3, (pid, sims)  # same tone at 16 kHz
    # non-Latin text is valid: encoded, finite, and the non-Latin query too
    assert ("ok_nonlatin", "text") in pf and np.isfinite(pf[("ok_nonlatin", "text")]["embedding"]).all()
    ru = lh.read("queries").where(F.col("query_text") == "красные кроссовки").first()["query_id"]
    assert lh.read("query_features").where((F.col("query_id") == ru) & (F.col("modality") == "text")).count() == 1
    assert ("ok_image_only", "image") in pf and ("ok_image_only", "text") not in pf
    # text over features.text.max_chars: quarantined with a reason by featurize, payload truncated
    assert ("ok_long_for_encoder", "text") not in pf
    assert len(fq[fq["record_id"] == "products:ok_long_for_encoder:text"]) == 1
    # counts add up: attempted = encoded + quarantined, per (source, modality), and rows match
    attempted = sum(v for k, v in fc.items() if k.startswith("attempted_"))
    assert attempted == fc["encoded"] + fc["quarantined"] and fc["quarantined"] == len(fq)
    assert lh.read("product_features").count() + lh.read("query_features").count() == fc["encoded"]
    for emb in (r["embedding"] for r in pf.values()):
        assert all(math.isfinite(x) for x in emb)


def test_byo_catalog_missing_required_column_names_it(lh, tmp_path):
    pd.DataFrame({"product_id": ["a"], "name": ["no title column"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="title"):
        ingest.run(lh, RUN_DATE, source="byo", catalog=str(tmp_path / "c.csv"))
    run = lh.read("runs").where("stage = 'ingest'").first()
    assert run["status"] == "failed" and "title" in run["message"]
    assert lh.read("products").count() == 0


def test_byo_catalog_column_names_are_case_insensitive(lh, tmp_path):
    """docs/data.md: 'Column names are case-insensitive.'"""
    pd.DataFrame({"Product_ID": ["a1"], "TITLE": ["blue hat"], "Colour": ["blue"]}).to_csv(
        tmp_path / "c.csv", index=False)
    c = ingest.run(lh, RUN_DATE, source="byo", catalog=str(tmp_path / "c.csv"))
    assert c["products_valid"] == 1
    assert lh.read("products").first()["title"] == "blue hat"


# ---- feature tables written by an external process: NaN / inf / wrong-length embeddings ------------------
def _poison(lh: Lakehouse, table: str, key: str, bad: dict[tuple[str, str], list]) -> None:
    """Overwrite some embeddings in a feature table (as an external writer would)."""
    pdf = lh.read(table).toPandas()
    for (ident, modality), emb in bad.items():
        sel = (pdf[key] == ident) & (pdf["modality"] == modality)
        assert sel.sum() == 1, (ident, modality)
        pdf.loc[sel, "embedding"] = pd.Series([emb], index=pdf.index[sel])
        pdf.loc[sel, "dim"] = len(emb)
    lh.overwrite(table, lh.spark.createDataFrame(pdf, schema=lh.read(table).schema))


def _bad_embeddings(lh: Lakehouse, table: str, key: str) -> dict:
    pdf = lh.read(table).toPandas().sort_values([key, "modality"]).drop_duplicates(key)  # 3 different ids
    a, b, c = pdf.iloc[0], pdf.iloc[1], pdf.iloc[2]
    nan = [float("nan")] * len(a["embedding"])
    inf = list(b["embedding"])
    inf[0] = float("inf")
    return {(a[key], a["modality"]): nan, (b[key], b["modality"]): inf,
            (c[key], c["modality"]): list(c["embedding"]) + [0.5]}


def _finite(v) -> bool:
    return v is None or bool(np.isfinite(np.asarray(v, dtype=np.float64)).all())


def test_training_lists_quarantine_non_finite_and_wrong_length_embeddings(lh):
    write_toy(lh, n_queries=8, n_cands=6)
    pbad = _bad_embeddings(lh, "product_features", "product_id")
    qpdf = lh.read("query_features").toPandas().sort_values("query_id")
    qtext = qpdf[qpdf["modality"] == "text"].iloc[-1]          # not q000, whose products are poisoned
    qbad = {(qtext["query_id"], "text"): [float("nan")] * len(qtext["embedding"])}
    _poison(lh, "product_features", "product_id", pbad)
    _poison(lh, "query_features", "query_id", qbad)

    counts = training_lists.run(lh, TOY_DATE)
    lists = lh.read("training_lists").toPandas()
    for col in ("grades", "q_text", "q_audio", "q_mask", "p_text", "p_image", "p_audio", "p_mask"):
        assert lists[col].map(_finite).all(), f"non-finite values reached training_lists.{col}"
    q = lh.read("quarantine").where(F.col("stage") == "training_lists").toPandas()
    reasons = dict(zip(q["record_id"], q["reason"]))
    for (ident, m) in list(pbad) + list(qbad):
        assert f"{ident}:{m}" in reasons, f"{ident}:{m} not quarantined: {reasons}"
    # the query whose only embedding is NaN has no usable features: quarantined as a whole, not trained on
    assert reasons.get(qtext["query_id"]) == "query has no features"
    assert qtext["query_id"] not in set(lists["query_id"])
    # counts add up: every labelled query is either a list or a quarantined query
    labelled = set(lh.read("labels").toPandas()["query_id"])
    q_queries = {r for r in reasons if r in labelled}
    assert set(lists["query_id"]) | q_queries == labelled and not set(lists["query_id"]) & q_queries
    assert counts["lists"] == len(lists) and counts["quarantined"] == len(q)
    # the poisoned products still take part through their other (valid) modalities
    for pid, _ in pbad:
        assert any(pid in ids for ids in lists["product_ids"]), pid


def test_score_quarantines_non_finite_and_wrong_length_embeddings(spark, tmp_path):
    lh = Lakehouse(spark, make_config(tmp_path, "score.top_n=5", "score.similarity_top_k=6",
                                      "score.candidates=both", "score.batch_size=16"))
    build_inputs(lh)
    pbad = {("p001", "text"): [float("nan")] * 16, ("p002", "image"): [float("inf")] + [0.0] * 11,
            ("p004", "text"): [0.1] * 17}
    qbad = {("q01", "text"): [float("nan")] * 16}
    _poison(lh, "product_features", "product_id", pbad)
    _poison(lh, "query_features", "query_id", qbad)
    counts = score.run(lh, RUN_DATE)                                  # must not crash
    day = lh.read("ranking_scores").toPandas()
    assert len(day) > 0 and np.isfinite(day[["score", "contrib_text", "contrib_image", "contrib_audio"]]
                                        .to_numpy(dtype=float)).all()
    assert "q01" not in set(day["query_id"])                          # only embedding was NaN
    q = lh.read("quarantine").where(F.col("stage") == "score").toPandas()
    got = set(q["record_id"])
    for (ident, m) in list(pbad) + list(qbad):
        assert f"{ident}:{m}" in got, f"{ident}:{m} not quarantined by score: {got}"
    assert counts["rows_written"] == len(day) and counts["quarantined"] == len(q)
    assert stage_status(lh, RUN_DATE, "score") == "succeeded"
