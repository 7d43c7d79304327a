"""Per-user coordinators: local connections, ordered events, broker fan-out.

A :class:`Coordinator` exists for each user with a connection on this
process. It owns those connections, subscribes to the user's broker channel
while it has any, and goes away with the last one.

Every push of a user, from WebSocket and HTTP alike, goes through
:meth:`Coordinators.push`: it is queued at once in the committer, whose FIFO
queue is the users' mailbox (a user's pushes commit in the order they were
queued), and a callback on the push's future publishes its event. Futures
resolve in commit order and their callbacks run in that order, so one user's
events leave this process in version order, with no task per user and no
extra hop. The callback runs even when the pusher went away.

An event is encoded once: the same text goes to every local receiver, and
the same bytes to the broker. Local connections get it at once (never the
connection that pushed: it gets the ack); other processes get it from the
broker, and each drops its own echo (Phoenix PubSub's rule).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import orjson

from .broker import Broker
from .committer import Committer
from .metrics import Metrics
from .protocol import delta_body, text_frame
from .types import Push, PushResult

__all__ = ["Coordinator", "Coordinators", "Receiver"]

log = logging.getLogger("hub.coordinator")


class Receiver(Protocol):
    """What a coordinator needs of a connection."""

    id: str
    user: str
    device: str
    notify_only: bool

    def deliver(self, text: str, frame: bytes | None = None) -> None:
        """Queue an outgoing message without waiting (may close a slow connection);
        ``frame`` is the same message as a pre-built WebSocket frame."""
        ...

    def close_soon(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Event:
    """A change event as it travels: a small header and the encoded message."""

    process: str
    connection: str | None
    version: int
    collections: tuple[str, ...]
    change: str | None  # the `change` message, None when over max_event_bytes
    committed_at: float = 0.0  # Unix time, for the delivery latency metric

    def sync_available(self) -> str:
        return orjson.dumps(
            {"type": "sync_available", "version": self.version, "collections": self.collections}
        ).decode()

    def to_wire(self) -> bytes:
        header = orjson.dumps(
            {
                "p": self.process,
                "c": self.connection,
                "v": self.version,
                "cols": self.collections,
                "t": self.committed_at,
            }
        )
        return header + b"\n" + (self.change.encode() if self.change is not None else b"")

    @classmethod
    def from_wire(cls, payload: bytes) -> Event:
        header, _, change = payload.partition(b"\n")
        h = orjson.loads(header)
        return cls(
            h["p"],
            h["c"],
            h["v"],
            tuple(h["cols"]),
            change.decode() if change else None,
            float(h.get("t", 0.0)),
        )


class Coordinator:
    """One user's connections on this process."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.connections: dict[str, Receiver] = {}

    def deliver(self, event: Event) -> tuple[int, int]:
        """Send an event to every local connection but its origin; how many got
        a ``change`` and how many a ``sync_available``."""
        notify: str | None = None
        notify_frame: bytes | None = None
        frame: bytes | None = None  # the change message as a frame, built once
        sent = notified = 0
        for conn in list(self.connections.values()):
            if conn.id == event.connection:
                continue
            if event.change is None or conn.notify_only:
                if notify is None:
                    notify = event.sync_available()
                    notify_frame = text_frame(notify.encode())
                conn.deliver(notify, notify_frame)
                notified += 1
            else:
                if frame is None:
                    frame = text_frame(event.change.encode())
                conn.deliver(event.change, frame)
                sent += 1
        return sent, notified


