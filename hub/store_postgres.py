"""The PostgreSQL store: a batch of pushes is one transaction of set-based statements.

A batch, whatever its size, is five round trips inside one transaction:

1. create missing user rows, then lock the version rows of the batch's users
   (``SELECT ... FOR UPDATE``, users in a fixed order, so batches of several
   processes never deadlock);
2. read the idempotency receipts of the batch's keyed pushes;
3. read the current stamps of every record the batch touches;
4. merge in Python with :mod:`hub.merge`, the reference rules, giving each
   push that changed something its user's next version;
5. write it all with one statement of ``unnest``-fed ``INSERT ... ON CONFLICT
   DO UPDATE ... WHERE`` the incoming stamp is greater (fields, records),
   version bumps, receipts and device sightings.

Because the version rows are locked for the whole transaction, the merge in
step 4 sees exactly the state it overwrites, and one user's versions commit in
order across processes. A batch that fails for a reason that is not one push's
fault is retried push by push, so one bad push cannot sink the others.

This module is the only one that speaks SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from orjson import Fragment

from .errors import (
    Forbidden,
    HubError,
    IdempotencyKeyReused,
    Internal,
    InvalidChange,
    ResetRequired,
    Unavailable,
)
from .merge import FieldState, RecordState, apply_delete, apply_upsert
from .protocol import PullQuery
from .types import ApiKeyRecord, Change, Cursor, Delta, FieldWrite, PullPage, Push, PushResult

__all__ = ["DATABASE_ERRORS", "PostgresStore", "check_database", "read_schema"]

log = logging.getLogger("hub.store")

SCHEMA_LOCK = 0x6875625F736368  # advisory lock id held while the schema is applied

RECEIPT_TTL = "24 hours"

# Every statement of the hub looks rows up by key or scans one user's index
# range. A plan cached while a table was nearly empty (a sequential scan or a
# hash join over the whole table) would stay in use as the table grows, until
# the next ANALYZE: measured on a fresh database, batches read the whole
# receipts table each time. With these off, cached plans are index lookups.
PLANNER_SETTINGS = {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off"}
# asyncpg closes and reopens a pooled connection after 50,000 statements by
# default. The committer's connection runs five per batch, so under load it was
# replaced every half minute or so, and the batches waiting meanwhile were late
# by a reconnect and by preparing every statement again (w6 saw deliveries late
# by up to 25 ms when it happened). The hub's sessions hold no state that could
# grow: keep them. A broken connection is still replaced.
NEVER_RECYCLE = 2**62
DEVICE_SEEN_S = 60.0  # last_seen is kept to about this precision
SEEN_DEVICES_MAX = 100_000

# A statement the server gave up on for its time (statement_timeout,
# lock_timeout): the database is slow, the request is not at fault.
TOO_SLOW = (asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError)

# Failures of the connection or the server as a whole: no push is at fault.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # A connection left mid-operation by one of the above (its server process
    # was terminated): its next statement fails with this.
    asyncpg.InternalClientError,
)


async def _apply_schema(con: Any, timeout: float) -> None:
    """Apply ``schema.sql`` (idempotent), one process at a time. Its locks are
    waited for at most ``timeout``: behind an open write, an index's lock
    must not queue every other writer behind it for longer."""
    async with con.transaction():
        await con.execute(f"SET LOCAL lock_timeout = {int(timeout * 1000)}")
        await con.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await con.execute(read_schema())


def read_schema() -> str:
    """``schema.sql``: from the source tree when run from it, else from the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "schema.sql", here / "schema.sql"):
        if candidate.is_file():
            return candidate.read_text()
    return importlib.resources.files("hub").joinpath("schema.sql").read_text()


INSERT_USERS = """
INSERT INTO hub_users (user_id) SELECT u FROM unnest($1::text[]) AS u ORDER BY u
ON CONFLICT (user_id) DO NOTHING
"""

LOCK_USERS = """
SELECT user_id, version FROM hub_users WHERE user_id = ANY($1::text[])
ORDER BY user_id FOR UPDATE
"""

# Receipts of the keyed pushes and the stored stamps of every touched record,
# in one round trip: kind 'r' rows are receipts (digest, response); kind 's'
# rows are a record's fields (name, stamp) with its delete stamp in the last column.
READ = f"""
SELECT 'r' AS kind, r.user_id, r.scope, r.key, NULL AS field, NULL AS hlc, r.digest,
       r.response::text AS response
FROM jsonb_array_elements($1::jsonb) AS k
JOIN hub_receipts r ON r.user_id = k->>0 AND r.scope = k->>1 AND r.key = k->>2
WHERE r.created_at > now() - interval '{RECEIPT_TTL}'
UNION ALL
SELECT 's', k->>0, k->>1, k->>2, f.field, f.hlc, NULL, r.deleted_hlc
FROM jsonb_array_elements($2::jsonb) AS k
LEFT JOIN hub_records r ON r.user_id = k->>0 AND r.collection = k->>1 AND r.record_id = k->>2
LEFT JOIN hub_fields f ON f.user_id = k->>0 AND f.collection = k->>1 AND f.record_id = k->>2
WHERE r.user_id IS NOT NULL OR f.user_id IS NOT NULL
UNION ALL
SELECT 'd', d.user_id, d.device, NULL, NULL, NULL, NULL, NULL
FROM jsonb_array_elements($3::jsonb) AS k
JOIN hub_devices d ON d.user_id = k->>0 AND d.device = k->>1
WHERE d.revoked_at IS NOT NULL
"""

