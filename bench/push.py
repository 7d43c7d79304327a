"""Workload ``push``: HTTP pushes against a real hub process.

Measured, each over several runs (the table shows the medians):

(a) latency of a one-change push, sent one after another on one keep-alive
    connection, after a warm-up;
(b) changes/s of 1000-change pushes (each change a new record), sent one
    after another;
(c) pushes/s of many clients (one user and connection each) pushing one-change
    pushes at once for a fixed time. How many pushes share a PostgreSQL
    transaction is read from the server's transaction ids: every commit of the
    hub takes one (its ``SELECT ... FOR UPDATE`` needs it), so pushes divided by
    ids used is a lower bound on pushes per transaction (other writers on the
    same server, if any, only lower it);
(d) the storage ceiling (:mod:`bench.ceiling`) in the same run, so (b) can be
    given as a fraction of it.

Every push carries an ``Idempotency-Key`` (as every WebSocket push does) and a
fresh HLC stamp, so each one changes stored state and gets a new version.
One-change pushes cycle over 100 records per user. Request bodies of (a) and
(b) are encoded before the clock starts. After the first warm-up of each
measurement the database is analyzed (:func:`bench.database.analyze`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import uvloop

from hub.auth import make_token
from hub.hlc import Clock

from . import machine
from .ceiling import measure_ceiling
from .cpu import CpuMeter, Group, postgres_group
from .database import Database, analyze, bench_database
from .http_client import HttpConnection
from .report import Report
from .servers import ServerProcess, start_hub
from .stats import summarize_ns

__all__ = ["PushConfig", "add_arguments", "run"]

PUSH_PATH = "/v1/sync/push"
JWT_SECRET = "bench-secret-" + "x" * 40
OTHER_LOAD_WARN_CORES = 0.2


@dataclass(frozen=True)
class PushConfig:
    """What the push workload does; the defaults keep it under a minute."""

    runs: int = 3
    warmup: int = 200
    sequential: int = 2000
    bulk_pushes: int = 30
    bulk_changes: int = 1000
    clients: int = 64
    concurrent_seconds: float = 8.0
    ceiling_runs: int = 5
    max_run_seconds: float = 4.0  # a run of (a) or (b) stops here, early (and says so)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PushConfig()
    parser.add_argument("--runs", type=int, default=d.runs, help="runs of each measurement")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed pushes first")
    parser.add_argument(
        "--sequential", type=int, default=d.sequential, help="timed one-change pushes per run"
    )
    parser.add_argument("--bulk-pushes", type=int, default=d.bulk_pushes)
    parser.add_argument("--bulk-changes", type=int, default=d.bulk_changes)
    parser.add_argument("--clients", type=int, default=d.clients, help="concurrent clients")
    parser.add_argument("--concurrent-seconds", type=float, default=d.concurrent_seconds)
    parser.add_argument("--ceiling-runs", type=int, default=d.ceiling_runs)


class Pusher:
    """One user's device pushing over one keep-alive connection."""

    def __init__(self, conn: HttpConnection, user: str, device: str) -> None:
        self.conn = conn
        self.user = user
        self.device = device
        self.clock = Clock(device)
        self.headers = {
            "Authorization": f"Bearer {make_token(JWT_SECRET, user, ttl_s=3600)}",
            "Content-Type": "application/json",
        }
        self.sent = 0

    def one_change(self, record: str) -> bytes:
        """A keyed request with one upsert of field ``n`` of ``record``."""
        self.sent += 1
        change = {
            "collection": "bench",
            "id": record,
            "op": "upsert",
            "fields": {"n": {"value": self.sent, "hlc": self.clock.now()}},
        }
        return self._request([change])

    def many_changes(self, tag: str, count: int) -> bytes:
        """A keyed request that creates ``count`` new records, one field each."""
        self.sent += 1
        stamp = self.clock.now()
        changes = [
            {
                "collection": "bulk",
                "id": f"{tag}-{i}",
                "op": "upsert",
                "fields": {"n": {"value": i, "hlc": stamp}},
            }
            for i in range(count)
        ]
        return self._request(changes)

    def _request(self, changes: list[dict[str, Any]]) -> bytes:
        body = orjson.dumps({"device": self.device, "changes": changes})
        headers = {**self.headers, "Idempotency-Key": f"{self.device}-{self.sent}"}
        return self.conn.request_bytes("POST", PUSH_PATH, headers, body)

    async def send(self, raw: bytes, expect_applied: int) -> None:
        status, body = await self.conn.send(raw)
        if status != 200:
            raise RuntimeError(f"push answered {status}: {body[:300]!r}")
        applied = orjson.loads(body)["applied"]
        if applied != expect_applied:
            raise RuntimeError(f"push applied {applied} changes, expected {expect_applied}")


