"""Workload ``storage``: PostgreSQL's CPU per push, and what the receipts take of it.

The store's own commit (:meth:`hub.store_postgres.PostgresStore.commit`) is
driven directly, with no hub process, no network and no WebSocket in front,
by batches shaped as w2's: each push writes one field of its user's one
record (so every write is an update), 250 users, ``batch`` pushes per
batch (50: about what w2's saturation makes). Two variants, in alternating
runs, each on a fresh database:

- ``receipts``: every push carries a message id, as a WebSocket push does,
  so the batch also reads and writes its idempotency receipts;
- ``no receipts``: the same pushes without ids.

Around each run the CPU time of the PostgreSQL server's processes for that
database is read, and this process's own (the store's Python side: merge,
encoding, asyncpg). The difference between the variants is what a receipt
costs PostgreSQL per push.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
from dataclasses import asdict, dataclass
from statistics import median

import uvloop

from hub.hlc import Clock
from hub.store_postgres import PostgresStore
from hub.types import Change, FieldWrite, Push

from . import machine
from .cpu import CpuMeter, postgres_group
from .database import Database, bench_database
from .report import Report

__all__ = ["add_arguments", "run"]

VARIANTS = ("receipts", "no receipts")
WARMUP_BATCHES = 20


@dataclass(frozen=True)
class StorageConfig:
    users: int = 250
    batch: int = 50
    runs: int = 3
    seconds: float = 6.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = StorageConfig()
    parser.add_argument("--users", type=int, default=d.users, help="users (one record each)")
    parser.add_argument("--batch", type=int, default=d.batch, help="pushes per commit")
    parser.add_argument("--runs", type=int, default=d.runs, help="runs of each variant")
    parser.add_argument("--seconds", type=float, default=d.seconds, help="length of each run")


@dataclass(frozen=True)
class StorageRun:
    variant: str
    pushes: int
    wall_s: float
    postgres_cpu_s: float
    store_cpu_s: float

    def per_push_us(self, cpu_s: float) -> float:
        return 1e6 * cpu_s / self.pushes


async def _measure(db: Database, cfg: StorageConfig, variant: str) -> StorageRun:
    store = await PostgresStore.connect(db.url, max_size=2)
    try:
        clocks = [Clock(f"d{u}") for u in range(cfg.users)]
        seq = 0

        def batch() -> list[Push]:
            nonlocal seq
            pushes = []
            for u in random.sample(range(cfg.users), cfg.batch):
                seq += 1
                write = FieldWrite("n", str(seq), clocks[u].now())
                key = f"m-{seq}" if variant == "receipts" else None
                changes = (Change("bench", "r", "upsert", (write,)),)
                pushes.append(Push(f"u{u}", "d0", changes, key, "ws:d0", b"%032d" % seq))
            return pushes

        for _ in range(WARMUP_BATCHES):
            await store.commit(batch())
        async with store.pool.acquire() as con:
            await con.execute("ANALYZE")
        meter = CpuMeter({"postgres": postgres_group(db.server_pid, db.name)})
        pushes = 0
        meter.start()
        own = time.process_time()
        began = time.perf_counter()
        while time.perf_counter() - began < cfg.seconds:
            await store.commit(batch())
            pushes += cfg.batch
        own = time.process_time() - own
        sample = meter.stop()
        return StorageRun(variant, pushes, sample.wall_s, sample.cpu_s["postgres"], own)
    finally:
        await store.close()


def run(args: argparse.Namespace) -> Report:
    cfg = StorageConfig(args.users, args.batch, args.runs, args.seconds)
    if cfg.batch > cfg.users:
        raise SystemExit("bench: want --batch <= --users (one push per user in a batch)")
    started = dt.datetime.now(dt.UTC)
    runs: list[StorageRun] = []
    version = origin = ""
    for _ in range(cfg.runs):
        for variant in VARIANTS:  # alternating, so that drifts of the machine hit both
            with bench_database() as db:
                version, origin = db.server_version, db.origin
                runs.append(uvloop.run(_measure(db, cfg, variant)))
    report = Report(
        args.workload, started, asdict(cfg), machine.describe(postgresql=version, database=origin)
    )
    for variant in VARIANTS:
        mine = [r for r in runs if r.variant == variant]
        report.add(
            f"{variant}: PostgreSQL CPU per push",
            "us",
            [r.per_push_us(r.postgres_cpu_s) for r in mine],
            "CPU of the database's backends and the server's own processes, per push",
        )
        report.add(
            f"{variant}: store (Python) CPU per push",
            "us",
            [r.per_push_us(r.store_cpu_s) for r in mine],
            "this process: merge, encoding, asyncpg",
        )
        report.add(f"{variant}: pushes/s", "pushes/s", [r.pushes / r.wall_s for r in mine])
    with_receipts, without = (
        median(r.per_push_us(r.postgres_cpu_s) for r in runs if r.variant == v) for v in VARIANTS
    )
    report.details["receipt_share_of_postgres_cpu"] = (
        (with_receipts - without) / with_receipts if with_receipts else 0.0
    )
    report.notes.append(
        f"a receipt costs PostgreSQL {with_receipts - without:.1f} us per push "
        f"({report.details['receipt_share_of_postgres_cpu']:.0%} of its CPU per push)"
    )
    report.finished_at = dt.datetime.now(dt.UTC)
    return report
