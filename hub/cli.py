"""The ``hub`` command: ``hub serve`` runs the hub, ``hub token`` makes a token."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import logging
import math
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from . import config, logs
from .auth import make_token, valid_user
from .embedded import EmbeddedError, start_postgres, start_valkey
from .errors import HubError
from .server import HubServer, bind, run_workers, uvicorn_config
from .store_postgres import DATABASE_ERRORS, PostgresStore, check_database

__all__ = ["main"]

# What a maintenance command reports in one line, not as a traceback.
COMMAND_FAILURES: tuple[type[BaseException], ...] = (HubError, *DATABASE_ERRORS)


def say(text: str) -> None:
    print(text, flush=True)


def development_secret(data_dir: str) -> str:
    """A per-installation secret kept in ``<data_dir>/dev-jwt-secret``, so demo
    tokens survive restarts. For development only."""
    path = Path(data_dir) / "dev-jwt-secret"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def serve(args: argparse.Namespace) -> int:
    try:
        settings = config.load(os.environ, args)
    except config.ConfigError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_format, settings.log_level)
    if settings.development_secret and not _loopback(settings.host):
        print(
            f"hub: HUB_HOST={settings.host} with the development secret: anyone who reaches "
            "the port could mint tokens (GET /dev/token); set HUB_JWT_SECRET or HUB_JWKS_URL, "
            "or listen on 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    if args.listen_fd is not None:
        # A worker started by `hub serve --workers N`: the parent resolved everything.
        assert settings.database_url is not None
        sock = socket.socket(fileno=int(args.listen_fd))
        return run_one(
            settings,
            settings.database_url,
            settings.jwt_secret,
            settings.api_key_pepper,
            sock,
            None,
            worker=True,
            development=args.development,
        )
    keep: list[object] = []  # handles that keep embedded servers running
    database_url = settings.database_url
    if database_url is None:
        try:
            database_url, handle = start_postgres(settings.data_dir)
        except EmbeddedError as exc:
            print(f"hub: {exc}", file=sys.stderr)
            return 2
        keep.append(handle)
        say(f"hub: embedded PostgreSQL, data in {Path(settings.data_dir, 'pgdata').resolve()}")
    redis_url = settings.redis_url
    if settings.workers > 1 and redis_url is None:
        try:
            redis_url, handle = start_valkey()
        except EmbeddedError as exc:
            print(f"hub: {exc}", file=sys.stderr)
            return 2
        keep.append(handle)
        say(f"hub: embedded Redis-compatible server for {settings.workers} workers: {redis_url}")
    try:
        secret, pepper = credentials(settings)
    except OSError as exc:
        print(f"hub: cannot keep the development secret in HUB_DATA_DIR: {exc}", file=sys.stderr)
        return 2
    problem = asyncio.run(check_database(database_url, settings.db_timeout_s, apply_schema=True))
    if problem is not None:
        print(f"hub: HUB_DATABASE_URL: {problem}", file=sys.stderr)
        return 2
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"hub: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    base = f"http://{settings.host}:{port}"
    if settings.development_secret:
        assert secret is not None
        say("!" * 72)
        say("!! DEVELOPMENT SECRET IN USE: anyone who can read the file below, or reach")
        say("!! this port (GET /dev/token), can mint tokens.")
        say(f"!! {Path(settings.data_dir, 'dev-jwt-secret').resolve()}")
        say("!! Set HUB_JWT_SECRET (or HUB_JWKS_URL) before real users connect.")
        say("!" * 72)
        say(f"hub: demo token (user 'demo', 24 h): {token_for(settings, secret, 'demo')}")
    if settings.workers > 1:
        env = dict(os.environ)
        env.update(
            {
                "HUB_DATABASE_URL": database_url,
                "HUB_JWT_SECRET": secret or "",
                "HUB_API_KEY_PEPPER": pepper or "",
                "HUB_REDIS_URL": redis_url or "",
            }
        )
        say(f"hub: starting {settings.workers} worker processes")
        say(f"hub: listening on {base}")
        if pepper is None:
            say("hub: API keys are disabled until HUB_API_KEY_PEPPER is set")
        argv = sys.argv[2:] + (["--development"] if settings.development_secret else [])
        return run_workers(settings.workers, sock, env, argv)

    def ready() -> None:
        say(f"hub: listening on {base}")

    if pepper is None:
        say("hub: API keys are disabled until HUB_API_KEY_PEPPER is set")
    return run_one(settings, database_url, secret, pepper, sock, ready)


def credentials(settings: config.Settings) -> tuple[str | None, str | None]:
    """The JWT secret (None with a JWKS) and the API key pepper (None: keys off).
    With neither JWT setting, both come from the development secret."""
    if not settings.development_secret:
        return settings.jwt_secret, settings.api_key_pepper
    secret = development_secret(settings.data_dir)
    pepper = (
        settings.api_key_pepper or hashlib.sha256(b"api-key-pepper:" + secret.encode()).hexdigest()
    )
    return secret, pepper


def run_one(
    settings: config.Settings,
    database_url: str,
    secret: str | None,
    pepper: str | None,
    sock: socket.socket,
    on_ready: Callable[[], None] | None,
    *,
    worker: bool = False,
    development: bool | None = None,
) -> int:
    from .app import create_app

    app = create_app(
        settings,
        database_url=database_url,
        jwt_secret=secret,
        api_key_pepper=pepper,
        on_ready=on_ready,
        development=development,
    )

    async def drain() -> None:
        hub = getattr(app.state, "hub", None)
        if hub is not None:
            await hub.drain()

    server = HubServer(
        uvicorn_config(app, settings.heartbeat_s, settings.shutdown_timeout_s), drain, worker=worker
    )
    server.run(sockets=[sock])
    return 0


class CommandError(Exception):
    """A maintenance command cannot go on; the message is for the operator."""


def retention(args: argparse.Namespace) -> int:
    """Purge tombstones past HUB_TOMBSTONE_RETENTION and expired receipts now."""

    async def purge(store: PostgresStore, settings: config.Settings) -> dict[str, Any]:
        if args.dry_run and not await store.has_schema():
            raise CommandError(
                "HUB_DATABASE_URL: this database has no hub tables (hub serve creates them); "
                "nothing to purge"
            )
        return await store.purge(retention_s=settings.tombstone_retention, dry_run=args.dry_run)

    return with_store(purge, "retention", apply_schema=not args.dry_run)


def resync_all(args: argparse.Namespace) -> int:
    """After restoring a backup: every device's next pull gets 410 and starts from 0."""
    if not args.yes:
        print("hub: this makes every device resync from 0; repeat with --yes", file=sys.stderr)
        return 2
    return with_store(lambda store, settings: _users(store.require_resync()), "resync-all")