async def _sequential(pusher: Pusher, cfg: PushConfig, run: int, database_url: str) -> list[int]:
    """Latencies (ns) of ``cfg.sequential`` one-change pushes, after the warm-up."""
    requests = [pusher.one_change(f"r{i % 100}") for i in range(cfg.warmup + cfg.sequential)]
    for raw in requests[: cfg.warmup]:
        await pusher.send(raw, 1)
    if run == 0:
        await analyze(database_url)
    latencies = []
    deadline = time.perf_counter() + cfg.max_run_seconds
    for raw in requests[cfg.warmup :]:
        t0 = time.perf_counter_ns()
        await pusher.send(raw, 1)
        latencies.append(time.perf_counter_ns() - t0)
        if time.perf_counter() > deadline:
            break
    return latencies


async def _bulk(pusher: Pusher, cfg: PushConfig, run: int, database_url: str) -> tuple[int, float]:
    """(changes, seconds) of ``cfg.bulk_pushes`` pushes of ``cfg.bulk_changes`` new records."""
    warm = pusher.many_changes(f"w{run}", cfg.bulk_changes)
    await pusher.send(warm, cfg.bulk_changes)
    if run == 0:
        await analyze(database_url)
    requests = [
        pusher.many_changes(f"b{run}-{p}", cfg.bulk_changes) for p in range(cfg.bulk_pushes)
    ]
    deadline = time.perf_counter() + cfg.max_run_seconds
    done = 0
    start = time.perf_counter()
    for raw in requests:
        await pusher.send(raw, cfg.bulk_changes)
        done += 1
        if time.perf_counter() > deadline:
            break
    return done * cfg.bulk_changes, time.perf_counter() - start


async def _xid(database_url: str) -> int:
    con = await asyncpg.connect(database_url)
    try:
        xid: int = await con.fetchval("SELECT pg_current_xact_id()::text::bigint")
    finally:
        await con.close()
    return xid


async def _concurrent(pushers: list[Pusher], seconds: float) -> tuple[int, list[int]]:
    """Every pusher pushes one-change pushes until the time is up.

    Returns the pushes completed within ``seconds`` and all their latencies (ns).
    """
    latencies: list[int] = []
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)
    max_each = int(seconds * 5000) + 100  # a bound on count, far above reachable rates

    async def client(p: Pusher) -> int:
        done = 0
        for i in range(max_each):
            raw = p.one_change(f"c{i % 100}")
            t0 = time.perf_counter_ns()
            if t0 >= deadline:
                break
            await p.send(raw, 1)
            t1 = time.perf_counter_ns()
            if t1 <= deadline:
                done += 1
                latencies.append(t1 - t0)
        return done

    counts = await asyncio.gather(*(client(p) for p in pushers))
    return sum(counts), latencies


