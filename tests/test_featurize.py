"""Stage `featurize` on a real Spark + Delta lakehouse: dims, incrementality, quarantine, deletes."""
from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pytest
from pyspark.sql import Row
from pyspark.sql import functions as F

from mmrank.stages import featurize
from mmrank.testing.media import image_bytes, wav_bytes
from mmrank.lakehouse import Lakehouse
from tests.conftest import make_config
from tests.test_encoders import tiny_bert_dir

D1, D2, D3, D4 = (dt.date(2026, 11, d) for d in (1, 2, 3, 4))
GOOD_JPEG = image_bytes((200, 30, 30), size=64, fmt="JPEG")


def sha(b):
    return None if b is None else hashlib.sha256(b).hexdigest()


def product(pid, title, image=None, audio=None, description="a product", brand="acme", category="shoes"):
    h = f"{title}|{description}|{hash(image)}|{hash(audio)}"
    return Row(product_id=pid, title=title, description=description, brand=brand, category=category,
               attributes={}, image_uri=None, image_bytes=image, image_hash=sha(image), audio_uri=None,
               audio_bytes=audio, audio_hash=sha(audio), source="test", content_hash=h, run_date=D1,
               ingested_at=dt.datetime(2026, 11, 1))


def products(lh, rows):
    lh.merge("products", lh.spark.createDataFrame(rows, schema=lh.read("products").schema))


@pytest.fixture
def flh(spark, tmp_path) -> Lakehouse:
    bert = tiny_bert_dir(tmp_path / "bert")
    cfg = make_config(tmp_path / "lake", f"features.text.path={bert}", "features.text.max_chars=500",
                      "features.device=cpu", "features.image.batch_size=2", "features.audio.batch_size=2",
                      "features.audio.max_seconds=1.0")
    return Lakehouse(spark, cfg)


def table(lh, name, key):
    return {(r[key], r["modality"]): r for r in lh.read(name).collect()}


