"""Workload ``w4`` (durable push; also run as ``push``): HTTP pushes against a
real hub process, next to what PostgreSQL alone takes.

Measured, each over several runs (the table shows the medians):

(a) for each push size (1, 10 and 1000 changes by default): pushes sent one
    after another by one client on one keep-alive connection, after a
    warm-up: changes stored per second, and the latency of each push from
    writing the request to reading the ack (p50, p99). Pushes of fewer than
    ``FRESH_FROM`` changes update records of a fixed set of ``RECORDS``
    (as a device editing its data does); larger ones create new records (as
    an import or a first sync does). One field per record;
(b) the storage ceilings (:mod:`bench.ceiling`) in the same run: the bare
    ``unnest`` upsert and ``COPY`` of the same number of rows per statement
    as the largest push, so (a) can be given as a fraction of them; the
    1000-change rate against the upsert ceiling is a target of the suite;
(c) pushes/s of many clients (one user and connection each) pushing
    one-change pushes at once for a fixed time. How many pushes share a
    PostgreSQL transaction is read from the server's transaction ids: every
    commit of the hub takes one (its ``SELECT ... FOR UPDATE`` needs it), so
    pushes divided by ids used is a lower bound on pushes per transaction
    (other writers on the same server, if any, only lower it);
(d) correctness: afterwards every user's state is pulled (``GET
    /v1/sync/pull`` from the beginning) and must be exactly what its acked
    pushes wrote (each field's value, stamp and version), the user's version
    must be that of its last ack, and its acks must carry the versions 1, 2,
    3, ... without a gap. Any difference makes the result invalid: a fast run
    that loses a change is a failed run.

Every push carries an ``Idempotency-Key`` (as every WebSocket push does) and a
fresh HLC stamp, so each one changes stored state and gets a new version.
Request bodies of (a) are encoded before the clock starts. After the first
warm-up of each measurement the database is analyzed
(:func:`bench.database.analyze`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
PULL_PATH = "/v1/sync/pull"
PULL_LIMIT = 5000  # the protocol's largest page
JWT_SECRET = "bench-secret-" + "x" * 40
OTHER_LOAD_WARN_CORES = 0.2
RECORDS = 100  # records per user that pushes smaller than FRESH_FROM update in turn
FRESH_FROM = 100  # pushes of this many changes or more create new records
BUDGET_S = 60.0  # a workload of the suite takes at most this long
TARGET_RATIO = 0.5  # 1000-change pushes against the unnest-upsert ceiling


@dataclass(frozen=True)
class PushConfig:
    """What the workload does; the defaults keep it under a minute."""

    sizes: tuple[int, ...] = (1, 10, 1000)
    runs: int = 3
    warmup: int = 200  # untimed pushes before the first run of a size (one for large ones)
    sequential: int = 1000  # timed pushes per run of a size below FRESH_FROM
    bulk_pushes: int = 30  # timed pushes per run of a size of FRESH_FROM or more
    clients: int = 64
    concurrent_seconds: float = 4.0
    ceiling_runs: int = 5
    max_run_seconds: float = 3.0  # a run of (a) stops here, early (and says so)


QUICK = PushConfig(
    runs=1, warmup=50, sequential=200, bulk_pushes=10, concurrent_seconds=2.0, ceiling_runs=2
)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 1000:
        raise argparse.ArgumentTypeError("push sizes must be between 1 and 1000 (the hub's limit)")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PushConfig()
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=d.sizes,
        metavar="N,N,...",
        help="changes per push, one measurement each (default: 1,10,1000)",
    )
    parser.add_argument("--runs", type=int, default=d.runs, help="runs of each measurement")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed pushes first")
    parser.add_argument(
        "--sequential",
        type=int,
        default=d.sequential,
        help=f"timed pushes per run of a size below {FRESH_FROM}",
    )
    parser.add_argument(
        "--bulk-pushes",
        type=int,
        default=d.bulk_pushes,
        help=f"timed pushes per run of a size of {FRESH_FROM} or more",
    )
    parser.add_argument(
        "--clients", type=int, default=d.clients, help="concurrent clients (0: no such phase)"
    )
    parser.add_argument("--concurrent-seconds", type=float, default=d.concurrent_seconds)
    parser.add_argument("--ceiling-runs", type=int, default=d.ceiling_runs)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one short run of everything (a smoke test; the numbers are rough)",
    )


@dataclass(frozen=True)
class Push:
    """One prepared request and what it writes: field ``n`` of each record
    gets ``value`` at ``stamp``."""

    raw: bytes
    collection: str
    records: tuple[str, ...]
    value: int
    stamp: str


@dataclass
class Pusher:
    """One user's device pushing over one keep-alive connection; remembers
    every acked push with its version, for the correctness check."""

    conn: HttpConnection
    user: str
    device: str
    sent: int = 0
    acked: list[tuple[Push, int]] = field(default_factory=list)
    clock: Clock = field(init=False)
    auth: str = field(init=False)

    def __post_init__(self) -> None:
        self.clock = Clock(self.device)
        self.auth = f"Bearer {make_token(JWT_SECRET, self.user, ttl_s=3600)}"

    def build(self, size: int) -> Push:
        """A keyed push of ``size`` changes, each to field ``n`` of its own record."""
        self.sent += 1
        if size < FRESH_FROM:
            first = self.sent * size
            collection = "bench"
            records = tuple(f"r{(first + i) % RECORDS}" for i in range(size))
        else:
            collection = "bulk"
            records = tuple(f"p{self.sent}-{i}" for i in range(size))
        stamp = self.clock.now()
        field_value = {"n": {"value": self.sent, "hlc": stamp}}
        changes = [
            {"collection": collection, "id": r, "op": "upsert", "fields": field_value}
            for r in records
        ]
        body = orjson.dumps({"device": self.device, "changes": changes})
        headers = {
            "Authorization": self.auth,
            "Content-Type": "application/json",
            "Idempotency-Key": f"{self.device}-{self.sent}",
        }
        raw = self.conn.request_bytes("POST", PUSH_PATH, headers, body)
        return Push(raw, collection, records, self.sent, stamp)

    async def send(self, push: Push) -> None:
        """Send ``push`` and check its ack: every change applied, a version."""
        status, body = await self.conn.send(push.raw)
        if status != 200:
            raise RuntimeError(f"push answered {status}: {body[:300]!r}")
        ack = orjson.loads(body)
        if ack["applied"] != len(push.records) or ack["ignored"] != 0:
            raise RuntimeError(f"push of {len(push.records)} changes acked as {ack}")
        self.acked.append((push, ack["version"]))

    async def pull_all(
        self, conn: HttpConnection
    ) -> tuple[dict[tuple[str, str], tuple[Any, str, int]], int]:
        """The user's whole state by pull on ``conn``, from the beginning: field
        ``n`` of each record as (value, stamp, version), and the user's version."""
        headers = {"Authorization": self.auth}
        state: dict[tuple[str, str], tuple[Any, str, int]] = {}
        cursor, version = "0", 0
        for _ in range(10_000):  # a bound far above any state pushed here
            path = f"{PULL_PATH}?since={quote(cursor)}&limit={PULL_LIMIT}"
            status, body = await conn.request("GET", path, headers)
            if status != 200:
                raise RuntimeError(f"pull answered {status}: {body[:300]!r}")
            page = orjson.loads(body)
            for delta in page["changes"]:
                key = (delta["collection"], delta["id"])
                if key in state or delta["deleted"] or set(delta["fields"]) != {"n"}:
                    raise RuntimeError(f"pull gave an unexpected delta: {delta}")
                n = delta["fields"]["n"]
                state[key] = (n["value"], n["hlc"], delta["version"])
            cursor, version = page["cursor"], page["version"]
            if not page["has_more"]:
                return state, version
        raise RuntimeError("pull did not reach the end")


