"""Audio module against independent expectations (libsndfile decoding, arithmetic)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from handler import audio
from tests.helpers import tone


def test_peak_normalize_hits_target_after_16_bit_encoding() -> None:
    for target in (-16.0, -23.0, -1.0):
        wav = audio.encode_wav(audio.peak_normalize(tone(0.5, amplitude=0.07), target), 24_000)
        decoded, _ = sf.read(io.BytesIO(wav), dtype="float32")
        assert abs(20 * np.log10(np.max(np.abs(decoded))) - target) < 0.1


def test_peak_normalize_leaves_silence_and_rejects_positive_target() -> None:
    zeros = np.zeros(100, np.float32)
    assert np.array_equal(audio.peak_normalize(zeros, -16), zeros)
    with pytest.raises(ValueError):
        audio.peak_normalize(tone(0.1), 1.0)


def test_stitch_inserts_exact_gap() -> None:
    a, b = np.ones(100, np.float32), np.full(50, 0.5, np.float32)
    gap = audio.ms_to_samples(500, 24_000)
    assert gap == 12_000
    out = audio.stitch([a, b], gap)
    assert len(out) == 100 + 12_000 + 50
    assert np.all(out[100:12_100] == 0) and np.all(out[:100] == 1) and np.all(out[-50:] == 0.5)


def test_mp3_round_trip_rate_duration_and_bitrate() -> None:
    samples = tone(3.0)
    data = audio.encode_mp3(samples, 24_000, 96)
    decoded, rate = sf.read(io.BytesIO(data))
    assert rate == 24_000
    assert abs(len(decoded) / rate - 3.0) < 0.06
    assert abs(len(data) * 8 / 3.0 / 1000 - 96) < 8


def test_mp3_rejects_bitrate_outside_mpeg2() -> None:
    with pytest.raises(ValueError):
        audio.encode_mp3(tone(0.1), 24_000, 192)


def test_pcm_is_two_bytes_per_sample_little_endian() -> None:
    samples = np.array([0.0, 0.5, -1.0], np.float32)
    data = audio.encode_pcm(samples)
    assert len(data) == 2 * len(samples)
    assert np.frombuffer(data, "<i2").tolist() == [0, round(0.5 * 32767), -32767]


def test_decode_mixes_channels_to_mono() -> None:
    stereo = np.stack([tone(0.2), -tone(0.2) * 0 + 0.25], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 16_000, format="WAV", subtype="PCM_16")
    decoded = audio.decode_wav(buffer.getvalue())
    assert decoded.sample_rate == 16_000 and decoded.samples.ndim == 1
    np.testing.assert_allclose(decoded.samples, stereo.mean(axis=1), atol=2e-4)


def test_decode_rejects_non_wav() -> None:
    with pytest.raises(audio.AudioDecodeError):
        audio.decode_wav(b"RIFF not really a wav file")
    buffer = io.BytesIO()
    sf.write(buffer, tone(0.1), 24_000, format="FLAC")
    with pytest.raises(audio.AudioDecodeError):
        audio.decode_wav(buffer.getvalue())


def test_resample_changes_length_by_rate_ratio() -> None:
    out = audio.resample(tone(1.0, 16_000), 16_000, 24_000)
    assert abs(len(out) - 24_000) <= 1


def test_trim_silence_keeps_padding() -> None:
    samples = np.concatenate([np.zeros(2400), tone(0.1), np.zeros(2400)]).astype(np.float32)
    trimmed = audio.trim_silence(samples, 24_000, pad_ms=10)
    assert len(trimmed) < len(samples)
    assert len(trimmed) >= 2400 + 2 * 240 - 2
