"""What a turn carries, checked and decoded: speakable text, inline or uploaded WAV audio.

Used by both API families (``/v1/converse`` and stitched dialogue).
"""

from __future__ import annotations

import base64
import binascii

from starlette.concurrency import run_in_threadpool

from handler.audio import AudioDecodeError, DecodedAudio, decode_wav
from handler.engines.base import is_speakable
from handler.errors import InvalidRequest, UnprocessableRequest, ValidationItem
from handler.schemas.converse import MAX_TURN_AUDIO_BYTES
from handler.services.context import RequestContext


def require_speakable(text: str, path: list[str], turn_index: int) -> None:
    """Refuse text with nothing to say: no letter or digit in any script.

    Raises:
        UnprocessableRequest: 422 ``unprocessable``, naming ``path`` and the turn.
    """
    if not is_speakable(text):
        message = f"turn {turn_index}: the text has no letter or digit to speak"
        raise UnprocessableRequest(
            message, turn_index=turn_index, validation=[ValidationItem(path, message)]
        )


def decode_turn_audio(audio_b64: str, turn_index: int) -> DecodedAudio:
    """Decode a turn's ``audio_wav_b64`` (``data:`` URI prefix allowed) to mono float32.

    The decoded size is computed from the base64 length and checked against the
    25 MiB cap before any bytes are decoded.

    Raises:
        InvalidRequest: over the cap, bad base64, or not a decodable WAV (naming the turn).
    """
    payload = audio_b64.strip()
    if payload.startswith("data:"):
        header, _, payload = payload.partition(",")
        if ";base64" not in header:
            raise InvalidRequest(
                f"conversation[{turn_index}].audio_wav_b64: data URI must be base64",
                turn_index=turn_index,
            )
    payload = "".join(payload.split())
    decoded_size = len(payload) // 4 * 3 - payload[-2:].count("=")
    if decoded_size > MAX_TURN_AUDIO_BYTES:
        raise InvalidRequest(
            f"conversation[{turn_index}].audio_wav_b64: {decoded_size} bytes decoded exceeds "
            f"the {MAX_TURN_AUDIO_BYTES}-byte (25 MiB) cap per turn",
            turn_index=turn_index,
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidRequest(
            f"conversation[{turn_index}].audio_wav_b64: not valid base64 ({error})",
            turn_index=turn_index,
        ) from error
    try:
        return decode_wav(raw)
    except AudioDecodeError as error:
        raise InvalidRequest(
            f"conversation[{turn_index}].audio_wav_b64: {error}", turn_index=turn_index
        ) from error


async def load_uploaded_audio(ctx: RequestContext, audio_id: str, turn_index: int) -> DecodedAudio:
    """Decode the caller's uploaded clip ``audio_id`` (size checked before reading).

    Raises:
        InvalidRequest: unknown id, over 25 MiB, or not a decodable WAV (naming the turn).
    """
    where = f"conversation[{turn_index}].audio_id"
    try:
        data = await run_in_threadpool(
            ctx.blobs.get, ctx.upload_key(audio_id), MAX_TURN_AUDIO_BYTES
        )
    except ValueError as error:
        raise InvalidRequest(f"{where}: {error} (25 MiB cap)", turn_index=turn_index) from error
    if data is None:
        raise InvalidRequest(f"{where}: no upload {audio_id!r}", turn_index=turn_index)
    try:
        return await run_in_threadpool(decode_wav, data)
    except AudioDecodeError as error:
        raise InvalidRequest(f"{where}: {error}", turn_index=turn_index) from error
