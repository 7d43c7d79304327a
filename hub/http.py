"""HTTP endpoints of PROTOCOL.md: push, pull, status, health.

Every handler runs inside :func:`endpoint`, the one place where errors become
responses: a :class:`~hub.errors.HubError` becomes its status and PROTOCOL.md's
error body (with ``Retry-After`` where the code calls for it), a client that
hung up mid-request is logged at info and answered with nothing, and
anything else is a logged 500 ``internal``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response

from . import protocol
from .auth import bearer_token, check_scopes, is_key_id, make_api_key, make_token
from .errors import (
    BadRequest,
    Forbidden,
    HubError,
    Internal,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ResetRequired,
    Unauthorized,
    Unavailable,
)
from .metrics import CONTENT_TYPE_LATEST
from .types import Principal

if TYPE_CHECKING:
    from .app import Hub

__all__ = ["endpoint", "error_response", "json_response"]

log = logging.getLogger("hub.http")

Handler = Callable[[Request], Awaitable[Response]]

DEV_TOKEN_TTL_S = 3600
PARSE_ON_LOOP_BYTES = 256 * 1024  # push bodies beyond are read on a thread
_big_parses = asyncio.Semaphore(1)
STATIC = Path(__file__).resolve().parent / "static"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def error_response(error: HubError) -> Response:
    headers = {}
    if isinstance(error, (RateLimited, Unavailable)):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return json_response(error.body(), error.status, headers)


def hub_of(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def endpoint(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except HubError as error:
            return error_response(error)
        except ClientDisconnect:
            log.info("client went away mid-request", extra={"path": request.url.path})
            return Response(status_code=499)
        except asyncio.CancelledError:
            # Cut by the shutdown's bound (the database does not answer): an
            # answer the client can act on, not the server's bare 500.
            if not hub_of(request).draining:
                raise
            log.warning("request cut by the shutdown", extra={"path": request.url.path})
            return error_response(Unavailable("the hub is shutting down; retry", retry_after=1.0))
        except Exception:
            log.exception("unhandled error", extra={"path": request.url.path})
            return error_response(Internal("internal error"))

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def principal(request: Request, scope: str) -> Principal:
    """Authenticate the request, check it may use ``scope``, and take a token
    of the user's request rate."""
    hub = hub_of(request)
    try:
        who = await hub.authenticator.authenticate(bearer_token(request.headers))
    except Unauthorized as exc:
        hub.count_auth_failure(exc.code)
        raise
    if not who.can(scope):
        raise Forbidden(f"this credential lacks the {scope!r} scope")
    hub.check_rate(hub.request_limits, who.user, "requests")
    return who


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge("request body size", int(declared), limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge("request body size", size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


@endpoint
async def push(request: Request) -> Response:
    """POST /v1/sync/push"""
    hub = hub_of(request)
    who = await principal(request, "write")
    key = request.headers.get("idempotency-key") or request.headers.get("x-idempotency-key")
    limits = hub.settings.limits
    try:
        hub.check_rate(hub.push_limits, who.user, "pushes")
        body = await read_body(request, limits.max_http_body_bytes)
        now_ms = time.time_ns() // 1_000_000
        if len(body) <= PARSE_ON_LOOP_BYTES:
            parsed = protocol.parse_http_push(
                body, user=who.user, key=key, limits=limits, now_ms=now_ms
            )
        else:
            # A big body may take a second to read exactly (numbers kept digit for
            # digit): on a thread, one at a time, so that the loop, which shares
            # the interpreter with it, keeps serving everyone else meanwhile.
            async with _big_parses:
                parsed = await asyncio.to_thread(
                    protocol.parse_http_push,
                    body,
                    user=who.user,
                    key=key,
                    limits=limits,
                    now_ms=now_ms,
                )
    except HubError as exc:
        hub.count_refused_push(exc.code)
        raise
    result = await hub.push(parsed)
    headers = {"Idempotent-Replay": "true"} if result.replay else None
    return json_response(result.body(), 200, headers)


@endpoint
async def pull(request: Request) -> Response:
    """GET /v1/sync/pull?since=&limit=&collection="""
    hub = hub_of(request)
    who = await principal(request, "read")
    query = protocol.parse_pull_query(request.query_params, hub.settings.limits)
    try:
        page = await hub.store.pull(who.user, query)
    except ResetRequired:
        hub.metrics.pulls.labels("reset_required").inc()
        raise
    hub.metrics.pulls.labels("ok").inc()
    return json_response(protocol.pull_body(page))


@endpoint
async def status(request: Request) -> Response:
    """GET /v1/sync/status"""
    who = await principal(request, "read")
    return json_response(await hub_of(request).store.status(who.user))


@endpoint
async def health(request: Request) -> Response:
    """GET /health: proves the hub can reach its database (cached about a second)."""
    report = await hub_of(request).health()
    return json_response(report, 503 if report["status"] == "down" else 200)


@endpoint
async def list_devices(request: Request) -> Response:
    """GET /v1/devices"""
    hub = hub_of(request)
    who = await principal(request, "admin")
    devices = await hub.store.devices(who.user)
    open_now = Counter(c.split("\t")[0] for c in await hub.presence.connections(who.user))
    for device in devices:
        device["connections"] = open_now.get(device["device"], 0)
    return json_response(devices)


@endpoint
async def revoke_device(request: Request) -> Response:
    """DELETE /v1/devices/{device}: its connections close with 4003 on every process."""
    return await _revoke(request, "device", "device")


async def _revoke(request: Request, kind: str, param: str) -> Response:
    """Revoke a device or an API key of the caller's user; 404 when it has none."""
    hub = hub_of(request)
    who = await principal(request, "admin")
    value = request.path_params[param]
    revoke = hub.store.revoke_device if kind == "device" else hub.store.revoke_api_key
    well_formed = protocol.valid_device(value) if kind == "device" else is_key_id(value)
    if not well_formed or not await revoke(who.user, value):
        raise NotFound(f"no {'API key' if kind == 'key' else kind} {value[:64]!r}")
    hub.revoked(kind, who.user, value)
    return Response(status_code=204)


@endpoint
async def list_keys(request: Request) -> Response:
    """GET /v1/api-keys (never the secrets)"""
    hub = hub_of(request)
    who = await principal(request, "admin")
    return json_response(await hub.store.api_keys(who.user))


@endpoint
async def create_key(request: Request) -> Response:
    """POST /v1/api-keys: the raw key is in this answer and nowhere else, ever."""
    hub = hub_of(request)
    who = await principal(request, "admin")
    if not hub.keys_enabled:
        raise Unavailable("API keys need HUB_API_KEY_PEPPER to be set", retry_after=3600)
    body = protocol.loads(await read_body(request, 64 * 1024))
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or "\x00" in name:
        raise BadRequest("'name' must be a string of 1..128 characters, without U+0000")
    scopes = check_scopes(body.get("scopes"))
    key_id, key = make_api_key()
    created = await hub.store.create_api_key(
        key_id, who.user, name, sorted(scopes), hub.authenticator.hash_key(key)
    )
    created.pop("last_used_at", None)
    created.pop("revoked", None)
    return json_response({**created, "key": key}, 201)


@endpoint
async def revoke_key(request: Request) -> Response:
    """DELETE /v1/api-keys/{id}: soft; refused at once on every process."""
    return await _revoke(request, "key", "key_id")


@endpoint
async def development_token(request: Request) -> Response:
    """GET /dev/token?user=demo: a token for the demo app. Exists only while the
    hub runs with its development secret (never with a configured secret)."""
    hub = hub_of(request)
    if hub.development_secret is None:
        raise NotFound("no such endpoint: /dev/token")
    user = request.query_params.get("user", "demo")
    if not 1 <= len(user) <= 128 or "\x00" in user:
        raise BadRequest("'user' must be 1..128 characters")
    token = make_token(hub.development_secret, user, ttl_s=DEV_TOKEN_TTL_S)
    return json_response({"token": token, "user": user, "expires_in_s": DEV_TOKEN_TTL_S})


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text (all workers of this hub in multi-process mode)."""
    body = hub_of(request).metrics.exposition()
    return Response(body, 200, media_type=CONTENT_TYPE_LATEST)


async def demo(request: Request) -> Response:
    """GET /: the demo app (a todo list on the browser client)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def live(request: Request) -> Response:
    """GET /health/live: the process serves."""
    return json_response({"status": "ok"})


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 and friends, in PROTOCOL.md's error body."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"no such endpoint: {request.url.path}"))
    if exc.status_code == 405:
        error = BadRequest(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = BadRequest(str(exc.detail))
    return json_response(error.body(), exc.status_code)
