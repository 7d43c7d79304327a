"""Workload ``w1``: idle capacity, what an open connection costs the server.

For each server (a real hub, the bare relay on the ``websockets`` package,
the bare Starlette relay under uvicorn), one at a time:

1. start it and read its resident memory (RSS) once it is ready;
2. open ``connections`` WebSockets from ``processes`` client processes
   (:mod:`bench.idle_clients`, picows), all starting together; on the hub
   each is authenticated (a JWT in the ``Authorization`` header, ``?device=``)
   and counts as connected when its ``welcome`` arrives, ``devices`` per user;
3. wait until the server's RSS stops moving, read it again, check that every
   connection is still open and that the server holds a socket for each.

RSS per connection is (RSS with the connections - RSS before) / connections.
Connect rate is connections divided by the time from the first connect to the
last one done; connect p99 is over every connection's own time. The goal:
the hub's RSS per idle connection at most 2x the ``websockets`` relay's.
The relays get ``relay_connections`` (default 10,000), fewer than the hub,
so that the whole run stays under a minute: their connections are bare, so
the cost of one does not depend on how many others there are.

Why not exactly 20,000 connections: the open-files hard limit of this machine
is 20,000 per process and cannot be raised, and the server needs a few
descriptors of its own (listening socket, PostgreSQL pool, logs, epoll), so
one server process holds a bit under 20,000 sockets; the default 19,800
leaves room for those. The clients are spread over processes for the same
reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from . import machine
from .cpu import CpuMeter, Group, postgres_group
from .database import bench_database
from .fanout import LOADGEN_MAX_CORES
from .report import Report
from .servers import ServerProcess, start_hub, start_relay, start_websockets_relay
from .stats import percentile
from .targets import Target
from .worker import WorkerProcess

__all__ = ["IdleConfig", "add_arguments", "run"]

JWT_SECRET = "bench-secret-" + "w" * 40
SETTLE_TIMEOUT_S = 6.0
SETTLE_STEP_S = 0.25
SETTLE_TOLERANCE = 0.002  # RSS counts as settled when it moves less than this between steps


@dataclass(frozen=True)
class IdleConfig:
    connections: int = 19_800
    relay_connections: int = 10_000
    devices: int = 4  # per user; the hub's per-user limit stays at its default (10)
    processes: int = 2
    concurrency: int = 50  # connects in flight per client process
    relays: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = IdleConfig()
    parser.add_argument(
        "--connections",
        type=int,
        default=d.connections,
        help="idle connections per server (at most a bit under the open-files limit, 20000)",
    )
    parser.add_argument(
        "--relay-connections",
        type=int,
        default=d.relay_connections,
        help="idle connections per relay (fewer than the hub's, to keep the run under a minute)",
    )
    parser.add_argument("--devices", type=int, default=d.devices, help="connections per user")
    parser.add_argument("--processes", type=int, default=d.processes, help="client processes")
    parser.add_argument(
        "--concurrency", type=int, default=d.concurrency, help="connects in flight per process"
    )
    parser.add_argument(
        "--no-relays", action="store_true", help="measure the hub only, not the two relays"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 4,000 connections on the hub, 2,000 on each relay",
    )


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _settled_rss(pid: int) -> tuple[int, float]:
    """RSS once two readings a step apart differ by less than the tolerance (bounded)."""
    t0 = time.monotonic()
    last = _rss(pid)
    while time.monotonic() - t0 < SETTLE_TIMEOUT_S:
        time.sleep(SETTLE_STEP_S)
        now = _rss(pid)
        if abs(now - last) <= SETTLE_TOLERANCE * last:
            return now, time.monotonic() - t0
        last = now
    return last, time.monotonic() - t0


@dataclass
class Outcome:
    name: str
    connections: int
    rss_before: int
    rss_after: int
    settle_s: float
    connect_window_s: float
    latencies_us: list[int]
    fds: int
    client_cores: list[float]
    server_cores: dict[str, float]
    checks: list[dict[str, Any]]
    problems: list[str]
    timings: dict[str, float]

    @property
    def rss_per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.connections

    @property
    def connect_rate(self) -> float:
        return self.connections / self.connect_window_s if self.connect_window_s > 0 else 0.0

    def latency_ms(self, fraction: float) -> float:
        return percentile(sorted(self.latencies_us), fraction) / 1000

    def as_json(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "rss_per_connection_bytes": self.rss_per_connection,
            "rss_settle_s": self.settle_s,
            "connect_window_s": self.connect_window_s,
            "connect_rate_per_s": self.connect_rate,
            "connect_p50_ms": self.latency_ms(0.5),
            "connect_p99_ms": self.latency_ms(0.99),
            "connect_max_ms": self.latency_ms(1.0),
            "server_open_fds": self.fds,
            "client_cores": self.client_cores,
            "server_cores": self.server_cores,
            "timings": self.timings,
            "client_checks": self.checks,
            "problems": self.problems,
        }


def _measure(
    name: str,
    start: Callable[[], ServerProcess],
    target_of: Callable[[ServerProcess], Target],
    server_groups: Callable[[ServerProcess], dict[str, Group]],
    connections: int,
    cfg: IdleConfig,
    log_dir: Path,
) -> Outcome:
    t_start = time.monotonic()
    server = start()
    workers: list[WorkerProcess] = []
    try:
        target = target_of(server)
        users = [f"idle-u{i}" for i in range(-(-connections // cfg.devices))]
        # Whole users per process, so a user's devices share one client process.
        per_process = -(-len(users) // cfg.processes)
        for p in range(cfg.processes):
            mine = users[p * per_process : (p + 1) * per_process]
            if not mine:
                continue
            config = {
                "target": target.as_json(),
                "users": mine,
                "devices": cfg.devices,
                "concurrency": cfg.concurrency,
                "timeout_s": 45.0,
            }
            workers.append(
                WorkerProcess("bench.idle_clients", config, log_dir / f"idle-{name}-{p}.log")
            )
        for w in workers:
            w.expect("loaded", 30)
        total = len(users) * cfg.devices
        rss_before, _ = _settled_rss(server.pid)
        clients = {f"client{i}": Group.of([w.pid]) for i, w in enumerate(workers)}
        meter = CpuMeter({**server_groups(server), **clients})
        t_connect = time.monotonic()
        meter.start()
        for w in workers:
            w.send({"cmd": "connect"})
        results = [w.expect("result", 60) for w in workers]
        cpu = meter.stop()
        t_connected = time.monotonic()
        if not server.alive():
            raise RuntimeError(f"the {name} died; its log:\n{server.log_tail()}")
        rss_after, settle_s = _settled_rss(server.pid)
        checks = [w.command({"cmd": "check"}, 30) for w in workers]
        fds = psutil.Process(server.pid).num_fds()
        t_measured = time.monotonic()
    finally:
        # Ended hard: the kernel closes the sockets at once, where 19,800 closing
        # handshakes would cost the server seconds that measure nothing here.
        for w in workers:
            w.kill()
        server.stop()
    timings = {
        "start_and_spawn_s": t_connect - t_start,
        "connect_s": t_connected - t_connect,
        "settle_and_check_s": t_measured - t_connected,
        "stop_s": time.monotonic() - t_measured,
    }
    connected = sum(r["connected"] for r in results)
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    # A client process's share of the connect window, in cores.
    cores = [
        r["cpu_s"] / (r["end"] - r["start"]) if r["end"] > r["start"] else 0.0 for r in results
    ]
    server_cores = {g: cpu.share(g) for g in server_groups(server)}
    problems = []
    if connected != total:
        errors = [e for r in results for e in r["first_errors"]]
        problems.append(
            f"INVALID {name}: {total - connected} of {total} connections failed "
            f"(first errors: {errors[:3]})"
        )
    still_open = sum(c["open"] for c in checks)
    if still_open != connected:
        codes = sorted({code for c in checks for code in c["close_codes"]})
        problems.append(
            f"INVALID {name}: {connected - still_open} connections closed while idle "
            f"(codes {codes})"
        )
    if any(c["unexpected_messages"] for c in checks):
        problems.append(f"INVALID {name}: idle connections were sent messages after the welcome")
    if max(cores) > LOADGEN_MAX_CORES:
        problems.append(
            f"{name}: a client process used {max(cores):.2f} cores while connecting "
            f"(above {LOADGEN_MAX_CORES}, the clients may have set the connect rate)"
        )
    if cpu.other_cores > 0.2:
        problems.append(f"{name}: other processes used {cpu.other_cores:.2f} cores meanwhile")
    return Outcome(
        name,
        connected,
        rss_before,
        rss_after,
        settle_s,
        window,
        [lat for r in results for lat in r["latencies_us"]],
        fds,
        cores,
        server_cores,
        checks,
        problems,
        timings,
    )


def _add_metrics(report: Report, o: Outcome) -> None:
    n = o.name
    report.add(
        f"{n}: RSS per idle connection",
        "bytes",
        [o.rss_per_connection],
        "(server RSS with the connections open and settled - RSS before) / connections",
    )
    report.add(f"{n}: idle connections held", "connections", [float(o.connections)])
    report.add(
        f"{n}: connect rate",
        "connections/s",
        [o.connect_rate],
        "connections / (last connect done - first connect started), all client processes",
    )
    report.add(
        f"{n}: connect p50",
        "ms",
        [o.latency_ms(0.5)],
        "from the start of a connection's TCP connect to its welcome (hub) or the end of "
        "the WebSocket handshake (relays)",
    )
    report.add(f"{n}: connect p99", "ms", [o.latency_ms(0.99)])
    report.add(
        f"{n}: server cores while connecting",
        "cores",
        [sum(o.server_cores.values())],
        "the server process" + (" and its PostgreSQL" if len(o.server_cores) > 1 else ""),
    )
    report.add(f"{n}: client cores while connecting (max)", "cores", [max(o.client_cores)])


def run(args: argparse.Namespace) -> Report:
    cfg = IdleConfig(
        connections=4_000 if args.quick else args.connections,
        relay_connections=2_000 if args.quick else args.relay_connections,
        devices=args.devices,
        processes=args.processes,
        concurrency=args.concurrency,
        relays=not args.no_relays,
    )
    if cfg.connections < 1 or cfg.devices < 1 or cfg.processes < 1:
        raise SystemExit("bench: want --connections, --devices and --processes >= 1")
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-w1-"))
    started = dt.datetime.now(dt.UTC)
    with bench_database() as db:
        report = Report(
            "w1",
            started,
            asdict(cfg),
            machine.describe(postgresql=db.server_version, database=db.origin),
        )
        env = {"HUB_MAX_CONNECTIONS_PER_USER": str(max(10, cfg.devices))}
        outcomes = [
            _measure(
                "hub",
                lambda: start_hub(db.url, JWT_SECRET, log_dir, env),
                lambda s: Target("hub", s.ws_url("/v1/ws"), JWT_SECRET),
                lambda s: {
                    "server": Group.of([s.pid]),
                    "postgres": postgres_group(db.server_pid, db.name),
                },
                cfg.connections,
                cfg,
                log_dir,
            )
        ]
    if cfg.relays:
        outcomes.append(
            _measure(
                "websockets relay",
                lambda: start_websockets_relay(log_dir),
                lambda s: Target("relay", s.ws_url("/ws")),
                lambda s: {"server": Group.of([s.pid])},
                cfg.relay_connections,
                cfg,
                log_dir,
            )
        )
        outcomes.append(
            _measure(
                "starlette relay",
                lambda: start_relay(log_dir),
                lambda s: Target("relay", s.ws_url("/ws")),
                lambda s: {"server": Group.of([s.pid])},
                cfg.relay_connections,
                cfg,
                log_dir,
            )
        )
    for o in outcomes:
        _add_metrics(report, o)
        report.details[o.name] = o.as_json()
        for problem in o.problems:
            if problem.startswith("INVALID "):
                report.invalid(problem.removeprefix("INVALID "))
            else:
                report.notes.append(problem)
    by_name = {o.name: o for o in outcomes}
    if "websockets relay" in by_name:
        ratio = by_name["hub"].rss_per_connection / by_name["websockets relay"].rss_per_connection
        report.add(
            "hub / websockets relay: RSS per idle connection",
            "ratio",
            [ratio],
            "the hub's memory per authenticated idle connection over the bare relay's",
        )
        report.target(
            "hub RSS per idle connection / websockets relay's",
            ratio,
            2.0,
            at_least=False,
            meaning="an authenticated idle hub connection costs at most twice the memory of a "
            "bare websockets connection",
        )
    if args.quick:
        report.notes.append("quick mode: a smoke test with fewer connections, rough numbers")
    else:
        report.notes.append(
            f"{cfg.connections} connections, not 20,000: the open-files hard limit is 20,000 "
            "per process and the server needs some descriptors besides its sockets"
        )
    report.notes.append(f"logs: {log_dir}")
    report.finished_at = dt.datetime.now(dt.UTC)
    return report