# Everything a batch writes, in one statement. The rows come as JSON arrays
# (one parameter per table): field values and actors are embedded as they
# are, without being decoded, and PostgreSQL parses them straight into jsonb.
# The parameters are jsonb, parsed once: on json text, each ->> parses the
# element again (measured: 11 -> 7.5 ms for 1000 rows; 40 -> 31 us of
# PostgreSQL CPU per push in batches of 30 one-change pushes).
WRITE = """
WITH fields AS (
    INSERT INTO hub_fields AS t
        (user_id, collection, record_id, field, value, hlc, version, device, origin, actor)
    SELECT e->>0, e->>1, e->>2, e->>3, (e->4)::jsonb, e->>5, (e->>6)::bigint, e->>7, e->>8,
           nullif((e->9)::jsonb, 'null')
    FROM jsonb_array_elements($1::jsonb) AS e
    ON CONFLICT (user_id, collection, record_id, field) DO UPDATE
        SET value = excluded.value, hlc = excluded.hlc, version = excluded.version,
            device = excluded.device, origin = excluded.origin, actor = excluded.actor
        WHERE excluded.hlc > t.hlc
    RETURNING 1
), records AS (
    INSERT INTO hub_records AS t
        (user_id, collection, record_id, deleted_hlc, deleted_at, version, device, origin, actor)
    SELECT e->>0, e->>1, e->>2, e->>3, CASE WHEN e->>3 IS NULL THEN NULL ELSE now() END,
           (e->>4)::bigint, e->>5, e->>6, nullif((e->7)::jsonb, 'null')
    FROM jsonb_array_elements($2::jsonb) AS e
    ON CONFLICT (user_id, collection, record_id) DO UPDATE
        SET deleted_hlc = excluded.deleted_hlc, deleted_at = excluded.deleted_at,
            version = excluded.version, device = excluded.device,
            origin = excluded.origin, actor = excluded.actor
        WHERE excluded.deleted_hlc > coalesce(t.deleted_hlc, '')
    RETURNING 1
), users AS (
    UPDATE hub_users AS t SET version = (e->>1)::bigint
    FROM jsonb_array_elements($3::jsonb) AS e
    WHERE t.user_id = e->>0
    RETURNING 1
), receipts AS (
    INSERT INTO hub_receipts (user_id, scope, key, digest, response)
    SELECT e->>0, e->>1, e->>2, decode(e->>3, 'hex'), (e->4)::jsonb
    FROM jsonb_array_elements($4::jsonb) AS e
    ON CONFLICT (user_id, scope, key) DO UPDATE
        SET digest = excluded.digest, response = excluded.response, created_at = now()
    RETURNING 1
), devices AS (
    INSERT INTO hub_devices AS t (user_id, device)
    SELECT e->>0, e->>1 FROM jsonb_array_elements($5::jsonb) AS e
    ON CONFLICT (user_id, device) DO UPDATE SET last_seen = now()
        WHERE t.last_seen < now() - interval '1 minute'
    RETURNING 1
)
SELECT 1
"""

# A page of pull stops before the delta that would take it past this many
# bytes (estimated from the stored text; a single delta may be larger): a page of
# 5000 deltas of 60 KB values was 115 MiB, built whole in memory.
PULL_PAGE_BYTES = 4 * 1024 * 1024

# The deltas after a cursor. Each branch reads at most limit+1 delta keys in
# index order; a field stamped at or before its record's delete stamp is not
# part of the state, so it makes no delta. The user's version is read in the
# same snapshot: a page that reaches the end may move the cursor up to it.
# (Read by a second statement when the page was empty, it could include a
# push committed in between, whose delta the cursor then skipped.) So there
# is always a row: with no delta, one whose key columns are NULL. The page
# ends with the first delta that ends past $7 bytes; the caller leaves that
# one out (unless it is the only one), and knows the page was cut.

