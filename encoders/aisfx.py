"""The aisfx sound-effects embedder (Ma and Lerch, ISMIR 2022) as a sound space, 512-d.

Family ``aisfx``: ``name`` is the architecture (``aisfx-cnn9``: four
two-convolution blocks, 64..512 channels, mean over frequency then max over
time), ``weights`` the converted ``.safetensors`` file that
``scripts/prepare_weights.py`` writes from the aisfx wheel's pickled
checkpoint (converted once, never unpickled at run time), or ``random``.

The model and its weights are CC BY 4.0 (attribution in README). Its input is
the paper's front end, rebuilt here in torch: mono 44.1 kHz, peak-normalized,
a 2048-point STFT every 1024 samples, a 96-band HTK mel power spectrogram
(each filter L1-normalized), ``log10(1 + 10^4 * mel)`` scaled by the
training set's maximum. The spectrogram is cut into 100-frame blocks (about
2.3 s) with a 50-frame hop; every block is one fixed-shape row of the forward
pass, and a clip's vector is the mean of its blocks' embeddings, L2-normalized.
Only the first ``MAX_SECONDS`` of a clip are read: a product sound's first
seconds carry it, and the work per clip stays bounded.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoders.forward import _autocast, _in_fixed_batches, _pad_rows, _seeded, _to_device

ARCH = "aisfx-cnn9"
SAMPLE_RATE = 44_100
N_FFT, HOP, N_MELS = 2048, 1024, 96
BLOCK_FRAMES, BLOCK_HOP = 100, 50
LOG_MAX = 9.457798957824707  # the paper's spectrogram normalization maximum
MAX_SECONDS = 30
DIM = 512
WEIGHTS_FILE = "aisfx-embedding.safetensors"


def weights_dir() -> Path:
    """Where prepared weights live: $CATALOG_INDEX_WEIGHTS, else <venv>/share/catalog_index/weights."""
    return Path(os.environ.get("CATALOG_INDEX_WEIGHTS") or Path(sys.prefix) / "share" / "catalog_index" / "weights")


def packaged_aisfx() -> str | None:
    """The converted aisfx weights when ``scripts/prepare_weights.py`` has written them, else None."""
    path = weights_dir() / WEIGHTS_FILE
    return str(path) if path.is_file() else None


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return nn.functional.max_pool2d(x, pool) if pool > 1 else x


class SfxNet(nn.Module):
    """[B, frames, mels] log-mel blocks -> [B, 512] (the state-dict keys of aisfx's embedding net)."""

    def __init__(self, width: int = 64):
        super().__init__()
        chans = [1, width, width * 2, width * 4, width * 8]
        for i in range(4):
            setattr(self, f"conv_block{i + 1}", _ConvBlock(chans[i], chans[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        for i, pool in enumerate((2, 2, 2, 1)):
            x = getattr(self, f"conv_block{i + 1}")(x, pool)
        return x.mean(3).amax(2)


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filters(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, 1 + n_fft // 2] triangular HTK-mel filters over 0..sr/2, each scaled to unit L1 norm."""
    freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (freqs[None] - lower) / (center - lower)
    fall = (upper - freqs[None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rise, fall))
    return (weights / np.maximum(weights.sum(1, keepdims=True), 1e-12)).astype(np.float32)


def log_mel(clip: np.ndarray, filters: torch.Tensor) -> torch.Tensor:
    """Mono 44.1 kHz samples -> [frames, 96] normalized log-mel (the paper's front end)."""
    y = torch.from_numpy(np.asarray(clip, np.float32).reshape(-1)[: MAX_SECONDS * SAMPLE_RATE])
    if y.numel() == 0:
        y = torch.zeros(N_FFT)
    peak = float(y.abs().max())
    y = y / (peak if peak > 0 else 1.0)
    spec = torch.stft(y, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="constant",
                      return_complex=True).abs() ** 2
    return (torch.log10(filters @ spec * 10_000.0 + 1.0) / LOG_MAX).T


def blocks(spec: torch.Tensor) -> torch.Tensor:
    """[frames, mels] -> [n, 100, mels]: 100-frame blocks every 50 frames, the last one zero-padded."""
    frames = spec.shape[0]
    n = max(1, math.ceil((frames - BLOCK_FRAMES) / BLOCK_HOP) + 1)
    padded = torch.zeros(BLOCK_HOP * (n - 1) + BLOCK_FRAMES, spec.shape[1])
    padded[:frames] = spec
    return padded.unfold(0, BLOCK_FRAMES, BLOCK_HOP).transpose(1, 2)


class AisfxModel:
    """``encode_audio`` (mono clips at 44.1 kHz) -> float32 unit rows."""

    dim = DIM
    sample_rate = SAMPLE_RATE

    def __init__(self, spec, device: torch.device, precision: str = "fp32"):
        if spec.name != ARCH:
            raise ValueError(f"aisfx architecture {spec.name!r} is unknown; known: {ARCH}")
        with _seeded(spec):
            net = SfxNet()
        if not spec.is_random:
            from safetensors.torch import load_file

            net.load_state_dict(load_file(spec.weights))
        self.net = net.to(device).eval()
        self.device, self.precision = device, precision
        self.filters = torch.from_numpy(mel_filters())

    @torch.inference_mode()
    def encode_audio(self, clips: list[np.ndarray], batch_size: int) -> np.ndarray:
        per_clip = [blocks(log_mel(c, self.filters)) for c in clips]
        if not per_clip:
            return np.zeros((0, DIM), np.float32)
        rows = torch.cat(per_clip)

        def run(start, stop, padded):
            x = _to_device(_pad_rows(rows[start:stop], padded), self.device)
            with _autocast(self.device, self.precision):
                return self.net(x)

        embedded = _in_fixed_batches(len(rows), batch_size or 32, self.device, run, normalize=False)
        out, start = np.zeros((len(clips), DIM), np.float32), 0
        for i, b in enumerate(per_clip):
            v = embedded[start:start + len(b)].mean(0)
            out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
            start += len(b)
        return out