def check_pushes(pusher: Pusher, state: dict[Any, Any], version: int) -> list[str]:
    """Differences between what ``pusher``'s acked pushes wrote and what pull gave."""
    problems = []
    versions = [v for _, v in pusher.acked]
    if versions != list(range(1, len(versions) + 1)):
        gaps = [(a, b) for a, b in zip(versions, versions[1:], strict=False) if b != a + 1]
        problems.append(f"acked versions are not 1..{len(versions)}: {gaps[:3]}")
    if version != (versions[-1] if versions else 0):
        problems.append(f"pull says version {version}, the last ack {versions[-1:]}")
    expected: dict[tuple[str, str], tuple[Any, str, int]] = {}
    for push, v in pusher.acked:
        for record in push.records:
            expected[(push.collection, record)] = (push.value, push.stamp, v)
    missing = expected.keys() - state.keys()
    extra = state.keys() - expected.keys()
    wrong = [k for k in expected.keys() & state.keys() if expected[k] != state[k]]
    for what, keys in (("missing", missing), ("unexpected", extra), ("wrong", wrong)):
        if keys:
            sample = sorted(keys)[:3]
            problems.append(f"{len(keys)} {what} records, e.g. {sample}")
    return [f"{pusher.user}: {p}" for p in problems]


@dataclass
class SequentialRun:
    size: int
    latencies_ns: list[int]
    seconds: float

    def as_json(self) -> dict[str, Any]:
        pushes = len(self.latencies_ns)
        return {
            "size": self.size,
            "pushes": pushes,
            "seconds": self.seconds,
            "changes_per_s": pushes * self.size / self.seconds,
            **summarize_ns(self.latencies_ns),
        }