PULL = """
WITH keys AS (
    SELECT version, collection, record_id FROM (
        (SELECT DISTINCT f.version, f.collection, f.record_id
         FROM hub_fields f
         LEFT JOIN hub_records r USING (user_id, collection, record_id)
         WHERE f.user_id = $1 AND (f.version, f.collection, f.record_id) > ($2, $3, $4)
           AND ($6::text IS NULL OR f.collection = $6)
           AND (r.deleted_hlc IS NULL OR f.hlc > r.deleted_hlc)
         ORDER BY 1, 2, 3 LIMIT $5)
        UNION
        (SELECT r.version, r.collection, r.record_id
         FROM hub_records r
         WHERE r.user_id = $1 AND r.deleted_hlc IS NOT NULL
           AND (r.version, r.collection, r.record_id) > ($2, $3, $4)
           AND ($6::text IS NULL OR r.collection = $6)
         ORDER BY 1, 2, 3 LIMIT $5)
    ) u
    ORDER BY 1, 2, 3 LIMIT $5
), page AS (
    SELECT k.version, k.collection, k.record_id,
           r.deleted_hlc, r.device AS record_device,
           r.origin AS record_origin, r.actor::text AS record_actor,
           (r.deleted_hlc IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM hub_fields l
                WHERE l.user_id = $1 AND l.collection = k.collection
                  AND l.record_id = k.record_id AND l.hlc > r.deleted_hlc)) AS deleted,
           f.field, f.value::text AS value, f.hlc, f.device, f.origin, f.actor::text AS actor,
           (SELECT u.version FROM hub_users u WHERE u.user_id = $1) AS user_version,
           (SELECT u.horizon FROM hub_users u WHERE u.user_id = $1) AS horizon
    FROM (SELECT) AS always_one_row
    LEFT JOIN keys k ON true
    LEFT JOIN hub_records r ON r.user_id = $1 AND r.collection = k.collection
        AND r.record_id = k.record_id
    LEFT JOIN hub_fields f ON f.user_id = $1 AND f.collection = k.collection
        AND f.record_id = k.record_id AND f.version = k.version
        AND (r.deleted_hlc IS NULL OR f.hlc > r.deleted_hlc)
), sized AS (
    -- Bytes before each delta and up to its end, estimated as the answer
    -- spells them (a delta's rows are peers in this order).
    SELECT p.*,
           sum(b.bytes) OVER (w GROUPS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before,
           sum(b.bytes) OVER w AS upto,
           count(*) OVER () AS page_rows
    FROM page p,
         LATERAL (SELECT coalesce(octet_length(p.value), 0) + coalesce(octet_length(p.actor), 0)
                         + coalesce(octet_length(p.field), 0)
                         + coalesce(octet_length(p.record_id), 0) + 160 AS bytes) b
    WINDOW w AS (ORDER BY p.version, p.collection, p.record_id)
)
-- Up to the first delta that ends past the budget (the caller leaves it out
-- unless it is the first); page_rows tells whether rows were left out.
SELECT * FROM sized s
WHERE coalesce(s.before, 0) <= $7
ORDER BY s.version, s.collection, s.record_id, s.field
"""

# What a connection reads once it can be found by revocations: the user's
# version for its welcome, and whether its device or key was revoked after
# its first checks (a revocation it was not there to hear).
ADMISSION = """
SELECT (SELECT version FROM hub_users WHERE user_id = $1),
       EXISTS (SELECT 1 FROM hub_devices
               WHERE user_id = $1 AND device = $2 AND revoked_at IS NOT NULL),
       EXISTS (SELECT 1 FROM hub_api_keys WHERE id = $3 AND revoked_at IS NOT NULL)
"""

# Which of these connections' devices and keys are revoked.
VERSIONS = "SELECT user_id, version FROM hub_users WHERE user_id = ANY($1::text[])"

REVOKED_AMONG = """
SELECT 'device', d.user_id, d.device
FROM unnest($1::text[], $2::text[]) AS c(user_id, device)
JOIN hub_devices d ON d.user_id = c.user_id AND d.device = c.device
WHERE d.revoked_at IS NOT NULL
UNION ALL
SELECT 'key', k.user_id, k.id FROM hub_api_keys k
WHERE k.id = ANY($3::text[]) AND k.revoked_at IS NOT NULL
"""

STATUS_COLLECTIONS = """
SELECT r.collection,
       count(*) FILTER (WHERE NOT dead) AS live,
       count(*) FILTER (WHERE dead) AS deleted
FROM (
    SELECT k.collection,
           (r.deleted_hlc IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM hub_fields f
               WHERE f.user_id = $1 AND f.collection = k.collection
                 AND f.record_id = k.record_id AND f.hlc > r.deleted_hlc)) AS dead
    FROM (SELECT DISTINCT collection, record_id FROM hub_fields WHERE user_id = $1
          UNION
          SELECT collection, record_id FROM hub_records WHERE user_id = $1) k
    LEFT JOIN hub_records r ON r.user_id = $1 AND r.collection = k.collection
        AND r.record_id = k.record_id
) r
GROUP BY r.collection ORDER BY r.collection
"""

STATUS_DEVICES = "SELECT device FROM hub_devices WHERE user_id = $1 ORDER BY device"

REGISTER_DEVICE = """
INSERT INTO hub_devices AS t (user_id, device, name, platform) VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id, device) DO UPDATE
    SET name = coalesce(excluded.name, t.name),
        platform = coalesce(excluded.platform, t.platform), last_seen = now()
RETURNING revoked_at
"""

LIST_DEVICES = """
SELECT device, name, platform, first_seen, last_seen, revoked_at
FROM hub_devices WHERE user_id = $1 ORDER BY first_seen, device
"""

REVOKE_DEVICE = """
UPDATE hub_devices SET revoked_at = coalesce(revoked_at, now())
WHERE user_id = $1 AND device = $2
"""

KEY_COLUMNS = "id, name, scopes, created_at, last_used_at, revoked_at"

CREATE_KEY = f"""
INSERT INTO hub_api_keys (id, user_id, name, scopes, key_hash) VALUES ($1, $2, $3, $4, $5)
RETURNING {KEY_COLUMNS}
"""

LIST_KEYS = f"""
SELECT {KEY_COLUMNS} FROM hub_api_keys WHERE user_id = $1 ORDER BY created_at, id
"""

REVOKE_KEY = """
UPDATE hub_api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE user_id = $1 AND id = $2
"""

FIND_KEY = "SELECT user_id, scopes, key_hash, revoked_at FROM hub_api_keys WHERE id = $1"

