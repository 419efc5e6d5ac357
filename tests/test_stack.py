"""The pinned stack works together: each package does real work, not just import (issue: foundation)."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
import torch


def test_delta_round_trip_keeps_schema_and_replaces_by_date(lh):
    from pyspark.sql import Row

    schema = lh.read("ranking_scores").schema
    d1, d2 = dt.date(2026, 11, 20), dt.date(2026, 11, 21)

    def rows(d, n):
        return lh.spark.createDataFrame(
            [Row(run_date=d, query_id=f"q{i}", product_id=f"p{i}", score=float(i), rank=i + 1,
                 model_version="m1", contrib_text=0.5, contrib_image=None, contrib_audio=0.25)
             for i in range(n)], schema=schema)

    lh.replace_date("ranking_scores", rows(d1, 3), d1)
    lh.replace_date("ranking_scores", rows(d2, 2), d2)
    lh.replace_date("ranking_scores", rows(d2, 4), d2)  # re-run of d2 replaces d2 only
    got = lh.read("ranking_scores")
    counts = {r["run_date"]: r["count"] for r in got.groupBy("run_date").count().collect()}
    assert counts == {d1: 3, d2: 4}
    assert dict(got.dtypes)["score"] == "float"
    assert got.where("query_id = 'q1' AND run_date = DATE'2026-11-21'").first()["contrib_audio"] == 0.25


def test_torchvision_transform_and_resnet_forward():
    from PIL import Image
    from torchvision import models, transforms

    img = Image.fromarray(np.full((80, 120, 3), (200, 30, 30), dtype=np.uint8))
    tf = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor()])
    x = tf(img)
    assert x.shape == (3, 64, 64)
    assert x[0].mean() > 0.7 and x[1].mean() < 0.2  # red stays red
    net = models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    with torch.inference_mode():
        assert net.eval()(x.unsqueeze(0)).shape == (1, 512)


def test_torchaudio_melspectrogram_finds_the_tone():
    import torchaudio

    sr, f0 = 16000, 1000.0
    t = torch.arange(sr) / sr
    wave = torch.sin(2 * math.pi * f0 * t).unsqueeze(0)
    spec = torchaudio.transforms.Spectrogram(n_fft=512)(wave)[0]  # [freq, time]
    peak_hz = spec.mean(dim=1).argmax().item() * sr / 512
    assert abs(peak_hz - f0) < sr / 512
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sr, n_mels=32)(wave)
    assert mel.shape[1] == 32
    resampled = torchaudio.functional.resample(wave, sr, 8000)
    assert resampled.shape[-1] == 8000


def test_transformers_forward_pass(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path)
    model = BertModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert out.shape == (1, 4, 16) and torch.isfinite(out).all()


def test_petastorm_spark_to_torch_loader_pass(spark, tmp_path):
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, f"file://{tmp_path}/petastorm")
    df = spark.range(40).selectExpr("cast(id as int) as id", "array(cast(id as float), 1.0f) as vec")
    conv = make_spark_converter(df)
    try:
        seen = []
        # synchronous reads, as mmrank's loader does: petastorm 0.13.1's thread pool can end a pass before its
        # ventilator counted the first row group when the machine is loaded (an empty pass)
        with conv.make_torch_dataloader(batch_size=8, num_epochs=1, reader_pool_type="dummy") as loader:
            for batch in loader:
                assert batch["vec"].shape[1] == 2
                seen += batch["id"].tolist()
                assert torch.equal(batch["vec"][:, 0], batch["id"].float())
    finally:
        conv.delete()
    assert sorted(seen) == list(range(40))


@pytest.mark.slow
def test_horovod_two_rank_allreduce_under_local_spark(spark):
    from mmrank.stack_check import check_horovod

    results = check_horovod(num_proc=2)
    assert sorted(r[0] for r in results) == [0.0, 1.0]
    assert all(r[1] == 2.0 and r[2] == 3.0 for r in results)  # 1 + 2 summed across ranks