def test_featurize_incremental_quarantine_and_deletes(flh):
    lh = flh
    products(lh, [
        product("p1", "red running shoe", image_bytes((220, 30, 30), seed=1), wav_bytes(440)),
        product("p2", "blue jacket", image_bytes((30, 40, 220), seed=2)),
        product("p3", "green mug", GOOD_JPEG[: len(GOOD_JPEG) // 2], wav_bytes(880)),  # corrupt JPEG
        product("p4", "silent speaker", GOOD_JPEG, b""),  # zero-length audio
        product("p5", "broken speaker", None, b"RIFF\x00\x01not really a wav"),  # unreadable audio
        product("p6", "y" * 600),  # absurdly long text, no image/audio
        product("p7", "plain sock"),
    ])
    qschema = lh.read("queries").schema
    lh.merge("queries", lh.spark.createDataFrame([
        Row(query_id="q1", query_text="red shoe", query_audio=None, audio_hash=None, kind="typed", source="t",
            content_hash="a", run_date=D1),
        Row(query_id="q2", query_text=None, query_audio=wav_bytes(300, seed=5),
            audio_hash=sha(wav_bytes(300, seed=5)), kind="voice", source="t", content_hash="b", run_date=D1),
    ], schema=qschema))

    c1 = featurize.run(lh, D1)
    pf, qf = table(lh, "product_features", "product_id"), table(lh, "query_features", "query_id")
    assert set(pf) == {("p1", "text"), ("p1", "image"), ("p1", "audio"), ("p2", "text"), ("p2", "image"),
                       ("p3", "text"), ("p3", "audio"), ("p4", "text"), ("p4", "image"), ("p5", "text"),
                       ("p7", "text")}
    assert {m: r["dim"] for (_, m), r in pf.items()} == {"text": 32, "image": 608, "audio": 232}
    assert all(len(r["embedding"]) == r["dim"] for r in pf.values())
    assert abs(np.linalg.norm(pf["p1", "text"]["embedding"]) - 1) < 1e-4
    assert pf["p1", "image"]["encoder"] == "resnet18" and "random-init" in pf["p1", "image"]["encoder_version"]
    assert set(qf) == {("q1", "text"), ("q2", "audio")} and qf["q2", "audio"]["dim"] == 232
    q = {r["record_id"]: r["reason"] for r in lh.read("quarantine").where("stage = 'featurize'").collect()}
    assert set(q) == {"products:p3:image", "products:p4:audio", "products:p5:audio", "products:p6:text"}
    assert q["products:p3:image"].startswith("corrupt image") and q["products:p4:audio"].startswith("empty audio")
    assert q["products:p5:audio"].startswith("unreadable audio") and "too long" in q["products:p6:text"]
    assert (c1["encoded_products_text"], c1["encoded_products_image"], c1["encoded_products_audio"]) == (6, 3, 2)
    assert (c1["encoded_queries_text"], c1["encoded_queries_audio"], c1["quarantined"]) == (1, 1, 4)

    c2 = featurize.run(lh, D2)  # nothing changed: nothing encoded (bad items are retried and fail again)
    assert c2["encoded"] == 0 and c2["unchanged"] == c1["encoded"] and c2["quarantined"] == 4

    p1_image_before = pf["p1", "image"]
    products(lh, [product("p1", "red trail shoe", image_bytes((220, 30, 30), seed=1), wav_bytes(440)),
                  product("p2", "blue jacket", None)])  # new title for p1; p2 loses its image
    c3 = featurize.run(lh, D3)
    assert c3["encoded"] == 1 and c3["encoded_products_text"] == 1
    pf3 = table(lh, "product_features", "product_id")
    assert pf3["p1", "text"]["content_hash"] != pf["p1", "text"]["content_hash"]
    assert pf3["p1", "text"]["run_date"] == D3 and pf3["p1", "image"]["run_date"] == D1
    assert pf3["p1", "image"]["content_hash"] == p1_image_before["content_hash"]
    assert ("p2", "image") not in pf3 and ("p2", "text") in pf3
    # the MERGE moved the one new text embedding and one key to delete, not the unchanged rest of the table
    from delta.tables import DeltaTable

    merge = DeltaTable.forPath(lh.spark, lh.location("product_features")).history(1).first()
    assert merge["operation"] == "MERGE" and merge["operationMetrics"]["numSourceRows"] == "2"
    assert c3["deleted_products"] == 1 and c3["deleted_queries"] == 0
    # what changed is decided from the hashes stored at ingest: a new image_hash (same bytes) re-encodes the
    # image; the bytes themselves are only read for the items being encoded
    p1 = lh.read("products").where("product_id = 'p1'").withColumn("image_hash", F.lit("new-hash"))
    lh.merge("products", p1.withColumn("content_hash", F.lit("changed")))
    c4 = featurize.run(lh, D4)
    assert c4["encoded"] == 1 and c4["encoded_products_image"] == 1
    runs = lh.read("runs").where("stage = 'featurize'").select("run_date", "status", "counts").collect()
    assert len(runs) == 4 and all(r["status"] == "succeeded" for r in runs)


def test_spark_path_matches_direct_encoder(flh):
    """The mapInPandas path returns what the encoder returns when called directly (same batches)."""
    from mmrank.encoders.registry import get_encoder

    lh, cfg = flh, flh.cfg.features
    items = [image_bytes((i * 40 % 255, 80, 200 - i * 20), seed=i) for i in range(6)]
    df = lh.spark.createDataFrame([("products", f"p{i}", "image", None, b, "h") for i, b in enumerate(items)],
                                  "source string, id string, modality string, text string, data binary, "
                                  "content_hash string")
    got = {r["id"]: r["embedding"] for r in featurize.encode_frame(df, cfg, 2).collect()}
    want = get_encoder("image", cfg).encode(items)
    np.testing.assert_allclose(np.array([got[f"p{i}"] for i in range(6)]), want, atol=1e-4)


def test_items_read_from_the_table_files_encode_as_direct(flh):
    """A full night's images and clips, read by the encoder tasks from the products table's files (tasks
    sharing a split when the splits are fewer than the task slots), embed exactly as the encoder does directly
    on the same bytes."""
    from mmrank.encoders.registry import get_encoder

    lh, cfg = flh, flh.cfg.features
    imgs = {f"p{i}": image_bytes((i * 40 % 255, 80, 200 - i * 20), seed=i) for i in range(6)}
    wavs = {pid: wav_bytes(250 + 90 * i) for i, pid in enumerate(imgs)}
    products(lh, [product(pid, f"item {pid}", imgs[pid], wavs[pid]) for pid in imgs])
    counts = {"attempted_products_image": 6, "unchanged_products_image": 0, "attempted_products_audio": 6,
              "unchanged_products_audio": 0}
    cands = featurize.candidates(lh, "products", {"text": "t", "image": "i", "audio": "a"})
    todo = featurize.with_bytes(lh, cands.where(F.col("modality") != "text"), counts, 4)
    assert todo.where(F.col("media_file").isNull()).count() == 0  # nothing joined with its bytes
    got = {(r["modality"], r["id"]): r["embedding"] for r in featurize.encode_frame(todo, cfg).collect()}
    for m, items in (("image", imgs), ("audio", wavs)):
        want = get_encoder(m, cfg).encode(list(items.values()))
        np.testing.assert_allclose(np.array([got[m, pid] for pid in items]), want, atol=1e-4)


@pytest.mark.parametrize("changed", [4, 1], ids=["most-changed-read-by-split", "few-changed-joined-then-spread"])
def test_with_bytes_delivers_each_modality_in_partitions_of_its_own(flh, changed):
    """Every partition holds one (source, modality): when most of a modality changed, one partition per split of
    the products' files (or per share of a split, when the splits are fewer than `n_parts`), rows carrying
    (file, split) references from which the task reads each item's own bytes (no bytes through Spark); when few
    did, `n_parts` partitions of rows joined with their bytes."""
    from mmrank.media_files import REF_COLUMNS, read_items

    lh = flh
    imgs = {f"p{i}": image_bytes((40 * i, 90, 30), seed=i) for i in range(4)}
    rows = [product(pid, f"item {pid}", img, wav_bytes(300 + 100 * i)) for i, (pid, img) in enumerate(imgs.items())]
    products(lh, rows[:2])
    products(lh, rows[2:])  # more files: several splits
    counts = {f"{k}_products_{m}": 0 for k in ("attempted", "unchanged") for m in ("text", "image", "audio")}
    counts.update({"attempted_products_image": changed, "unchanged_products_image": 4 - changed,
                   "attempted_products_audio": changed, "unchanged_products_audio": 4 - changed})
    cands = featurize.candidates(lh, "products", {"text": "t", "image": "i", "audio": "a"})
    todo = cands.where((F.col("modality") == "text") | F.col("id").isin(*list(imgs)[:changed]))
    got = featurize.with_bytes(lh, todo, counts, 3).withColumn("pid", F.spark_partition_id())
    rows = got.select("pid", "source", "modality", "id", "data", *REF_COLUMNS).toPandas()
    per_part = rows.groupby("pid").apply(lambda g: len(g.drop_duplicates(["source", "modality", *REF_COLUMNS])))
    assert (per_part == 1).all(), per_part
    media = rows[rows["modality"] != "text"]
    if changed == 4:
        assert media["data"].isna().all() and media["media_file"].notna().all()
        splits = media.drop_duplicates(["modality", "media_file", "media_start"])
        assert splits["media_file"].nunique() >= 2 and media["pid"].nunique() >= len(splits)
        assert rows["pid"].nunique() == got.rdd.getNumPartitions()  # no empty task
        image = media[media["modality"] == "image"]
        fetched = {i: b for rows, items in read_items(image, "product_id", "image_bytes", 2)
                   for i, b in zip(rows["id"], items)}
    else:
        assert media["media_file"].isna().all() and got.rdd.getNumPartitions() == 3 * 3
        fetched = dict(zip(media["id"][media["modality"] == "image"], media["data"][media["modality"] == "image"]))
    assert {k: bytes(v) for k, v in fetched.items()} == dict(list(imgs.items())[:changed])
    assert sorted(media["id"][media["modality"] == "audio"]) == list(imgs)[:changed]
    assert sorted(rows["id"][rows["modality"] == "text"]) == list(imgs)