TOUCH_KEYS = """
UPDATE hub_api_keys AS k SET last_used_at = to_timestamp(x.t)
FROM unnest($1::text[], $2::float8[]) AS x(id, t)
WHERE k.id = x.id AND (k.last_used_at IS NULL OR k.last_used_at < to_timestamp(x.t))
"""

RETENTION_LOCK = 0x6875625F726574  # advisory lock: one purging process at a time
# Tombstones purged per transaction: it holds its users' version locks, and
# their pushes wait meanwhile (measured: 400,000 in one took 5.5 s).
PURGE_RECORDS_PER_TRANSACTION = 1000

# A tombstone: a deleted record none of whose fields is stamped after the delete.
DEAD = """
r.deleted_hlc IS NOT NULL AND r.deleted_at < now() - make_interval(secs => $1)
AND NOT EXISTS (SELECT 1 FROM hub_fields f
                WHERE f.user_id = r.user_id AND f.collection = r.collection
                  AND f.record_id = r.record_id AND f.hlc > r.deleted_hlc)
"""

COUNT_TOMBSTONES = f"SELECT count(*) FROM hub_records r WHERE {DEAD}"

TOMBSTONE_USERS = f"""
SELECT DISTINCT r.user_id FROM hub_records r WHERE {DEAD} ORDER BY 1 LIMIT $2
"""

# Under the users' version locks (as pushes take them), so that a push
# reviving a record cannot interleave: delete at most $3 tombstones, oldest
# versions first, their fields, and raise each user's horizon to the newest
# version purged. (Bounded: the locks stall those users' pushes meanwhile.)
PURGE_TOMBSTONES = f"""
WITH gone AS (
    DELETE FROM hub_records
    WHERE ctid IN (
        SELECT r.ctid FROM hub_records r
        WHERE r.user_id = ANY($2::text[]) AND {DEAD}
        ORDER BY r.user_id, r.version LIMIT $3)
    RETURNING user_id, collection, record_id, version
), fields AS (
    DELETE FROM hub_fields f USING gone g
    WHERE f.user_id = g.user_id AND f.collection = g.collection AND f.record_id = g.record_id
    RETURNING 1
), horizon AS (
    UPDATE hub_users u SET horizon = greatest(u.horizon, m.v)
    FROM (SELECT user_id, max(version) AS v FROM gone GROUP BY user_id) m
    WHERE u.user_id = m.user_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM fields)
"""

COUNT_RECEIPTS = (
    f"SELECT count(*) FROM hub_receipts WHERE created_at < now() - interval '{RECEIPT_TTL}'"
)

PURGE_RECEIPTS = f"""
WITH gone AS (
    DELETE FROM hub_receipts WHERE ctid IN (
        SELECT ctid FROM hub_receipts
        WHERE created_at < now() - interval '{RECEIPT_TTL}' LIMIT $1)
    RETURNING 1
)
SELECT count(*) FROM gone
"""


@dataclass(slots=True)
class _Plan:
    """What a batch writes, gathered by the merge, as the columns of WRITE."""

    fields: dict[tuple[str, str, str, str], tuple[str, str, int, str, str | None, str | None]] = (
        field(default_factory=dict)
    )
    records: dict[tuple[str, str, str], tuple[str | None, int, str, str | None, str | None]] = (
        field(default_factory=dict)
    )
    versions: dict[str, int] = field(default_factory=dict)
    receipts: dict[tuple[str, str, str], tuple[bytes, str]] = field(default_factory=dict)
    devices: set[tuple[str, str]] = field(default_factory=set)

    def arguments(self) -> list[str]:
        """The five JSON parameters of WRITE."""
        fields = [
            [*key, Fragment(value), hlc, version, device, origin, _fragment(actor)]
            for key, (value, hlc, version, device, origin, actor) in self.fields.items()
        ]
        records = [
            [*key, deleted_hlc, version, device, origin, _fragment(actor)]
            for key, (deleted_hlc, version, device, origin, actor) in self.records.items()
        ]
        receipts = [
            [*key, digest.hex(), Fragment(response)]
            for key, (digest, response) in self.receipts.items()
        ]
        return [
            orjson.dumps(rows).decode()
            for rows in (
                fields,
                records,
                list(self.versions.items()),
                receipts,
                sorted(self.devices),
            )
        ]


def _fragment(text: str | None) -> Fragment | None:
    return None if text is None else Fragment(text)


