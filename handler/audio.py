"""Audio: decode, resample, mono mix-down, trim, peak normalisation, stitch, encode.

All sample buffers are float32 mono numpy arrays in [-1, 1], shape
``[n_samples]``; sample rates are in Hz; durations are given in samples or
milliseconds as each name says. Decoding and encoding go through soundfile
(libsndfile), resampling through soxr.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

# MPEG-2 Layer III (the MP3 flavour for 16/22.05/24 kHz audio) allows exactly
# these bitrates in kbps (ISO/IEC 13818-3, table of bitrate_index values).
MPEG2_LAYER3_BITRATES_KBPS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_SILENCE_FLOOR = 1e-9


class AudioDecodeError(ValueError):
    """The bytes are not a WAV file that libsndfile can decode."""


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded clip: float32 mono ``samples`` at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


def to_mono(frames: np.ndarray) -> np.ndarray:
    """Average the channels of ``[n_samples, n_channels]`` (or pass ``[n_samples]``) to mono."""
    if frames.ndim == 1:
        return frames.astype(np.float32, copy=False)
    return np.asarray(frames.mean(axis=1), dtype=np.float32)


def decode_wav(data: bytes) -> DecodedAudio:
    """Decode a WAV file of any sample rate and channel count to float32 mono.

    Raises:
        AudioDecodeError: if ``data`` is not a decodable WAV file or has no samples.
    """
    try:
        with sf.SoundFile(io.BytesIO(data)) as handle:
            if handle.format != "WAV":
                raise AudioDecodeError(f"expected a WAV file, got {handle.format}")
            frames = handle.read(dtype="float32", always_2d=True)
            sample_rate = int(handle.samplerate)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioDecodeError(f"not a decodable WAV file ({error})") from error
    if frames.shape[0] == 0:
        raise AudioDecodeError("the WAV file has no samples")
    return DecodedAudio(to_mono(frames), sample_rate)


def resample(samples: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Resample mono float32 audio with soxr (high quality); identity when rates match."""
    if from_hz == to_hz:
        return samples
    return np.asarray(soxr.resample(samples, from_hz, to_hz, quality="HQ"), dtype=np.float32)


def peak_normalize(samples: np.ndarray, target_dbfs: float) -> np.ndarray:
    """Scale audio so its absolute peak sits at ``target_dbfs``.

    Args:
        samples: float32 mono samples in [-1, 1], shape [n_samples].
        target_dbfs: peak target in dBFS (0 = full scale), e.g. -16.0.

    Returns:
        float32 array, same shape; silence is returned unchanged.

    Raises:
        ValueError: if ``target_dbfs`` > 0.

    Source: speechbase conversation docs ("a peak-level target in dBFS, not LUFS").
    """
    if target_dbfs > 0:
        raise ValueError(f"target_dbfs must be <= 0, got {target_dbfs}")
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak <= _SILENCE_FLOOR:
        return samples
    gain = (10.0 ** (target_dbfs / 20.0)) / peak
    return np.asarray(samples * gain, dtype=np.float32)


def trim_silence(
    samples: np.ndarray, sample_rate: int, threshold: float = 0.01, pad_ms: float = 30.0
) -> np.ndarray:
    """Drop leading and trailing samples below ``threshold`` (linear), keeping ``pad_ms``.

    Returns the input unchanged when no sample reaches the threshold.
    """
    loud = np.flatnonzero(np.abs(samples) >= threshold)
    if loud.size == 0:
        return samples
    pad = ms_to_samples(pad_ms, sample_rate)
    return samples[max(0, loud[0] - pad) : loud[-1] + 1 + pad]


def ms_to_samples(duration_ms: float, sample_rate: int) -> int:
    """Milliseconds -> whole samples, rounded to nearest."""
    return round(duration_ms * sample_rate / 1000.0)


def silence(n_samples: int) -> np.ndarray:
    """``n_samples`` of float32 digital silence."""
    return np.zeros(n_samples, dtype=np.float32)


def stitch(segments: list[np.ndarray], gap_samples: int) -> np.ndarray:
    """Concatenate segments with ``gap_samples`` of silence between consecutive ones.

    Total length is ``sum(len(s)) + gap_samples * (len(segments) - 1)``.
    """
    if not segments:
        return silence(0)
    pieces: list[np.ndarray] = []
    for index, segment in enumerate(segments):
        if index:
            pieces.append(silence(gap_samples))
        pieces.append(segment)
    return np.concatenate(pieces).astype(np.float32, copy=False)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> int16, clipped, scaled by 32767 and rounded."""
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM mono WAV bytes."""
    buffer = io.BytesIO()
    sf.write(buffer, to_pcm16(samples), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def encode_pcm(samples: np.ndarray) -> bytes:
    """Raw signed 16-bit little-endian mono PCM (``s16le``): 2 bytes per sample."""
    return to_pcm16(samples).astype("<i2").tobytes()


def mp3_compression_level(bitrate_kbps: int, sample_rate: int) -> float:
    """Libsndfile's MP3 ``compression_level`` in [0, 1] that selects ``bitrate_kbps`` (CBR).

    libsndfile maps the level linearly between the layer's highest and lowest
    bitrate (``mpeg_l3_encode.c``: ``bitrate = max - level * (max - min)``);
    MPEG-2 (sample rates below 32 kHz) spans 160..8 kbps.

    Raises:
        ValueError: if the sample rate is not an MPEG-2 rate or the bitrate is
            not one of ``MPEG2_LAYER3_BITRATES_KBPS``.
    """
    if sample_rate not in (16_000, 22_050, 24_000):
        raise ValueError(f"MP3 output supports 16/22.05/24 kHz here, not {sample_rate} Hz")
    if bitrate_kbps not in MPEG2_LAYER3_BITRATES_KBPS:
        raise ValueError(f"bitrate must be one of {MPEG2_LAYER3_BITRATES_KBPS} kbps")
    high, low = MPEG2_LAYER3_BITRATES_KBPS[-1], MPEG2_LAYER3_BITRATES_KBPS[0]
    return (high - bitrate_kbps) / (high - low)


def encode_mp3(samples: np.ndarray, sample_rate: int, bitrate_kbps: int = 96) -> bytes:
    """Constant-bitrate MP3 bytes through libsndfile's LAME encoder.

    Raises:
        ValueError: see :func:`mp3_compression_level`.
    """
    level = mp3_compression_level(bitrate_kbps, sample_rate)
    buffer = io.BytesIO()
    sf.write(
        buffer,
        np.clip(samples, -1.0, 1.0),
        sample_rate,
        format="MP3",
        compression_level=level,
        bitrate_mode="CONSTANT",
    )
    return buffer.getvalue()


MEDIA_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "pcm": "audio/pcm"}


def encode(
    samples: np.ndarray, sample_rate: int, audio_format: str, mp3_bitrate_kbps: int = 96
) -> bytes:
    """Encode to ``"wav"`` (16-bit PCM), ``"mp3"`` (CBR) or ``"pcm"`` (s16le).

    Raises:
        ValueError: for an unknown format or an unsupported MP3 bitrate.
    """
    if audio_format == "wav":
        return encode_wav(samples, sample_rate)
    if audio_format == "mp3":
        return encode_mp3(samples, sample_rate, mp3_bitrate_kbps)
    if audio_format == "pcm":
        return encode_pcm(samples)
    raise ValueError(f"unknown audio format {audio_format!r}")
