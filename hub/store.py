"""The store interface: where pushes are committed and pulls are read.

The one implementation is :mod:`hub.store_postgres`. Its guarantees:

- ``commit`` takes a batch of pushes, possibly of many users, and answers
  each one, in order: a :class:`PushResult`, or the :class:`HubError` that
  rejected that push alone. A push that gets a result is durable.
- One user's pushes get strictly increasing versions, committed in version
  order across every process that shares the database; a push that changes
  nothing gets no version.
- ``pull`` pages never lose or repeat a delta; a device that has seen
  version ``v`` has seen every change with a version up to ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .errors import HubError
from .protocol import PullQuery
from .types import PullPage, Push, PushResult

__all__ = ["Store"]


class Store(Protocol):
    async def commit(self, pushes: Sequence[Push]) -> list[PushResult | HubError]:
        """Commit a batch; one answer per push, in order."""
        ...

    async def pull(self, user: str, query: PullQuery, max_bytes: int = ...) -> PullPage:
        """The deltas after ``query.cursor``, about ``max_bytes`` at most (at least
        one delta); ``ResetRequired`` for a cursor past the horizon."""
        ...

    async def admission(self, user: str, device: str, key_id: str | None) -> tuple[int, str | None]:
        """The user's version (0 with no history), and ``"device"`` or ``"key"``
        when the connection's device or API key is revoked."""
        ...

    async def versions(self, users: Sequence[str]) -> dict[str, int]:
        """The version of each of ``users`` that has a history."""
        ...

    async def status(self, user: str) -> dict[str, Any]:
        """PROTOCOL.md's ``/v1/sync/status`` body."""
        ...

    async def ping(self) -> None:
        """One round trip to the database; raises when it cannot be made."""
        ...

    async def close(self, timeout: float | None = None) -> None: ...