class PostgresStore:
    """The :class:`hub.store.Store` on PostgreSQL, over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, *, event_bytes: int = 64 * 1024) -> None:
        self.pool = pool
        # A push whose event would be larger gets no deltas (sync_available).
        self.event_bytes = event_bytes
        # Devices this process recorded lately: their last_seen is fresh enough,
        # so batches need not send them again (bounded; cleared when full).
        self._seen_devices: dict[tuple[str, str], float] = {}

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        event_bytes: int = 64 * 1024,
        apply_schema: bool = True,
    ) -> PostgresStore:
        """Open a pool and apply the schema (idempotent; safe with several processes).
        Without ``apply_schema`` the database is left as it is (a dry run changes nothing)."""
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            command_timeout=timeout,
            server_settings={"application_name": "hub", **PLANNER_SETTINGS},
            reset=_keep_session,
            max_queries=NEVER_RECYCLE,
        )
        try:
            if apply_schema:
                async with pool.acquire() as con:
                    await _apply_schema(con, timeout)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, event_bytes=event_bytes)

    async def close(self, timeout: float | None = None) -> None:
        """Close the pool; past ``timeout``, drop connections still busy."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except TimeoutError:
            self.pool.terminate()

    @contextlib.asynccontextmanager
    async def _acquired(self) -> AsyncIterator[Any]:
        """A pooled connection, dropped (not handed out again) after a failure
        of the connection: the pool resets nothing on release, so a connection
        whose server process was terminated mid-statement would come back in
        the middle of that statement, and fail the next user's."""
        async with self.pool.acquire() as con:
            try:
                yield con
            except CONNECTION_ERRORS:
                con.terminate()  # the pool opens a new one when it is wanted
                raise

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; losing the database is ``Unavailable`` (503), not a 500."""
        try:
            async with self._acquired() as con:
                yield con
        except CONNECTION_ERRORS as exc:
            log.warning("database unavailable: %s", type(exc).__name__)
            raise Unavailable("the database is unavailable; retry") from None
        except TOO_SLOW as exc:  # the server's statement_timeout or lock_timeout
            log.warning("database too slow: %s", type(exc).__name__)
            raise Unavailable("the database did not answer in time; retry") from None

    async def has_schema(self) -> bool:
        """Whether the hub's tables are there (a store opened without applying them)."""
        async with self._connection() as con:
            found: bool = await con.fetchval(
                "SELECT to_regclass('hub_records') IS NOT NULL"
                " AND to_regclass('hub_receipts') IS NOT NULL"
            )
            return found

    async def ping(self) -> None:
        async with self._acquired() as con:
            await con.fetchval("SELECT 1")

    # -- push ------------------------------------------------------------

    async def commit(self, pushes: Sequence[Push]) -> list[PushResult | HubError]:
        if not pushes:
            return []
        try:
            return await self._commit(pushes)
        except CONNECTION_ERRORS as exc:
            log.warning("database unavailable during commit: %s", type(exc).__name__)
            return [Unavailable("the database is unavailable; retry") for _ in pushes]
        except asyncpg.PostgresError as exc:
            if len(pushes) == 1:
                return [_rejection(exc)]
            log.warning(
                "batch of %d pushes failed (%s); retrying one by one",
                len(pushes),
                type(exc).__name__,
            )
            results: list[PushResult | HubError] = []
            for push in pushes:
                results.extend(await self.commit([push]))
            return results

    async def _commit(self, pushes: Sequence[Push]) -> list[PushResult | HubError]:
        users = sorted({p.user for p in pushes})
        async with self._acquired() as con:
            async with con.transaction():
                rows = await con.fetch(LOCK_USERS, users)
                done = (
                    await self._merge_locked(con, pushes, rows) if len(rows) == len(users) else None
                )
            if done is None:
                # First pushes of new users: their rows are made on their own,
                # with no lock held (made inside the batch, after locking the
                # others, two processes could deadlock), then the batch again.
                await con.execute(INSERT_USERS, users)
                async with con.transaction():
                    rows = await con.fetch(LOCK_USERS, users)
                    done = await self._merge_locked(con, pushes, rows)
        results, devices = done
        now = time.monotonic()
        for device in devices:  # committed: recorded for the next minute
            self._seen_devices[device] = now
        return results

    async def _merge_locked(
        self, con: Any, pushes: Sequence[Push], locked: Sequence[asyncpg.Record]
    ) -> tuple[list[PushResult | HubError], set[tuple[str, str]]]:
        """Merge and write a batch whose users' version rows (``locked``) ``con``
        holds locked: the results, and the devices whose ``last_seen`` it wrote."""
        keyed = [(p.user, p.scope, p.key) for p in pushes if p.key is not None]
        touched = sorted({(p.user, c.collection, c.record_id) for p in pushes for c in p.changes})
        versions = {r[0]: r[1] for r in locked}
        receipts: dict[tuple[str, str, str], tuple[bytes, str]] = {}
        state: dict[tuple[str, str, str], RecordState] = {}
        devices = sorted({(p.user, p.device) for p in pushes})
        keys = [orjson.dumps(k).decode() for k in (keyed, touched, devices)]
        rows = await con.fetch(READ, *keys)
        revoked: set[tuple[str, str]] = set()
        for kind, u, a, b, name, stamp, digest, text in rows:
            if kind == "r":
                receipts[(u, a, b)] = (digest, text)
                continue
            if kind == "d":
                revoked.add((u, a))
                continue
            record = state.get((u, a, b))
            if record is None:
                record = state[(u, a, b)] = RecordState(deleted_hlc=text)
            if name is not None:
                record.fields[name] = FieldState(None, stamp)  # the value is not read
        plan = _Plan()
        results = [
            Forbidden("this device was revoked")
            if (p.user, p.device) in revoked
            else _merge(p, versions, receipts, state, plan, self.event_bytes)
            for p in pushes
        ]
        plan.devices = self._unseen(plan.devices)
        await con.execute(WRITE, *plan.arguments())
        return results, plan.devices

    def _unseen(self, devices: set[tuple[str, str]]) -> set[tuple[str, str]]:
        now = time.monotonic()
        seen = self._seen_devices
        if len(seen) > SEEN_DEVICES_MAX:
            seen.clear()
        return {d for d in devices if now - seen.get(d, -DEVICE_SEEN_S) >= DEVICE_SEEN_S}

    # -- pull ------------------------------------------------------------

    async def admission(self, user: str, device: str, key_id: str | None) -> tuple[int, str | None]:
        """The user's version, and ``"device"`` or ``"key"`` if the connection's
        device or API key is revoked (else None), in one round trip."""
        async with self._connection() as con:
            row = await con.fetchrow(ADMISSION, user, device, key_id)
        assert row is not None
        revoked = "device" if row[1] else "key" if row[2] else None
        return int(row[0] or 0), revoked

    async def versions(self, users: Sequence[str]) -> dict[str, int]:
        """The version of each of ``users`` that has a history, in one round trip."""
        async with self._connection() as con:
            rows = await con.fetch(VERSIONS, list(users))
        return {r[0]: int(r[1]) for r in rows}

    async def revoked_among(
        self, devices: Sequence[tuple[str, str]], keys: Sequence[str]
    ) -> set[tuple[str, str, str]]:
        """Of these (user, device) pairs and key ids, the revoked ones, as
        ``("device", user, device)`` and ``("key", user, key id)``."""
        async with self._connection() as con:
            rows = await con.fetch(
                REVOKED_AMONG, [u for u, _ in devices], [d for _, d in devices], list(keys)
            )
        return {(r[0], r[1], r[2]) for r in rows}

    async def pull(self, user: str, query: PullQuery, max_bytes: int = PULL_PAGE_BYTES) -> PullPage:
        """The deltas after the query's cursor: at most ``query.limit``, and
        no more than about ``max_bytes`` as the answer spells them (at least
        one delta, whatever its size); ``has_more`` when any were left."""
        cursor = query.cursor
        if cursor.collection is None:
            # Past the whole of ``version``: every key of the next one sorts after this.
            after = (cursor.version + 1, "", "")
        else:
            after = (cursor.version, cursor.collection, cursor.record_id or "")
        async with self._connection() as con:
            rows = await con.fetch(PULL, user, *after, query.limit + 1, query.collection, max_bytes)
        user_version, horizon = rows[0]["user_version"] or 0, rows[0]["horizon"] or 0
        _check_cursor(cursor, user_version, horizon)
        deltas, cut = _deltas(rows, max_bytes) if rows[0]["version"] is not None else ([], False)
        has_more = cut or len(deltas) > query.limit
        if has_more:
            deltas = deltas[: query.limit]
            last = deltas[-1]
            next_cursor = Cursor(last.version, last.collection, last.record_id, horizon)
        else:
            next_cursor = Cursor(max(user_version, cursor.version), horizon=horizon)
        return PullPage(tuple(deltas), next_cursor, has_more, user_version)

    async def purge(
        self, *, retention_s: float, batch: int = 500, dry_run: bool = False
    ) -> dict[str, Any]:
        """Purge tombstones older than ``retention_s`` and expired receipts, in
        bounded transactions; with ``dry_run``, only count them. Returns what
        went (or would go); ``{"skipped": True}`` when another process purges."""
        async with self._connection() as con:
            if not await con.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
                return {"skipped": True}
            try:
                if dry_run:
                    return {
                        "dry_run": True,
                        "tombstones": await con.fetchval(COUNT_TOMBSTONES, retention_s),
                        "receipts": await con.fetchval(COUNT_RECEIPTS),
                    }
                records = fields = receipts = 0
                while True:
                    users = [r[0] for r in await con.fetch(TOMBSTONE_USERS, retention_s, batch)]
                    if not users:
                        break
                    async with con.transaction():
                        await con.fetch(LOCK_USERS, users)
                        row = await con.fetchrow(
                            PURGE_TOMBSTONES, retention_s, users, PURGE_RECORDS_PER_TRANSACTION
                        )
                    assert row is not None
                    records += row[0]
                    fields += row[1]
                    if not row[0]:
                        break  # revived meanwhile: nothing of these users goes this round
                while True:
                    gone = await con.fetchval(PURGE_RECEIPTS, batch * 10)
                    receipts += gone
                    if gone < batch * 10:
                        break
                return {"tombstones": records, "fields": fields, "receipts": receipts}
            finally:
                await con.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)

    async def require_resync(self) -> int:
        """Make every cursor made until now get 410 (after restoring a backup):
        each user's horizon goes past its version. Returns the users touched."""
        async with self._connection() as con:
            done = await con.execute("UPDATE hub_users SET horizon = version + 1")
        return int(done.split()[-1])

    # -- devices -------------------------------------------------------------------

    async def register_device(
        self, user: str, device: str, name: str | None, platform: str | None
    ) -> bool:
        """Record a connecting device (name and platform when given); False when revoked."""
        async with self._connection() as con:
            revoked = await con.fetchval(REGISTER_DEVICE, user, device, name, platform)
        return revoked is None

    async def devices(self, user: str) -> list[dict[str, Any]]:
        async with self._connection() as con:
            rows = await con.fetch(LIST_DEVICES, user)
        return [
            {
                "device": r["device"],
                "name": r["name"],
                "platform": r["platform"],
                "first_seen": r["first_seen"].isoformat(),
                "last_seen": r["last_seen"].isoformat(),
                "revoked": r["revoked_at"] is not None,
            }
            for r in rows
        ]

    async def revoke_device(self, user: str, device: str) -> bool:
        """Revoke; False when the user has no such device."""
        async with self._connection() as con:
            done: str = await con.execute(REVOKE_DEVICE, user, device)
        return done != "UPDATE 0"

    # -- API keys ----------------------------------------------------------------------

    async def create_api_key(
        self, key_id: str, user: str, name: str, scopes: list[str], key_hash: bytes
    ) -> dict[str, Any]:
        async with self._connection() as con:
            row = await con.fetchrow(CREATE_KEY, key_id, user, name, scopes, key_hash)
        assert row is not None
        return _key_body(row)

    async def api_keys(self, user: str) -> list[dict[str, Any]]:
        async with self._connection() as con:
            rows = await con.fetch(LIST_KEYS, user)
        return [_key_body(r) for r in rows]

    async def revoke_api_key(self, user: str, key_id: str) -> bool:
        async with self._connection() as con:
            done: str = await con.execute(REVOKE_KEY, user, key_id)
        return done != "UPDATE 0"

    async def find_api_key(self, key_id: str) -> ApiKeyRecord | None:
        async with self._connection() as con:
            row = await con.fetchrow(FIND_KEY, key_id)
        if row is None:
            return None
        return ApiKeyRecord(
            key_id,
            row["user_id"],
            frozenset(row["scopes"]),
            bytes(row["key_hash"]),
            row["revoked_at"] is not None,
        )

    async def keys_used(self, used: dict[str, float]) -> None:
        """Record when keys were last used, in one statement for many."""
        if not used:
            return
        async with self._connection() as con:
            await con.execute(TOUCH_KEYS, list(used), list(used.values()))

    async def status(self, user: str) -> dict[str, Any]:
        async with self._connection() as con:
            version = await con.fetchval("SELECT version FROM hub_users WHERE user_id = $1", user)
            collections = await con.fetch(STATUS_COLLECTIONS, user)
            devices = await con.fetch(STATUS_DEVICES, user)
        return {
            "version": int(version or 0),
            "collections": {
                r["collection"]: {"records": r["live"], "deleted": r["deleted"]}
                for r in collections
            },
            "devices": [r["device"] for r in devices],
        }


