"""Encoders as plain Python (no Spark): interface, pooling, fallbacks, per-item errors, versions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrank.config import FeaturesConf
from mmrank.encoders.base import ItemError
from mmrank.encoders.registry import get_encoder
from mmrank.registry import ENCODERS
from mmrank.testing.media import image_bytes, wav_bytes
from mmrank.testing.models import tiny_bert_dir  # noqa: F401  (other test modules import it from here)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


def feats(tiny_bert: str | None = None, **sections) -> FeaturesConf:
    base = {"device": "cpu", "image": {"image_size": 64, "batch_size": 4}, "audio": {"max_seconds": 1.0}}
    if tiny_bert:
        base["text"] = {"path": tiny_bert, "max_chars": 300, "batch_size": 4}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return FeaturesConf.model_validate(base)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_registry_and_cache(tiny_bert):
    f = feats(tiny_bert)
    enc = get_encoder("text", f)
    assert get_encoder("text", f) is enc  # one instance per process and config
    assert {"minilm", "bert"} <= set(ENCODERS["text"]) and {"resnet18", "resnet50"} <= set(ENCODERS["image"])
    assert (enc.modality, enc.dim, enc.precision, enc.device.type) == ("text", 32, "fp32", "cpu")
    with pytest.raises(ValueError, match="'nope' is not registered for features.audio.name; known: logmel_cnn"):
        feats(audio={"name": "nope"})  # config refuses a name no encoder registered
    with pytest.raises(KeyError, match="unknown modality 'smell'"):
        get_encoder("smell", f)


def test_text_mean_pooling_norm_and_padding_invariance(tiny_bert):
    enc = get_encoder("text", feats(tiny_bert))
    alone = enc.encode(["red shoe"])
    mixed = enc.encode(["a much longer product description with many many more tokens than the first",
                        "red shoe", "blue denim jacket with brass buttons and two pockets, slim fit"])
    assert alone.dtype == np.float32 and alone.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(alone[0], mixed[1], atol=1e-5)


def test_text_item_errors(tiny_bert):
    enc = get_encoder("text", feats(tiny_bert))
    vecs, errs = enc.encode_safe(["ok text", "   ", "x" * 301, None, "also fine"])
    assert errs[0] is None and errs[4] is None and vecs[0].shape == (32,)
    assert errs[1] == "empty text" and "too long" in errs[2] and "not a string" in errs[3]
    assert vecs[1] is None and vecs[2] is None
    with pytest.raises(ItemError, match="too long"):
        enc.encode(["x" * 301])


def test_real_minilm_semantics():
    enc = get_encoder("text", feats())
    assert enc.dim == 384 and "all-MiniLM-L6-v2" in enc.version and "len64" in enc.version
    shoe, sneaker, cake = enc.encode(["red running shoe", "red sneaker", "chocolate cake"])
    assert cos(shoe, sneaker) > cos(shoe, cake) + 0.2


def test_image_fallback_carries_colour_and_rejects_corrupt(caplog):
    enc = get_encoder("image", feats(image={"seed": 3}))  # fresh config -> fresh instance -> warning
    assert "random-init" in enc.version and enc.dim == 512 + 96
    red1, red2 = image_bytes((220, 30, 30), seed=1), image_bytes((200, 40, 20), seed=2)
    blue = image_bytes((30, 40, 220), seed=3)
    jpeg = image_bytes((220, 30, 30), size=64, fmt="JPEG")
    vecs, errs = enc.encode_safe([red1, red2, blue, jpeg[: len(jpeg) // 2], b"", b"not an image", jpeg])
    assert errs[3].startswith("corrupt image") and errs[4] == "empty image (0 bytes)"
    assert errs[5].startswith("corrupt image") and errs[:3] == [None] * 3 and errs[6] is None
    assert abs(np.linalg.norm(vecs[0]) - 1) < 1e-5
    assert cos(vecs[0], vecs[1]) > 0.9 > cos(vecs[0], vecs[2]) + 0.15
    assert cos(vecs[0], vecs[6]) > cos(vecs[0], vecs[2])  # JPEG red is red


def test_image_weights_change_version_and_load(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    base = get_encoder("image", feats())
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, tmp_path / "a.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "b.safetensors"))
    a = get_encoder("image", feats(image={"weights_path": str(tmp_path / "a.pt")}))
    b = get_encoder("image", feats(image={"weights_path": str(tmp_path / "b.safetensors")}))
    assert len({base.version, a.version, b.version}) == 3 and "random-init" not in a.version
    va, vb = a.encode([image_bytes((0, 200, 0))]), b.encode([image_bytes((0, 200, 0))])
    np.testing.assert_allclose(va, vb, atol=1e-5)  # same weights, either file format
    with pytest.raises(FileNotFoundError):
        get_encoder("image", feats(image={"weights_path": str(tmp_path / "missing.pt")}))


def test_audio_separates_tones_and_rejects_bad_bytes(tmp_path):
    enc = get_encoder("audio", feats())
    assert enc.dim == 2 * 64 + 2 * 20 + 64 and "random-init" in enc.version
    a440, a440b = wav_bytes(440, seed=1), wav_bytes(440, seconds=0.8, sr=22050, seed=2)  # resampled
    a2k = wav_bytes(2000, seed=3)
    vecs, errs = enc.encode_safe([a440, b"", b"RIFF\x00\x00garbage", a440b, a2k, wav_bytes(440, seconds=0.0)])
    assert errs[1] == "empty audio (0 bytes)" and errs[2].startswith("unreadable audio")
    assert errs[5] is not None and [errs[i] for i in (0, 3, 4)] == [None] * 3
    assert abs(np.linalg.norm(vecs[0]) - 1) < 1e-5
    assert cos(vecs[0], vecs[3]) > 0.95 and cos(vecs[0], vecs[3]) > cos(vecs[0], vecs[4]) + 0.3
    from mmrank.encoders.audio import conv_encoder

    torch.save(conv_encoder(64, 64).state_dict(), tmp_path / "conv.pt")
    trained = get_encoder("audio", feats(audio={"weights_path": str(tmp_path / "conv.pt")}))
    assert trained.version != enc.version and trained.encode([a440]).shape == (1, enc.dim)