async def _sequential(
    pusher: Pusher, size: int, cfg: PushConfig, run: int, database_url: str
) -> SequentialRun:
    """One run of pushes of ``size`` changes, one at a time, after a warm-up."""
    fresh = size >= FRESH_FROM
    warmup = 0 if run else (1 if fresh else cfg.warmup)
    count = cfg.bulk_pushes if fresh else cfg.sequential
    pushes = [pusher.build(size) for _ in range(warmup + count)]
    for push in pushes[:warmup]:
        await pusher.send(push)
    if run == 0:
        await analyze(database_url)
    latencies = []
    start = time.perf_counter_ns()
    deadline = start + int(cfg.max_run_seconds * 1e9)
    for push in pushes[warmup:]:
        t0 = time.perf_counter_ns()
        await pusher.send(push)
        t1 = time.perf_counter_ns()
        latencies.append(t1 - t0)
        if t1 > deadline:
            break
    return SequentialRun(size, latencies, (time.perf_counter_ns() - start) / 1e9)


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
        for _ in range(max_each):
            push = p.build(1)
            t0 = time.perf_counter_ns()
            if t0 >= deadline:
                break
            await p.send(push)
            t1 = time.perf_counter_ns()
            if t1 <= deadline:
                done += 1
                latencies.append(t1 - t0)
        return done

    counts = await asyncio.gather(*(client(p) for p in pushers))
    return sum(counts), latencies


def _changes(size: int) -> str:
    return f"{size} change" + ("s" if size > 1 else "")


async def _measure_sizes(
    db: Database, hub: ServerProcess, cfg: PushConfig, report: Report, tag: str
) -> tuple[list[Pusher], dict[int, list[SequentialRun]]]:
    """(a): every size, one user and connection each."""
    pushers, runs = [], {}
    for size in cfg.sizes:
        conn = await HttpConnection.open("127.0.0.1", hub.port)
        pusher = Pusher(conn, f"bench-seq{size}-{tag}", f"seq{size}")
        pushers.append(pusher)
        runs[size] = [await _sequential(pusher, size, cfg, run, db.url) for run in range(cfg.runs)]
        name = f"push {_changes(size)}"
        what = "new records" if size >= FRESH_FROM else f"records of a set of {RECORDS}"
        report.add(
            f"{name}: changes/s",
            "changes/s",
            [r.as_json()["changes_per_s"] for r in runs[size]],
            f"{_changes(size)} per push ({what}, one field each), one push at a time on a "
            "keep-alive connection: changes stored per second",
        )
        report.add(
            f"{name}: latency p50",
            "ms",
            [r.as_json()["p50_ms"] for r in runs[size]],
            "the same pushes: request written to ack read, median",
        )
        report.add(
            f"{name}: latency p99",
            "ms",
            [r.as_json()["p99_ms"] for r in runs[size]],
            "the same pushes, 99th percentile",
        )
    return pushers, runs