async def _measure(db: Database, hub: ServerProcess, cfg: PushConfig, report: Report) -> None:
    tag = secrets.token_hex(3)
    host, port = "127.0.0.1", hub.port
    details: dict[str, Any] = {}
    meter = CpuMeter(
        {
            "hub": Group.of([hub.pid]),
            "postgres": postgres_group(db.server_pid, db.name),
            "client": Group.of([os.getpid()]),
        }
    )
    whole = CpuMeter(meter.groups)
    whole.start()

    # (a) one-change pushes, one after another
    seq = Pusher(await HttpConnection.open(host, port), f"bench-seq-{tag}", "seq")
    runs_a = []
    for run in range(cfg.runs):
        lat = await _sequential(seq, cfg, run, db.url)
        runs_a.append({**summarize_ns(lat), "pushes_per_s": len(lat) / (sum(lat) / 1e9)})
    seq.conn.close()
    details["sequential"] = runs_a
    report.add(
        "push 1 change: latency p50",
        "ms",
        [r["p50_ms"] for r in runs_a],
        "one-change HTTP push, one at a time on a keep-alive connection: request sent "
        "to response read, median",
    )
    report.add(
        "push 1 change: latency p99",
        "ms",
        [r["p99_ms"] for r in runs_a],
        "the same pushes, 99th percentile",
    )

    # (b) 1000-change pushes, one after another
    bulk = Pusher(await HttpConnection.open(host, port), f"bench-bulk-{tag}", "bulk")
    runs_b = []
    for run in range(cfg.runs):
        changes, seconds = await _bulk(bulk, cfg, run, db.url)
        runs_b.append({"changes": changes, "seconds": seconds, "changes_per_s": changes / seconds})
    bulk.conn.close()
    details["bulk"] = runs_b
    report.add(
        f"push {cfg.bulk_changes} changes: changes/s",
        "changes/s",
        [r["changes_per_s"] for r in runs_b],
        f"{cfg.bulk_changes}-change pushes (each change a new record, one field), "
        "one at a time: changes stored per second",
    )

    # (d) the storage ceiling, measured in the same run
    ceiling = await measure_ceiling(
        db.url, runs=cfg.ceiling_runs, batches=cfg.bulk_pushes, rows=cfg.bulk_changes
    )
    details["ceiling"] = [asdict(c) | {"rows_per_s": c.rows_per_s} for c in ceiling]
    ceiling_rate = report.add(
        f"storage ceiling: unnest upsert of {cfg.bulk_changes} rows",
        "rows/s",
        [c.rows_per_s for c in ceiling],
        "bare asyncpg INSERT ... SELECT FROM unnest ON CONFLICT DO UPDATE WHERE newer, "
        "into a table like hub_fields, one statement per transaction",
    )
    report.add(
        "bulk push / storage ceiling",
        "ratio",
        [r["changes_per_s"] / ceiling_rate.median for r in runs_b],
        "hub changes/s of (b) divided by the ceiling's median rows/s",
    )

    # (c) many clients at once
    pushers = [
        Pusher(await HttpConnection.open(host, port), f"bench-c{i}-{tag}", f"c{i}")
        for i in range(cfg.clients)
    ]
    await _concurrent(pushers, 1.0)  # warm-up: users, connections, plans
    await analyze(db.url)
    runs_c = []
    for _ in range(cfg.runs):
        xid0 = await _xid(db.url)
        meter.start()
        pushes, lat = await _concurrent(pushers, cfg.concurrent_seconds)
        cpu = meter.stop()
        transactions = max(1, await _xid(db.url) - xid0 - 1)
        server_cpu = cpu.total("hub", "postgres")
        runs_c.append(
            {
                **summarize_ns(lat),
                "pushes": pushes,
                "pushes_per_s": pushes / cfg.concurrent_seconds,
                "transactions": transactions,
                "pushes_per_transaction": pushes / transactions,
                "cpu": cpu.as_json(),
                "pushes_per_server_cpu_s": pushes / server_cpu if server_cpu else 0.0,
                "client_cores": cpu.share("client"),
            }
        )
    for p in pushers:
        p.conn.close()
    details["concurrent"] = runs_c
    report.add(
        f"push 1 change x {cfg.clients} clients: pushes/s",
        "pushes/s",
        [r["pushes_per_s"] for r in runs_c],
        f"{cfg.clients} clients (one user each) pushing one-change pushes for "
        f"{cfg.concurrent_seconds:g} s: pushes answered per second",
    )
    report.add(
        f"push 1 change x {cfg.clients} clients: pushes per transaction",
        "pushes/txn",
        [r["pushes_per_transaction"] for r in runs_c],
        "pushes divided by PostgreSQL transaction ids used meanwhile (>1: pushes share "
        "transactions)",
    )
    report.add(
        f"push 1 change x {cfg.clients} clients: latency p50",
        "ms",
        [r["p50_ms"] for r in runs_c],
    )
    report.add(
        f"push 1 change x {cfg.clients} clients: latency p99",
        "ms",
        [r["p99_ms"] for r in runs_c],
    )
    report.add(
        f"push 1 change x {cfg.clients} clients: pushes per server CPU-second",
        "pushes/cpu-s",
        [r["pushes_per_server_cpu_s"] for r in runs_c],
        "pushes divided by the CPU-seconds of the hub process and all PostgreSQL processes",
    )
    report.add(
        "load client CPU (concurrent phase)",
        "cores",
        [r["client_cores"] for r in runs_c],
        "CPU used by this benchmark's own process during (c), in cores",
    )
    for i, r in enumerate(runs_c, 1):
        if r["cpu"]["other_cores"] > OTHER_LOAD_WARN_CORES:
            report.notes.append(
                f"concurrent run {i}: other processes used {r['cpu']['other_cores']:.2f} "
                "cores meanwhile"
            )
    busy = whole.stop()
    details["whole_run_cpu"] = busy.as_json()
    report.details = details
    if busy.other_cores > OTHER_LOAD_WARN_CORES:
        report.notes.append(
            f"other processes used {busy.other_cores:.2f} cores on average during the run: "
            "the machine was not quiet, expect noise"
        )