async def _users(count: Awaitable[int]) -> dict[str, object]:
    return {"users": await count}


def with_store(
    action: Callable[[PostgresStore, config.Settings], Awaitable[dict[str, Any]]],
    command: str,
    *,
    apply_schema: bool = True,
) -> int:
    """Run ``action`` on the store of HUB_DATABASE_URL; print its JSON. Never on
    an embedded PostgreSQL: that would be a database of its own, not the hub's."""
    try:
        settings = config.load(os.environ)
    except config.ConfigError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 2
    database_url = settings.database_url
    if database_url is None:
        print("hub: HUB_DATABASE_URL is not set: name the hub's database", file=sys.stderr)
        return 2
    problem = asyncio.run(check_database(database_url, settings.db_timeout_s))
    if problem is not None:
        print(f"hub: HUB_DATABASE_URL: {problem}", file=sys.stderr)
        return 2
    # The store's warnings would repeat the one line that reports a failure.
    logging.getLogger("hub").setLevel(logging.ERROR)

    async def run() -> dict[str, Any]:
        assert database_url is not None
        store = await PostgresStore.connect(
            database_url, max_size=1, timeout=settings.db_timeout_s, apply_schema=apply_schema
        )
        try:
            return await action(store, settings)
        finally:
            await store.close()

    try:
        report = asyncio.run(run())
    except CommandError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 2
    except COMMAND_FAILURES as exc:  # one line, as hub serve reports a failed start
        print(f"hub: {command} failed on HUB_DATABASE_URL: {_reason(exc)}", file=sys.stderr)
        return 2
    print(orjson.dumps(report).decode())
    if report.get("skipped"):  # a purge found the retention lock taken
        print(
            f"hub: another process is purging now; {command} did nothing, try again later",
            file=sys.stderr,
        )
        return 3
    return 0


