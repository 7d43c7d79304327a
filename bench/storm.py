"""Workload ``w5``: the reconnect storm.

``users`` x ``devices`` WebSocket devices (two client processes,
:mod:`bench.storm_clients`) hold replicas of their users' data: each
connected, pulled from 0 and kept its cursor. Then:

1. every device disconnects (the hub's ``/health`` must count 0 connections);
2. another device of the same users (a pusher process) makes ``changes``
   changes over HTTP, one change per push, cycling over 8 records per user,
   every 13th a delete;
3. at one instant every device reconnects and catches up: pulls from its
   cursor over the WebSocket, paging until ``has_more`` is false, while the
   pusher makes ``live_changes`` more over ``live_seconds``, which reach the
   devices as ``change`` events during their catch-up.

Measured: the time from the reconnect instant until every device holds its
user's final version (its replica complete up to it), each device's own
catch-up time (p50, p99), and the database's load over the storm: the
PostgreSQL cores used (its processes' CPU over the storm's length) and the
most backends of the run's database active at once (``pg_stat_activity``,
sampled every 20 ms).

Correctness (a run that fails it is invalid): at the end every user's state
is pulled from 0 and every device's replica must equal it (field values,
stamps, delete stamps); no device may get an event version twice or a delta
twice within one paged pull; every push must succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import uvloop

from . import machine
from .cpu import CpuMeter, Group, postgres_group
from .database import Database, analyze, bench_database
from .fanout import LOADGEN_MAX_CORES
from .report import Report
from .servers import ServerProcess, start_hub
from .stats import percentile
from .worker import WorkerProcess

__all__ = ["StormConfig", "add_arguments", "run"]

JWT_SECRET = "bench-secret-" + "s" * 40
SAMPLE_S = 0.02


@dataclass(frozen=True)
class StormConfig:
    users: int = 500
    devices: int = 4
    processes: int = 2
    seed_records: int = 5
    changes: int = 10_000
    live_changes: int = 1_000
    live_seconds: float = 2.0
    page_limit: int = 500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = StormConfig()
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--devices", type=int, default=d.devices, help="devices per user")
    parser.add_argument("--processes", type=int, default=d.processes, help="device processes")
    parser.add_argument(
        "--changes", type=int, default=d.changes, help="changes made while the devices are away"
    )
    parser.add_argument(
        "--live-changes", type=int, default=d.live_changes, help="changes made during the storm"
    )
    parser.add_argument("--live-seconds", type=float, default=d.live_seconds)
    parser.add_argument("--page-limit", type=int, default=d.page_limit, help="pull page size")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: 100 users, 2,000 changes"
    )


class ActivitySampler:
    """Samples the active backends of one database every ``SAMPLE_S``, on its own thread."""

    def __init__(self, url: str, database: str) -> None:
        self.url = url
        self.database = database
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-activity", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        uvloop.run(self._sample())

    async def _sample(self) -> None:
        con = await asyncpg.connect(self.url, timeout=5)
        try:
            while not self._stop.is_set():
                active = await con.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                    "AND state = 'active' AND pid <> pg_backend_pid()",
                    self.database,
                )
                self.samples.append(int(active))
                await asyncio.sleep(SAMPLE_S)
        finally:
            await con.close()


def _connections(hub: ServerProcess) -> int:
    with urllib.request.urlopen(hub.url + "/health", timeout=5) as answer:
        count: int = orjson.loads(answer.read())["connections"]
    return count


def _wait_disconnected(hub: ServerProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = _connections(hub)
    while count and time.monotonic() < deadline:
        time.sleep(0.05)
        count = _connections(hub)
    return count


def _all(
    workers: list[WorkerProcess], command: dict[str, Any], timeout: float
) -> list[dict[str, Any]]:
    for w in workers:
        w.send(command)
    return [w.expect("result", timeout) for w in workers]


def _storm(cfg: StormConfig, db: Database, log_dir: Path, report: Report) -> None:
    hub = start_hub(db.url, JWT_SECRET, log_dir, {"HUB_MAX_CONNECTIONS_PER_USER": "10"})
    workers: list[WorkerProcess] = []
    try:
        users = [f"storm-u{i}" for i in range(cfg.users)]
        ws_url = hub.ws_url("/v1/ws")
        pusher = WorkerProcess(
            "bench.storm_clients",
            {"role": "pusher", "http_url": hub.url, "users": users, "jwt_secret": JWT_SECRET},
            log_dir / "storm-pusher.log",
        )
        workers.append(pusher)
        per = -(-cfg.users // cfg.processes)
        devices = [
            WorkerProcess(
                "bench.storm_clients",
                {
                    "role": "devices",
                    "ws_url": ws_url,
                    "users": users[p * per : (p + 1) * per],
                    "devices": cfg.devices,
                    "jwt_secret": JWT_SECRET,
                    "page_limit": cfg.page_limit,
                },
                log_dir / f"storm-devices-{p}.log",
            )
            for p in range(cfg.processes)
            if users[p * per : (p + 1) * per]
        ]
        workers.extend(devices)
        for w in workers:
            w.expect("loaded", 30)
        seed = pusher.command(
            {
                "cmd": "push",
                "kind": "seed",
                "per_user": cfg.seed_records,
                "per_push": cfg.seed_records,
            },
            30,
        )
        first = _all(devices, {"cmd": "connect", "timeout": 30, "concurrency": 200}, 40)
        uvloop.run(analyze(db.url))
        dropped = _all(devices, {"cmd": "drop", "timeout": 10}, 20)
        left = _wait_disconnected(hub, 10)
        per_user = cfg.changes // cfg.users
        offline = pusher.command({"cmd": "push", "kind": "r", "per_user": per_user}, 60)
        uvloop.run(analyze(db.url))

        groups = {
            "hub": Group.of([hub.pid]),
            "postgres": postgres_group(db.server_pid, db.name),
            **{f"devices{i}": Group.of([w.pid]) for i, w in enumerate(devices)},
            "pusher": Group.of([pusher.pid]),
        }
        meter = CpuMeter(groups)
        sampler = ActivitySampler(db.url, db.name)
        sampler.start()
        at = time.monotonic() + 0.5
        meter.start()
        live_per_user = max(1, cfg.live_changes // cfg.users)
        pusher.send(
            {
                "cmd": "push",
                "kind": "live",
                "per_user": live_per_user,
                "at": at,
                "seconds": cfg.live_seconds,
            }
        )
        stormed = _all(devices, {"cmd": "storm", "at": at, "timeout": 30}, 45)
        live = pusher.expect("result", 45)
        backlog = {**seed["final"], **offline["final"]}
        final = {**backlog, **live["final"]}
        settled = _all(
            devices,
            {"cmd": "settle", "backlog": backlog, "final": final, "at": at, "timeout": 20},
            30,
        )
        cpu = meter.stop()
        sampler.stop()
        verified = _all(devices, {"cmd": "verify", "timeout": 20}, 30)
        if not hub.alive():
            raise RuntimeError(f"the hub died; its log:\n{hub.log_tail()}")
    finally:
        for w in workers:
            w.stop()
        hub.stop()

    catch_up = sorted(t for s in settled for t in s["backlog_ms"])
    to_final = sorted(t for s in settled for t in s["final_ms"])
    storm_s = catch_up[-1] / 1000 if catch_up else float("nan")
    pg_cores = cpu.share("postgres")
    hub_cores = cpu.share("hub")
    device_cores = max(cpu.share(f"devices{i}") for i in range(len(devices)))
    total = cfg.users * cfg.devices
    report.add(
        "storm: time until every device holds the server's state",
        "s",
        [storm_s],
        f"{total} devices reconnect at one instant after {offline['changes']:,} changes; until "
        "the last device's replica is complete up to its user's version at that instant",
    )
    report.add(
        "storm: per-device catch-up p50",
        "ms",
        [percentile(catch_up, 0.5)],
        "from the reconnect instant to that device holding its user's version at that instant",
    )
    report.add("storm: per-device catch-up p99", "ms", [percentile(catch_up, 0.99)])
    report.add(
        "storm: time until every device holds the final state",
        "s",
        [to_final[-1] / 1000 if to_final else float("nan")],
        f"the same, up to the final version: {live['changes']:,} more changes were pushed "
        f"from the reconnect instant on, over {cfg.live_seconds:g} s, and arrived as events",
    )
    report.add(
        "storm: PostgreSQL cores",
        "cores",
        [pg_cores],
        "the run database's backends and the server's own processes: CPU from the reconnect "
        "instant until every device held the final state, over that time",
    )
    report.add(
        "storm: most PostgreSQL backends active at once",
        "backends",
        [float(max(sampler.samples, default=0))],
        f"pg_stat_activity of the run's database, sampled every {SAMPLE_S * 1000:.0f} ms",
    )
    report.add("storm: hub cores", "cores", [hub_cores])
    report.add(
        "storm: device process cores (max)",
        "cores",
        [device_cores],
        f"a run is doubtful above {LOADGEN_MAX_CORES}",
    )
    report.add(
        "storm: pulls per device",
        "pulls",
        [sum(s["pulls"] for s in settled) / total],
        "WebSocket pull messages per device over its life (pages and re-pulls included)",
    )
    report.add(
        "offline changes pushed per second", "changes/s", [offline["changes"] / offline["seconds"]]
    )
    report.details.update(
        {
            "seed": seed | {"final": None},
            "first_connect": [r | {"connect_ms": None} for r in first],
            "dropped": dropped,
            "connections_left_after_drop": left,
            "offline": offline | {"final": None},
            "live": live | {"final": None},
            "storm": [r | {"connect_ms": None} for r in stormed],
            "storm_connect_p99_ms": percentile(
                sorted(t for r in stormed for t in r["connect_ms"]), 0.99
            ),
            "settle": [s | {"backlog_ms": None, "final_ms": None} for s in settled],
            "verify": verified,
            "cpu": cpu.as_json(),
            "active_backends_samples": len(sampler.samples),
        }
    )

    failed = offline["failed"] + live["failed"] + seed["failed"]
    if failed:
        report.invalid(
            f"{failed} pushes failed: {offline['first_failures'] + live['first_failures']}"
        )
    if left:
        report.invalid(f"{left} connections still open on the hub after every device dropped")
    for name, results in (("first connect", first), ("storm", stormed)):
        missing = sum(r["devices"] - r["synced"] for r in results)
        if missing:
            errors = [e for r in results for e in r["first_errors"]]
            report.invalid(f"{name}: {missing} devices did not connect and catch up ({errors[:3]})")
    behind = sum(s["final_behind"] for s in settled)
    if behind:
        report.invalid(f"{behind} devices never reached their user's final version")
    for key, what in (
        ("diverged_devices", "devices whose replica differs from the server's state"),
        ("differing_records", "records that differ between a replica and the server"),
        ("duplicate_events", "change events received twice (same version)"),
        ("repeated_deltas", "deltas repeated within one paged pull"),
        ("errors", "error messages"),
        ("closed_early", "connections closed by the hub"),
        ("users_unverified", "users whose state could not be pulled for the check"),
    ):
        count = sum(v[key] for v in verified)
        if count:
            report.invalid(f"{count} {what}")
    early = sum(s["early_events"] for s in settled)
    if early:
        report.notes.append(
            f"{early} change events reached a device before its connection's welcome "
            "(the hub attaches a connection to its user's events before it sends the welcome)"
        )
    if device_cores > LOADGEN_MAX_CORES:
        report.notes.append(f"a device process used {device_cores:.2f} cores: it may set the pace")
    if cpu.other_cores > 0.2:
        report.notes.append(f"other processes used {cpu.other_cores:.2f} cores meanwhile")


def run(args: argparse.Namespace) -> Report:
    cfg = StormConfig(
        users=100 if args.quick else args.users,
        devices=args.devices,
        processes=args.processes,
        changes=2_000 if args.quick else args.changes,
        live_changes=200 if args.quick else args.live_changes,
        live_seconds=args.live_seconds,
        page_limit=args.page_limit,
    )
    if cfg.users < 1 or cfg.devices < 1 or cfg.changes < cfg.users:
        raise SystemExit("bench: want --users >= 1, --devices >= 1, --changes >= --users")
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-w5-"))
    started = dt.datetime.now(dt.UTC)
    with bench_database() as db:
        report = Report(
            "w5",
            started,
            asdict(cfg),
            machine.describe(postgresql=db.server_version, database=db.origin),
        )
        _storm(cfg, db, log_dir, report)
    report.notes.append(f"logs: {log_dir}")
    report.finished_at = dt.datetime.now(dt.UTC)
    return report