def run(args: argparse.Namespace) -> Report:
    counts = (args.runs, args.sequential, args.bulk_pushes, args.bulk_changes, args.clients)
    if min(counts) < 1 or args.ceiling_runs < 1 or args.concurrent_seconds <= 0:
        raise SystemExit("bench: every count must be at least 1 and every time positive")
    cfg = PushConfig(
        runs=args.runs,
        warmup=args.warmup,
        sequential=args.sequential,
        bulk_pushes=args.bulk_pushes,
        bulk_changes=args.bulk_changes,
        clients=args.clients,
        concurrent_seconds=args.concurrent_seconds,
        ceiling_runs=args.ceiling_runs,
    )
    started = dt.datetime.now(dt.UTC)
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-push-"))
    with bench_database() as db:
        report = Report(
            "push",
            started,
            asdict(cfg),
            machine.describe(postgresql=db.server_version, database=db.origin),
        )
        hub = start_hub(db.url, JWT_SECRET, log_dir)
        try:
            uvloop.run(_measure(db, hub, cfg, report))
        except Exception:
            if hub.alive():
                print(f"bench: the hub's log ({hub.log_path}):\n{hub.log_tail()}")
            raise
        finally:
            hub.stop()
    report.notes.append(f"hub log: {hub.log_path}")
    slow = [r for r in report.details.get("sequential", []) if r["count"] < cfg.sequential]
    if slow:
        report.notes.append(f"{len(slow)} sequential run(s) stopped at the time bound")
    full = cfg.bulk_pushes * cfg.bulk_changes
    short = [r for r in report.details.get("bulk", []) if r["changes"] < full]
    if short:
        report.notes.append(f"{len(short)} bulk run(s) stopped at the time bound")
    report.finished_at = dt.datetime.now(dt.UTC)
    return report
