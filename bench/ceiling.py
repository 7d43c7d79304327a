"""The storage ceiling: how many field rows per second PostgreSQL itself takes
through the statement the hub's store writes fields with.

A scratch table is made ``LIKE hub_fields INCLUDING ALL`` (same columns,
collations, primary key and index; the hub's schema must already be applied),
and batches of fresh rows go in through a bare asyncpg connection with
``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE ... WHERE
excluded.hlc > t.hlc``, one autocommitted statement per batch. No merge, no
version rows, no record rows, no HTTP: this is the most the hub's write path
could reach on this machine, and the push workload reports its own rate as a
fraction of it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import asyncpg

__all__ = ["CeilingRun", "measure_ceiling"]

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


@dataclass(frozen=True)
class CeilingRun:
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def _batch(tag: str, batch: int, rows: int, wall_ms: int) -> list[list[object]]:
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


async def measure_ceiling(
    database_url: str, *, runs: int, batches: int, rows: int
) -> list[CeilingRun]:
    """``runs`` runs of ``batches`` statements of ``rows`` rows each, after a warm-up."""
    table = "bench_ceiling_" + secrets.token_hex(4)
    con = await asyncpg.connect(database_url)
    try:
        await con.execute(f"CREATE TABLE {table} (LIKE hub_fields INCLUDING ALL)")
        statement = await con.prepare(UPSERT.format(table=table))
        wall_ms = time.time_ns() // 1_000_000
        # Warm-up: plan cache, catalog, buffers.
        for b in range(3):
            await statement.fetch(*_batch("warm", b, rows, wall_ms))
        results = []
        for run in range(runs):
            prepared = [_batch(f"r{run}", b, rows, wall_ms) for b in range(batches)]
            start = time.perf_counter()
            for columns in prepared:
                await statement.fetch(*columns)
            results.append(CeilingRun(rows * batches, time.perf_counter() - start))
        return results
    finally:
        try:
            await con.execute(f"DROP TABLE IF EXISTS {table}")
        finally:
            await con.close()
