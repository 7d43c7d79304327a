"""The storage ceilings: how many field rows per second PostgreSQL itself takes
through a bare asyncpg connection, with nothing of the hub in the way.

A scratch table is made ``LIKE hub_fields INCLUDING ALL`` (same columns,
collations, primary key and index; the hub's schema must already be applied),
and batches of fresh rows go in, one autocommitted statement per batch (so
one commit, one WAL flush, per batch, as for a push), by one of two methods:

- ``upsert``: the last-writer-wins statement the hub's fields are written
  with, ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE ... WHERE
  excluded.hlc > t.hlc``. No merge, no version rows, no record rows, no
  receipts, no HTTP: the most the hub's write path could reach on this
  machine, and the push workload reports its own rate as a fraction of it.
- ``copy``: ``COPY ... FROM STDIN (FORMAT binary)`` of the same rows, the
  fastest way in that PostgreSQL has; it cannot merge, so it bounds what any
  upsert could reach.

Each measurement gets its own scratch table, dropped afterwards.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

__all__ = ["METHODS", "CeilingRun", "measure_ceiling"]

METHODS = ("upsert", "copy")
COLUMNS = "user_id collection record_id field value hlc version device origin actor".split()

UPSERT = """
INSERT INTO {table} AS t
    (user_id, collection, record_id, field, value, hlc, version, device, origin, actor)
SELECT u, c, i, n, val::jsonb, h, v, d, o, a::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::text[], $9::text[], $10::text[])
    AS x(u, c, i, n, val, h, v, d, o, a)
ON CONFLICT (user_id, collection, record_id, field) DO UPDATE
    SET value = excluded.value, hlc = excluded.hlc, version = excluded.version,
        device = excluded.device, origin = excluded.origin, actor = excluded.actor
    WHERE excluded.hlc > t.hlc
"""

Batch = list[list[object]]  # columns (upsert) or rows (copy)
Writer = Callable[[Batch], Awaitable[object]]


@dataclass(frozen=True)
class CeilingRun:
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def _batch(tag: str, batch: int, rows: int, wall_ms: int) -> Batch:
    """Columns of ``rows`` fresh rows (distinct records), one field each."""
    ids = [f"{tag}-{batch}-{i}" for i in range(rows)]
    stamp = f"{wall_ms:013d}-0000-bench"
    return [
        ["bench-ceiling"] * rows,
        ["bulk"] * rows,
        ids,
        ["n"] * rows,
        [str(i) for i in range(rows)],
        [stamp] * rows,
        [batch + 1] * rows,
        ["bench"] * rows,
        ["user"] * rows,
        [None] * rows,
    ]


async def _writer(con: asyncpg.Connection, table: str, method: str) -> Writer:
    """A function writing one batch (columns) into ``table`` by ``method``."""
    if method == "upsert":
        statement = await con.prepare(UPSERT.format(table=table))
        return lambda columns: statement.fetch(*columns)
    if method == "copy":
        # Rows, not columns: turned around before the clock starts, by _prepare.
        return lambda rows: con.copy_records_to_table(table, records=rows, columns=COLUMNS)
    raise ValueError(f"unknown ceiling method {method!r}, expected one of {METHODS}")


def _prepare(columns: Batch, method: str) -> Batch:
    return [list(row) for row in zip(*columns, strict=True)] if method == "copy" else columns


async def measure_ceiling(
    database_url: str, *, runs: int, batches: int, rows: int, method: str = "upsert"
) -> list[CeilingRun]:
    """``runs`` runs of ``batches`` statements of ``rows`` rows each, after a warm-up,
    written by ``method`` (one of :data:`METHODS`)."""
    table = f"bench_ceiling_{method}_" + secrets.token_hex(4)
    con = await asyncpg.connect(database_url)
    try:
        await con.execute(f"CREATE TABLE {table} (LIKE hub_fields INCLUDING ALL)")
        write = await _writer(con, table, method)
        wall_ms = time.time_ns() // 1_000_000
        # Warm-up: plan cache, catalog, buffers.
        for b in range(3):
            await write(_prepare(_batch("warm", b, rows, wall_ms), method))
        results = []
        for run in range(runs):
            prepared = [
                _prepare(_batch(f"r{run}", b, rows, wall_ms), method) for b in range(batches)
            ]
            start = time.perf_counter()
            for batch in prepared:
                await write(batch)
            results.append(CeilingRun(rows * batches, time.perf_counter() - start))
        return results
    finally:
        try:
            await con.execute(f"DROP TABLE IF EXISTS {table}")
        finally:
            await con.close()
