"""Audio encoder `logmel_lstm`: the first design note's recurrent speech encoder over log-mel frames.

The front end is `logmel_cnn`'s (`mmrank.encoders.audio.AudioEncoder`: decoding, resampling, log-mel in
[0, 1], MFCCs, the masked statistics blocks); only the learned block differs: a bidirectional LSTM (or GRU,
`features.audio.rnn`) of `rnn_layers` layers and `rnn_hidden` units per direction over the log-mel frames,
packed by length so padded frames never reach the recurrence, then its outputs averaged over the valid
frames. Embedding = the statistics blocks + that [2 * rnn_hidden] block, each L2-normalised, then the whole.
Without `weights_path` (a state_dict of the recurrent module, safetensors or weights-only torch file) the
recurrence is a seeded random init (loud warning; the version says `random-init`), like the conv encoder.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmrank.encoders.audio import AudioEncoder
from mmrank.registry import ENCODERS


class _BiRNN(torch.nn.Module):
    """Bidirectional LSTM/GRU over [B, T, n_mels] frames, packed by valid length -> [B, T, 2 * hidden]."""

    def __init__(self, cell: str, n_mels: int, hidden: int, layers: int):
        super().__init__()
        rnn = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
        self.rnn = rnn(n_mels, hidden, num_layers=layers, batch_first=True, bidirectional=True)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        packed = pack_padded_sequence(frames, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=frames.shape[1])[0]


@ENCODERS["audio"].register("logmel_lstm")
class LSTMAudioEncoder(AudioEncoder):
    """`logmel_cnn`'s front end with a bidirectional recurrent block instead of the conv block."""

    def _learned(self, c) -> tuple[int, str]:
        self.cell, self.hidden, self.layers = c.rnn, c.rnn_hidden, c.rnn_layers
        return 2 * self.hidden, f"{self.cell}{self.layers}x{self.hidden}"

    def _build_learned(self) -> torch.nn.Module:
        return _BiRNN(self.cell, self.n_mels, self.hidden, self.layers)

    def _learned_block(self, logmel: torch.Tensor, mask: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            h = self.net(logmel.float().transpose(1, 2), frames)            # [B, T, 2H], 0 past each length
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