def _merge(
    push: Push,
    versions: dict[str, int],
    receipts: dict[tuple[str, str, str], tuple[bytes, str]],
    state: dict[tuple[str, str, str], RecordState],
    plan: _Plan,
    event_bytes: int,
) -> PushResult | HubError:
    """Merge one push into the batch's state and plan; its answer."""
    user = push.user
    current = versions[user]
    if push.key is not None:
        receipt_key = (user, push.scope, push.key)
        prior = receipts.get(receipt_key)
        if prior is not None:
            digest, response = prior
            if bytes(digest) != push.digest:
                return IdempotencyKeyReused(push.key)
            body = orjson.loads(response)
            return PushResult(
                body["version"], body["applied"], body["ignored"], prev=current, replay=True
            )
    version = current + 1
    applied = 0
    written: dict[tuple[str, str], list[str]] = {}
    # The change that last wrote each field, and the last that raised each delete stamp.
    wrote: dict[tuple[str, str, str], Change] = {}
    deleted_by: dict[tuple[str, str], Change] = {}
    for change in push.changes:
        key = (user, change.collection, change.record_id)
        record = state.get(key)
        if record is None:
            record = state[key] = RecordState()
        if change.op == "delete":
            assert change.hlc is not None
            if apply_delete(record, change.hlc):
                applied += 1
                deleted_by[key[1:]] = change
                plan.records[key] = (change.hlc, version, push.device, change.origin, change.actor)
            continue
        names = apply_upsert(record, change.fields)  # FieldWrite is (name, value, hlc)
        if names:
            applied += 1
            written.setdefault(key[1:], []).extend(names)
            for name in names:
                wrote[(*key[1:], name)] = change
            changed: Sequence[FieldWrite] = change.fields
            if len(names) < len(changed):
                kept = set(names)
                changed = [f for f in changed if f.name in kept]
            for f in changed:
                plan.fields[(*key, f.name)] = (
                    f.value,
                    f.hlc,
                    version,
                    push.device,
                    change.origin,
                    change.actor,
                )
    ignored = len(push.changes) - applied
    plan.devices.add((user, push.device))
    if applied:
        versions[user] = version
        plan.versions[user] = version
        big = _event_too_big(push, event_bytes)
        result = PushResult(
            version,
            applied,
            ignored,
            prev=current,
            deltas=None if big else _push_deltas(push, version, state, written, wrote, deleted_by),
            collections=tuple(sorted({c.collection for c in push.changes})),
        )
    else:
        result = PushResult(current, 0, ignored, prev=current)
    if push.key is not None:
        response = orjson.dumps(result.body()).decode()
        receipts[(user, push.scope, push.key)] = (push.digest, response)
        plan.receipts[(user, push.scope, push.key)] = (push.digest, response)
    return result


