"""The application: the one place that builds adapters and wires the parts.

:func:`create_app` gives the Starlette app. Its lifespan opens the store,
starts the broker (Redis when ``HUB_REDIS_URL`` is set, else in-process) and
the committer; on shutdown, :meth:`Hub.drain` closes WebSockets in batches
with 1012 and lets in-flight pushes commit, then the lifespan closes the
committer, the broker and the database pool, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from . import http, logs
from .auth import Authenticator, JwtVerifier
from .broker import Broker
from .broker_memory import MemoryBroker
from .broker_redis import RedisBroker
from .committer import Committer
from .config import Settings
from .coordinator import Coordinators
from .errors import BadRequest, RateLimited, Unavailable
from .metrics import Metrics
from .presence import MemoryPresence, Presence
from .presence_redis import RedisPresence
from .protocol import WS_1012_RESTARTING, WS_4003_FORBIDDEN
from .ratelimit import Buckets
from .server import drain_connections, retry_hint
from .session import websocket_endpoint
from .store_postgres import PostgresStore
from .types import Push, PushResult

__all__ = ["Hub", "create_app"]

log = logging.getLogger("hub.app")

HEALTH_CACHE_S = 1.0
HEALTH_PROBE_TIMEOUT_S = 1.0
SAMPLE_S = 1.0
# Telling devices of a gap in their events while the database does not answer:
# tried again after this long, doubled each time up to the most.
GAP_RETRY_S = 0.25
GAP_RETRY_MAX_S = 15.0
GC_YOUNG_THRESHOLD = 10_000
KEYS_USED_FLUSH_S = 30.0
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CORS_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "X-Idempotency-Key",
    "X-Request-Id",
]
CORS_RESPONSE_HEADERS = ["Idempotent-Replay", "Retry-After", "X-Request-Id"]
#: The broker channel of control messages (revocations) every process hears.
#: Not a user: user ids cannot hold U+0000.
CONTROL = "\x00control"

try:
    HUB_VERSION = package_version("hub")
except PackageNotFoundError:  # running from a source tree that is not installed
    HUB_VERSION = "0.0.0"


class Hub:
    """The runtime of one hub process."""

    def __init__(
        self,
        settings: Settings,
        store: PostgresStore,
        broker: Broker,
        authenticator: Authenticator,
        presence: Presence | None = None,
        *,
        keys_enabled: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.authenticator = authenticator
        self.presence: Presence = presence or MemoryPresence()
        self.development_secret: str | None = None  # set only in development mode
        self.draining = False  # a graceful shutdown has begun
        self.keys_enabled = keys_enabled
        self.push_limits = Buckets(settings.rate_pushes_per_s, settings.rate_burst_s)
        self.request_limits = Buckets(settings.rate_requests_per_s, settings.rate_burst_s)
        self.metrics = Metrics()
        self.committer = Committer(
            store, max_batch_pushes=settings.max_batch_pushes, metrics=self.metrics
        )
        self.coordinators = Coordinators(
            self.committer,
            broker,
            max_event_bytes=settings.max_event_bytes,
            max_connections_per_user=settings.max_connections_per_user,
            metrics=self.metrics,
        )
        self.started = time.monotonic()
        self.loop_lag_s = 0.0
        self._health: tuple[float, dict[str, Any]] | None = None
        self._health_lock = asyncio.Lock()
        self._sampler: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._rechecker: asyncio.Task[None] | None = None
        self._gap_users: set[str] = set()  # users whose devices here are to be told of a gap
        self._unsure_users: set[str] = set()  # ... and whose devices elsewhere are
        self._gap_task: asyncio.Task[None] | None = None

    async def push(self, push: Push) -> PushResult:
        """A push from HTTP: through the user's coordinator, like a WebSocket push."""
        return await asyncio.shield(self.coordinators.push(push))

    def count_auth_failure(self, code: str) -> None:
        self.metrics.auth_failures.labels(code).inc()

    def count_refused_push(self, code: str) -> None:
        """A push refused before its commit (its form, a limit, its rate)."""
        self.metrics.pushes.labels(code).inc()

    def start(self) -> None:
        self.committer.start()
        self.broker.on_gap = self.gap
        self.broker.on_unsure = self.unsure
        self.broker.subscribe(CONTROL, self._control)
        self._sampler = asyncio.get_running_loop().create_task(self._sample())
        self._retention = asyncio.get_running_loop().create_task(self._purge_periodically())
        if self.broker.spans_processes:
            self._rechecker = asyncio.get_running_loop().create_task(self._recheck_after_gaps())

    async def stop(self) -> None:
        """Stop background work and let the committer finish, within an eighth of
        the shutdown bound (the drain had half of it already)."""
        for task in (self._sampler, self._retention, self._rechecker, self._gap_task):
            if task is not None:
                task.cancel()
        closing = asyncio.ensure_future(self.committer.close())
        await asyncio.wait([closing], timeout=self.settings.shutdown_timeout_s / 8)
        if not closing.done():
            log.warning("the database did not finish the last commit in time")
            self.committer.abandon()

    # -- gaps in the events -----------------------------------------------------------

    def gap(self, users: list[str]) -> None:
        """Events of these users may have been lost on their way here (the
        broker was down, or subscribed late): tell their devices to pull.
        Users told of at once share one query; one runs at a time."""
        self._gap_users.update(u for u in users if u != CONTROL)
        self._tell_of_gaps_soon()

    def unsure(self, users: list[str]) -> None:
        """Events of these users published here may not have reached the
        other processes: tell their devices there to pull."""
        self._unsure_users.update(u for u in users if u != CONTROL)
        self._tell_of_gaps_soon()

    def _tell_of_gaps_soon(self) -> None:
        if self._gap_task is None or self._gap_task.done():
            self._gap_task = asyncio.get_running_loop().create_task(self._tell_of_gaps())

    async def _tell_of_gaps(self) -> None:
        failures = 0
        while self._gap_users or self._unsure_users:
            await asyncio.sleep(0)  # the users of this loop turn, together
            local = {u for u in self._gap_users if self.coordinators.of_user(u)}
            elsewhere = self._unsure_users
            self._gap_users, self._unsure_users = set(), set()
            if not local and not elsewhere:
                continue
            try:
                versions = await self.store.versions(sorted(local | elsewhere))
            except Unavailable:  # the database is down too: again, once it answers
                log.warning("could not tell devices of a gap in events: the database is down")
                self._gap_users |= local
                self._unsure_users |= elsewhere
                failures = min(failures + 1, 16)
                await asyncio.sleep(min(GAP_RETRY_MAX_S, GAP_RETRY_S * 2**failures))
                continue
            except Exception:  # not to be had by asking again: these users are let go
                log.exception("could not tell devices of a gap in events")
                continue
            failures = 0
            for user, version in versions.items():  # (a user with no history missed nothing)
                if version and user in local:
                    self.coordinators.notify(user, version)
                if version and user in elsewhere:
                    self.coordinators.announce(user, version)

    # -- revocations ----------------------------------------------------------------

    def revoked(self, kind: str, user: str, value: str) -> None:
        """A device or API key was revoked: act here and tell every other process."""
        self._apply_revocation(kind, user, value)
        if self.broker.spans_processes:
            self.broker.publish(CONTROL, orjson.dumps({"kind": kind, "user": user, "value": value}))

    def _control(self, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
            self._apply_revocation(message["kind"], message["user"], message["value"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("dropped a malformed control message")

    def _apply_revocation(self, kind: str, user: str, value: str) -> None:
        if kind == "key":
            self.authenticator.forget_key(value)
        for conn in self.coordinators.of_user(user):
            if (kind == "device" and conn.device == value) or (
                kind == "key" and _key_id(conn) == value
            ):
                conn.close_soon(WS_4003_FORBIDDEN, f"{kind} revoked")

    async def _recheck_after_gaps(self) -> None:
        """After every gap in the control channel (the first subscription, a
        reconnect of the broker), look up this process's connections: a
        revocation published meanwhile was not heard here. And every
        ``revocation_recheck_s`` anyway: a revocation published into a link
        that had gone silent (the revoking process's) was heard nowhere."""
        loop = asyncio.get_running_loop()
        seen: int | None = None
        checked = loop.time()
        while True:
            try:
                await self.broker.live(CONTROL)
                gaps = getattr(self.broker, "reconnects", 0)
                if gaps != seen or loop.time() - checked >= self.settings.revocation_recheck_s:
                    await self._recheck_connections()
                    seen, checked = gaps, loop.time()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down: try again at the next turn
                log.warning("could not recheck revocations: %s", type(exc).__name__)
            await asyncio.sleep(SAMPLE_S)

    async def _recheck_connections(self) -> None:
        conns = list(self.coordinators.connections())
        if not conns:
            return
        devices = sorted({(c.user, c.device) for c in conns})
        keys = sorted({k for c in conns if (k := _key_id(c)) is not None})
        revoked = await self.store.revoked_among(devices, keys)
        for kind, user, value in revoked:
            log.info("closing connections of a revocation heard late", extra={"kind": kind})
            self._apply_revocation(kind, user, value)

    def check_rate(self, buckets: Buckets, user: str, what: str) -> None:
        wait = buckets.take(user, time.monotonic())
        if wait:
            raise RateLimited(f"too many {what}; slow down", wait)

    async def _purge_periodically(self) -> None:
        """The retention job: every process runs it, one at a time gets the lock.
        The first run comes at a random point of the interval, to spread processes."""
        interval = self.settings.retention_interval_s
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                report = await self.store.purge(retention_s=self.settings.tombstone_retention)
                if not report.get("skipped"):
                    log.info("retention purge", extra=report)
            except Exception:  # the job retries next interval; serving goes on
                log.exception("retention purge failed")
            await asyncio.sleep(interval)

    async def _sample(self) -> None:
        """Once a second: how late the loop ran this timer, and the gauges of state."""
        loop = asyncio.get_running_loop()
        reconnects = dropped = 0
        flushed = loop.time()
        while True:
            before = loop.time()
            await asyncio.sleep(SAMPLE_S)
            self.loop_lag_s = max(0.0, loop.time() - before - SAMPLE_S)
            m = self.metrics
            m.loop_lag.set(self.loop_lag_s)
            m.connections.set(self.coordinators.connection_count)
            m.users_online.set(len(self.coordinators.users))
            pool = self.store.pool
            m.db_pool_in_use.set(pool.get_size() - pool.get_idle_size())
            now_reconnects = getattr(self.broker, "reconnects", 0)
            now_dropped = getattr(self.broker, "dropped", 0)
            m.broker_reconnects.inc(max(0, now_reconnects - reconnects))
            m.broker_dropped.inc(max(0, now_dropped - dropped))
            reconnects, dropped = now_reconnects, now_dropped
            if self.authenticator.keys_used and loop.time() - flushed > KEYS_USED_FLUSH_S:
                used, self.authenticator.keys_used = self.authenticator.keys_used, {}
                flushed = loop.time()
                try:
                    await self.store.keys_used(used)
                except Exception:  # last_used_at is best effort
                    log.warning("could not record API key use")

    async def drain(self) -> None:
        """Graceful shutdown, the hub's part: close WebSockets in batches with
        1012 and a jittered retry hint; let queued pushes commit (bounded)."""
        self.draining = True
        connections = list(self.coordinators.connections())
        log.info("draining", extra={"connections": len(connections)})
        await drain_connections(
            connections, lambda conn: conn.close_soon(WS_1012_RESTARTING, retry_hint())
        )
        deadline = time.monotonic() + self.settings.shutdown_timeout_s / 2
        while self.committer.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.committer.pending():  # the database is stuck: answer, so clients retry elsewhere
            log.warning("pushes not committed in time", extra={"pushes": self.committer.pending()})
            self.committer.abandon()

    async def health(self) -> dict[str, Any]:
        """The /health report, computed at most about once a second."""
        async with self._health_lock:
            now = time.monotonic()
            if self._health is None or now - self._health[0] > HEALTH_CACHE_S:
                self._health = (time.monotonic(), await self._check())
            return self._health[1]

    async def _check(self) -> dict[str, Any]:
        start = time.perf_counter()
        postgres: dict[str, Any]
        # Not wait_for: past the timeout it awaits the probe's cancellation, and
        # on a hung database the driver's cancel request hangs as well. The
        # probe is left to end on its own; its outcome is read when it does.
        probe = asyncio.ensure_future(self.store.ping())
        probe.add_done_callback(_read_outcome)
        try:
            await asyncio.wait([probe], timeout=self.settings.db_timeout_s)
        finally:
            probe.cancel()  # a no-op once it ended
        if not probe.done():
            postgres = {"ok": False, "error": "TimeoutError"}
        elif (exc := probe.exception()) is not None:  # any failure of the probe is the finding
            postgres = {"ok": False, "error": type(exc).__name__}
        else:
            postgres = {"ok": True, "latency_ms": round((time.perf_counter() - start) * 1e3, 2)}
        broker = await self.broker.probe(HEALTH_PROBE_TIMEOUT_S)
        if not postgres["ok"]:
            status = "down"
        elif not broker["ok"]:
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "checks": {"postgres": postgres, "broker": broker},
            "connections": self.coordinators.connection_count,
            "users_online": len(self.coordinators.users),
            "event_loop_lag_ms": round(self.loop_lag_s * 1e3, 2),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "version": HUB_VERSION,
        }


def _read_outcome(probe: asyncio.Future[None]) -> None:
    # Mark a probe's failure read: one abandoned by /health is no unhandled error.
    if not probe.cancelled():
        probe.exception()


class ErrorBodyCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the error body of
    PROTOCOL.md (it answers 400 with plain text)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refusal = bytes(response.body).decode(errors="replace")  # "Disallowed CORS origin"
        body = BadRequest(f"{refusal}: not in this hub's CORS settings").body()
        kept = {
            k: v for k, v in response.headers.items() if k.startswith(("access-control-", "vary"))
        }
        return Response(orjson.dumps(body), 400, kept, media_type="application/json")


def create_app(
    settings: Settings,
    *,
    database_url: str,
    jwt_secret: str | None,
    api_key_pepper: str | None = None,
    on_ready: Callable[[], None] | None = None,
    development: bool | None = None,
) -> HubApp:
    """The hub as an ASGI app. The caller resolves ``database_url``, the JWT
    secret (None: JWKS) and the API key pepper (None: API keys disabled)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = await PostgresStore.connect(
            database_url,
            max_size=settings.db_pool_size,
            timeout=settings.db_timeout_s,
            event_bytes=settings.max_event_bytes,
        )
        broker: Broker = (
            RedisBroker(settings.redis_url, check_s=settings.broker_check_s)
            if settings.redis_url
            else MemoryBroker()
        )
        presence: Presence = (
            RedisPresence(settings.redis_url) if settings.redis_url else MemoryPresence()
        )
        await broker.start()
        await presence.start()
        verifier = JwtVerifier(
            secret=jwt_secret,
            jwks_url=None if jwt_secret else settings.jwks_url,
            algorithms=settings.jwt_algorithms or (),
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            jwks_min_refresh_s=settings.jwks_min_refresh_s,
        )
        authenticator = Authenticator(
            verifier, pepper=api_key_pepper or "", find_key=store.find_api_key
        )
        hub = Hub(
            settings, store, broker, authenticator, presence, keys_enabled=bool(api_key_pepper)
        )
        # (Workers of `hub serve --workers N` get the development secret as their
        # HUB_JWT_SECRET, and are told that it is one.)
        if settings.development_secret if development is None else development:
            hub.development_secret = jwt_secret
        hub.start()
        app.state.hub = hub
        # What start-up made lives as long as the process: keep it out of the
        # cyclic collector's sight, so full collections under load stay short
        # (measured: 64 HTTP clients went from 3,200 to 4,600 pushes/s). And
        # collect the young generation every 10,000 allocations, not 700: the
        # hub makes many short-lived objects and few cycles (fan-out: 19,100
        # to 21,500 deliveries per server CPU-second, p99 unchanged).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD)
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await hub.stop()  # in-flight pushes commit before the pool closes
            # A commit given up on may still end while the pool closes: the
            # broker stays open until then, so its event goes out.
            await store.close(timeout=settings.shutdown_timeout_s / 8)
            await presence.close()
            await broker.close()
            log.info("shutdown complete")

    routes = [
        Route("/v1/sync/push", http.push, methods=["POST"]),
        Route("/v1/sync/pull", http.pull, methods=["GET"]),
        Route("/v1/sync/status", http.status, methods=["GET"]),
        Route("/health", http.health, methods=["GET"]),
        Route("/health/live", http.live, methods=["GET"]),
        Route("/metrics", http.metrics, methods=["GET"]),
        Route("/v1/devices", http.list_devices, methods=["GET"]),
        Route("/v1/devices/{device}", http.revoke_device, methods=["DELETE"]),
        Route("/v1/api-keys", http.list_keys, methods=["GET"]),
        Route("/v1/api-keys", http.create_key, methods=["POST"]),
        Route("/v1/api-keys/{key_id}", http.revoke_key, methods=["DELETE"]),
        Route("/dev/token", http.development_token, methods=["GET"]),
        Mount("/client", StaticFiles(directory=http.STATIC, html=False), name="client"),
        Route("/", http.demo, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http.http_exception},
        middleware=[
            Middleware(
                ErrorBodyCORSMiddleware,
                allow_origins=list(settings.allowed_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=CORS_REQUEST_HEADERS,
                expose_headers=CORS_RESPONSE_HEADERS,
                max_age=600,
            )
        ],
    )
    return HubApp(app)


class HubApp:
    """The ASGI entry: ``/v1/ws`` goes straight to the session (the hot path
    needs no routing or middleware per message); everything else to Starlette."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/v1/ws":
            await websocket_endpoint(self.state.hub, scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every HTTP request gets an id (the client's X-Request-Id when sane),
        in its log lines and in the response's X-Request-Id header."""
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if REQUEST_ID_RE.fullmatch(given) else secrets.token_hex(8)
        logs.request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _key_id(conn: Any) -> str | None:
    """The API key a connection holds, if it holds one."""
    principal = getattr(conn, "principal", None)
    return None if principal is None else principal.key_id
