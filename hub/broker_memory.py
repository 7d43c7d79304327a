"""The in-process broker: for one hub process (the default)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .broker import Handler

__all__ = ["MemoryBroker"]

log = logging.getLogger("hub.broker")


class MemoryBroker:
    """Delivers on the next turn of the event loop, in publish order."""

    kind = "memory"
    spans_processes = False
    on_gap: Callable[[list[str]], None] | None = None  # it has no gaps
    on_unsure: Callable[[list[str]], None] | None = None

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self.published = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._handlers.clear()

    def publish(self, user: str, payload: bytes) -> None:
        self.published += 1
        if user in self._handlers:
            asyncio.get_running_loop().call_soon(self._deliver, user, payload)

    def _deliver(self, user: str, payload: bytes) -> None:
        handler = self._handlers.get(user)
        if handler is None:
            return
        try:
            handler(payload)
        except Exception:
            log.exception("event handler failed")

    def subscribe(self, user: str, handler: Handler) -> asyncio.Future[None]:
        self._handlers[user] = handler
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ready.set_result(None)
        return ready

    def unsubscribe(self, user: str) -> None:
        self._handlers.pop(user, None)

    def live(self, user: str) -> asyncio.Future[None]:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ready.set_result(None)
        return ready

    async def probe(self, timeout: float) -> dict[str, Any]:
        return {"ok": True, "kind": self.kind}
