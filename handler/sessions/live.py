"""The conversation factory of the running service: a :class:`LiveConversation` per socket.

Binds a session's voice (a Kokoro engine and voice spec from the catalog), the
VAD, the ASR and aligner in Triton and the configured chat LM (the bundled
``chat`` model in Triton, or ``CONVERSE_CHAT_BASE_URL``) into
:class:`ConversationModels`.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from handler.engines.chat import chat_model
from handler.engines.vad import SileroVad
from handler.sessions.base import ConversationFactory, Emit, SessionParams
from handler.sessions.protocol import SessionEnded
from handler.sessions.runner import ConversationModels, LiveConversation
from handler.storage.base import SessionRecord
from handler.transcription import align, transcribe
from handler.triton import TritonClient


async def _transcript(triton: TritonClient, audio_16k: np.ndarray, language: str) -> str:
    text, _ = await transcribe(triton, audio_16k, language)
    return text


def live_conversations(state: State) -> ConversationFactory:
    """The factory for ``create_app``: reads ``settings``, ``triton``, ``catalog``, ``storage``.

    The factory raises (the transport then closes the socket with an internal
    error): ``InvalidRequest`` when the session's model no longer has named
    voices, ``ServiceUnavailable`` when Triton is unreachable.
    """

    async def build(record: SessionRecord, params: SessionParams, emit: Emit) -> LiveConversation:
        triton: TritonClient = state.triton
        _, engine = await state.catalog.resolve_named_voices(record.model, ["voice_id"])
        # Read again now that this socket holds the session: what an older socket
        # did up to the takeover (its last turn number) counts.
        record = (
            await run_in_threadpool(state.storage.get_session, record.key_id, record.id)
        ) or record
        turns = await run_in_threadpool(state.storage.list_turns, record.key_id, record.id)

        async def speak(text: str) -> np.ndarray:
            return await engine.synthesize(triton, text, record.voice, 1.0)

        models = ConversationModels(
            vad=SileroVad(triton),
            chat=chat_model(state.settings),
            transcribe=partial(_transcript, triton),
            speak=speak,
            voice_rate=engine.sample_rate,
            align=partial(align, triton),
            tool_timeout_s=state.settings.session_tool_timeout_s,
            call_timeout_s=state.settings.session_model_timeout_s,
            reply_seed=state.settings.session_reply_seed,
        )
        conversation = LiveConversation(record, params, models, emit, state.storage, turns)
        limit = record.config.get("max_turns")
        if limit is not None and conversation.exchanges >= limit:
            # Its last reply was stored but its end was not (the process stopped between).
            await emit(SessionEnded(turn_id=turns[-1].turn_id, reason="max_turns"))
        return conversation

    return build
