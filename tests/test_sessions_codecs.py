"""Live-socket audio codecs: each encoding round-trips at each sample rate; bad input fails."""

from __future__ import annotations

import numpy as np
import pytest

from handler.sessions.codecs import OPUS_FRAME, CodecError, Decoder, Encoder
from handler.sessions.protocol import ENCODINGS, SAMPLE_RATES

# Lowest SNR each encoding must keep on a two-tone signal, dB: pcm16 is exact up to
# 16-bit rounding (~90 dB); G.711 mu-law gives ~38 dB on loud signals (its 8-bit
# companding); Opus at 48 kbit/s is perceptual, so ~20 dB waveform SNR is typical.
MIN_SNR_DB = {"pcm16": 80.0, "mulaw": 30.0, "opus": 15.0}


def two_tones(sample_rate: int) -> np.ndarray:
    """1 s of 300 Hz + 1100 Hz under a Hann window, then 200 ms of silence (codec delays)."""
    t = np.arange(sample_rate) / sample_rate
    tones = 0.4 * np.sin(2 * np.pi * 300 * t) + 0.2 * np.sin(2 * np.pi * 1100 * t)
    signal = (tones * np.hanning(sample_rate)).astype(np.float32)
    return np.concatenate([signal, np.zeros(sample_rate // 5, np.float32)])


def round_trip(
    encoding: str, sample_rate: int, signal: np.ndarray
) -> tuple[list[bytes], np.ndarray]:
    encoder, decoder = Encoder(encoding, sample_rate), Decoder(encoding, sample_rate)
    step = sample_rate // 7  # chunks that do not line up with 20 ms frames
    chunks = [signal[i : i + step] for i in range(0, signal.size, step)]
    messages = [message for chunk in chunks for message in encoder.encode(chunk)]
    messages += encoder.flush()
    return messages, np.concatenate([decoder.decode(m) for m in messages])


@pytest.mark.parametrize("sample_rate", SAMPLE_RATES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_keeps_the_signal(encoding: str, sample_rate: int) -> None:
    signal = two_tones(sample_rate)
    reference = signal[:sample_rate]
    messages, decoded = round_trip(encoding, sample_rate, signal)
    lag = int(np.argmax(np.correlate(decoded, reference, "valid")))
    assert lag <= sample_rate * 0.010  # at most Opus's 6.5 ms lookahead (+ resampler delay)
    aligned = decoded[lag : lag + sample_rate]
    snr = 10 * np.log10(np.sum(reference**2) / np.sum((reference - aligned) ** 2))
    assert snr >= MIN_SNR_DB[encoding]
    assert np.corrcoef(reference, aligned)[0, 1] > 0.99
    if encoding == "opus":  # one 20 ms packet per message
        assert len(messages) == pytest.approx(signal.size / sample_rate / 0.020, abs=2)
    if encoding == "pcm16":
        assert sum(len(m) for m in messages) == 2 * signal.size
    if encoding == "mulaw":
        assert sum(len(m) for m in messages) == signal.size


def test_mulaw_bytes_follow_g711() -> None:
    # ITU-T G.711 mu-law: zero codes as 0xFF, the positive peak as 0x80, the negative as 0x00.
    encoder = Encoder("mulaw", 8000)
    assert encoder.encode(np.array([0.0, 1.0, -1.0], np.float32)) == [b"\xff\x80\x00"]


def test_pcm16_is_little_endian() -> None:
    assert Encoder("pcm16", 16000).encode(np.array([0.5], np.float32)) == [b"\x00\x40"]
    assert Decoder("pcm16", 16000).decode(b"\x00\xc0")[0] == -0.5


def test_opus_flush_pads_the_last_frame_and_reset_drops_it() -> None:
    encoder = Encoder("opus", 48000)
    assert encoder.encode(np.zeros(OPUS_FRAME // 2, np.float32)) == []
    assert encoder.flush()
    encoder.encode(np.zeros(OPUS_FRAME // 2, np.float32))
    encoder.reset()
    assert encoder.flush() == []


@pytest.mark.parametrize(
    ("encoding", "message"), [("pcm16", b"\x00\x01\x02"), ("pcm16", b""), ("opus", b"\xff\xff\xff")]
)
def test_bad_messages_raise_codec_error(encoding: str, message: bytes) -> None:
    with pytest.raises(CodecError):
        Decoder(encoding, 16000).decode(message)


@pytest.mark.parametrize(("encoding", "sample_rate"), [("flac", 16000), ("pcm16", 44100)])
def test_unsupported_formats_are_refused(encoding: str, sample_rate: int) -> None:
    with pytest.raises(ValueError):
        Decoder(encoding, sample_rate)
    with pytest.raises(ValueError):
        Encoder(encoding, sample_rate)