async def _measure_ceilings(
    db: Database, cfg: PushConfig, report: Report, runs: dict[int, list[SequentialRun]]
) -> dict[str, Any]:
    """(b): both ceilings at the largest push size, and the ratios to them."""
    size = max(cfg.sizes)
    details: dict[str, Any] = {}
    medians = {}
    for method, label, meaning in (
        (
            "upsert",
            "unnest upsert",
            "bare asyncpg INSERT ... SELECT FROM unnest ON CONFLICT DO UPDATE WHERE newer",
        ),
        ("copy", "COPY", "bare asyncpg COPY FROM STDIN (binary) of the same rows"),
    ):
        ceiling = await measure_ceiling(
            db.url, runs=cfg.ceiling_runs, batches=cfg.bulk_pushes, rows=size, method=method
        )
        details[method] = [asdict(c) | {"rows_per_s": c.rows_per_s} for c in ceiling]
        medians[method] = report.add(
            f"storage ceiling: {label} of {size} rows",
            "rows/s",
            [c.rows_per_s for c in ceiling],
            f"{meaning}, into a table like hub_fields, one statement per transaction",
        ).median
    rates = [r.as_json()["changes_per_s"] for r in runs[size]]
    ratio = report.add(
        "bulk push / storage ceiling",
        "ratio",
        [r / medians["upsert"] for r in rates],
        f"changes/s of {size}-change pushes divided by the unnest-upsert ceiling's median rows/s",
    )
    report.add(
        "bulk push / COPY ceiling",
        "ratio",
        [r / medians["copy"] for r in rates],
        f"changes/s of {size}-change pushes divided by the COPY ceiling's median rows/s",
    )
    if size == 1000:
        report.target(
            "1000-change pushes / unnest-upsert ceiling",
            ratio.median,
            TARGET_RATIO,
            at_least=True,
            meaning="changes/s of 1000-change HTTP pushes, one at a time, against the bare "
            "unnest upsert of 1000 rows per transaction on the same database",
        )
    else:
        report.notes.append("no target: the largest push size measured is not 1000")
    return details


