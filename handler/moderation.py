"""Moderation of turn text before synthesis, with a pluggable policy.

Speechbase: every turn passes moderation on its own text, and one blocked turn
fails the whole conversation (422 ``content_moderation_blocked``). The default
policy is a local blocklist of whole words plus regular expressions (no
network). Another policy is named in ``CONVERSE_MODERATION_POLICY`` as
``module:factory``; the factory receives the settings and returns an object
with ``check(text) -> ModerationVerdict | None``. A policy that raises obeys
``CONVERSE_MODERATION_FAIL_MODE``: ``open`` lets the text through, ``closed``
blocks it with reason ``error_fail_closed``.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass
from typing import Protocol

from handler.errors import ContentBlocked
from handler.settings import Settings

logger = logging.getLogger("converse.moderation")


@dataclass(frozen=True)
class ModerationVerdict:
    """Why a text is blocked: ``type`` (machine-readable) and ``detail`` (human)."""

    type: str
    detail: str


class ModerationPolicy(Protocol):
    """Anything that can judge one text."""

    def check(self, text: str) -> ModerationVerdict | None:
        """None when the text may be voiced, else why not."""


class BlocklistPolicy:
    """Blocks whole-word matches of ``words`` (case-insensitive) and any of ``patterns``.

    Raises (constructor):
        re.error: a pattern that does not compile.
    """

    def __init__(self, words: list[str], patterns: list[str]) -> None:
        terms = [re.escape(w.strip()) for w in words if w.strip()]
        self._words = re.compile(rf"\b(?:{'|'.join(terms)})\b", re.IGNORECASE) if terms else None
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


def moderate(policy: ModerationPolicy, texts: list[str], fail_mode: str) -> None:
    """Check every text; the first blocked one fails the request.

    Raises:
        ContentBlocked: a text is blocked, or the policy failed with ``fail_mode`` "closed".
    """
    for index, text in enumerate(texts):
        try:
            verdict = policy.check(text)
        except Exception as error:  # any policy failure is subject to fail_mode
            logger.warning("moderation policy failed on turn %d: %s", index, error)
            if fail_mode == "open":
                continue
            raise ContentBlocked(
                f"turn {index} could not be moderated", "error_fail_closed", str(error), index
            ) from error
        if verdict is not None:
            raise ContentBlocked(
                f"turn {index} was blocked by moderation", verdict.type, verdict.detail, index
            )
