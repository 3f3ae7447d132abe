"""Audio module against independent expectations (libsndfile and PyAV decoders, ISO frames)."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from handler import audio
from tests.helpers import tone

ROOT = Path(__file__).resolve().parent.parent
# MPEG-2 Layer III bitrate_index -> kbps (ISO/IEC 13818-3; index 0 is free format).
MPEG2_BITRATE_INDEX = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
SIDE_INFO_MPEG2_MONO = 9  # bytes after the 4-byte header, where a Xing/Info tag starts


def mp3_frames(data: bytes, sample_rate: int) -> list[tuple[int, bool]]:
    """(kbps, is a Xing/Info tag frame) of each MPEG-2 Layer III mono frame, walking all bytes."""
    frames, offset = [], 0
    while offset < len(data):
        header = data[offset : offset + 4]
        assert header[0] == 0xFF and header[1] >> 1 == 0b1111001, f"no frame at byte {offset}"
        kbps = MPEG2_BITRATE_INDEX[header[2] >> 4]
        tag = data[offset + 4 + SIDE_INFO_MPEG2_MONO :][:4]
        frames.append((kbps, tag in (b"Info", b"Xing")))
        offset += 72_000 * kbps // sample_rate + (header[2] >> 1 & 1)
    assert offset == len(data)
    return frames


def decode_soundfile(data: bytes) -> np.ndarray:
    return sf.read(io.BytesIO(data), dtype="float32")[0]


def decode_pyav(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), "r") as container:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])


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


ONE_PCM16_STEP = 2.0**-15  # 16-bit PCM: [-1, 1) in 2**16 steps; -90.3 dBFS


def pcm16_codes(samples: np.ndarray) -> np.ndarray:
    """The int16 codes a WAV of ``samples`` holds, read back by libsndfile."""
    return sf.read(io.BytesIO(audio.encode_wav(samples, 24_000)), dtype="int16")[0]


@pytest.mark.parametrize(
    "samples",
    [
        np.random.default_rng(3).uniform(-1e-7, 1e-7, 2_400).astype(np.float32),  # -140 dBFS
        tone(0.1, amplitude=0.99 * ONE_PCM16_STEP),
    ],
    ids=["float-residue", "just-under-one-step"],
)
def test_peak_normalize_leaves_audio_under_one_16_bit_step_as_it_is(samples: np.ndarray) -> None:
    # Such a turn encodes as codes -1..1, i.e. silence; boosted to -16 dBFS its
    # numerical noise would peak at 5,193 codes (a +124 dB gain for the residue).
    assert np.max(np.abs(pcm16_codes(samples))) <= 1
    levelled = audio.peak_normalize(samples, -16.0)
    assert np.array_equal(levelled, samples)
    assert np.max(np.abs(pcm16_codes(levelled))) <= 1


def test_peak_normalize_levels_audio_from_one_16_bit_step_up() -> None:
    quiet = tone(0.1, amplitude=2 * ONE_PCM16_STEP)  # two steps, -84.3 dBFS
    levelled = audio.peak_normalize(quiet, -16.0)
    assert abs(20 * np.log10(np.max(np.abs(levelled))) + 16.0) < 0.01


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


@pytest.mark.parametrize("kbps", MPEG2_BITRATE_INDEX[1:])
def test_mp3_is_constant_bitrate_at_every_mpeg2_bitrate(kbps: int) -> None:
    frames = mp3_frames(audio.encode_mp3(tone(1.0), 24_000, kbps), 24_000)
    (tag_kbps, is_tag), *audio_frames = frames
    # The Info tag frame may have a higher bitrate than the stream: the tag must fit in it.
    assert is_tag and tag_kbps >= kbps
    assert audio_frames and all(frame == (kbps, False) for frame in audio_frames)


@pytest.mark.parametrize("decode", [decode_soundfile, decode_pyav])
@pytest.mark.parametrize("kbps", MPEG2_BITRATE_INDEX[1:])
def test_mp3_decodes_from_the_first_sample(
    kbps: int, decode: Callable[[bytes], np.ndarray]
) -> None:
    # Band-limited noise (under ~1.5 kHz, inside even 8 kbps's passband) between
    # silences: its autocorrelation has a single sharp peak, so the lag is exact.
    noise = np.random.default_rng(7).standard_normal(24_000)
    burst = np.convolve(noise, np.hanning(16) / 8, mode="same") * 0.3
    samples = np.concatenate([np.zeros(7_000), burst, np.zeros(5_123)]).astype(np.float32)
    decoded = decode(audio.encode_mp3(samples, 24_000, kbps))
    assert 0 <= len(decoded) - len(samples) <= 46  # FFmpeg's end padding: see encode_mp3
    lead = 64  # lets a decoder that starts early show as a negative lag
    padded = np.concatenate([np.zeros(lead), decoded, np.zeros(1_200)])
    lags = np.correlate(padded[: len(samples) + lead + 1_200], samples, mode="valid")
    assert int(np.argmax(lags)) - lead == 0


@pytest.mark.parametrize(
    "process",
    [
        partial(audio.peak_normalize, target_dbfs=-16.0),
        partial(audio.encode_wav, sample_rate=24_000),
        audio.encode_pcm,
    ],
    ids=["peak_normalize", "encode_wav", "encode_pcm"],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_levelling_and_pcm_encoders_refuse_non_finite_samples(
    process: Callable[[np.ndarray], object], bad: float
) -> None:
    samples = tone(0.1)
    samples[1_000] = bad
    with pytest.raises(ValueError, match="1 of 2400 samples are NaN or infinite"):
        process(samples)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_mp3_encoder_refuses_non_finite_samples_without_aborting(bad: str) -> None:
    # A NaN reaching LAME fails an assertion and aborts the process: run it in a child.
    script = (
        "import numpy as np\n"
        "from handler import audio\n"
        "samples = np.zeros(2400, np.float32)\n"
        f"samples[1000] = float({bad!r})\n"
        "try:\n"
        "    audio.encode_mp3(samples, 24_000, 96)\n"
        "except ValueError as error:\n"
        "    print('refused:', error)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert "refused: 1 of 2400 samples are NaN or infinite" in child.stdout
