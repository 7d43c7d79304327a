"""The broker interface: how a change event reaches the user's devices on
every hub process.

Guarantees, the same for every implementation:

- **At most once.** An event is delivered once or not at all: while the
  transport is down, events are dropped, never queued without bound. A lost
  event is never a lost change: devices notice the gap (``prev``) and pull,
  and pull is authoritative.
- **Per publisher order.** Events published by one process for one user
  arrive in publish order; events of different processes may interleave.
- **Isolation.** A subscriber of user ``u`` receives only what was published
  for ``u``.
- ``publish`` never blocks on the network and never raises for an outage;
  ``subscribe`` and ``unsubscribe`` take effect as soon as the transport is
  up, and again after it comes back.

Implementations: :mod:`hub.broker_memory` (one process) and
:mod:`hub.broker_redis` (Redis pub/sub, many processes or machines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Broker", "Handler"]

Handler = Callable[[bytes], None]


class Broker(Protocol):
    kind: str
    #: False when every subscriber lives in this process: the coordinators
    #: deliver locally already, so publishing would only make echoes.
    spans_processes: bool
    #: Told of users whose subscription is live again after a gap (the
    #: transport was down, or confirmed it late): events published meanwhile
    #: did not arrive, and their devices are to be told to pull.
    on_gap: Callable[[list[str]], None] | None
    #: Told of users whose events published here may not have reached the
    #: other processes (the transport failed under them): their devices
    #: there are to be told to pull.
    on_unsure: Callable[[list[str]], None] | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def publish(self, user: str, payload: bytes) -> None:
        """Send ``payload`` to every subscriber of ``user`` (at most once)."""
        ...

    def subscribe(self, user: str, handler: Handler) -> asyncio.Future[None]:
        """Call ``handler(payload)`` for each event of ``user`` (one handler per
        user); the future resolves once events published from now on arrive."""
        ...

    def unsubscribe(self, user: str) -> None: ...

    def live(self, user: str) -> asyncio.Future[None]:
        """Resolves once ``user``'s subscription is live: at once when it is, or
        when the transport confirms it (again, after a reconnect)."""
        ...

    async def probe(self, timeout: float) -> dict[str, Any]:
        """A round trip through the transport: ``{"ok": bool, ...}`` for /health."""
        ...
