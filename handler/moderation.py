"""Moderation of turn text before synthesis, with a pluggable policy.

Speechbase: every turn passes moderation on its own text, and one blocked turn
fails the whole conversation (422 ``content_moderation_blocked``). The default
policy is a local blocklist of whole words plus regular expressions (no
network). Another policy is named in ``CONVERSE_MODERATION_POLICY`` as
``module:factory``; the factory receives the settings and returns an object
with ``check(text) -> ModerationVerdict | None``. A policy that raises obeys
``CONVERSE_MODERATION_FAIL_MODE``: ``open`` lets the text through, ``closed``
fails the request with reason ``error_fail_closed`` (503, ``Retry-After``:
moderation is down, the same request may pass later).

The client reads a verdict's ``type`` and a generic sentence; what matched
(the term, the operator's pattern) and a failing policy's own error text are
the error's ``detail``, which only the request's log line carries.

``check`` is synchronous (a custom policy may call a moderation service over
the network), so every turn is checked in a worker thread, all turns of a
request at once, off the event loop; the request's deadline still applies (a
check it outlives is abandoned, its result dropped).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from handler.errors import ContentBlocked, ModerationUnavailable
from handler.settings import Settings

logger = logging.getLogger("converse.moderation")

# Worker threads all moderation checks of one event loop share: a slow or hung
# moderation service holds at most these, never the default pool that
# normalising, encoding and storage calls run in.
MODERATION_THREADS = 16
_THREADS: RunVar[anyio.CapacityLimiter] = RunVar("converse_moderation_threads")
# Checks whose thread runs, abandoned ones included: the limiter above lets go of a
# check its request abandoned (deadline, client gone) while ``check`` still runs, so
# this is what bounds the threads a hung moderation service holds.
_RUNNING = threading.BoundedSemaphore(MODERATION_THREADS)


class ModerationSaturated(RuntimeError):
    """Every moderation thread still runs a check (a hung service): this one was not started."""


def _check_in_thread(policy: ModerationPolicy, text: str) -> ModerationVerdict | None:
    """``policy.check(text)`` while a running-check place is free (worker thread).

    Raises:
        ModerationSaturated: :data:`MODERATION_THREADS` checks still run.
    """
    if not _RUNNING.acquire(blocking=False):
        raise ModerationSaturated(f"all {MODERATION_THREADS} moderation threads are busy")
    try:
        return policy.check(text)
    finally:
        _RUNNING.release()

# What the client reads as ``reason.detail``, by verdict type (others: DEFAULT_REASON).
PUBLIC_REASONS = {
    "blocklist": "the text contains a blocked term",
    "pattern": "the text matches a blocked pattern",
}
DEFAULT_REASON = "the moderation policy blocked the text"


@dataclass(frozen=True)
class ModerationVerdict:
    """Why a text is blocked.

    Attributes:
        type: machine-readable reason, sent to the client as ``reason.type``
            (the blocklist policy's: ``blocklist``, ``pattern``).
        detail: operator-only (the matched term or pattern); logged as the
            request's ``error_detail``, never sent to the client.
    """

    type: str
    detail: str


class ModerationPolicy(Protocol):
    """Anything that can judge one text (called in a worker thread, possibly concurrently)."""

    def check(self, text: str) -> ModerationVerdict | None:
        """None when the text may be voiced, else why not."""


class BlocklistPolicy:
    """Blocks whole-word matches of ``words`` (case-insensitive) and any of ``patterns``.

    A word matches where no word character (letter, digit, ``_``) touches
    either end of it, so entries that begin or end with a symbol (``@ss``,
    ``c++``) match as whole words too, and ``badword`` does not match inside
    ``badwords``.

    Raises (constructor):
        re.error: a pattern that does not compile.
    """

    def __init__(self, words: list[str], patterns: list[str]) -> None:
        terms = [re.escape(w.strip()) for w in words if w.strip()]
        self._words = (
            re.compile(rf"(?<!\w)(?:{'|'.join(terms)})(?!\w)", re.IGNORECASE) if terms else None
        )
        self._patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def check(self, text: str) -> ModerationVerdict | None:
        """The first blocklist or pattern match, if any."""
        if self._words is not None and (match := self._words.search(text)):
            return ModerationVerdict("blocklist", f"blocked term {match.group(0)!r}")
        for pattern in self._patterns:
            if pattern.search(text):
                return ModerationVerdict("pattern", f"matched pattern {pattern.pattern!r}")
        return None


def load_policy(settings: Settings) -> ModerationPolicy:
    """The policy the settings name (``blocklist`` or ``module:factory``)."""
    if settings.moderation_policy == "blocklist":
        words = settings.moderation_blocklist.split(",")
        return BlocklistPolicy(words, settings.moderation_patterns)
    module_name, _, attribute = settings.moderation_policy.partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    policy: ModerationPolicy = factory(settings)
    return policy


def _moderation_threads() -> anyio.CapacityLimiter:
    """The running event loop's limiter of moderation worker threads."""
    try:
        return _THREADS.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(MODERATION_THREADS)
        _THREADS.set(limiter)
        return limiter


async def moderate(
    policy: ModerationPolicy, texts: list[str], fail_mode: str, retry_after_s: int
) -> None:
    """Check every text, all at once in worker threads; the first blocked one fails the request.

    "First" is by index: the answer waits only for the checks of the turns
    before the one that decides it; checks still running then are abandoned
    (as they are when the caller is cancelled: deadline, client gone).

    Args:
        policy: the app's policy; ``check`` runs in a worker thread.
        texts: one text per turn, in request order.
        fail_mode: "open" (a failing check lets its text through) or "closed".
        retry_after_s: ``Retry-After`` seconds when the policy failed closed.

    Raises:
        ContentBlocked: a text is blocked (422); the verdict's detail is only logged.
        ModerationUnavailable: the policy raised and ``fail_mode`` is "closed"
            (503, reason ``error_fail_closed``); its error text is only logged. So
            does a check that could not start because :data:`MODERATION_THREADS`
            checks still run (:class:`ModerationSaturated`: a hung service).
    """
    threads = _moderation_threads()
    checks = [
        asyncio.ensure_future(
            anyio.to_thread.run_sync(
                _check_in_thread, policy, text, abandon_on_cancel=True, limiter=threads
            )
        )
        for text in texts
    ]
    try:
        for index, check in enumerate(checks):
            try:
                verdict = await check
            except Exception as error:  # any policy failure is subject to fail_mode
                logger.warning("moderation policy failed on turn %d: %r", index, error)
                if fail_mode == "open":
                    continue
                raise ModerationUnavailable(
                    index, retry_after_s, detail=f"moderation policy failed: {error!r}"
                ) from error
            if verdict is not None:
                raise ContentBlocked(
                    f"turn {index} was blocked by moderation",
                    verdict.type,
                    PUBLIC_REASONS.get(verdict.type, DEFAULT_REASON),
                    index,
                    detail=f"moderation {verdict.type}: {verdict.detail}",
                )
    finally:
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