def _event_too_big(push: Push, limit: int) -> bool:
    """Whether a push's change event would pass ``limit`` bytes, estimated
    cheaply (no encoding; it stops counting once past the limit)."""
    size = 160 * len(push.changes)
    if size > limit:
        return True
    for change in push.changes:
        for f in change.fields:
            size += len(f.value) + len(f.name) + 60
        if size > limit:
            return True
    return False


def _push_deltas(
    push: Push,
    version: int,
    state: dict[tuple[str, str, str], RecordState],
    written: dict[tuple[str, str], list[str]],
    wrote: dict[tuple[str, str, str], Change],
    deleted_by: dict[tuple[str, str], Change],
) -> tuple[Delta, ...]:
    """The record deltas of one push, for its change event, in record order.
    Origin and actor are those of the change that wrote the delta's first
    field by name, or with no field, of its delete (as a pull tells them)."""
    deltas = []
    for ckey in sorted(written.keys() | deleted_by.keys()):
        record = state[(push.user, *ckey)]
        fields = {n: (record.fields[n].value, record.fields[n].hlc) for n in written.get(ckey, ())}
        # A later delete of the same push may have hidden fields written before it.
        if record.deleted_hlc is not None:
            fields = {n: v for n, v in fields.items() if v[1] > record.deleted_hlc}
        if fields:
            change = wrote[(*ckey, min(fields))]
        else:  # hidden again by a delete of the same push
            change = deleted_by.get(ckey) or wrote[(*ckey, written[ckey][-1])]
        deltas.append(
            Delta(
                ckey[0],
                ckey[1],
                version,
                push.device,
                fields,
                record.deleted,
                record.deleted_hlc,
                change.origin,
                change.actor,
            )
        )
    return tuple(deltas)


