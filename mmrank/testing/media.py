"""Tiny synthetic media for tests and benchmarks: solid/noisy colour images and tone WAV clips, as bytes."""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from PIL import Image


def image_bytes(rgb: tuple[int, int, int], size: int = 48, noise: float = 8.0, seed: int = 0,
                fmt: str = "PNG") -> bytes:
    """An image of colour `rgb` with Gaussian pixel noise and a few stripes (some texture), encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    px = np.array(rgb, np.float32)[None, None, :] + rng.normal(0, noise, (size, size, 3))
    px[:, :: max(2, size // 6)] *= 0.8
    buf = io.BytesIO()
    Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def wav_bytes(freq: float, seconds: float = 0.5, sr: int = 16000, noise: float = 0.01, seed: int = 0) -> bytes:
    """A mono 16-bit WAV of a sine tone at `freq` Hz plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = 0.5 * np.sin(2 * np.pi * freq * t) + noise * rng.normal(size=t.shape)
    buf = io.BytesIO()
    sf.write(buf, y.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()
