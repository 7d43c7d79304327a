"""The Redis pub/sub broker: fan-out across hub processes and machines.

Two plain connections per process, speaking RESP with the hiredis parser:
one in subscriber mode carries the channels of every user with a connection
here (``hub:u:<user>``; ``hub:<n>:u:<user>`` on Redis database n > 0, so
that deployments on different databases of one server do not hear each
other) plus this process's probe channel; the other
publishes. Events published in one turn of the event loop leave in one write
(a pipeline of ``PUBLISH`` commands), and every message that arrived in one
read is dispatched from that read: no task switch and no per-message timer
on the hot path. (The redis-py pub/sub reader spent about 17 us of CPU per
event on a ``get_message`` call and its timeouts; see docs/BENCHMARKS.md.)

A supervisor task makes both connections; when either breaks (Redis
restarted, ``CLIENT KILL``), or the link goes silent without breaking (a NAT
or load balancer that dropped the flows: every ``check_s`` a probe goes out
through Redis and back, and two lost in a row replace both connections), it
reconnects with jittered exponential backoff and subscribes again to every
channel wanted now. A push never waits for
Redis: while it is unreachable, events wait in a bounded outbox (flushed on
reconnect), beyond which they are dropped and counted (at most once: pull is
the authoritative catch-up).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from .broker import Handler

__all__ = ["RedisBroker"]

log = logging.getLogger("hub.broker")

CHANNEL_PREFIX = "hub:u:"
MAX_OUTBOX = 50_000  # events kept while Redis is unreachable
MAX_UNSENT_BYTES = 16 << 20  # publish buffer of a connection that stopped draining
SUBSCRIBE_CHUNK = 1000  # channels per SUBSCRIBE command
CONNECT_TIMEOUT_S = 2.0
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 5.0
CHECK_S = 5.0  # how often a connected link is proved alive
CHECK_MISSES = 2  # probes lost in a row that condemn the link


def channel_prefix(db: int) -> str:
    """The channels' prefix for a Redis database number. Pub/sub ignores the
    number, so it goes into the names: deployments sharing one Redis server
    on different databases hear only their own events (and keep the names of
    database 0 as they always were)."""
    return CHANNEL_PREFIX if db == 0 else f"hub:{db}:u:"


def pack(*args: bytes) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RedisUnavailable(Exception):
    """A connection could not be made or was refused (authentication)."""


class _Connection(asyncio.Protocol):
    """One Redis connection: packed commands out, hiredis-parsed replies in.

    A reply answers the oldest pending request (``request``) if there is one;
    otherwise it goes to ``on_reply`` (subscriber-mode messages, publish counts).
    """

    def __init__(self, on_reply: Callable[[Any], None]) -> None:
        self.on_reply = on_reply
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.requests: deque[asyncio.Future[Any]] = deque()
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if self.requests:
                waiter = self.requests.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
            else:
                self.on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self.requests:
            if not waiter.done():
                waiter.set_exception(RedisUnavailable("connection lost"))
        self.requests.clear()
        if not self.closed.done():
            self.closed.set_result(exc)

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.closed.done()

    def send(self, data: bytes) -> None:
        if self.open:
            assert self.transport is not None
            self.transport.write(data)

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    async def request(self, *args: bytes) -> Any:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.requests.append(waiter)
        self.send(pack(*args))
        return await asyncio.wait_for(waiter, CONNECT_TIMEOUT_S)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(options: dict[str, Any], on_reply: Callable[[Any], None]) -> _Connection:
    """Open and authenticate a connection described by ``parse_url`` options."""
    loop = asyncio.get_running_loop()
    kind = options.get("connection_class")

    def factory() -> _Connection:
        return _Connection(on_reply)

    try:
        if kind is UnixDomainSocketConnection:
            made = loop.create_unix_connection(factory, options["path"])
        else:
            host, port = options.get("host", "localhost"), int(options.get("port", 6379))
            tls = _tls_context(options) if kind is SSLConnection else None
            made = loop.create_connection(
                factory, host, port, ssl=tls, server_hostname=host if tls else None
            )
        _, conn = await asyncio.wait_for(made, CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise RedisUnavailable(f"cannot connect: {type(exc).__name__}: {exc}") from None
    password = options.get("password")
    if password:
        username = options.get("username")
        auth = (username.encode(), password.encode()) if username else (password.encode(),)
        try:
            reply = await conn.request(b"AUTH", *auth)
        except (RedisUnavailable, TimeoutError):
            conn.close()
            raise RedisUnavailable("no answer to AUTH") from None
        if isinstance(reply, hiredis.ReplyError):
            conn.close()
            raise RedisUnavailable(f"AUTH refused: {reply}")
    return conn


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class RedisBroker:
    kind = "redis"
    spans_processes = True

    def __init__(
        self, url: str, *, process_id: str | None = None, check_s: float = CHECK_S
    ) -> None:
        self._options: dict[str, Any] = dict(parse_url(url))
        self._prefix = channel_prefix(int(self._options.get("db") or 0))
        self._check_s = check_s
        self._process_id = process_id or secrets.token_hex(6)
        self._probe_channel = f"hub:probe:{self._process_id}".encode()  # unique anyway
        self._handlers: dict[bytes, Handler] = {}
        self._subscribed: set[bytes] = set()  # SUBSCRIBE sent on this connection
        self._confirmed: set[bytes] = set()  # ... and answered, with no UNSUBSCRIBE since
        self._waiting: dict[bytes, list[asyncio.Future[None]]] = {}
        # Confirmed on an earlier connection and wanted since: confirmed again,
        # there was a gap (on_gap).
        self._were_live: set[bytes] = set()
        self._gaps: list[str] = []  # users told of at the end of this loop turn
        self.on_gap: Callable[[list[str]], None] | None = None
        # Users this process published for since the link last proved itself
        # (a probe's round trip), and those whose events may not have reached
        # Redis: published into a link found dead, or dropped. Once connected
        # again, the hub is told of the latter (on_unsure), so that the other
        # processes' devices hear of what they may have missed.
        self._window: set[str] = set()
        self._proving: set[str] = set()  # the window a probe under way is to prove
        self._unsure: set[str] = set()
        self.on_unsure: Callable[[list[str]], None] | None = None
        self._outbox: deque[bytes] = deque()  # packed PUBLISH commands not yet written
        self._flush_scheduled = False
        self._sync_scheduled = False
        self._probes: dict[bytes, asyncio.Future[None]] = {}
        self._sub: _Connection | None = None
        self._pub: _Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = False
        self.reconnects = 0
        self.dropped = 0
        self.published = 0
        self.received = 0

    def __repr__(self) -> str:
        return f"RedisBroker(connected={self.connected})"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="hub-broker")

    async def close(self) -> None:
        self._closing = True
        self._flush()  # what was published last (the event of a late commit) goes out
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._drop_connections()

    # -- connections ------------------------------------------------------------

    async def _supervise(self) -> None:
        """Connect, serve until a connection breaks, reconnect with backoff."""
        backoff = BACKOFF_START_S
        while not self._closing:
            try:
                self._sub = await _connect(self._options, self._on_subscriber_reply)
                self._pub = await _connect(self._options, self._on_publish_reply)
            except RedisUnavailable as exc:
                self._drop_connections()
                if self.reconnects == 0 or backoff >= BACKOFF_MAX_S:
                    log.warning("broker cannot connect: %s", exc)
                self.reconnects += 1
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self._subscribed.clear()
            self._confirmed.clear()
            self._were_live &= set(self._handlers)  # (those given up meanwhile: no gap)
            self._sync_subscriptions()
            self.connected = True
            self._flush()
            log.info("broker connected", extra={"channels": len(self._subscribed)})
            if self._unsure:
                unsure, self._unsure = list(self._unsure), set()
                self._tell(self.on_unsure, unsure)
            backoff = BACKOFF_START_S
            silent = await self._watch(self._sub, self._pub)
            self._unsure |= self._window
            self._window = set()
            self._drop_connections()
            if not self._closing:
                log.warning(
                    "broker link silent; reconnecting" if silent else "broker connection lost"
                )
                self.reconnects += 1
                await asyncio.sleep(backoff * (0.5 + random.random()))

    async def _watch(self, sub: _Connection, pub: _Connection) -> bool:
        """Wait until a connection breaks (False) or the link stops carrying
        messages while both look open (True)."""
        closed = [sub.closed, pub.closed]
        misses = 0
        while True:
            done, _ = await asyncio.wait(
                closed, timeout=self._check_s, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                return False
            # A probe that comes back proves what was published before it went.
            self._proving, self._window = self._window, set()
            alive = (await self.probe(self._check_s))["ok"]
            if not alive:
                self._window |= self._proving
            self._proving = set()
            if alive and self._unsure:  # events dropped on a link that holds: told now
                unsure, self._unsure = list(self._unsure), set()
                self._tell(self.on_unsure, unsure)
            misses = 0 if alive else misses + 1
            if misses >= CHECK_MISSES:
                return True

    def _drop_connections(self) -> None:
        self.connected = False
        for conn in (self._sub, self._pub):
            if conn is not None:
                conn.close()
        self._sub = self._pub = None
        self._subscribed.clear()
        self._confirmed.clear()

    def _channel(self, user: str) -> bytes:
        return (self._prefix + user).encode()

    # -- publishing -------------------------------------------------------------

    def publish(self, user: str, payload: bytes) -> None:
        self._window.add(user)
        if not self._publish(self._channel(user), payload):
            self._unsure.add(user)

    def _publish(self, ch: bytes, payload: bytes) -> bool:
        """Queue a PUBLISH; False when it was dropped (the outbox is full)."""
        if len(self._outbox) >= MAX_OUTBOX:
            self.dropped += 1
            return False
        self._outbox.append(pack(b"PUBLISH", ch, payload))
        if not self._flush_scheduled and self.connected:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _flush(self) -> None:
        """Write every queued PUBLISH in one go (events of one loop turn: one write)."""
        self._flush_scheduled = False
        pub = self._pub
        if not self._outbox or pub is None or not pub.open:
            return
        if pub.unsent() > MAX_UNSENT_BYTES:  # Redis stopped reading: at most once
            self.dropped += len(self._outbox)
            self._outbox.clear()
            # The dropped events' users: published since the last proof, or
            # in the window a probe under way is to prove.
            self._unsure |= self._window | self._proving
            return
        count = len(self._outbox)
        pub.send(b"".join(self._outbox))
        self._outbox.clear()
        self.published += count

    def _on_publish_reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            log.warning("publish refused: %s", reply)

    # -- subscribing ------------------------------------------------------------

    def subscribe(self, user: str, handler: Handler) -> asyncio.Future[None]:
        """Subscribe; the future resolves once Redis confirmed the subscription."""
        self._handlers[self._channel(user)] = handler
        ready = self.live(user)
        if not ready.done():
            self._schedule_sync()
        return ready

    def live(self, user: str) -> asyncio.Future[None]:
        ch = self._channel(user)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if ch in self._confirmed:
            ready.set_result(None)
        else:
            self._waiting.setdefault(ch, []).append(ready)
        return ready

    def unsubscribe(self, user: str) -> None:
        ch = self._channel(user)
        if self._handlers.pop(ch, None) is not None:
            for ready in self._waiting.pop(ch, []):
                ready.cancel()
            self._schedule_sync()

    def _schedule_sync(self) -> None:
        # Users who come and go in one loop turn cost one command, not one each.
        if not self._sync_scheduled:
            self._sync_scheduled = True
            asyncio.get_running_loop().call_soon(self._sync_subscriptions)

    def _sync_subscriptions(self) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE for the difference between wanted and sent."""
        self._sync_scheduled = False
        sub = self._sub
        if sub is None or not sub.open:
            return  # the supervisor subscribes to every wanted channel once connected
        wanted = set(self._handlers)
        wanted.add(self._probe_channel)
        add = wanted - self._subscribed
        remove = self._subscribed - wanted
        for command, channels in ((b"SUBSCRIBE", add), (b"UNSUBSCRIBE", remove)):
            for chunk in _chunks(sorted(channels), SUBSCRIBE_CHUNK):
                sub.send(pack(command, *chunk))
        self._subscribed |= add
        self._subscribed -= remove
        # Not confirmed from now on: a new subscription waits for its own answer.
        self._confirmed -= remove
        # Nor live before, as far as gaps go: a channel given up and wanted
        # again in one loop turn was never unsubscribed, and stays.
        self._were_live -= remove

    def _on_subscriber_reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError) or not isinstance(reply, list) or not reply:
            log.warning("unexpected reply on the subscriber connection: %r", reply)
            return
        kind = reply[0]
        if kind == b"message":
            self._dispatch(reply[1], reply[2])
        elif kind == b"subscribe":
            ch = reply[1]
            if ch in self._subscribed:
                self._confirmed.add(ch)
                for ready in self._waiting.pop(ch, []):
                    if not ready.done():
                        ready.set_result(None)
                if ch in self._were_live:
                    self._gap(ch)
                elif ch in self._handlers:
                    self._were_live.add(ch)

    def _gap(self, ch: bytes) -> None:
        if self.on_gap is None or not ch.startswith(self._prefix.encode()):
            return
        if not self._gaps:
            asyncio.get_running_loop().call_soon(self._tell_gaps)
        self._gaps.append(ch[len(self._prefix) :].decode())

    def _tell_gaps(self) -> None:
        users, self._gaps = self._gaps, []
        self._tell(self.on_gap, users)

    @staticmethod
    def _tell(hook: Callable[[list[str]], None] | None, users: list[str]) -> None:
        if hook is not None and users:
            try:
                hook(users)
            except Exception:
                log.exception("could not tell of a gap in the events")

    def _dispatch(self, ch: bytes, data: bytes) -> None:
        if ch == self._probe_channel:
            waiter = self._probes.pop(data, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        handler = self._handlers.get(ch)
        if handler is None:
            return
        self.received += 1
        try:
            handler(data)
        except Exception:
            log.exception("event handler failed")

    # -- health ------------------------------------------------------------------

    async def probe(self, timeout: float) -> dict[str, Any]:
        """Publish a nonce on this process's probe channel and wait to receive it:
        proves both directions, so a silently dead subscription shows."""
        if not self.connected:
            return {"ok": False, "kind": self.kind, "error": "not connected"}
        nonce = secrets.token_bytes(8)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[nonce] = waiter
        start = time.perf_counter()
        try:
            self._publish(self._probe_channel, nonce)
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError as exc:
            return {"ok": False, "kind": self.kind, "error": type(exc).__name__}
        finally:
            self._probes.pop(nonce, None)
        return {
            "ok": True,
            "kind": self.kind,
            "latency_ms": round((time.perf_counter() - start) * 1e3, 2),
        }


def _chunks(items: list[bytes], size: int) -> Iterable[list[bytes]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