# What the driver and the network raise: an operator's command reports them
# in one line (the hub's own failures are HubError).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


async def check_database(
    database_url: str, timeout: float, *, apply_schema: bool = False
) -> str | None:
    """Why the database cannot be used, said for an operator; None when it can.
    With ``apply_schema``, the schema goes in now (as every process applies it
    when it starts), so that a database that cannot take it (no CREATE right,
    a clashing table) is named before the hub serves, not in a traceback."""
    try:
        con = await asyncpg.connect(database_url, timeout=timeout, command_timeout=timeout)
    except DATABASE_ERRORS as exc:
        return f"cannot connect: {type(exc).__name__}: {exc}"
    except ValueError as exc:  # a malformed URL, as asyncpg reads it
        return f"cannot be used: {exc}"
    try:
        if apply_schema:
            await _apply_schema(con, timeout)
    except asyncpg.PostgresError as exc:
        return f"cannot apply the hub's schema: {type(exc).__name__}: {exc}"
    except DATABASE_ERRORS as exc:
        return f"cannot apply the hub's schema: {type(exc).__name__}"
    finally:
        con.terminate()
    return None


async def _keep_session(con: asyncpg.Connection) -> None:
    """The pool's reset on release, doing nothing. asyncpg's default sends
    ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release, a round trip per batch and per pull; the hub leaves no session
    state behind (the retention job unlocks its advisory lock itself)."""


def _key_body(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "scopes": sorted(row["scopes"]),
        "created_at": row["created_at"].isoformat(),
        "last_used_at": row["last_used_at"].isoformat() if row["last_used_at"] else None,
        "revoked": row["revoked_at"] is not None,
    }


def _rejection(exc: asyncpg.PostgresError) -> HubError:
    """The answer to a push that failed on its own."""
    if isinstance(exc, asyncpg.DataError):
        return InvalidChange(f"the database refused a value: {exc.__class__.__name__}")
    if isinstance(exc, TOO_SLOW):  # the server's statement_timeout or lock_timeout
        log.warning("database too slow for a push: %s", type(exc).__name__)
        return Unavailable("the database did not answer in time; retry")
    log.error("push failed in the database: %s: %s", type(exc).__name__, exc)
    return Internal("the push could not be stored")


def _check_cursor(cursor: Cursor, version: int, horizon: int) -> None:
    # Below the horizon, a cursor made before the purge may have seen records
    # whose deletes are gone: only a full resync makes the device right again.
    if cursor.version and cursor.horizon < horizon:
        # Inside the horizon's own version (a position within it), the purge may
        # have taken deletes that sort after the position: they are lost too.
        if cursor.version < horizon or (cursor.version == horizon and cursor.collection):
            raise ResetRequired(horizon)
    if cursor.version > version:
        # A cursor from the future: the database was restored from an older backup.
        raise ResetRequired.ahead(version)


def _deltas(rows: Sequence[asyncpg.Record], max_bytes: int) -> tuple[list[Delta], bool]:
    """The deltas of a pull's rows, and whether the page was cut for its bytes
    (the last delta the query sent ends past ``max_bytes``: left out, unless
    it is the first, which comes alone; or the query left rows out after it)."""
    deltas: list[Delta] = []
    key: tuple[int, str, str] | None = None
    for row in rows:
        this = (row["version"], row["collection"], row["record_id"])
        if this != key:
            if deltas and row["upto"] > max_bytes:
                return deltas, True
            key = this
            deltas.append(
                Delta(
                    row["collection"],
                    row["record_id"],
                    row["version"],
                    row["device"] if row["field"] is not None else row["record_device"],
                    {},
                    row["deleted"],
                    row["deleted_hlc"],
                    row["origin"] if row["field"] is not None else row["record_origin"],
                    row["actor"] if row["field"] is not None else row["record_actor"],
                )
            )
        if row["field"] is not None:
            deltas[-1].fields[row["field"]] = (row["value"], row["hlc"])
    # A first delta past the budget comes alone: the page was cut if the
    # query left rows out after it.
    return deltas, len(rows) < rows[0]["page_rows"]
