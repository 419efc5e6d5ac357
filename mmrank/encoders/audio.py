"""Audio encoder: log-mel / MFCC statistics pooling plus a small 1-D conv encoder over log-mel frames.

Decoding uses `soundfile` (bundled libsndfile: WAV/FLAC/OGG) rather than `torchaudio.load`, because
torchaudio >= 2.9 routes load/save through torchcodec + FFmpeg, which this stack does not ship. The rest of
the front end is torchaudio: `functional.resample` to `features.audio.sample_rate`, `transforms.MelSpectrogram`
(25 ms window, 10 ms hop), and MFCCs as the DCT (`functional.create_dct`) of the same log-mel, so the mel
filterbank runs once. Clips are mixed to mono and cropped to `max_seconds`; shorter clips are zero-padded in
the batch but padded frames are masked out of every pooling.

Log-mel is in dB relative to the clip's loudest bin, floored at -80 dB and mapped to [0, 1] (loudness
invariant). The embedding concatenates, each block L2-normalised, then L2-normalised again:
mean over time of log-mel centred over the mel bins (spectral shape, the noise floor removed) + std over
time (2*n_mels), mean+std of MFCC 1..n_mfcc (c0, the overall level, dropped; 2*n_mfcc), and the masked time-mean of a
2-layer Conv1d encoder (conv_channels). The conv encoder is seeded random init unless `weights_path` is set
(loud warning, version says `random-init`); the statistics blocks carry the signal without weights.
Default dim = 2*64 + 2*20 + 64 = 232.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio

from mmrank.config import FeaturesConf
from mmrank.encoders.base import Encoder, ItemError, file_fingerprint, load_state_dict, resolve, warn_random_init
from mmrank.registry import ENCODERS

TOP_DB = 80.0
WIN_S, HOP_S = 0.025, 0.010


def conv_encoder(n_mels: int, channels: int) -> torch.nn.Module:
    """The 1-D conv stack over log-mel frames ([B, n_mels, T] -> [B, channels, T])."""
    return torch.nn.Sequential(
        torch.nn.Conv1d(n_mels, channels, 5, padding=2), torch.nn.ReLU(),
        torch.nn.Conv1d(channels, channels, 5, padding=2), torch.nn.ReLU())


def _masked_mean_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, C, T], mask [B, T] -> [B, 2C] (mean and std over valid frames)."""
    m = mask.unsqueeze(1).to(x.dtype)
    n = m.sum(2).clamp_min(1.0)
    mean = (x * m).sum(2) / n
    var = ((x - mean.unsqueeze(2)).pow(2) * m).sum(2) / n
    return torch.cat([mean, var.clamp_min(0).sqrt()], 1)


