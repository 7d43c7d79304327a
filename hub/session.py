"""One WebSocket connection (``GET /v1/ws``): authenticate, read, write.

A session checks the ``Origin`` (before the upgrade), authenticates by
header or by a first ``auth`` message, registers with its user's coordinator,
and then reads client messages until the connection ends. A bad message gets
an ``error`` reply and the connection stays open; only the close codes of
PROTOCOL.md end it.

Isolation: everything the session sends goes through its own bounded queue,
drained by its own writer task. Nobody ever waits on a session: when its
queue overflows (the client reads too slowly), it is closed with 1013 and
its queue dropped, while everyone else goes on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import Headers, QueryParams
from starlette.types import Receive, Scope, Send

from . import logs, protocol
from .auth import bearer_token
from .errors import (
    BadRequest,
    Forbidden,
    HubError,
    RateLimited,
    ResetRequired,
    TokenExpired,
    Unauthorized,
    Unavailable,
    retry_delay,
)
from .protocol import (
    WS_1011_INTERNAL_ERROR,
    WS_1013_TOO_SLOW,
    WS_4001_UNAUTHENTICATED,
    WS_4003_FORBIDDEN,
    WS_4008_RATE_LIMITED,
    WS_4009_TOO_MANY_CONNECTIONS,
    WS_4010_TOKEN_EXPIRED,
    text_frame,
)
from .ratelimit import TokenBucket
from .server import HeartbeatProtocol
from .types import Change, Principal, Push, PushResult

if TYPE_CHECKING:
    from .app import Hub

__all__ = ["Session", "websocket_endpoint"]

log = logging.getLogger("hub.session")

SUBSCRIBE_WAIT_S = 2.0
EXPIRY_WARNING_S = 60.0
MAX_PUSHES_IN_FLIGHT = 64
MAX_STRIKES = 20
MAX_PULL_ANSWER_BYTES = 1024 * 1024 - 1024
CLOSE_SEND_S = 5.0  # a close frame not written by then: the peer does not read; drop it
# What one connection may make the hub hold for a client that reads slowly:
# queued messages (events are at most 64 KiB; past this, 1013 as when the
# queue is full) and pulls being answered (each answer up to 1 MiB).
MAX_QUEUED_BYTES = 4 * 1024 * 1024
MAX_PULLS_IN_FLIGHT = 4


class Session:
    """A connection's state; also the coordinator's :class:`~hub.coordinator.Receiver`."""

    def __init__(self, hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
        self.hub = hub
        self.headers = Headers(scope=scope)
        self.query = QueryParams(scope.get("query_string", b""))
        self._receive = receive
        self._send = send
        self._sending = False  # a send is under way (suspended on a busy socket)
        owner = getattr(send, "__self__", None)
        self._frames = owner if isinstance(owner, HeartbeatProtocol) else None
        self.id = "c-" + secrets.token_hex(8)
        self.user = ""
        self.device = ""
        self.notify_only = False
        self.principal: Principal | None = None
        self._queue: deque[str] = deque()
        self._queued_bytes = 0  # of the texts in _queue (characters, about bytes)
        # Events that came before the welcome went out (the user's channel is
        # subscribed first, so none is missed); None once welcomed.
        self._early: list[str] | None = []
        self._closing: tuple[int, str] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._in_flight = 0
        self._pulls = 0  # pull answers being made
        settings = hub.settings
        self._messages = TokenBucket(
            settings.rate_messages_per_s, settings.rate_burst_s, time.monotonic()
        )
        self._strikes = 0  # messages refused in a row; past MAX_STRIKES: close 4008

    # -- the coordinator's side ------------------------------------------------

    def deliver(self, text: str, frame: bytes | None = None) -> None:
        """Send at once when the socket takes it, else queue (bounded) for the writer.

        ``frame`` is ``text`` as a pre-built WebSocket frame (an event's, built
        once for all its receivers); written straight to the socket when the
        server supports it and nothing is queued before it.
        """
        if self._closing is not None:
            return
        if self._early is not None:
            if len(self._early) >= self.hub.settings.send_queue_size:
                self.close_soon(WS_1013_TOO_SLOW, "too slow; reconnect and pull")
            else:
                self._early.append(text)
            return
        if not self._sending and not self._queue and self._frames is not None:
            if self._frames.write_frame(frame or text_frame(text.encode())):
                return
        if self._sending or self._queue:
            if (
                len(self._queue) >= self.hub.settings.send_queue_size
                or self._queued_bytes + len(text) > MAX_QUEUED_BYTES
            ):
                self.hub.metrics.slow_closes.inc()
                log.info("closing a slow connection", extra={"connection": self.id})
                self.close_soon(WS_1013_TOO_SLOW, "too slow; reconnect and pull")
                return
            self._queue.append(text)
            self._queued_bytes += len(text)
            return
        self._send_eagerly(text)

    def _send_eagerly(self, text: str) -> None:
        """Run the ASGI send until it first suspends, without a task switch.

        uvicorn's send only suspends while the socket is not writable; in the
        common case it writes and returns at once. Only when it suspends is a
        writer task made, which finishes that send and drains the queue. (What
        Python 3.12's eager tasks do, by hand.)
        """
        coro: Any = self._send({"type": "websocket.send", "text": text})
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except Exception:  # the client is gone; the reader sees the disconnect
            return
        self._sending = True
        self._writer = asyncio.get_running_loop().create_task(self._finish(coro, waiting))

    async def _finish(self, coro: Any, waiting: Any) -> None:
        try:
            await _resume(coro, waiting)
            while self._queue and self._closing is None:
                text = self._queue.popleft()
                self._queued_bytes -= len(text)
                await self._send({"type": "websocket.send", "text": text})
        except Exception:
            return  # the client is gone; the reader sees the disconnect
        finally:
            self._sending = False

    def close_soon(self, code: int, reason: str) -> None:
        """Close with ``code``; queued messages are dropped."""
        if self._closing is not None:
            return
        self._closing = (code, reason)
        self._queue.clear()
        self._queued_bytes = 0
        if self.user:
            self.hub.coordinators.detach(self)  # no more events for a closing connection
        # A writer stuck sending to a client that does not read would never get
        # to the close: cancel it, and send the close on its own.
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        asyncio.get_running_loop().create_task(self._send_close())

    async def _send_close(self) -> None:
        assert self._closing is not None
        code, reason = self._closing
        try:
            await asyncio.wait_for(
                self._send({"type": "websocket.close", "code": code, "reason": reason}),
                CLOSE_SEND_S,
            )
        except TimeoutError:
            if self._frames is not None:
                self._frames.abort()
        except Exception:  # the client is gone already
            pass

    # -- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        hub = self.hub
        logs.connection_id.set(self.id)
        connect = await self._receive()
        if connect["type"] != "websocket.connect":
            return
        origin = self.headers.get("origin")
        if origin is not None and origin not in hub.settings.allowed_origins:
            log.info("refused an upgrade from a foreign origin", extra={"origin": origin[:200]})
            await self._send({"type": "websocket.close"})  # before accept: HTTP 403
            return
        await self._send({"type": "websocket.accept"})
        try:
            auth = await self._authenticate()
        except Unavailable as exc:  # the credential could not be checked: retry, not give up
            await self._close_now(WS_1013_TOO_SLOW, exc.message[:120])
            return
        except HubError as exc:
            hub.count_auth_failure(exc.code)
            code = WS_4003_FORBIDDEN if isinstance(exc, Forbidden) else WS_4001_UNAUTHENTICATED
            await self._close_now(code, exc.message[:120])
            return
        except (TimeoutError, Disconnected):
            if not self._closing:
                await self._close_now(WS_4001_UNAUTHENTICATED, "no auth message in time")
            return
        principal, device, mode, name, platform = auth
        self.principal, self.user, self.device = principal, principal.user, device
        self.notify_only = mode == "notify"
        try:
            registered = await hub.store.register_device(self.user, device, name, platform)
        except Unavailable:
            await self._close_now(WS_1013_TOO_SLOW, "the database is unavailable; retry")
            return
        except Exception:
            log.exception("could not register a device")
            await self._close_now(WS_1011_INTERNAL_ERROR, "internal error")
            return
        if not registered:
            await self._close_now(WS_4003_FORBIDDEN, "this device was revoked")
            return
        member = f"{device}\t{self.id}"
        limit = hub.settings.max_connections_per_user
        if not await hub.presence.acquire(self.user, member, limit):
            await self._close_now(WS_4009_TOO_MANY_CONNECTIONS, "too many connections")
            return
        ready = hub.coordinators.attach(self)
        if ready is None:
            hub.presence.release(self.user, member)
            await self._close_now(WS_4009_TOO_MANY_CONNECTIONS, "too many connections")
            return
        try:
            if not ready.done():  # not cancelled by the wait, nor raising if it was
                await asyncio.wait([ready], timeout=SUBSCRIBE_WAIT_S)
            if not ready.done():
                # Welcomed before the subscription is live: what is published
                # until it is may not arrive, so once it is, a pull is due.
                ready.add_done_callback(functools.partial(_gap_once_live, hub, self.user))
            # Read now that revocations find this connection: one committed
            # since the checks above passed it by.
            version, revoked = await hub.store.admission(self.user, device, principal.key_id)
            if revoked is not None:
                await self._close_now(WS_4003_FORBIDDEN, f"this {revoked} was revoked")
                return
            self._schedule_expiry()
            welcome = {
                "type": "welcome",
                "user": self.user,
                "device": self.device,
                "connection": self.id,
                "version": version,
                "heartbeat_s": _seconds(hub.settings.heartbeat_s),
            }
            early, self._early = self._early, None
            self.deliver(orjson.dumps(welcome).decode())
            for text in early or ():
                self.deliver(text)
            await self._read_loop()
        except Unavailable:
            self.close_soon(WS_1013_TOO_SLOW, "the database is unavailable; retry")
        except Exception:
            log.exception("connection failed", extra={"connection": self.id})
            self.close_soon(WS_1011_INTERNAL_ERROR, "internal error")
        finally:
            if self._frames is not None:
                self._frames.on_message = None
            hub.coordinators.detach(self)
            hub.presence.release(self.user, member)
            for timer in self._timers:
                timer.cancel()
            if self._writer is not None:
                self._writer.cancel()

    async def _close_now(self, code: int, reason: str) -> None:
        self._closing = (code, reason)
        await self._send_close()

    async def _authenticate(self) -> tuple[Principal, str, str, str | None, str | None]:
        hub = self.hub
        params = self.query
        name = platform = None
        if "authorization" in self.headers:
            principal = await hub.authenticator.authenticate(bearer_token(self.headers))
            device = params.get("device")
            mode = params.get("mode", "events")
            if mode not in protocol.MODES:
                raise BadRequest("'mode' must be 'events' or 'notify'")
        else:
            message = await asyncio.wait_for(self._receive(), hub.settings.auth_timeout_s)
            if message["type"] == "websocket.disconnect":
                raise Disconnected()
            auth = protocol.parse_auth(protocol.loads(_payload(message)))
            principal = await hub.authenticator.authenticate(auth.token)
            device, mode = auth.device or params.get("device"), auth.mode
            name, platform = auth.device_name, auth.platform
        if not protocol.valid_device(device):
            raise Unauthorized("a device id is required: 1..64 characters of [A-Za-z0-9_.:-]")
        assert device is not None
        _check_can_listen(principal)
        return principal, device, mode, name, platform

    def _schedule_expiry(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        assert self.principal is not None
        expires_at = self.principal.expires_at
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        left = expires_at - time.time()
        self._timers.append(
            loop.call_later(max(0.0, left - EXPIRY_WARNING_S), self._warn_expiry, expires_at)
        )
        self._timers.append(
            loop.call_later(max(0.0, left), self.close_soon, WS_4010_TOKEN_EXPIRED, "token expired")
        )

    def _warn_expiry(self, expires_at: float) -> None:
        left = max(0, int(expires_at - time.time()))
        self.deliver(orjson.dumps({"type": "auth_expiring", "expires_in_s": left}).decode())

    # -- reading -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            frames = self._frames
            if frames is not None and frames.queue.empty():
                # Nothing left in the ASGI queue: from now on messages come
                # straight from the protocol, in order, and the queue brings
                # only the disconnect.
                frames.on_message = self._on_message
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                return
            self._handle(_payload(message))

    def _on_message(self, raw: str | bytes) -> None:
        """A message handed over by the protocol: as :meth:`_read_loop` would
        handle it, and a failure ends this connection, not the protocol's reading."""
        try:
            self._handle(raw)
        except Exception:
            log.exception("connection failed", extra={"connection": self.id})
            self.close_soon(WS_1011_INTERNAL_ERROR, "internal error")

    def _handle(self, raw: str | bytes) -> None:
        mid: str | None = None
        try:
            try:
                message = protocol.loads(raw, exact=True)
                if not isinstance(message, dict):
                    raise BadRequest("a message must be a JSON object")
            except BadRequest:
                if self._over_rate():  # what is not a message counts as one
                    return
                raise
            if isinstance(message.get("id"), str):
                mid = message["id"][: protocol.MAX_MESSAGE_ID_CHARS]
            if self._over_rate():
                return
            kind = message.get("type")
            if kind == "push":
                self._push(message)
            elif kind == "pull":
                mid = protocol.message_id(message, required=False)
                if self._pulls >= MAX_PULLS_IN_FLIGHT:
                    raise RateLimited(
                        f"{MAX_PULLS_IN_FLIGHT} pulls are being answered; wait for them", 0.1
                    )
                self._pulls += 1
                asyncio.get_running_loop().create_task(self._pull(message, mid))
            elif kind == "ping":
                self.deliver('{"type":"pong"}')
            elif kind == "auth":
                asyncio.get_running_loop().create_task(self._refresh(message, mid))
            else:
                raise BadRequest(f"unknown message type {str(kind)[:40]!r}")
        except HubError as exc:
            self.deliver(protocol.error_of(exc, mid))

    def _over_rate(self) -> bool:
        """Take a message from the connection's rate: RateLimited when over it,
        and True when over it MAX_STRIKES times in a row (closed with 4008)."""
        wait = self._messages.take(time.monotonic())
        if not wait:
            self._strikes = 0
            return False
        self._strikes += 1
        if self._strikes > MAX_STRIKES:
            self.close_soon(WS_4008_RATE_LIMITED, "rate limited")
            return True
        wait = retry_delay(wait)
        raise RateLimited(f"too many messages; retry in {wait:.2f}s", wait)

    def _push(self, message: dict[str, Any]) -> None:
        assert self.principal is not None
        mid = protocol.message_id(message, required=True)
        assert mid is not None
        try:
            changes = self._admit_push(message)
        except HubError as exc:
            self.hub.count_refused_push(exc.code)
            raise
        push = Push(
            self.user,
            self.device,
            changes,
            mid,
            "ws:" + self.device,
            protocol.push_digest(message["changes"]),
        )
        self._in_flight += 1
        future = self.hub.coordinators.push(push, origin=self.id)
        future.add_done_callback(lambda f: self._acked(mid, f))

    def _admit_push(self, message: dict[str, Any]) -> tuple[Change, ...]:
        """A push's changes, once it may be pushed: the checks before a commit."""
        assert self.principal is not None
        if not self.principal.can("write"):
            raise Forbidden("this credential cannot push")
        if self._in_flight >= MAX_PUSHES_IN_FLIGHT:
            raise RateLimited("too many pushes in flight on this connection; wait for acks", 1.0)
        self.hub.check_rate(self.hub.push_limits, self.user, "pushes")
        if "changes" not in message:
            raise BadRequest("'changes' is required")
        return protocol.parse_changes(
            message["changes"], self.hub.settings.limits, time.time_ns() // 1_000_000
        )

    def _acked(self, mid: str, future: asyncio.Future[PushResult]) -> None:
        self._in_flight -= 1
        if future.cancelled():
            return
        error = future.exception()
        if isinstance(error, HubError):
            self.deliver(protocol.error_of(error, mid))
            return
        if error is not None:
            self.deliver(protocol.error_message("internal", "internal error", mid))
            return
        r = future.result()
        self.deliver(protocol.ack_message(mid, r.version, r.applied, r.ignored, r.replay))

    async def _pull(self, message: dict[str, Any], mid: str | None) -> None:
        try:
            await self._answer_pull(message, mid)
        finally:
            self._pulls -= 1

    async def _answer_pull(self, message: dict[str, Any], mid: str | None) -> None:
        try:
            query = protocol.parse_pull_query(message, self.hub.settings.limits)
            while True:
                try:
                    page = await self.hub.store.pull(self.user, query, MAX_PULL_ANSWER_BYTES)
                except ResetRequired:
                    self.hub.metrics.pulls.labels("reset_required").inc()
                    raise
                body = {"type": "changes", **protocol.pull_body(page)}
                if mid is not None:
                    body["id"] = mid
                text = orjson.dumps(body)
                if len(text) <= MAX_PULL_ANSWER_BYTES or query.limit == 1:
                    break
                # Too big for one message: ask for fewer deltas (has_more says the rest).
                query = protocol.PullQuery(query.cursor, max(1, query.limit // 2), query.collection)
            self.hub.metrics.pulls.labels("ok").inc()
            self.deliver(text.decode())
        except HubError as exc:
            self.deliver(protocol.error_of(exc, mid))
        except Exception:  # a bug: the device is told, and can pull over HTTP or again
            log.exception("pull failed", extra={"connection": self.id})
            self.deliver(protocol.error_message("internal", "internal error", mid))

    async def _refresh(self, message: dict[str, Any], mid: str | None) -> None:
        """Swap in a fresh token of the same user before the old one expires."""
        authenticator = self.hub.authenticator
        forgets = authenticator.forgets
        try:
            auth = protocol.parse_auth(message)
            principal = await self.hub.authenticator.authenticate(auth.token)
            if principal.user != self.user:
                raise Forbidden("a token of another user cannot be used on this connection")
            _check_can_listen(principal)  # refused: the connection keeps its credential
        except HubError as exc:
            self.deliver(protocol.error_of(exc, mid))
            return
        except Exception:  # a bug: the old token stays, and the device is told
            log.exception("token refresh failed", extra={"connection": self.id})
            self.deliver(protocol.error_message("internal", "internal error", mid))
            return
        while principal.key_id is not None:
            # A revocation broadcast until the key is in place looks for
            # connections holding it, and this one does not hold it yet: read
            # the key again, until no revocation came during the read (one
            # that comes after it finds the key in place).
            try:
                _, revoked = await self.hub.store.admission(self.user, "", principal.key_id)
            except Unavailable as exc:
                self.deliver(protocol.error_of(exc, mid))
                return
            if revoked is not None:
                self.deliver(protocol.error_of(Unauthorized("this API key was revoked"), mid))
                return
            if authenticator.forgets == forgets:
                break
            forgets = authenticator.forgets
        if self._closing is not None:
            return
        self.principal = principal
        self._schedule_expiry()
        self.deliver(orjson.dumps({"type": "auth_ok", "expires_at": principal.expires_at}).decode())


def _payload(message: Any) -> str | bytes:
    text = message.get("text")
    if text is not None:
        return str(text)
    data = message.get("bytes")
    return bytes(data) if data is not None else b""


async def _resume(coro: Any, waiting: Any) -> None:
    """Drive a coroutine that suspended on ``waiting`` (a future, or None for a
    bare yield) to its end, as a task would have."""
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                # As a task does with a future yielded to it: take over the wait.
                waiting._asyncio_future_blocking = False
                await waiting
        except BaseException as exc:  # cancelled: let the coroutine clean up
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting = coro.send(None)
        except StopIteration:
            return


def _seconds(value: float) -> int | float:
    """A duration as the protocol writes it: a whole number of seconds as an
    integer (``30``, not ``30.0``, which a typed client may refuse)."""
    return int(value) if value.is_integer() else value


def _check_can_listen(principal: Principal) -> None:
    """What a credential needs to hold a connection, at connect and at every refresh."""
    if principal.expires_at is not None and principal.expires_at <= time.time():
        # Within the validation leeway, but a connection needs a live token.
        raise TokenExpired("the token has expired")
    if not principal.can("read"):
        raise Forbidden("this credential cannot receive events")


def _gap_once_live(hub: Hub, user: str, ready: asyncio.Future[None]) -> None:
    if not ready.cancelled():  # (cancelled: the user left this process meanwhile)
        hub.gap([user])


class Disconnected(Exception):
    """The client went away before it authenticated."""


async def websocket_endpoint(hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /v1/ws``, as a bare ASGI handler: the hot path skips the framework."""
    await Session(hub, scope, receive, send).run()
