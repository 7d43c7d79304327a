"""The ``hub`` command: ``hub serve`` runs the hub, ``hub token`` makes a token."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from . import config, logs
from .auth import make_token
from .embedded import EmbeddedError, start_postgres

__all__ = ["main"]

WS_MAX_MESSAGE_BYTES = 1024 * 1024


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


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    try:
        settings = config.load(os.environ, args)
    except config.ConfigError as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_format, settings.log_level)
    database_url = settings.database_url
    keep = []
    if database_url is None:
        try:
            database_url, handle = start_postgres(settings.data_dir)
        except EmbeddedError as exc:
            print(f"hub: {exc}", file=sys.stderr)
            return 2
        keep.append(handle)
        say(f"hub: embedded PostgreSQL, data in {Path(settings.data_dir, 'pgdata').resolve()}")
    secret = settings.jwt_secret
    if secret is None:
        secret = development_secret(settings.data_dir)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    base = f"http://{settings.host}:{port}"
    if settings.jwt_secret is None:
        say("!" * 72)
        say("!! DEVELOPMENT SECRET IN USE: anyone with the file below can mint tokens.")
        say(f"!! {Path(settings.data_dir, 'dev-jwt-secret').resolve()}")
        say("!! Set HUB_JWT_SECRET (or HUB_JWKS_URL) before real users connect.")
        say("!" * 72)
        say(f"hub: demo token (user 'demo', 24 h): {make_token(secret, 'demo')}")

    def ready() -> None:
        say(f"hub: listening on {base}")

    app = create_app(settings, database_url=database_url, jwt_secret=secret, on_ready=ready)
    uv_config = uvicorn.Config(
        app,
        loop="auto",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=WS_MAX_MESSAGE_BYTES,
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )
    server = uvicorn.Server(uv_config)
    server.run(sockets=[sock])
    del keep
    return 0


def token(args: argparse.Namespace) -> int:
    settings = config.load(os.environ)
    secret = settings.jwt_secret or development_secret(settings.data_dir)
    print(make_token(secret, args.user, ttl_s=args.ttl))
    return 0


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
    serve_p.set_defaults(run=serve)
    token_p = sub.add_parser(
        "token", help="print an HS256 token for a user (HUB_JWT_SECRET or the dev secret)"
    )
    token_p.add_argument("user")
    token_p.add_argument("--ttl", type=float, default=86400.0, help="lifetime in seconds")
    token_p.set_defaults(run=token)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