class Coordinators:
    """The coordinators of this process, created on demand, gone when idle."""

    def __init__(
        self,
        committer: Committer,
        broker: Broker,
        *,
        max_event_bytes: int = 64 * 1024,
        max_connections_per_user: int = 10,
        process_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.committer = committer
        # A push answered 'unavailable' at shutdown that commits all the same:
        # its event goes out (to every connection: the pusher's is closing).
        committer.on_late_commit = lambda push, result: self._publish(push, None, result)
        self.broker = broker
        self.max_event_bytes = max_event_bytes
        self.max_connections_per_user = max_connections_per_user
        self.process_id = process_id or secrets.token_hex(6)
        self.users: dict[str, Coordinator] = {}
        self.metrics = metrics

    # -- connections -----------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return sum(len(c.connections) for c in self.users.values())

    def connections(self) -> Iterable[Receiver]:
        for coordinator in list(self.users.values()):
            yield from list(coordinator.connections.values())

    def attach(self, conn: Receiver) -> asyncio.Future[None] | None:
        """Register a connection; None when the user is at the connection limit.

        The future resolves once the user's broker subscription is live, so
        that an event published after it reaches this connection.
        """
        coordinator = self.users.get(conn.user)
        if coordinator is None:
            coordinator = self.users[conn.user] = Coordinator(conn.user)
        if len(coordinator.connections) >= self.max_connections_per_user:
            return None
        first = not coordinator.connections
        coordinator.connections[conn.id] = conn
        user = conn.user
        if first:
            return self.broker.subscribe(user, lambda payload: self._received(user, payload))
        # Every connection waits until the subscription is live: a second one
        # that came while it was on its way (or while the broker reconnects)
        # would otherwise miss what is published before Redis confirms it.
        return self.broker.live(user)

    def detach(self, conn: Receiver) -> None:
        coordinator = self.users.get(conn.user)
        if coordinator is None or coordinator.connections.pop(conn.id, None) is None:
            return
        if not coordinator.connections:
            del self.users[conn.user]
            self.broker.unsubscribe(conn.user)

    def notify(self, user: str, version: int) -> None:
        """Send every local connection of ``user`` a ``sync_available`` for
        ``version`` (of any collection): after a gap, when events may be lost."""
        coordinator = self.users.get(user)
        if coordinator is not None:
            event = Event(self.process_id, None, version, (), None, time.time())
            self._count(event, coordinator.deliver(event))

    def announce(self, user: str, version: int) -> None:
        """Have every other process send ``user``'s connections a
        ``sync_available`` for ``version``: after events published here may
        not have reached them."""
        if self.broker.spans_processes:
            event = Event(self.process_id, None, version, (), None, time.time())
            self.broker.publish(user, event.to_wire())

    def of_user(self, user: str) -> list[Receiver]:
        coordinator = self.users.get(user)
        return list(coordinator.connections.values()) if coordinator else []

    # -- pushes and events -------------------------------------------------------

    def push(self, push: Push, origin: str | None = None) -> asyncio.Future[PushResult]:
        """Queue a push; its event is published in commit order once it commits."""
        future = self.committer.enqueue(push)
        future.add_done_callback(lambda f: self._committed(push, origin, f))
        return future

    def _committed(
        self, push: Push, origin: str | None, future: asyncio.Future[PushResult]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self._publish(push, origin, future.result())

    def _publish(self, push: Push, origin: str | None, result: PushResult) -> None:
        if not result.applied or result.replay:
            return
        try:
            event = self._event(push, origin, result)
        except Exception:  # an event is best effort; the push is committed and acked
            log.exception("could not build the event of a push")
            return
        coordinator = self.users.get(push.user)
        if coordinator is not None:
            self._count(event, coordinator.deliver(event))
        if self.broker.spans_processes:
            self.broker.publish(push.user, event.to_wire())
        if self.metrics is not None:
            self.metrics.events_published.inc()

    def _event(self, push: Push, origin: str | None, result: PushResult) -> Event:
        collections = result.collections
        if result.deltas is None:  # too large for a change event: sync_available
            return Event(self.process_id, origin, result.version, collections, None, time.time())
        data = orjson.dumps(
            {
                "type": "change",
                "version": result.version,
                "prev": result.prev,
                "device": push.device,
                "changes": [delta_body(d) for d in result.deltas],
            }
        )
        change = data.decode() if len(data) <= self.max_event_bytes else None
        return Event(self.process_id, origin, result.version, collections, change, time.time())

    def _received(self, user: str, payload: bytes) -> None:
        try:
            event = Event.from_wire(payload)
        except (ValueError, KeyError, orjson.JSONDecodeError):
            log.warning("dropped a malformed event")
            return
        if event.process == self.process_id:
            return  # delivered locally when it was committed
        coordinator = self.users.get(user)
        if coordinator is not None:
            self._count(event, coordinator.deliver(event))

    def _count(self, event: Event, counts: tuple[int, int]) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        changes, notices = counts
        if changes:
            metrics.change_deliveries.inc(changes)
        if notices:
            metrics.notice_deliveries.inc(notices)
        if changes or notices:
            metrics.delivery_seconds.observe(max(0.0, time.time() - event.committed_at))