async def _measure_concurrent(
    db: Database, hub: ServerProcess, cfg: PushConfig, report: Report, tag: str, meter: CpuMeter
) -> tuple[list[Pusher], list[dict[str, Any]]]:
    """(c): ``cfg.clients`` clients pushing one-change pushes at once."""
    pushers = [
        Pusher(await HttpConnection.open("127.0.0.1", hub.port), f"bench-c{i}-{tag}", f"c{i}")
        for i in range(cfg.clients)
    ]
    await _concurrent(pushers, min(1.0, cfg.concurrent_seconds))  # warm-up
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
    n = cfg.clients
    report.add(
        f"push 1 change x {n} clients: pushes/s",
        "pushes/s",
        [r["pushes_per_s"] for r in runs_c],
        f"{n} clients (one user each) pushing one-change pushes for "
        f"{cfg.concurrent_seconds:g} s: pushes answered per second",
    )
    report.add(
        f"push 1 change x {n} clients: pushes per transaction",
        "pushes/txn",
        [r["pushes_per_transaction"] for r in runs_c],
        "pushes divided by PostgreSQL transaction ids used meanwhile (>1: pushes share "
        "transactions)",
    )
    report.add(f"push 1 change x {n} clients: latency p50", "ms", [r["p50_ms"] for r in runs_c])
    report.add(f"push 1 change x {n} clients: latency p99", "ms", [r["p99_ms"] for r in runs_c])
    report.add(
        f"push 1 change x {n} clients: pushes per server CPU-second",
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
    return pushers, runs_c


async def _check(pushers: list[Pusher], port: int, report: Report) -> dict[str, Any]:
    """(d): pull every user's state and compare it with its acked pushes."""
    start = time.perf_counter()
    problems, changes = [], 0
    # A connection of its own: the pushers' ones may have been idle past the
    # server's keep-alive timeout.
    conn = await HttpConnection.open("127.0.0.1", port)
    try:
        for p in pushers:
            state, version = await p.pull_all(conn)
            problems += check_pushes(p, state, version)
            changes += sum(len(push.records) for push, _ in p.acked)
    finally:
        conn.close()
    pushes = sum(len(p.acked) for p in pushers)
    if problems:
        report.invalid(
            f"the pulled state differs from the acked pushes ({len(problems)} problems): "
            + "; ".join(problems[:5])
        )
    else:
        report.notes.append(
            f"correctness: all {pushes:,} acked pushes ({changes:,} changes) of "
            f"{len(pushers)} users pulled back exactly, versions contiguous"
        )
    return {
        "users": len(pushers),
        "pushes": pushes,
        "changes": changes,
        "problems": problems,
        "seconds": time.perf_counter() - start,
    }


async def _measure(db: Database, hub: ServerProcess, cfg: PushConfig, report: Report) -> None:
    tag = secrets.token_hex(3)
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
    pushers, runs = await _measure_sizes(db, hub, cfg, report, tag)
    details["sequential"] = {
        str(size): [r.as_json() for r in size_runs] for size, size_runs in runs.items()
    }
    details["ceiling"] = await _measure_ceilings(db, cfg, report, runs)
    if cfg.clients:
        concurrent, details["concurrent"] = await _measure_concurrent(
            db, hub, cfg, report, tag, meter
        )
        pushers += concurrent
    details["correctness"] = await _check(pushers, hub.port, report)
    for p in pushers:
        p.conn.close()
    busy = whole.stop()
    details["whole_run_cpu"] = busy.as_json()
    report.details = details
    if busy.other_cores > OTHER_LOAD_WARN_CORES:
        report.notes.append(
            f"other processes used {busy.other_cores:.2f} cores on average during the run: "
            "the machine was not quiet, expect noise"
        )


def _config(args: argparse.Namespace) -> PushConfig:
    if args.quick:
        return QUICK
    counts = (args.runs, args.sequential, args.bulk_pushes, args.ceiling_runs)
    if min(counts) < 1 or args.clients < 0 or args.concurrent_seconds <= 0:
        raise SystemExit("bench: every count must be at least 1 and every time positive")
    return PushConfig(
        sizes=args.sizes,
        runs=args.runs,
        warmup=args.warmup,
        sequential=args.sequential,
        bulk_pushes=args.bulk_pushes,
        clients=args.clients,
        concurrent_seconds=args.concurrent_seconds,
        ceiling_runs=args.ceiling_runs,
    )


def run(args: argparse.Namespace) -> Report:
    cfg = _config(args)
    started = dt.datetime.now(dt.UTC)
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-push-"))
    with bench_database() as db:
        report = Report(
            args.workload,
            started,
            asdict(cfg) | {"quick": args.quick},
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
    for size, size_runs in report.details.get("sequential", {}).items():
        full = cfg.bulk_pushes if int(size) >= FRESH_FROM else cfg.sequential
        short = [r for r in size_runs if r["pushes"] < full]
        if short:
            report.notes.append(
                f"{len(short)} run(s) of {size}-change pushes stopped at the time bound"
            )
    report.finished_at = dt.datetime.now(dt.UTC)
    took = (report.finished_at - started).total_seconds()
    if took > BUDGET_S:
        report.notes.append(f"took {took:.0f} s, over the suite's budget of {BUDGET_S:.0f} s")
    return report
