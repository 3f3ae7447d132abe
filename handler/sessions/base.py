"""The seam between the socket transport and the conversation runner.

The transport (:mod:`handler.sessions.transport`) owns the socket: auth,
query parameters, one live socket per session, limits, sequence numbers,
audio codecs and close codes. A :class:`Conversation` owns what is said:
it receives the user's audio (decoded to float32 at the session rate) and
the client's events, and emits server events and reply audio through
:data:`Emit`. The app's ``state.conversation_factory`` builds one per socket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from handler.sessions.protocol import ClientEvent, ServerEvent
from handler.storage.base import SessionRecord


@dataclass(frozen=True)
class SessionParams:
    """The socket's query parameters, validated.

    Attributes:
        sample_rate: input and output sample rate, Hz (8000, 16000, 24000 or 48000).
        encoding: ``pcm16``, ``mulaw`` or ``opus``.
        vad_threshold: speech probability in [0, 1] above which audio counts as speech.
    """

    sample_rate: int = 16000
    encoding: str = "pcm16"
    vad_threshold: float = 0.5


@dataclass(frozen=True)
class AssistantAudio:
    """Reply audio for the client: float32 mono [n] in [-1, 1] at the session rate.

    The transport encodes it with the socket's codec and sends a
    ``response.audio`` event followed by the binary messages.
    """

    turn_id: str
    samples: np.ndarray


# Send one event (the transport sets its ``seq``) or one piece of reply audio.
Emit = Callable[[ServerEvent | AssistantAudio], Awaitable[None]]


class Conversation(Protocol):
    """One socket's conversation, driven by the transport.

    The transport calls these from its receive loop, one at a time; a
    Conversation that works in the background (replies, barge-in) runs its own
    tasks and emits from them. Emitting :class:`~handler.sessions.protocol.SessionEnded`
    ends the session with that reason and closes the socket; emitting after
    :meth:`close` is ignored.
    """

    async def on_audio(self, samples: np.ndarray) -> None:
        """User audio: float32 mono [n] in [-1, 1] at the session rate."""

    async def on_event(self, event: ClientEvent) -> None:
        """A validated client event: ``tool.result``, ``response.cancel``, ``playback.position``."""

    async def close(self) -> None:
        """The socket is gone or the session ended: stop all work (called once)."""


ConversationFactory = Callable[[SessionRecord, SessionParams, Emit], Awaitable[Conversation]]
