"""Presence: how many connections a user has open, across hub processes.

The per-user connection limit of PROTOCOL.md (4009) counts every process.
A connection is named ``"<device>\t<connection id>"`` (device ids hold no
tab), so the devices list can count connections per device.
:class:`MemoryPresence` counts this process only (one process is the whole
hub); :mod:`hub.presence_redis` counts in Redis for many processes.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["MemoryPresence", "Presence"]


class Presence(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(self, user: str, connection: str, limit: int) -> bool:
        """Count ``connection`` in unless ``user`` already has ``limit`` open."""
        ...

    def release(self, user: str, connection: str) -> None: ...

    async def connections(self, user: str) -> list[str]:
        """The user's open connections, on every process."""
        ...


class MemoryPresence:
    def __init__(self) -> None:
        self._open: dict[str, set[str]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._open.clear()

    async def acquire(self, user: str, connection: str, limit: int) -> bool:
        open_now = self._open.setdefault(user, set())
        if connection not in open_now and len(open_now) >= limit:
            return False
        open_now.add(connection)
        return True

    async def connections(self, user: str) -> list[str]:
        return sorted(self._open.get(user, ()))

    def release(self, user: str, connection: str) -> None:
        open_now = self._open.get(user)
        if open_now is not None:
            open_now.discard(connection)
            if not open_now:
                del self._open[user]
