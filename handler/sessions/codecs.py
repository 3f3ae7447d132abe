"""Audio of a live socket: client messages -> float32, float32 -> messages to the client.

Encodings (``WS /v1/conversations/{id}/stream?encoding=``):
  * ``pcm16``: signed 16-bit little-endian mono samples at the socket's rate.
  * ``mulaw``: G.711 mu-law, one byte per sample at the socket's rate (PyAV's
    ``pcm_mulaw``, FFmpeg's ITU-T G.711 tables).
  * ``opus``: one Opus packet per message (RFC 6716), 20 ms frames, coded at
    48 kHz mono with PyAV's libopus and resampled to/from the socket's rate
    with soxr; the receiving Opus decoder's usual 6.5 ms lookahead applies.

Every sample rate in :data:`~handler.sessions.protocol.SAMPLE_RATES` works
with every encoding. Decoders and encoders keep state between messages (the
Opus codec state, soxr's resampling filter), so use one of each per socket.
"""

from __future__ import annotations

from typing import Literal

import av
import numpy as np
import soxr

from handler.sessions.protocol import ENCODINGS, SAMPLE_RATES

OPUS_RATE = 48_000
OPUS_FRAME = 960  # 20 ms at 48 kHz (RFC 6716 allows 2.5-60 ms; 20 ms is the usual VoIP frame)
OPUS_BITRATE = 48_000  # bits/s; libopus's fullband speech is transparent well below this
_INT16_SCALE = 32768.0


class CodecError(ValueError):
    """A client audio message that does not decode in the socket's encoding."""


def _check(encoding: str, sample_rate: int) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {SAMPLE_RATES}, got {sample_rate}")


def to_int16(samples: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> int16 (clipped, rounded), shape kept."""
    return np.clip(np.round(samples * _INT16_SCALE), -32768, 32767).astype(np.int16)


def _codec(
    name: Literal["pcm_mulaw", "libopus"], mode: Literal["r", "w"], sample_rate: int
) -> av.AudioCodecContext:
    context = av.CodecContext.create(name, mode)
    context.sample_rate = sample_rate
    context.layout = "mono"
    if mode == "w":
        context.format = "s16"
    return context


def _frame(samples: np.ndarray, sample_rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(to_int16(samples)[None, :], format="s16", layout="mono")
    frame.sample_rate = sample_rate
    return frame


def _samples(frames: list[av.AudioFrame]) -> np.ndarray:
    if not frames:
        return np.zeros(0, np.float32)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32) / (
        _INT16_SCALE
    )


class Decoder:
    """Client audio messages -> float32 mono at the socket's sample rate.

    Args:
        encoding: ``pcm16``, ``mulaw`` or ``opus``.
        sample_rate: the socket's rate, Hz (one of ``SAMPLE_RATES``).

    Raises:
        ValueError: unsupported encoding or rate.
    """

    def __init__(self, encoding: str, sample_rate: int) -> None:
        _check(encoding, sample_rate)
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._codec: av.AudioCodecContext | None = None
        self._resampler: soxr.ResampleStream | None = None
        if encoding == "mulaw":
            self._codec = _codec("pcm_mulaw", "r", sample_rate)
        elif encoding == "opus":
            self._codec = _codec("libopus", "r", OPUS_RATE)
            if sample_rate != OPUS_RATE:
                self._resampler = soxr.ResampleStream(OPUS_RATE, sample_rate, 1, dtype="float32")

    def decode(self, message: bytes) -> np.ndarray:
        """One binary message -> float32 [n] in [-1, 1] (n may be 0 while soxr fills).

        Raises:
            CodecError: odd byte count for pcm16, an empty message, or an invalid Opus packet.
        """
        if not message:
            raise CodecError("empty audio message")
        if self.encoding == "pcm16":
            if len(message) % 2:
                raise CodecError(f"pcm16 message of {len(message)} bytes: not whole samples")
            return np.frombuffer(message, "<i2").astype(np.float32) / _INT16_SCALE
        assert self._codec is not None
        try:
            samples = _samples(self._codec.decode(av.Packet(message)))
        except av.FFmpegError as error:
            raise CodecError(f"not a valid {self.encoding} message: {error}") from error
        if self._resampler is not None:
            return self._resampler.resample_chunk(samples)
        return samples


class Encoder:
    """float32 mono at the socket's sample rate -> binary messages for the client.

    ``pcm16`` and ``mulaw`` give one message per :meth:`encode` call; ``opus``
    gives one message per 20 ms packet, holding back the samples of a partial
    frame until more audio or :meth:`flush` (end of a reply).

    Args:
        encoding: ``pcm16``, ``mulaw`` or ``opus``.
        sample_rate: the socket's rate, Hz (one of ``SAMPLE_RATES``).

    Raises:
        ValueError: unsupported encoding or rate.
    """

    def __init__(self, encoding: str, sample_rate: int) -> None:
        _check(encoding, sample_rate)
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._codec: av.AudioCodecContext | None = None
        self._resampler: soxr.ResampleStream | None = None
        self._pending = np.zeros(0, np.float32)
        if encoding == "mulaw":
            self._codec = _codec("pcm_mulaw", "w", sample_rate)
            self._codec.open()

    def _opus(self) -> av.AudioCodecContext:
        if self._codec is None:
            self._codec = _codec("libopus", "w", OPUS_RATE)
            self._codec.bit_rate = OPUS_BITRATE
            self._codec.open()
            if self.sample_rate != OPUS_RATE:
                self._resampler = soxr.ResampleStream(
                    self.sample_rate, OPUS_RATE, 1, dtype="float32"
                )
        return self._codec

    def encode(self, samples: np.ndarray) -> list[bytes]:
        """float32 [n] in [-1, 1] -> zero or more messages."""
        samples = np.asarray(samples, np.float32).reshape(-1)
        if self.encoding == "pcm16":
            return [to_int16(samples).astype("<i2").tobytes()] if samples.size else []
        if self.encoding == "mulaw":
            assert self._codec is not None
            if not samples.size:
                return []
            packets = self._codec.encode(_frame(samples, self.sample_rate))
            return [b"".join(bytes(p) for p in packets)]
        return self._encode_opus(samples, last=False)

    def flush(self) -> list[bytes]:
        """The held-back end of a reply (Opus: padded to a whole frame); the codec restarts."""
        if self.encoding != "opus" or self._codec is None:
            return []
        messages = self._encode_opus(np.zeros(0, np.float32), last=True)
        self._codec, self._resampler = None, None
        return messages

    def reset(self) -> None:
        """Drop held-back audio (an interrupted reply); the codec restarts."""
        self._pending = np.zeros(0, np.float32)
        if self.encoding == "opus":
            self._codec, self._resampler = None, None

    def _encode_opus(self, samples: np.ndarray, last: bool) -> list[bytes]:
        codec = self._opus()
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=last)
        pending = np.concatenate([self._pending, samples])
        if last and pending.size % OPUS_FRAME:
            pending = np.concatenate([pending, np.zeros(-pending.size % OPUS_FRAME, np.float32)])
        whole = pending.size - pending.size % OPUS_FRAME
        self._pending = pending[whole:]
        packets: list[av.Packet] = []
        for start in range(0, whole, OPUS_FRAME):
            packets.extend(codec.encode(_frame(pending[start : start + OPUS_FRAME], OPUS_RATE)))
        if last:
            packets.extend(codec.encode(None))
        return [bytes(p) for p in packets]
