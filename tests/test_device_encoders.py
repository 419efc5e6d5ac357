"""Encoders and their device: never built on the driver, placed per task, the batch (nvJPEG-style) image path
and the overlapped decode pipeline, all on CPU. No GPU exists here: the torchvision decoder runs its batch path
on the CPU (`features.image.decoder=torchvision`), the same code that runs with device=cuda on a GPU.
"""
from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pytest
import torch
from PIL import Image
from pyspark.errors import PythonException

from mmrank.config import FeaturesConf
from mmrank.encoders.image import Jpeg, batch_decodable
from mmrank.encoders.registry import encoder_identity, get_encoder
from mmrank.lakehouse import Lakehouse
from mmrank.stages import featurize
from mmrank.testing.media import image_bytes, wav_bytes
from tests.conftest import make_config
from tests.test_encoders import feats as section_feats
from tests.test_featurize import product, products

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def feats(tiny_bert: str | None = None, overlap: str = "auto", precision: str = "auto", **sections) -> FeaturesConf:
    """tests/test_encoders' small CPU config, with the top-level `overlap` and `precision` keys."""
    base = section_feats(tiny_bert, **sections).model_dump()
    return FeaturesConf.model_validate({**base, "overlap": overlap, "precision": precision})


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _bad_huffman_jpeg() -> bytes:
    """Complete JPEG structure (SOI..EOI, RGB header) whose Huffman table is garbage: both decoders reject it."""
    good = image_bytes((200, 30, 30), size=48, fmt="JPEG")
    i = good.index(b"\xff\xc4")
    return good[:i + 4] + b"\x00" + bytes([0xFF] * 16) + good[i + 21:]


GOOD = [image_bytes((23 * i % 256, 40, 180), seed=i, size=48 + 9 * i, fmt="JPEG") for i in range(7)]
GREY = image_bytes((90, 90, 90), seed=9, size=50, fmt="JPEG")
IMAGES = GOOD + [
    image_bytes((1, 2, 250), seed=3, size=40, fmt="PNG"),  # not a JPEG: PIL
    _cmyk_jpeg(),                                          # CMYK JPEG: PIL
    b"",                                                   # empty
    GOOD[0][: len(GOOD[0]) // 2],                          # truncated JPEG: PIL rejects it
    _bad_huffman_jpeg(),                                   # passes the header check, fails in the batch decoder
]
N_OK = len(GOOD) + 2


def test_driver_identity_needs_no_device():
    """A driver configured with features.device=cuda and no GPU gets name/version/dim; placing fails."""
    cuda = FeaturesConf.model_validate({"device": "cuda", "precision": "auto"})
    cpu = cuda.model_copy(update={"device": "cpu"})
    for m in ("text", "image", "audio"):
        ident = encoder_identity(m, cuda)
        enc = get_encoder(m, cpu)
        assert (ident.name, ident.version, ident.dim) == (enc.name, enc.version, enc.dim)
        with pytest.raises(RuntimeError, match="no CUDA device is visible"):
            get_encoder(m, cuda)


def test_encoder_cache_follows_the_task_device():
    """A reused Spark worker serving a task on another GPU gets the encoder rebuilt there, not the old one.
    (`cuda:1` is only a device name here: an encoder is not loaded before its first encode.)"""
    f = feats(precision="fp32")
    on_cpu = get_encoder("image", f, torch.device("cpu"))
    assert get_encoder("image", f, torch.device("cpu")) is on_cpu
    on_gpu1 = get_encoder("image", f, torch.device("cuda", 1))
    assert on_gpu1 is not on_cpu and on_gpu1.device == torch.device("cuda", 1) and not on_gpu1._loaded
    assert on_gpu1.precision == "fp32" and on_gpu1.overlaps and on_gpu1.batch_decode
    assert get_encoder("image", f, torch.device("cpu")) is not on_gpu1
    assert not on_cpu.overlaps and not on_cpu.batch_decode  # the CPU path stays the default on CPU


def test_batch_decoder_matches_pil_and_quarantines_the_same_items():
    pil = get_encoder("image", feats())
    tv = get_encoder("image", feats(image={"decoder": "torchvision"}))
    assert [type(tv.decode(b)).__name__ for b in GOOD + [GREY]] == ["Jpeg"] * (len(GOOD) + 1)
    assert not any(isinstance(tv.decode(b), Jpeg) for b in IMAGES[len(GOOD):len(GOOD) + 2])
    assert not batch_decodable(IMAGES[-2]) and batch_decodable(IMAGES[-1])
    v_pil, e_pil = pil.encode_safe(IMAGES + [GREY])
    v_tv, e_tv = tv.encode_safe(IMAGES + [GREY])
    assert [e is None for e in e_tv] == [e is None for e in e_pil] == [True] * N_OK + [False] * 3 + [True]
    assert e_tv[-2].startswith("corrupt image") and e_tv[-4] == "empty image (0 bytes)"
    for a, b in zip(v_pil, v_tv):
        if a is not None:
            assert float(a @ b) > 0.999  # close (resize and IDCT rounding), not bit-identical


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_overlapped_decode_gives_the_same_embeddings(decoder):
    """`features.overlap=on` (decode the next window on a thread) changes when work happens, not the result
    (up to float rounding: windows change which items share a model batch)."""
    items = IMAGES * 2  # several windows of batch_size 4 * WINDOW_BATCHES
    plain = get_encoder("image", feats(image={"decoder": decoder}))
    over = get_encoder("image", feats(overlap="on", image={"decoder": decoder}))
    assert over.overlaps and not plain.overlaps
    v1, e1 = plain.encode_safe(items)
    v2, e2 = over.encode_safe(items)
    assert [e is None for e in e1] == [e is None for e in e2]
    for a, b in zip(v1, v2):
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_overlapped_text_and_audio_match(tmp_path):
    from tests.test_encoders import tiny_bert_dir

    bert = tiny_bert_dir(tmp_path / "bert")
    texts = [f"red shoe number {i} " * (1 + i % 5) for i in range(40)] + ["", "   "]
    clips = [wav_bytes(200 + 40 * i, seconds=0.2 + 0.1 * (i % 3)) for i in range(10)] + [b"RIFFnope"]
    for m, items in (("text", texts), ("audio", clips)):
        v1, e1 = get_encoder(m, feats(bert)).encode_safe(items)
        v2, e2 = get_encoder(m, feats(bert, overlap="on")).encode_safe(items)
        assert [e is None for e in e1] == [e is None for e in e2]
        assert sum(e is not None for e in e1) == (2 if m == "text" else 1)
        for a, b in zip(v1, v2):
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-5)


def test_featurize_plans_on_a_driver_without_the_configured_gpu(spark, tmp_path):
    """features.device=cuda, no GPU anywhere: the driver plans (no encoder built there); only a task that has
    something to encode needs the device, and its error comes from that task."""
    cfg = make_config(tmp_path / "lake", "features.device=cuda", "features.image.batch_size=2")
    lh = Lakehouse(spark, cfg)
    counts = featurize.run(lh, dt.date(2026, 11, 1))  # nothing to encode: succeeds
    assert counts["encoded"] == 0 and counts["unchanged"] == 0
    products(lh, [product("p1", "red shoe", image_bytes((200, 30, 30), seed=1))])
    with pytest.raises(PythonException, match="no CUDA device is visible"):
        featurize.run(lh, dt.date(2026, 11, 2))
