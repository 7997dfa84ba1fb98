"""Audio decoding: formats, mono mix, resampling, caps, and every kind of bad audio -> a named reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from encoders.audio import AudioPolicy, decodable_formats, decode_audio, level_dbfs, resample
from encoders.media import MediaError
from schemas.dead_letter import Reason

RATE = 44_100


def _tone(seconds=1.0, rate=RATE, freq=440.0, amp=0.3, channels=2) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([x, 0.5 * x], 1).astype(np.float32) if channels == 2 else x.astype(np.float32)


def _encode(samples, rate=RATE, fmt="WAV", subtype="PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


FORMATS = [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("OGG", "OPUS"), ("MP3", "MPEG_LAYER_III")]


def test_this_libsndfile_decodes_the_documented_formats():
    formats = decodable_formats()
    assert {"WAV", "FLAC", "OGG", "MP3"} <= set(formats)
    assert {"VORBIS", "OPUS"} <= set(formats["OGG"]) and "MPEG_LAYER_III" in formats["MP3"]


@pytest.mark.parametrize("fmt, subtype", FORMATS)
def test_every_format_decodes_to_mono_at_each_rate(fmt, subtype):
    rate = 48_000 if subtype == "OPUS" else RATE  # Opus encodes at 48 kHz
    clip = decode_audio(_encode(_tone(2.0, rate), rate, fmt, subtype), (16_000, 48_000))
    assert clip.source_rate == rate and abs(clip.duration_s - 2.0) < 0.1
    for target in (16_000, 48_000):
        x = clip.at(target)
        assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 2 * target) < 0.1 * target
    # the mono mix of channels at 0.3 and 0.15 peaks near 0.225, whatever the codec did
    assert 0.18 < np.abs(clip.at(16_000)).max() < 0.27


def test_resampling_keeps_the_tone_and_removes_what_cannot_be_represented():
    x = _tone(1.0, 48_000, freq=1000, channels=1) + _tone(1.0, 48_000, freq=12_000, channels=1)
    y = resample(x, 48_000, 16_000)
    spectrum = np.abs(np.fft.rfft(y))
    freqs = np.fft.rfftfreq(len(y), 1 / 16_000)
    assert abs(freqs[np.argmax(spectrum)] - 1000) < 2
    # 12 kHz is above the 8 kHz Nyquist limit: a band-limited resampler removes it instead of aliasing to 4 kHz
    alias = spectrum[np.abs(freqs - 4000) < 20].max()
    assert alias < 0.01 * spectrum.max()


def _reason(data: bytes, policy: AudioPolicy = AudioPolicy()) -> Reason:
    with pytest.raises(MediaError) as err:
        decode_audio(data, (16_000,), policy)
    return err.value.reason


@pytest.mark.parametrize("fmt, subtype", FORMATS)
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_audio_is_decode_failed(fmt, subtype, keep):
    rate = 48_000 if subtype == "OPUS" else RATE
    data = _encode(_tone(2.0, rate), rate, fmt, subtype)
    assert _reason(data[: int(len(data) * keep)]) in (Reason.DECODE_FAILED,)


def test_zero_length_unknown_container_and_corrupt_header():
    assert _reason(b"") is Reason.DECODE_FAILED
    assert _reason(b"plain text, not audio at all" * 10) is Reason.UNSUPPORTED_FORMAT
    assert _reason(b"\x89PNG\r\n\x1a\n" + bytes(100)) is Reason.UNSUPPORTED_FORMAT
    assert _reason(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(50)) is Reason.DECODE_FAILED
    assert _reason(b"OggS" + bytes(60)) is Reason.DECODE_FAILED


def test_longer_than_the_cap_is_refused_from_the_header():
    data = _encode(_tone(3.0, 16_000, channels=1), 16_000)
    assert _reason(data, AudioPolicy(max_seconds=2.5)) is Reason.AUDIO_TOO_LONG
    assert decode_audio(data, (16_000,), AudioPolicy(max_seconds=3.5)).duration_s == pytest.approx(3.0)


def test_silence_and_near_silence_are_silent_audio():
    assert _reason(_encode(np.zeros(16_000, np.float32), 16_000)) is Reason.SILENT_AUDIO
    hiss = np.random.default_rng(0).normal(0, 1e-4, 16_000).astype(np.float32)  # about -80 dBFS
    assert _reason(_encode(hiss, 16_000, subtype="FLOAT")) is Reason.SILENT_AUDIO
    quiet_speech_level = _tone(1.0, 16_000, amp=0.01, channels=1)  # about -43 dBFS: kept
    assert decode_audio(_encode(quiet_speech_level, 16_000), (16_000,)).duration_s == pytest.approx(1.0)
    assert level_dbfs(np.zeros(4, np.float32)) == -np.inf


def test_header_only_wav_is_too_short():
    assert _reason(_encode(np.zeros((0, 1), np.float32), 16_000)) is Reason.DECODE_FAILED


def test_policy_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="max_audio_seconds"):
        AudioPolicy(max_seconds=0)
    with pytest.raises(ValueError, match="dBFS"):
        AudioPolicy(silence_dbfs=3)
