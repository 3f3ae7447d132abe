"""The start/stop shape the local servers share (tritonserver, its test double, the API stack)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """Something ``start()`` brings up and ``stop()`` tears down; ``with`` does both.

    Subclasses implement ``start`` (block until serving, return self) and an
    idempotent ``stop`` that leaves no thread or process behind.
    """

    def start(self) -> Self:
        """Bring the service up and return it once it answers."""
        raise NotImplementedError

    def stop(self) -> None:
        """Tear the service down (safe to call twice)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
