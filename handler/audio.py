"""Audio: decode, resample, mono mix-down, trim, peak normalisation, stitch, encode.

All sample buffers are float32 mono numpy arrays in [-1, 1], shape
``[n_samples]``; sample rates are in Hz; durations are given in samples or
milliseconds as each name says. Decoding and WAV encoding go through soundfile
(libsndfile), MP3 encoding through PyAV (FFmpeg's libmp3lame and mp3 muxer),
resampling through soxr. Levelling and encoding refuse NaN and infinite
samples (:class:`NonFiniteAudioError`) rather than turn them into silence.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import soundfile as sf
import soxr

# MPEG-2 Layer III (the MP3 flavour for 16/22.05/24 kHz audio) allows exactly
# these bitrates in kbps (ISO/IEC 13818-3, table of bitrate_index values).
MPEG2_LAYER3_BITRATES_KBPS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
# One step of 16-bit PCM, full scale 1.0: the range [-1, 1) in 2**16 steps, 2**-15
# = -90.3 dBFS. peak_normalize leaves audio whose peak is below it as it is: to_pcm16
# encodes it as codes -1, 0 and +1 only, the output format's own quantisation noise,
# so it is silence carrying numerical residue (a model's float noise, a resampler's
# ringing) that a peak gain would lift into loud noise (a 1e-7 peak to -16 dBFS is
# +124 dB).
PCM16_LSB = 2.0**-15
# Sample rates a WAV clip may have, Hz: 8 kHz is telephone speech (G.711), 192 kHz the
# highest rate of common recorders. Outside them a small file stands for enormous audio
# once resampled (20,000 samples at 1 Hz are 320 million at 16 kHz).
MIN_WAV_SAMPLE_RATE = 8_000
MAX_WAV_SAMPLE_RATE = 192_000


class AudioDecodeError(ValueError):
    """The bytes are not a WAV file that libsndfile can decode."""


class NonFiniteAudioError(ValueError):
    """Samples hold NaN or infinite values, which have no level and no encoding."""


def require_finite(samples: np.ndarray) -> None:
    """Check that every sample is a finite number.

    Raises:
        NonFiniteAudioError: if any sample is NaN or +-inf; the message counts them.
    """
    finite = np.isfinite(samples)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise NonFiniteAudioError(
            f"{bad.size} of {samples.size} samples are NaN or infinite (first at index {bad[0]})"
        )


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
    """Decode a WAV file of any channel count to float32 mono.

    The sample rate is checked before any sample is read: it must lie within
    :data:`MIN_WAV_SAMPLE_RATE`..:data:`MAX_WAV_SAMPLE_RATE` Hz.

    Raises:
        AudioDecodeError: if ``data`` is not a decodable WAV file, has no
            samples, or has a sample rate outside those bounds.
    """
    try:
        with sf.SoundFile(io.BytesIO(data)) as handle:
            if handle.format != "WAV":
                raise AudioDecodeError(f"expected a WAV file, got {handle.format}")
            sample_rate = int(handle.samplerate)
            if not MIN_WAV_SAMPLE_RATE <= sample_rate <= MAX_WAV_SAMPLE_RATE:
                raise AudioDecodeError(
                    f"the WAV file's sample rate {sample_rate} Hz is outside "
                    f"{MIN_WAV_SAMPLE_RATE}-{MAX_WAV_SAMPLE_RATE} Hz"
                )
            frames = handle.read(dtype="float32", always_2d=True)
    except AudioDecodeError:
        raise
    except sf.LibsndfileError as error:
        raise AudioDecodeError(f"not a decodable WAV file ({error.error_string})") from error
    except ValueError as error:
        # libsndfile opens some codecs (GSM 6.10, G.721, NMS ADPCM) whose frames
        # soundfile cannot count to read them.
        raise AudioDecodeError(
            "not a decodable WAV file (its encoding cannot be read; send 16-bit PCM)"
        ) from error
    except (RuntimeError, TypeError) as error:
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
        float32 array, same shape. Audio whose peak is below :data:`PCM16_LSB`
        (one 16-bit step, -90.3 dBFS; digital silence included) is returned
        unchanged: it encodes as silence, and a gain would only make its
        numerical noise audible.

    Raises:
        ValueError: if ``target_dbfs`` > 0.
        NonFiniteAudioError: if a sample is NaN or infinite (its peak would
            scale every other sample to 0 or NaN).

    Source: speechbase conversation docs ("a peak-level target in dBFS, not LUFS").
    """
    if target_dbfs > 0:
        raise ValueError(f"target_dbfs must be <= 0, got {target_dbfs}")
    require_finite(samples)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak < PCM16_LSB:
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
    """float32 [-1, 1] -> int16, clipped, scaled by 32767 and rounded.

    Raises:
        NonFiniteAudioError: if a sample is NaN or infinite.
    """
    require_finite(samples)
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM mono WAV bytes.

    Raises:
        NonFiniteAudioError: see :func:`to_pcm16`.
    """
    buffer = io.BytesIO()
    sf.write(buffer, to_pcm16(samples), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def encode_pcm(samples: np.ndarray) -> bytes:
    """Raw signed 16-bit little-endian mono PCM (``s16le``): 2 bytes per sample.

    Raises:
        NonFiniteAudioError: see :func:`to_pcm16`.
    """
    return to_pcm16(samples).astype("<i2").tobytes()


def check_mp3_bitrate(bitrate_kbps: int, sample_rate: int) -> None:
    """Check that MP3 can carry ``bitrate_kbps`` at ``sample_rate``.

    Raises:
        ValueError: if the sample rate is not an MPEG-2 rate (16, 22.05 or
            24 kHz) or the bitrate is not one of ``MPEG2_LAYER3_BITRATES_KBPS``.
    """
    if sample_rate not in (16_000, 22_050, 24_000):
        raise ValueError(f"MP3 output supports 16/22.05/24 kHz here, not {sample_rate} Hz")
    if bitrate_kbps not in MPEG2_LAYER3_BITRATES_KBPS:
        raise ValueError(f"bitrate must be one of {MPEG2_LAYER3_BITRATES_KBPS} kbps")



def encode_mp3(samples: np.ndarray, sample_rate: int, bitrate_kbps: int = 96) -> bytes:
    """Constant-bitrate MP3 bytes (LAME through PyAV), led by a LAME/Info tag frame.

    The tag carries LAME's encoder delay (576 samples) and end padding, so
    decoders that read it (FFmpeg, mpg123 and libsndfile through it) return
    the input from its first sample: word timestamps and segment durations
    line up with the decoded audio. FFmpeg records at most 1105 samples of
    end padding where LAME may leave up to 1151, so the decoded audio can end
    with up to 46 extra samples (under 2 ms at 24 kHz). No ID3 tag is
    written. Empty input gives empty bytes.

    Args:
        samples: float32 mono samples, shape [n_samples]; clipped to [-1, 1].
        sample_rate: Hz, 16000, 22050 or 24000 (MPEG-2 Layer III).
        bitrate_kbps: one of ``MPEG2_LAYER3_BITRATES_KBPS``.

    Raises:
        ValueError: see :func:`check_mp3_bitrate`.
        NonFiniteAudioError: if a sample is NaN or infinite (a NaN reaching
            LAME fails an assertion in its psychoacoustic model, which aborts
            the whole process).
    """
    check_mp3_bitrate(bitrate_kbps, sample_rate)
    require_finite(samples)
    buffer = io.BytesIO()
    # Not libsndfile's encoder: at 16-56 kbps and 24 kHz the tag does not fit
    # a frame of the stream's bitrate and LAME leaves it out (decoders then
    # start 1105 samples late); FFmpeg's muxer puts it in a frame it fits.
    with av.open(buffer, "w", format="mp3", options={"id3v2_version": "0"}) as container:
        stream = container.add_stream("libmp3lame", rate=sample_rate, layout="mono")
        stream.bit_rate = bitrate_kbps * 1000
        packets = []
        if samples.size:  # PyAV cannot make a frame of 0 samples
            planar = np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(planar[None, :], format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            packets.extend(stream.encode(frame))
        packets.extend(stream.encode(None))
        container.mux(packets)
    return buffer.getvalue()


MEDIA_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "pcm": "audio/pcm"}


def encode(
    samples: np.ndarray, sample_rate: int, audio_format: str, mp3_bitrate_kbps: int = 96
) -> bytes:
    """Encode to ``"wav"`` (16-bit PCM), ``"mp3"`` (CBR) or ``"pcm"`` (s16le).

    Raises:
        ValueError: for an unknown format or an unsupported MP3 bitrate.
        NonFiniteAudioError: if a sample is NaN or infinite.
    """
    if audio_format == "wav":
        return encode_wav(samples, sample_rate)
    if audio_format == "mp3":
        return encode_mp3(samples, sample_rate, mp3_bitrate_kbps)
    if audio_format == "pcm":
        return encode_pcm(samples)
    raise ValueError(f"unknown audio format {audio_format!r}")
