"""``POST /v1/audio/conversation`` shapes (speechbase-conversation*.md).

Defaults are the spec's: ``gapMs`` 0, ``volumeDbfs`` -16 (peak, not LUFS),
``output`` "wav", MP3 bitrate 96 kbps, ``split`` false. Ranges the spec leaves
open are this service's choices (docs/api.md): ``gapMs`` 0..10,000,
``volumeDbfs`` -60..0, MP3 bitrates of MPEG-2 Layer III, and a request body of
at most :data:`MAX_BODY_BYTES`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, PlainValidator, TypeAdapter, field_validator

from handler.schemas import REQUEST_CONFIG
from handler.schemas.converse import MAX_TURN_CHARS, MAX_TURNS
from handler.settings import MIB

MAX_VOICE_CHARS = 256
MAX_MODEL_CHARS = 128
MAX_VOICE_ID_CHARS = 64
# The largest valid body, so that a bigger one is refused (413) before it is
# parsed. A JSON string spends at most 12 bytes on one character: a character
# outside the BMP written as an escaped surrogate pair, "\ud83d\ude42" (what
# json.dumps sends for an emoji). A turn with every field at its cap is
# 12 * (8,000 + 256 + 128 + 64) = 101,376 bytes of characters plus 64 of keys,
# quotes and commas; 64 such turns are 6,492,160 bytes. The MiB on top covers the
# top-level fields (under 2 KB) and any indentation: 7,540,736 bytes in all.
MAX_JSON_BYTES_PER_CHAR = 12
MAX_TURN_BODY_BYTES = (
    MAX_JSON_BYTES_PER_CHAR
    * (MAX_TURN_CHARS + MAX_VOICE_CHARS + MAX_MODEL_CHARS + MAX_VOICE_ID_CHARS)
    + 64
)
MAX_BODY_BYTES = MAX_TURNS * MAX_TURN_BODY_BYTES + MIB


class DialogueTurn(BaseModel):
    """One turn: text plus a voice reference (inline ``voice`` or saved ``voiceId``)."""

    model_config = REQUEST_CONFIG

    text: str = Field(min_length=1, max_length=MAX_TURN_CHARS)
    voice: str | None = Field(None, min_length=1, max_length=MAX_VOICE_CHARS)
    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_CHARS)
    voiceId: str | None = Field(  # noqa: N815 (spec name)
        None, min_length=1, max_length=MAX_VOICE_ID_CHARS
    )


class Mp3Output(BaseModel):
    """``{"format": "mp3", "bitrate": 96}``."""

    model_config = REQUEST_CONFIG

    format: Literal["mp3"]
    bitrate: int = Field(96, description="kbps")


OutputName = Literal["wav", "mp3", "pcm"]
_OUTPUT_NAME: TypeAdapter[OutputName] = TypeAdapter(OutputName)


def _parse_output(value: object) -> OutputName | Mp3Output:
    """Validate ``output`` as the member its shape means: an object is MP3 settings.

    A plain union would try both members and report each one's errors under
    pydantic's label for it (``["output", "Mp3Output", "format"]``); validating
    the one member the value means reports them at the request's own paths:
    ``["output"]`` for a bad name (or a value of neither shape),
    ``["output", "format"]`` and ``["output", "bitrate"]`` inside the object.
    """
    if isinstance(value, dict | Mp3Output):
        return Mp3Output.model_validate(value)
    return _OUTPUT_NAME.validate_python(value)


Output = Annotated[
    OutputName | Mp3Output,
    PlainValidator(_parse_output, json_schema_input_type=OutputName | Mp3Output),
]


class DialogueRequest(BaseModel):
    """Many turns, many voices, one stitched file (or per-turn segments with ``split``)."""

    model_config = REQUEST_CONFIG

    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_CHARS)
    turns: list[DialogueTurn] = Field(min_length=1, max_length=MAX_TURNS)
    gapMs: int = Field(0, ge=0, le=10_000)  # noqa: N815 (spec name)
    volumeDbfs: float = Field(-16.0, ge=-60.0, le=0.0)  # noqa: N815 (spec name)
    output: Output = "wav"
    split: bool = False
    timestamps: object | None = Field(
        None, description="Only on /with-timestamps; rejected on this endpoint."
    )

    @field_validator("timestamps")
    @classmethod
    def _no_timestamps_here(cls, value: object | None) -> object | None:
        # Runs only when the field is sent (defaults are not validated): its
        # presence, null included, is the error (speechbase: "the plain endpoint rejects it").
        raise ValueError("timestamps is only accepted by /v1/audio/conversation/with-timestamps")

    @property
    def audio_format(self) -> str:
        """The output format: wav, mp3 or pcm."""
        return self.output if isinstance(self.output, str) else self.output.format

    @property
    def mp3_bitrate_kbps(self) -> int:
        """Requested MP3 bitrate (96 unless given)."""
        return self.output.bitrate if isinstance(self.output, Mp3Output) else 96


class AudioSegment(BaseModel):
    """One turn's audio under ``split: true`` (inline, or as a URL when too big)."""

    audio: str | None = Field(description="Base64 audio in the requested format, or null.")
    url: str | None = Field(None, description="Download URL when audio is null.")
    expires_in: int | None = Field(None, description="Seconds the url stays valid.")
    mediaType: str  # noqa: N815 (spec name)
    durationMs: int  # noqa: N815 (spec name)
    turnIndex: int  # noqa: N815 (spec name)


class LinkedAudio(BaseModel):
    """Where to download audio too big to return inline."""

    url: str
    expires_in: int = Field(description="Seconds the url stays valid.")


class LinkedDialogue(BaseModel):
    """Answer of a stitched request whose file exceeds the inline threshold."""

    audio: LinkedAudio
    mediaType: str  # noqa: N815 (spec name)


class SplitResponse(BaseModel):
    """Answer of a ``split: true`` request."""

    audioSegments: list[AudioSegment]  # noqa: N815 (spec name)
    warnings: list[str] = Field(default_factory=list)


class TimestampsRequest(DialogueRequest):
    """``/with-timestamps`` request: the conversation request plus ``timestamps``."""

    timestamps: Literal["on", "off"] = Field(
        "on", description="on: return word timestamps; off: skip them."
    )

    @field_validator("timestamps")
    @classmethod
    def _no_timestamps_here(cls, value: object | None) -> object | None:
        return value


class SegmentWord(BaseModel):
    """A word in a split segment: seconds from the segment's start."""

    text: str
    start: float
    end: float


class DialogueWord(SegmentWord):
    """A word in the stitched audio: seconds from its start, and the turn it belongs to."""

    turnIndex: int  # noqa: N815 (spec name)


class TimedAudioSegment(AudioSegment):
    """A split segment with its block-relative word timestamps."""

    timestamps: list[SegmentWord]


class TimestampsResponse(BaseModel):
    """Stitched audio (base64, or a URL when too big) with word timestamps."""

    audio: str | None
    url: str | None = None
    expires_in: int | None = None
    mediaType: str  # noqa: N815 (spec name)
    warnings: list[str] = Field(default_factory=list)
    timestamps: list[DialogueWord]


class TimestampsSplitResponse(BaseModel):
    """Per-turn segments, each with block-relative timestamps."""

    audioSegments: list[TimedAudioSegment]  # noqa: N815 (spec name)
    warnings: list[str] = Field(default_factory=list)