def _reason(exc: BaseException) -> str:
    """What went wrong, said briefly: the driver's error under the store's own."""
    if isinstance(exc, HubError):
        cause = exc.__context__
        return exc.message + (f" ({type(cause).__name__})" if cause is not None else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def token(args: argparse.Namespace) -> int:
    if not valid_user(args.user):
        print("hub: the user must be 1..128 characters, without NUL", file=sys.stderr)
        return 2
    if not (math.isfinite(args.ttl) and args.ttl >= 1):
        print("hub: --ttl must be a number of seconds, at least 1", file=sys.stderr)
        return 2
    try:
        settings = config.load(os.environ)
        secret, _ = credentials(settings)
    except config.ConfigError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"hub: cannot read the development secret in HUB_DATA_DIR: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print(
            "hub: with HUB_JWKS_URL the hub makes no tokens; your identity provider does",
            file=sys.stderr,
        )
        return 2
    if settings.development_secret:
        print(
            "hub: warning: HUB_JWT_SECRET is not set: signed with the development secret "
            "of HUB_DATA_DIR, which only a development hub accepts",
            file=sys.stderr,
        )
    print(token_for(settings, secret, args.user, args.ttl))
    return 0


def token_for(settings: config.Settings, secret: str, user: str, ttl_s: float = 86400.0) -> str:
    """A token that a hub with these settings accepts: their audience and
    issuer, signed with the first of their algorithms."""
    claims = {
        name: value
        for name, value in (("aud", settings.jwt_audience), ("iss", settings.jwt_issuer))
        if value is not None
    }
    algorithm = settings.jwt_algorithms[0] if settings.jwt_algorithms else "HS256"
    return make_token(secret, user, ttl_s=ttl_s, algorithm=algorithm, **claims)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="hub", description="Real-time sync server for local-first apps."
    )
    sub = top.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser(
        "serve",
        help="run the hub",
        description="Run the hub. Every flag can also be given as its HUB_* variable; "
        "with no HUB_DATABASE_URL an embedded PostgreSQL is started.",
    )
    config.add_arguments(serve_p)
    serve_p.add_argument("--listen-fd", default=None, help=argparse.SUPPRESS)
    serve_p.add_argument("--development", action="store_true", help=argparse.SUPPRESS)
    serve_p.set_defaults(run=serve)
    retention_p = sub.add_parser(
        "retention",
        help="purge tombstones older than HUB_TOMBSTONE_RETENTION and expired receipts",
        description="Purge now what the hub's retention job purges every "
        "HUB_RETENTION_INTERVAL_S: tombstones older than HUB_TOMBSTONE_RETENTION (devices "
        "with older cursors then get 410 reset_required) and idempotency receipts older "
        "than 24 h. Prints what went, as JSON. Works on HUB_DATABASE_URL, which must be "
        "set; --dry-run changes nothing there, not even the schema. Exits with 3 when "
        "another process is purging, 2 on failure.",
    )
    retention_p.add_argument("--dry-run", action="store_true", help="only count what would go")
    retention_p.set_defaults(run=retention)
    resync_p = sub.add_parser(
        "resync-all",
        help="after restoring a backup: make every device resync from 0",
        description="Raise every user's horizon past its version, so that every cursor "
        "made until now gets 410 reset_required and its device pulls again from 0. Run "
        "it after restoring the database from a backup, before the hubs serve again. "
        "Works on HUB_DATABASE_URL, which must be set.",
    )
    resync_p.add_argument("--yes", action="store_true", help="really do it")
    resync_p.set_defaults(run=resync_all)
    token_p = sub.add_parser(
        "token",
        help="print a token for a user (HUB_JWT_SECRET or the dev secret)",
        description="Print a token that a hub with the same settings accepts: signed with "
        "HUB_JWT_SECRET (or, with a warning, the development secret of HUB_DATA_DIR) by the "
        "first of HUB_JWT_ALGORITHMS (HS256 by default), with HUB_JWT_AUDIENCE and "
        "HUB_JWT_ISSUER as its aud and iss when set.",
    )
    token_p.add_argument("user", help="the user id: 1..128 characters")
    token_p.add_argument(
        "--ttl", type=float, default=86400.0, help="lifetime in seconds (default 1 day)"
    )
    token_p.set_defaults(run=token)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
