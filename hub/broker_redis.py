"""The Redis pub/sub broker: fan-out across hub processes and machines.

One pub/sub connection per process carries the subscriptions of every user
with a connection here (channel ``hub:u:<user>``), plus this process's probe
channel. A reader task delivers messages; when the connection breaks (Redis
restarted, ``CLIENT KILL``), it reconnects with jittered exponential backoff
and subscribes again to every channel wanted now. Publishing goes through a
bounded queue drained by one task that pipelines the ``PUBLISH`` commands,
so a push never waits for Redis; while Redis is down, events are dropped and
counted (at most once: pull is the authoritative catch-up).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import deque
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from .broker import Handler

__all__ = ["RedisBroker"]

log = logging.getLogger("hub.broker")

CHANNEL_PREFIX = "hub:u:"
MAX_OUTBOX = 50_000
MAX_PIPELINE = 512
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 5.0


def channel(user: str) -> bytes:
    return (CHANNEL_PREFIX + user).encode()


class RedisBroker:
    kind = "redis"
    spans_processes = True

    def __init__(self, url: str, *, process_id: str | None = None) -> None:
        self._url = url
        self._process_id = process_id or secrets.token_hex(6)
        self._probe_channel = f"hub:probe:{self._process_id}".encode()
        self._handlers: dict[bytes, Handler] = {}
        self._subscribed: set[bytes] = set()
        self._confirmed: set[bytes] = set()
        self._waiting: dict[bytes, list[asyncio.Future[None]]] = {}
        self._lock = asyncio.Lock()
        self._changes = asyncio.Event()
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._outbox_ready = asyncio.Event()
        self._probes: dict[bytes, asyncio.Future[None]] = {}
        self._client: redis.Redis | None = None
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.connected = False
        self.reconnects = 0
        self.dropped = 0
        self.published = 0
        self.received = 0

    def __repr__(self) -> str:
        return f"RedisBroker(connected={self.connected})"

    async def start(self) -> None:
        self._client = redis.Redis.from_url(
            self._url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=0
        )
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="hub-broker-reader"),
            asyncio.create_task(self._publish_loop(), name="hub-broker-publisher"),
            asyncio.create_task(self._control_loop(), name="hub-broker-control"),
        ]

    async def close(self) -> None:
        self._closing = True
        self._outbox_ready.set()
        self._changes.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._drop_pubsub()
        if self._client is not None:
            await self._client.aclose()

    # -- publishing -------------------------------------------------------------

    def publish(self, user: str, payload: bytes) -> None:
        if len(self._outbox) >= MAX_OUTBOX:
            self.dropped += 1
            return
        self._outbox.append((channel(user), payload))
        self._outbox_ready.set()

    async def _publish_loop(self) -> None:
        assert self._client is not None
        while not self._closing:
            if not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), MAX_PIPELINE))]
            try:
                if len(batch) == 1:
                    await self._client.publish(*batch[0])
                else:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for ch, payload in batch:
                            pipe.publish(ch, payload)
                        await pipe.execute()
                self.published += len(batch)
            except (TimeoutError, RedisError, OSError) as exc:
                # At most once: these events are gone; devices catch up by pull.
                self.dropped += len(batch) + len(self._outbox)
                self._outbox.clear()
                log.warning("publish failed, %d events dropped: %s", len(batch), exc)
                await asyncio.sleep(BACKOFF_START_S)

    # -- subscribing ------------------------------------------------------------

    def subscribe(self, user: str, handler: Handler) -> asyncio.Future[None]:
        """Subscribe; the future resolves once Redis confirmed the subscription."""
        ch = channel(user)
        self._handlers[ch] = handler
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if ch in self._confirmed:
            ready.set_result(None)
        else:
            self._waiting.setdefault(ch, []).append(ready)
            self._changes.set()
        return ready

    def unsubscribe(self, user: str) -> None:
        ch = channel(user)
        if self._handlers.pop(ch, None) is not None:
            for ready in self._waiting.pop(ch, []):
                ready.cancel()
            self._changes.set()

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self.connected = False
        self._subscribed.clear()
        self._confirmed.clear()
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except (RedisError, OSError):
                pass

    async def _connect(self) -> None:
        assert self._client is not None
        async with self._lock:
            pubsub = self._client.pubsub()
            wanted = {self._probe_channel, *self._handlers}
            await pubsub.subscribe(*wanted)
            self._pubsub, self._subscribed = pubsub, wanted
            self.connected = True
        # Users who came while this connection was being made: the control loop adds them.
        self._changes.set()
        log.info("broker connected", extra={"channels": len(wanted)})

    async def _control_loop(self) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE as users come and go, in batches."""
        while not self._closing:
            await self._changes.wait()
            self._changes.clear()
            if self._pubsub is None:
                continue  # the reader subscribes to all wanted channels once connected
            try:
                async with self._lock:
                    wanted = set(self._handlers) | {self._probe_channel}
                    add = wanted - self._subscribed
                    remove = self._subscribed - wanted
                    if add:
                        await self._pubsub.subscribe(*add)
                        self._subscribed |= add
                    if remove:
                        await self._pubsub.unsubscribe(*remove)
                        self._subscribed -= remove
                        self._confirmed -= remove
            except (TimeoutError, RedisError, OSError, AttributeError):
                continue  # the reader sees the broken connection and reconnects

    async def _read_loop(self) -> None:
        backoff = BACKOFF_START_S
        while not self._closing:
            try:
                if self._pubsub is None:
                    await self._connect()
                    backoff = BACKOFF_START_S
                message = await self._pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind = message.get("type")
                if kind == "message":
                    self._dispatch(message["channel"], message["data"])
                elif kind == "subscribe":
                    ch = message["channel"]
                    self._confirmed.add(ch)
                    for ready in self._waiting.pop(ch, []):
                        if not ready.done():
                            ready.set_result(None)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, RedisError, OSError) as exc:
                was_connected = self.connected
                await self._drop_pubsub()
                if was_connected:
                    log.warning("broker connection lost: %s", exc)
                self.reconnects += 1
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)

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
        if not self.connected or self._client is None:
            return {"ok": False, "kind": self.kind, "error": "not connected"}
        nonce = secrets.token_bytes(8)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[nonce] = waiter
        start = time.perf_counter()
        try:
            await asyncio.wait_for(self._client.publish(self._probe_channel, nonce), timeout)
            await asyncio.wait_for(waiter, timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            return {"ok": False, "kind": self.kind, "error": type(exc).__name__}
        finally:
            self._probes.pop(nonce, None)
        return {
            "ok": True,
            "kind": self.kind,
            "latency_ms": round((time.perf_counter() - start) * 1e3, 2),
        }
