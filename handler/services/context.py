"""Everything a service needs about one authenticated request, in one object."""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from handler.engines.catalog import ModelCatalog
from handler.moderation import ModerationPolicy, moderate
from handler.services.telemetry import RequestRecord
from handler.settings import Settings
from handler.storage import BlobStore, Storage
from handler.storage.base import SavedVoice
from handler.triton import TritonClient


@dataclass(frozen=True)
class Delivered:
    """Audio handed back inline (``data``) or as a time-limited ``url``."""

    data: bytes | None
    url: str | None
    expires_in: int | None


@dataclass(frozen=True)
class RequestContext:
    """Shared services plus the caller's key id, request id, public base URL and deadline.

    ``deadline`` is ``time.monotonic()`` seconds (set when the request arrived);
    ``record`` collects the request's telemetry (see :mod:`handler.services.telemetry`).
    """

    settings: Settings
    catalog: ModelCatalog
    triton: TritonClient
    storage: Storage
    blobs: BlobStore
    key_id: str
    request_id: str
    base_url: str
    moderation: ModerationPolicy
    deadline: float
    record: RequestRecord

    async def deliver(self, name: str, data: bytes, media_type: str, force_url: bool) -> Delivered:
        """Inline ``data`` if it fits ``inline_audio_max_bytes`` (and not ``force_url``).

        Otherwise store it as ``responses/<request_id>/<name>`` in the blob store
        and return a download URL valid for ``url_expires_s``.
        """
        if not force_url and len(data) <= self.settings.inline_audio_max_bytes:
            return Delivered(data, None, None)
        key = f"responses/{self.request_id}/{name}"
        await run_in_threadpool(self.blobs.put, key, data, media_type)
        expires = self.settings.url_expires_s
        return Delivered(None, self.blobs.download_url(key, expires, self.base_url), expires)

    async def record_usage(
        self, input_chars: int, input_audio_s: float, output_audio_s: float
    ) -> None:
        """Add this (successful) request's usage to the key's totals and to its log record."""
        self.record.characters = input_chars
        self.record.input_audio_s = input_audio_s
        self.record.output_audio_s = output_audio_s
        await run_in_threadpool(
            self.storage.record_usage,
            self.key_id,
            input_chars,
            input_audio_s,
            output_audio_s,
            time.time(),
        )

    async def saved_voice(self, voice_id: str) -> SavedVoice | None:
        """The caller's saved voice with this id, or None."""
        return await run_in_threadpool(self.storage.get_voice, self.key_id, voice_id)

    async def moderate(self, texts: list[str]) -> None:
        """Run every text through the moderation policy, off the event loop.

        See :func:`handler.moderation.moderate`; a policy that fails closed is
        answered with ``Retry-After: retry_after_s``.

        Raises:
            ContentBlocked: a text is blocked (422).
            ModerationUnavailable: the policy failed and fails closed (503).
        """
        await moderate(
            self.moderation,
            texts,
            self.settings.moderation_fail_mode,
            self.settings.retry_after_s,
        )

    def upload_key(self, upload_id: str) -> str:
        """Blob key of the caller's upload ``upload_id``."""
        return f"uploads/{self.key_id}/{upload_id}.wav"
