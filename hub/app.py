"""The application: the one place that builds adapters and wires the parts.

:func:`create_app` gives the Starlette app; its lifespan opens the store,
starts the committer, and on shutdown lets in-flight pushes finish before
closing the database pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from . import http
from .auth import Authenticator
from .committer import Committer
from .config import Settings
from .store_postgres import PostgresStore
from .types import Push, PushResult

__all__ = ["Hub", "create_app"]

log = logging.getLogger("hub.app")

HEALTH_CACHE_S = 1.0

try:
    HUB_VERSION = package_version("hub")
except PackageNotFoundError:  # running from a source tree that is not installed
    HUB_VERSION = "0.0.0"


class Hub:
    """The runtime of one hub process: store, committer, authenticator."""

    def __init__(self, settings: Settings, store: PostgresStore, authenticator: Authenticator):
        self.settings = settings
        self.store = store
        self.authenticator = authenticator
        self.committer = Committer(store, max_batch_pushes=settings.max_batch_pushes)
        self.started = time.monotonic()
        self._health: tuple[float, dict[str, Any]] | None = None
        self._health_lock = asyncio.Lock()

    async def push(self, push: Push) -> PushResult:
        return await self.committer.submit(push)

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
        try:
            await asyncio.wait_for(self.store.ping(), self.settings.db_timeout_s)
            postgres = {"ok": True, "latency_ms": round((time.perf_counter() - start) * 1e3, 2)}
        except Exception as exc:  # any failure of the probe is the finding
            postgres = {"ok": False, "error": type(exc).__name__}
        return {
            "status": "ok" if postgres["ok"] else "down",
            "checks": {"postgres": postgres, "broker": {"ok": True, "kind": "memory"}},
            "connections": 0,
            "users_online": 0,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "version": HUB_VERSION,
        }


def create_app(
    settings: Settings,
    *,
    database_url: str,
    jwt_secret: str,
    on_ready: Callable[[], None] | None = None,
) -> Starlette:
    """The hub as an ASGI app; ``database_url`` and ``jwt_secret`` are resolved by the caller."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = await PostgresStore.connect(
            database_url, max_size=settings.db_pool_size, timeout=settings.db_timeout_s
        )
        authenticator = Authenticator(
            jwt_secret, audience=settings.jwt_audience, issuer=settings.jwt_issuer
        )
        hub = Hub(settings, store, authenticator)
        hub.committer.start()
        app.state.hub = hub
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            # In-flight pushes finish before the pool closes.
            await hub.committer.close()
            await store.close()

    routes = [
        Route("/v1/sync/push", http.push, methods=["POST"]),
        Route("/v1/sync/pull", http.pull, methods=["GET"]),
        Route("/v1/sync/status", http.status, methods=["GET"]),
        Route("/health", http.health, methods=["GET"]),
        Route("/health/live", http.live, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http.http_exception},
    )
