"""Audio decoding: bytes -> mono float32 waveforms at the rates the models want.

Decoding is libsndfile's (through soundfile): WAV, FLAC, OGG/Vorbis,
OGG/Opus and MP3 with libsndfile >= 1.1 (``decodable_formats()`` says what
this machine's build really reads). Channels are averaged to mono and the
signal is resampled with soxr (band-limited, high quality), once per target
rate, so a Whisper model (16 kHz) and a CLAP model (48 kHz) each get what
they were trained on. Every failure is a :class:`MediaError` with a
dead-letter reason, so one bad clip never stops the job.
"""
from __future__ import annotations

import dataclasses
import io
import math
import re

import numpy as np

from encoders.media import MediaError
from schemas.dead_letter import Reason

# Magic numbers of containers libsndfile reads. Bytes that start like one of
# these but do not decode are corrupt (decode_failed); anything else is a
# format we do not read (unsupported_format).
_AUDIO_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b".snd", b"caff")
_MP3_SYNC = (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xfa")


@dataclasses.dataclass(frozen=True)
class AudioPolicy:
    """Limits on decoded audio; the byte cap is the fetch policy's ``max_bytes``."""

    max_seconds: float = 120.0  # longer clips are dead-lettered (audio_too_long), never cut silently
    silence_dbfs: float = -60.0  # a clip whose RMS level stays below this is silent (silent_audio)
    min_seconds: float = 0.05

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"max_audio_seconds must be a positive number, got {self.max_seconds}")
        if not (math.isfinite(self.silence_dbfs) and self.silence_dbfs < 0):
            raise ValueError(f"silence threshold must be a negative dBFS value, got {self.silence_dbfs}")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"min_seconds must be in [0, max_seconds), got {self.min_seconds}")


@dataclasses.dataclass(frozen=True)
class AudioClip:
    """One decoded clip: mono float32 samples per requested rate, and its length."""

    waveforms: tuple[tuple[int, np.ndarray], ...]  # (sample_rate, samples) pairs
    duration_s: float
    source_rate: int

    def at(self, sample_rate: int) -> np.ndarray:
        for rate, samples in self.waveforms:
            if rate == sample_rate:
                return samples
        raise KeyError(f"clip was not resampled to {sample_rate} Hz (has {[r for r, _ in self.waveforms]})")


def decodable_formats() -> dict[str, list[str]]:
    """Container -> codecs this machine's libsndfile decodes (for docs and tests)."""
    import soundfile as sf

    wanted = ("WAV", "FLAC", "OGG", "MP3")
    return {f: sorted(sf.available_subtypes(f)) for f in wanted if f in sf.available_formats()}


def _clean(error: Exception) -> str:
    """soundfile's message without the in-memory stream's address (dead letters must be reproducible)."""
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "<bytes>", str(error))


def _looks_like_audio(data: bytes) -> bool:
    return data.startswith(_AUDIO_MAGIC) or data[:2] in _MP3_SYNC


def _truncation(data: bytes) -> str | None:
    """Why a WAV or Ogg stream is cut short, or None.

    libsndfile trusts what is there: a cut WAV decodes as a shorter clip and a
    cut Ogg stream ends at its last whole page. A WAV ``data`` chunk that
    declares more bytes than the file holds, or an Ogg stream whose last page
    lacks the end-of-stream flag, is a truncated upload, not a short clip.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        pos = 12
        while pos + 8 <= len(data):
            chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
            if chunk == b"data":
                held = len(data) - pos - 8
                # 0 and 0xFFFFFFFF are what streaming writers put before they know the size
                if size not in (0, 0xFFFFFFFF) and size > held:
                    return f"WAV data chunk declares {size} bytes, file holds {held}"
                return None
            pos += 8 + size + (size & 1)
        return None
    if data[:4] == b"OggS":
        pos, flags = 0, 0
        while pos < len(data):  # walk the pages: 27-byte header, segment table, body
            if data[pos:pos + 4] != b"OggS" or pos + 27 > len(data):
                return f"Ogg page at byte {pos} is cut or malformed"
            segments = data[pos + 26]
            body = sum(data[pos + 27:pos + 27 + segments])
            end = pos + 27 + segments + body
            if pos + 27 + segments > len(data) or end > len(data):
                return f"last Ogg page needs {end - pos} bytes, {len(data) - pos} left"
            flags, pos = data[pos + 5], end
        if not flags & 0x04:
            return "Ogg stream ends without its end-of-stream page"
    return None


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level of a clip in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling with soxr's high-quality preset (mono float32 in and out)."""
    if from_rate == to_rate:
        return np.ascontiguousarray(samples, np.float32)
    import soxr

    return np.ascontiguousarray(soxr.resample(samples, from_rate, to_rate, quality="HQ"), np.float32)


def decode_audio(data: bytes, target_rates: tuple[int, ...], policy: AudioPolicy = AudioPolicy()) -> AudioClip:
    """Bytes -> :class:`AudioClip` (mono, resampled to each of ``target_rates``); raises MediaError.

    The duration cap is checked from the header before samples are decoded,
    so an hour-long file costs nothing. A file whose header promises more
    frames than it holds is truncated and fails (decode_failed) rather than
    being embedded from a fragment.
    """
    import soundfile as sf

    if not data:
        raise MediaError(Reason.DECODE_FAILED, "zero-length audio")
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - soundfile raises LibsndfileError, RuntimeError, TypeError
        known = _looks_like_audio(data)
        reason = Reason.DECODE_FAILED if known else Reason.UNSUPPORTED_FORMAT
        what = "audio header unreadable" if known else "not an audio format we read"
        raise MediaError(reason, f"{what}: {_clean(e)}") from None
    with f:
        rate, frames, container = int(f.samplerate), int(f.frames), f.format
        if rate <= 0:
            raise MediaError(Reason.DECODE_FAILED, f"{container} header has sample rate {rate}")
        duration = frames / rate
        if duration > policy.max_seconds:
            raise MediaError(Reason.AUDIO_TOO_LONG,
                             f"{container} clip of {duration:.1f}s exceeds the {policy.max_seconds:g}s cap")
        try:
            samples = f.read(dtype="float32", always_2d=True)
        except Exception as e:  # noqa: BLE001
            raise MediaError(Reason.DECODE_FAILED, f"{container} decode failed: {e}") from None
    cut = _truncation(data)
    if cut:
        raise MediaError(Reason.DECODE_FAILED, f"{container} truncated: {cut}")
    if len(samples) < frames:
        raise MediaError(Reason.DECODE_FAILED,
                         f"{container} truncated: header promises {frames} frames, {len(samples)} decoded")
    if len(samples) < policy.min_seconds * rate:
        raise MediaError(Reason.DECODE_FAILED, f"{container} clip has {len(samples)} samples, too short to use")
    if not np.all(np.isfinite(samples)):
        raise MediaError(Reason.DECODE_FAILED, f"{container} decoded to non-finite samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    level = level_dbfs(mono)
    if level < policy.silence_dbfs:
        raise MediaError(Reason.SILENT_AUDIO,
                         f"{container} clip is silent: RMS {level:.1f} dBFS < {policy.silence_dbfs:g} dBFS")
    waveforms = tuple((int(r), resample(mono, rate, int(r))) for r in sorted(set(target_rates)))
    return AudioClip(waveforms=waveforms, duration_s=len(mono) / rate, source_rate=rate)