@ENCODERS["audio"].register("logmel_cnn")
class AudioEncoder(Encoder):
    """Inputs are raw audio file bytes; empty or unreadable bytes are item errors."""

    modality = "audio"

    def __init__(self, name: str, features: FeaturesConf, device: torch.device | None = None):
        c = features.audio
        super().__init__(name, features, c.batch_size, device)
        self.sr, self.n_mels, self.n_mfcc, self.channels, self.seed = (
            c.sample_rate, c.n_mels, c.n_mfcc, c.conv_channels, c.seed)
        self.max_samples = int(round(c.max_seconds * self.sr))
        self.hop = int(round(HOP_S * self.sr))
        self.weights = resolve(c.weights_path)
        if self.weights is not None and not self.weights.exists():
            raise FileNotFoundError(f"features.audio.weights_path: {self.weights} does not exist")
        wid = file_fingerprint(self.weights) if self.weights else f"random-init-seed{self.seed}"
        learned_dim, learned_tag = self._learned(c)
        self.version = (f"{name}-{wid}-sr{self.sr}-mel{self.n_mels}-mfcc{self.n_mfcc}-"
                        f"{c.max_seconds:g}s-{learned_tag}")
        self.dim = 2 * self.n_mels + 2 * self.n_mfcc + learned_dim
        if self.weights is None:
            warn_random_init(f"audio encoder {name}", "features.audio.weights_path")

    # ---- the learned block over log-mel frames (subclasses replace these two and `_learned_block`) ----------
    def _learned(self, c) -> tuple[int, str]:
        """(width of the learned block, its tag in `version`)."""
        return self.channels, f"c{self.channels}"

    def _build_learned(self) -> torch.nn.Module:
        return conv_encoder(self.n_mels, self.channels)

    def _learned_block(self, logmel: torch.Tensor, mask: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """[B, width] from log-mel [B, M, T] with its valid-frame mask [B, T] (`frames` = valid counts [B])."""
        h = self.net(logmel).float()
        m = mask.unsqueeze(1).float()
        return (h * m).sum(2) / m.sum(2).clamp_min(1.0)

    def _load(self) -> None:
        win = int(round(WIN_S * self.sr))
        n_fft = 1 << (win - 1).bit_length()
        self.mel = torchaudio.transforms.MelSpectrogram(
            self.sr, n_fft=n_fft, win_length=win, hop_length=self.hop, n_mels=self.n_mels).to(self.device)
        self.dct = torchaudio.functional.create_dct(self.n_mfcc + 1, self.n_mels, "ortho").to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = self._build_learned()
        if self.weights is not None:
            net.load_state_dict(load_state_dict(self.weights))
        self.net = net.eval().to(self.device)

    def decode(self, item: Any) -> torch.Tensor:
        if item is None or len(item) == 0:
            raise ItemError("empty audio (0 bytes)")
        try:
            data, sr = sf.read(io.BytesIO(bytes(item)), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
            raise ItemError(f"unreadable audio: {type(e).__name__}: {e}") from None
        if data.shape[0] == 0:
            raise ItemError("audio has no samples")
        if not np.isfinite(data).all():
            raise ItemError("audio has non-finite samples")
        wave = torch.from_numpy(data.mean(1))
        if sr != self.sr:
            wave = torchaudio.functional.resample(wave, sr, self.sr)
        return wave[: self.max_samples]

    def _length(self, decoded: torch.Tensor) -> int:
        return int(decoded.shape[0])

    def _forward(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Clips of different lengths are encoded in same-length groups: zero padding would reach the STFT and
        conv windows at the end of shorter clips, making an embedding depend on what else is in its batch
        (then an incremental re-run would not reproduce a full run)."""
        lens = [int(w.shape[0]) for w in batch]
        if len(set(lens)) > 1:
            out: list[torch.Tensor | None] = [None] * len(batch)
            for n in sorted(set(lens)):
                idx = [i for i, m in enumerate(lens) if m == n]
                for i, e in zip(idx, self._forward([batch[i] for i in idx])):
                    out[i] = e
            return torch.stack(out)
        return self._forward_same_length(batch)

    def _forward_same_length(self, batch: list[torch.Tensor]) -> torch.Tensor:
        lengths = torch.tensor([w.shape[0] for w in batch], device=self.device)
        x = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True).to(self.device)
        with torch.autocast(self.device.type, enabled=False):  # STFT stays fp32 (no bf16 FFT)
            db = 10.0 * torch.log10(self.mel(x.float()).clamp_min(1e-10))  # [B, M, T]
            db = db - db.amax((1, 2), keepdim=True)
            logmel = db.clamp_min(-TOP_DB) / TOP_DB + 1.0
            frames = (lengths // self.hop + 1).clamp_max(logmel.shape[2])
            mask = torch.arange(logmel.shape[2], device=self.device)[None, :] < frames[:, None]
            mfcc = torch.einsum("bmt,mk->bkt", logmel, self.dct[:, 1:])  # c0 (overall level) dropped
            stats = _masked_mean_std(logmel, mask)
            mean = stats[:, : self.n_mels]  # spectral shape: centred over mel bins (noise floor removed)
            stats = torch.cat([mean - mean.mean(1, keepdim=True), stats[:, self.n_mels:]], 1)
            blocks = [stats, _masked_mean_std(mfcc, mask)]
        blocks.append(self._learned_block(logmel, mask, frames))
        return F.normalize(torch.cat([F.normalize(b, dim=1) for b in blocks], 1), dim=1)
