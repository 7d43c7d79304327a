"""Building changes and pushes for store-level tests, and reading them back."""

from __future__ import annotations

from typing import Any

import orjson

from hub.errors import HubError
from hub.merge import Replica
from hub.protocol import Limits, PullQuery
from hub.store_postgres import PostgresStore
from hub.types import Change, Cursor, FieldWrite, Push, PushResult

LIMITS = Limits()


def stamp(wall: int, counter: int = 0, node: str = "d1") -> str:
    return f"{1_700_000_000_000 + wall:013d}-{counter:04d}-{node}"


def upsert(record: str, collection: str = "todos", **fields: tuple[Any, str]) -> Change:
    writes = tuple(
        FieldWrite(name, orjson.dumps(value).decode(), hlc) for name, (value, hlc) in fields.items()
    )
    return Change(collection, record, "upsert", writes)


def delete(record: str, hlc: str, collection: str = "todos") -> Change:
    return Change(collection, record, "delete", (), hlc)


def push(user: str, *changes: Change, device: str = "d1", key: str | None = None) -> Push:
    digest = orjson.dumps([repr(c) for c in changes])
    return Push(user, device, tuple(changes), key, "http", digest)


async def pull_all(store: PostgresStore, user: str, limit: int = 500, since: Cursor | None = None):
    deltas = []
    cursor = since or Cursor(0)
    for _ in range(10_000):
        page = await store.pull(user, PullQuery(cursor, limit, None))
        deltas.extend(page.changes)
        cursor = page.cursor
        if not page.has_more:
            return deltas, cursor, page.version
    raise AssertionError("pull did not end")


def replica_of(deltas) -> dict:
    replica = Replica()
    for delta in deltas:
        replica.apply_delta(delta)
    return normalized(replica)


def normalized(replica: Replica) -> dict:
    """Replica state with JSON values decoded (jsonb re-spaces text) and dead records kept."""
    return {
        key: ({n: (orjson.loads(v), h) for n, (v, h) in fields.items()}, deleted_hlc)
        for key, (fields, deleted_hlc) in replica.state().items()
    }


async def commit_one(store: PostgresStore, p: Push) -> PushResult:
    [result] = await store.commit([p])
    if isinstance(result, HubError):
        raise result
    return result
