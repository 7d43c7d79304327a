"""Workloads ``relay`` and ``fanout``: WebSocket fan-out under load.

One target at a time (the bare relay, or a real hub) is started as its own
process, and the load generator (:mod:`bench.loadgen`, another process)
connects ``users x devices`` WebSockets to it. Then, for each target:

1. ``runs`` closed-loop phases: saturation deliveries/s (a delivery is one
   message arriving at one peer device);
2. ``runs`` open-loop phases at half the median saturation rate, sends on a
   fixed timetable: delivery latency from the scheduled send time;
3. a correctness check: every receiving connection got each of its user's
   messages exactly once (on the hub: by version).

Before them, a short closed-loop warm-up is not counted (on the hub it is
followed by :func:`bench.database.analyze`). Around every phase the CPU time
of the server process is read (on the hub, plus the PostgreSQL backends of
its database and the server's own processes, and Redis when the hub uses
it), giving deliveries per server CPU-second. A run in which the load
generator used more than ``LOADGEN_MAX_CORES`` of a core is marked invalid:
then the client, not the server, may have set the pace.

``relay`` runs the bare relay only; ``fanout`` runs the hub and the relay in
the same invocation and reports hub/relay ratios.

``w2`` (same-user fan-out on one process) runs the hub, both bare relays
(:mod:`bench.relay_starlette`, :mod:`bench.relay_websockets`) and the two
Socket.IO peers (:mod:`bench.peers`) with Redis; ``w3`` runs the hub and the
peers as two processes each through Redis, device ``d`` of every user on
process ``d mod 2``, and the one-process hub again for the W3/W2 ratio. Both
record the issue's goals with :meth:`bench.report.Report.target`, and drive the
load from two load generator processes (:class:`LoadgenShards`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import uvloop

from . import machine
from .cpu import CpuMeter, CpuSample, Group, listener_pid, postgres_group
from .database import Database, analyze, bench_database
from .loadgen import LoadgenConfig
from .report import Report
from .servers import (
    Redis,
    ServerProcess,
    bench_redis,
    node_peer_missing,
    peer_versions,
    start_hub,
    start_node_socketio,
    start_python_socketio,
    start_relay,
    start_websockets_relay,
)
from .stats import median, summarize_ns
from .targets import Kind, Target
from .worker import WorkerError, WorkerProcess

__all__ = [
    "FanoutConfig",
    "add_fanout_arguments",
    "add_relay_arguments",
    "add_w2_arguments",
    "add_w3_arguments",
    "run_fanout",
    "run_relay",
    "run_w2",
    "run_w3",
]

LOADGEN_MAX_CORES = 0.8
# Counts of the load generator's check that make a run invalid when not zero.
CHECK_FAILURES = (
    "lost",
    "duplicates",
    "diverged_replicas",
    "acks_missing",
    "ack_mismatches",
    "errors",
)
WARMUP_S = 1.0  # a closed-loop phase before the measured ones, not counted
OTHER_LOAD_WARN_CORES = 0.2
JWT_SECRET = "bench-secret-" + "y" * 40
# W2 and W3 load five targets each, three runs of two phases, in under a minute.
W_SECONDS = 1.0
W_WARMUP_S = 0.5
# The websockets relay takes about 65,000 deliveries/s from one picows process
# at 0.85 of a core (mostly recv and send system calls): two share that load.
W_LOADGENS = 2


@dataclass(frozen=True)
class FanoutConfig:
    users: int = 250
    devices: int = 4
    runs: int = 3
    seconds: float = 5.0
    client: str = "auto"
    broker: str = "memory"  # the hub's broker: "memory" (in-process) or "redis"
    warmup_s: float = WARMUP_S
    loadgens: int = 1  # load generator processes, each carrying a share of the users
    # Also run the open phases at this rate (messages/s): a peer's half-load
    # rate, so that latencies compare at the same offered load.
    matched_rate: float | None = None


def _add_common(parser: argparse.ArgumentParser, seconds: float, loadgens: int = 1) -> None:
    d = FanoutConfig()
    parser.add_argument("--users", type=int, default=d.users, help="users (one sender each)")
    parser.add_argument("--devices", type=int, default=d.devices, help="connections per user")
    parser.add_argument("--runs", type=int, default=d.runs, help="runs of each phase")
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each phase")
    parser.add_argument(
        "--client",
        choices=["auto", "picows", "websockets"],
        default=d.client,
        help="WebSocket client library of the load generator (auto: picows, else websockets)",
    )
    parser.add_argument(
        "--loadgens",
        type=int,
        default=loadgens,
        help="load generator processes, each carrying a share of the users; a run is invalid "
        f"when one of them uses more than {LOADGEN_MAX_CORES} of a core",
    )


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, seconds=5.0)


def add_fanout_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, seconds=3.0)
    parser.add_argument(
        "--broker",
        choices=["memory", "redis"],
        default="memory",
        help="the hub's broker; redis uses HUB_BENCH_REDIS_URL, else the machine's Redis at "
        "127.0.0.1:6379, else a throwaway one",
    )


def _config(args: argparse.Namespace) -> FanoutConfig:
    if args.devices < 2 or args.users < 1 or args.runs < 1 or args.seconds <= 0:
        raise SystemExit("bench: want --devices >= 2, --users >= 1, --runs >= 1, --seconds > 0")
    if not 1 <= args.loadgens <= args.users:
        raise SystemExit("bench: want 1 <= --loadgens <= --users")
    return FanoutConfig(
        users=args.users,
        devices=args.devices,
        runs=args.runs,
        seconds=args.seconds,
        client=args.client,
        broker=getattr(args, "broker", "memory"),
        loadgens=args.loadgens,
    )


# -- the load generator process, seen from here --------------------------------


class LoadgenProcess(WorkerProcess):
    """``python -m bench.loadgen``: configured on stdin, answers one JSON line per command
    (a :class:`~bench.worker.WorkerProcess`; a reported failure raises ``WorkerError``)."""

    def __init__(self, config: LoadgenConfig, log_path: Path) -> None:
        super().__init__("bench.loadgen", config.as_json(), log_path)


class LoadgenShards:
    """Several load generator processes, each carrying a shard of the users, seen
    as one: commands go to all at once (an open loop's rate split evenly), and
    their answers are merged (counts and rates added, latencies pooled)."""

    def __init__(self, config: LoadgenConfig, processes: int, log_dir: Path, name: str) -> None:
        self.parts = [
            LoadgenProcess(
                replace(config, shard=i, shards=processes),
                log_dir / f"loadgen-{name}{f'-{i + 1}' if processes > 1 else ''}.log",
            )
            for i in range(processes)
        ]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.parts]

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        answers = [p.expect(event, timeout) for p in self.parts]
        if len(answers) == 1:
            return answers[0]
        merged = dict(answers[0])
        merged["connections"] = sum(a["connections"] for a in answers)
        merged["connect_s"] = max(a["connect_s"] for a in answers)
        return merged

    def command(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        n = len(self.parts)
        if message.get("cmd") == "open":
            message = {**message, "rate": message["rate"] / n}
        for p in self.parts:
            p.send(message)
        answers = [p.expect("result", timeout) for p in self.parts]
        if message.get("cmd") == "check":
            return _merge_checks(answers)
        return _merge_phases(answers)

    def stop(self) -> None:
        for p in self.parts:
            p.stop()


SUMMED = (
    "sent",
    "deliveries",
    "deliveries_in_window",
    "deliveries_per_s",
    "pending_after_drain",
    "closed_connections",
    "target_rate",
    "scheduled",
    "sent_late_or_never",
)


def _merge_phases(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's results from several shards as if from one load generator."""
    merged = dict(answers[0])
    if len(answers) > 1:
        for key in SUMMED:
            if key in merged:
                merged[key] = sum(a[key] for a in answers)
        merged["window_s"] = max(a["window_s"] for a in answers)
        merged["drained"] = all(a["drained"] for a in answers)
        merged["loadgen_cores_self"] = max(a["loadgen_cores_self"] for a in answers)
        for summary, raw in (
            ("latency", "latency_ns"),
            ("round", "round_ns"),
            ("send_lag", "send_lag_ns"),
        ):
            if raw in merged:
                merged[summary] = summarize_ns([v for a in answers for v in a[raw]])
    for raw in ("latency_ns", "round_ns", "send_lag_ns"):
        merged.pop(raw, None)
    return merged


def _merge_checks(answers: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(answers[0])
    for a in answers[1:]:
        for key, value in a.items():
            if isinstance(value, int) and not isinstance(value, bool):
                merged[key] += value
        merged["first_errors"] = (merged["first_errors"] + a["first_errors"])[:10]
        merged["close_codes"] = sorted(set(merged["close_codes"]) | set(a["close_codes"]))
    return merged


# -- phases against one target --------------------------------------------------


@dataclass
class PhaseRun:
    """One phase: what the load generator saw and the CPU it cost."""

    result: dict[str, Any]
    cpu: CpuSample
    server_groups: tuple[str, ...]

    @property
    def deliveries_per_s(self) -> float:
        rate: float = self.result["deliveries_per_s"]
        return rate

    @property
    def server_cpu_s(self) -> float:
        return self.cpu.total(*self.server_groups)

    @property
    def deliveries_per_cpu_s(self) -> float:
        cpu = self.server_cpu_s
        return self.result["deliveries"] / cpu if cpu > 0 else 0.0

    @property
    def loadgen_cores(self) -> float:
        """The busiest load generator process's cores (the one that could set the pace)."""
        return max(
            (self.cpu.share(g) for g in self.cpu.cpu_s if g.startswith("loadgen")), default=0.0
        )

    @property
    def loadgen_cores_total(self) -> float:
        return sum(self.cpu.share(g) for g in self.cpu.cpu_s if g.startswith("loadgen"))

    def as_json(self) -> dict[str, Any]:
        return {
            **self.result,
            "cpu": self.cpu.as_json(),
            "server_cores": self.server_cpu_s / self.cpu.wall_s if self.cpu.wall_s else 0.0,
            "deliveries_per_server_cpu_s": self.deliveries_per_cpu_s,
            "loadgen_cores_measured": self.loadgen_cores,
            "loadgen_cores_total": self.loadgen_cores_total,
        }


@dataclass
class TargetOutcome:
    name: str
    ready: dict[str, Any]
    cpu_of: str = ""  # which processes the server CPU counts, in words
    wall_s: float = 0.0  # from connecting the load to closing it
    closed: list[PhaseRun] = field(default_factory=list)
    open: list[PhaseRun] = field(default_factory=list)
    matched: list[PhaseRun] = field(default_factory=list)  # open phases at cfg.matched_rate
    check: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def saturation(self) -> float:
        return median([r.deliveries_per_s for r in self.closed])

    def as_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "wall_s": round(self.wall_s, 2),
            "closed": [r.as_json() for r in self.closed],
            "open": [r.as_json() for r in self.open],
            "matched": [r.as_json() for r in self.matched],
            "check": self.check,
            "problems": self.problems,
        }


def _run_target(
    name: str,
    target: Target,
    server: ServerProcess | Sequence[ServerProcess],
    groups: dict[str, Group],
    cfg: FanoutConfig,
    log_dir: Path,
    after_warmup: Callable[[], None] | None = None,
    cpu_of: str = "",
) -> TargetOutcome:
    """Connect the load, warm up, run the closed then the open phases, check the deliveries.

    ``server``: the target's process, or all of them; ``cpu_of`` says in words
    which processes ``groups`` counts (shown beside the per-CPU-second metrics).
    """
    servers = [server] if isinstance(server, ServerProcess) else list(server)
    began = time.perf_counter()
    loadgen_config = LoadgenConfig(
        target,
        users=cfg.users,
        devices=cfg.devices,
        tag=f"bench-{secrets.token_hex(3)}",
        client=cfg.client,
    )
    loadgen = LoadgenShards(loadgen_config, cfg.loadgens, log_dir, _slug(name))
    try:
        try:
            ready = loadgen.expect("ready", loadgen_config.connect_timeout_s + 15)
        except WorkerError as exc:
            logs = "\n".join(
                f"the end of {s.name}'s log ({s.log_path}):\n{s.log_tail(1500)}" for s in servers
            )
            raise RuntimeError(
                f"the load generator could not connect to the {name}: {exc}\n{logs}"
            ) from None
        outcome = TargetOutcome(name, ready, cpu_of=cpu_of)
        loadgen_groups = {
            "loadgen" + (f"-{i + 1}" if len(loadgen.pids) > 1 else ""): Group.of([pid])
            for i, pid in enumerate(loadgen.pids)
        }
        meter = CpuMeter({**groups, **loadgen_groups, "bench": Group.of([os.getpid()])})
        server_groups = tuple(groups)
        timeout = cfg.seconds + loadgen_config.drain_s + 30

        def phase(message: dict[str, Any]) -> PhaseRun:
            meter.start()
            result = loadgen.command(message, timeout)
            run = PhaseRun(result, meter.stop(), server_groups)
            for s in servers:
                if not s.alive():
                    raise RuntimeError(f"{s.name} died; its log:\n{s.log_tail()}")
            return run

        phase({"cmd": "closed", "seconds": cfg.warmup_s})  # not counted
        if after_warmup is not None:
            after_warmup()
        for _ in range(cfg.runs):
            outcome.closed.append(phase({"cmd": "closed", "seconds": cfg.seconds}))
        rate = outcome.saturation / 2 / (cfg.devices - 1)  # messages/s for half the deliveries
        for _ in range(cfg.runs):
            outcome.open.append(phase({"cmd": "open", "rate": rate, "seconds": cfg.seconds}))
        if cfg.matched_rate:
            for _ in range(cfg.runs):
                outcome.matched.append(
                    phase({"cmd": "open", "rate": cfg.matched_rate, "seconds": cfg.seconds})
                )
        outcome.check = loadgen.command({"cmd": "check"}, 30)
    finally:
        loadgen.stop()
    outcome.wall_s = time.perf_counter() - began
    _judge(outcome)
    return outcome


def _judge(outcome: TargetOutcome) -> None:
    """Note everything that makes a run invalid or its numbers doubtful."""
    name = outcome.name
    for kind, runs in (("closed", outcome.closed), ("open", outcome.open)):
        for i, run in enumerate(runs, 1):
            where = f"{name} {kind} run {i}"
            if run.loadgen_cores > LOADGEN_MAX_CORES:
                outcome.problems.append(
                    f"INVALID {where}: the load generator used {run.loadgen_cores:.2f} cores "
                    f"(limit {LOADGEN_MAX_CORES})"
                )
            if not run.result["drained"]:
                outcome.problems.append(
                    f"{where}: {run.result['pending_after_drain']} messages still incomplete "
                    "after the drain time"
                )
            if run.result.get("sent_late_or_never"):
                outcome.problems.append(
                    f"{where}: {run.result['sent_late_or_never']} scheduled sends never went out"
                )
            if run.cpu.other_cores > OTHER_LOAD_WARN_CORES:
                outcome.problems.append(
                    f"{where}: other processes used {run.cpu.other_cores:.2f} cores meanwhile"
                )
    check = outcome.check
    for key in CHECK_FAILURES:
        if check.get(key):
            outcome.problems.append(f"INVALID {name}: {check[key]} {key.replace('_', ' ')}")
    if check.get("prev_gaps"):
        # Allowed by the protocol (events are at most once, and may be reordered
        # across processes), but with one hub process none is expected.
        outcome.problems.append(f"{name}: {check['prev_gaps']} change events with a gap in prev")
    if check.get("closed_connections"):
        outcome.problems.append(
            f"INVALID {name}: {check['closed_connections']} connections closed "
            f"(codes {check.get('close_codes')})"
        )


def _add_metrics(report: Report, outcome: TargetOutcome, cfg: FanoutConfig) -> None:
    n = outcome.name
    report.add(
        f"{n}: saturation deliveries/s",
        "deliveries/s",
        [r.deliveries_per_s for r in outcome.closed],
        f"closed loop, {cfg.users} users x {cfg.devices} devices: one device per user sends, "
        f"waits until its {cfg.devices - 1} peers got the message, sends again; messages "
        "arriving at peers per second",
    )
    report.add(
        f"{n}: deliveries per server CPU-second (saturation)",
        "deliveries/cpu-s",
        [r.deliveries_per_cpu_s for r in outcome.closed],
        "deliveries divided by the CPU-seconds of " + (outcome.cpu_of or "the server process"),
    )
    report.add(
        f"{n}: server CPU-seconds per 1k deliveries (saturation)",
        "cpu-s",
        [
            1000 / r.deliveries_per_cpu_s if r.deliveries_per_cpu_s else math.nan
            for r in outcome.closed
        ],
        "the same, the other way up",
    )
    report.add(
        f"{n}: server cores (saturation)",
        "cores",
        [r.server_cpu_s / r.cpu.wall_s for r in outcome.closed],
        "CPU of the same processes, in cores (1.0 = one core busy all the time)",
    )
    groups = outcome.closed[0].server_groups if outcome.closed else ()
    if len(groups) > 1:  # where the server CPU goes: its own process(es), PostgreSQL, Redis
        for group in groups:
            report.add(
                f"{n}: {SERVER_GROUP_NAMES.get(group, group)} CPU-seconds per 1k deliveries "
                "(saturation)",
                "cpu-s",
                [
                    1000 * r.cpu.total(group) / r.result["deliveries"]
                    if r.result["deliveries"]
                    else math.nan
                    for r in outcome.closed
                ],
                "the server CPU-seconds per 1k deliveries above, split by process group"
                if group == groups[0]
                else "",
            )
    for label, q in (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")):
        report.add(
            f"{n}: half load latency {label}",
            "ms",
            [r.result["latency"][q] for r in outcome.open],
            "open loop at half the saturation rate, sends on a fixed timetable; from a "
            "message's scheduled send time to its arrival at a peer"
            if label == "p50"
            else "",
        )
    for label, q in (("p50", "p50_ms"), ("p99", "p99_ms")):
        report.add(
            f"{n}: half load send lag {label}",
            "ms",
            [r.result["send_lag"][q] for r in outcome.open],
            "how late the load generator sent, after the scheduled time (its timers tick "
            "in milliseconds); part of the latency above"
            if label == "p50"
            else "",
        )
    report.add(
        f"{n}: half load deliveries/s",
        "deliveries/s",
        [r.deliveries_per_s for r in outcome.open],
    )
    report.add(
        f"{n}: deliveries per server CPU-second (half load)",
        "deliveries/cpu-s",
        [r.deliveries_per_cpu_s for r in outcome.open],
    )
    report.add(
        f"{n}: load generator cores (max of phases)",
        "cores",
        [max(r.loadgen_cores for r in outcome.closed + outcome.open)],
        f"the busiest load generator process; a run is invalid above {LOADGEN_MAX_CORES}",
    )
    if cfg.loadgens > 1:
        report.add(
            f"{n}: load generator cores, all {cfg.loadgens} processes (max of phases)",
            "cores",
            [max(r.loadgen_cores_total for r in outcome.closed + outcome.open)],
        )


SERVER_GROUP_NAMES = {"server": "server process(es)", "postgres": "PostgreSQL", "redis": "Redis"}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name)


def _measure_processes(
    name: str,
    kind: Kind,
    path: str,
    start: Callable[[str], ServerProcess],
    processes: int,
    extra_groups: dict[str, Group],
    cpu_of: str,
    cfg: FanoutConfig,
    log_dir: Path,
    jwt_secret: str | None = None,
    after_warmup: Callable[[], None] | None = None,
) -> TargetOutcome:
    """Start ``processes`` servers (``start(process name)``), load them as one target, stop them."""
    with contextlib.ExitStack() as stack:
        servers = []
        for i in range(processes):
            server = start(_slug(name) + (f"-{i + 1}" if processes > 1 else ""))
            stack.callback(server.stop)
            servers.append(server)
        target = Target.of(kind, [s.ws_url(path) for s in servers], jwt_secret)
        groups = {"server": Group.of([s.pid for s in servers]), **extra_groups}
        return _run_target(name, target, servers, groups, cfg, log_dir, after_warmup, cpu_of)


def _redis_group(redis: Redis) -> Group:
    return Group.of([listener_pid(redis.port)])


def _measure_relay(cfg: FanoutConfig, log_dir: Path, name: str = "relay") -> TargetOutcome:
    return _measure_processes(
        name,
        "relay",
        "/ws",
        lambda process: start_relay(log_dir, process),
        1,
        {},
        "the relay process",
        cfg,
        log_dir,
    )


def _measure_websockets_relay(
    cfg: FanoutConfig, log_dir: Path, name: str = "websockets relay"
) -> TargetOutcome:
    return _measure_processes(
        name,
        "relay",
        "/ws",
        lambda process: start_websockets_relay(log_dir, process),
        1,
        {},
        "the relay process",
        cfg,
        log_dir,
    )


def _measure_hub(
    cfg: FanoutConfig,
    db: Database,
    log_dir: Path,
    redis: Redis | None = None,
    processes: int = 1,
    name: str = "hub",
) -> TargetOutcome:
    """The hub on ``processes`` processes sharing ``db``; with ``redis``, its broker is Redis."""
    env = {"HUB_MAX_CONNECTIONS_PER_USER": str(max(10, cfg.devices))}
    groups = {"postgres": postgres_group(db.server_pid, db.name)}
    cpu_of = (
        f"the hub process{'es' if processes > 1 else ''}, the PostgreSQL backends of its "
        "database and the PostgreSQL server's own processes"
    )
    if redis is not None:
        env["HUB_REDIS_URL"] = redis.url
        groups["redis"] = _redis_group(redis)
        cpu_of += ", and Redis"
    elif processes > 1:
        raise ValueError("several hub processes need a Redis")
    return _measure_processes(
        name,
        "hub",
        "/v1/ws",
        lambda process: start_hub(db.url, JWT_SECRET, log_dir, env, process),
        processes,
        groups,
        cpu_of,
        cfg,
        log_dir,
        JWT_SECRET,
        lambda: uvloop.run(analyze(db.url)),
    )


def _measure_python_socketio(
    cfg: FanoutConfig, redis: Redis, log_dir: Path, processes: int = 1
) -> TargetOutcome:
    return _measure_processes(
        "python-socketio" + (f" x{processes}" if processes > 1 else ""),
        "socketio",
        "/socket.io/",
        lambda process: start_python_socketio(log_dir, redis.url, process),
        processes,
        {"redis": _redis_group(redis)},
        "the python-socketio process" + ("es" if processes > 1 else "") + " and Redis",
        cfg,
        log_dir,
    )


def _measure_node_socketio(
    cfg: FanoutConfig, redis: Redis, log_dir: Path, report: Report, processes: int = 1
) -> TargetOutcome | None:
    """The Node Socket.IO peer, or ``None`` (with a note in ``report``) when it cannot run."""
    name = "socket.io" + (f" x{processes}" if processes > 1 else "")
    missing = node_peer_missing()
    if missing is not None:
        report.notes.append(f"{name} (Node) skipped: {missing}")
        return None
    return _measure_processes(
        name,
        "socketio",
        "/socket.io/",
        lambda process: start_node_socketio(log_dir, redis.url, process),
        processes,
        {"redis": _redis_group(redis)},
        "the Node process" + ("es" if processes > 1 else "") + " and Redis",
        cfg,
        log_dir,
    )


def _finish(report: Report, outcomes: Sequence[TargetOutcome | None]) -> Report:
    for outcome in outcomes:
        if outcome is None:
            continue
        report.details[outcome.name] = outcome.as_json()
        for problem in outcome.problems:
            if problem.startswith("INVALID"):
                report.invalid(problem.removeprefix("INVALID "))
            else:
                report.notes.append(problem)
    report.finished_at = dt.datetime.now(dt.UTC)
    return report


def run_relay(args: argparse.Namespace) -> Report:
    cfg = _config(args)
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-relay-"))
    report = Report("relay", dt.datetime.now(dt.UTC), asdict(cfg), machine.describe())
    outcome = _measure_relay(cfg, log_dir)
    report.details["client"] = outcome.ready.get("client")
    _add_metrics(report, outcome, cfg)
    report.notes.append(f"logs: {log_dir}")
    return _finish(report, [outcome])


def run_fanout(args: argparse.Namespace) -> Report:
    cfg = _config(args)
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-fanout-"))
    started = dt.datetime.now(dt.UTC)
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(bench_database())
        redis = stack.enter_context(bench_redis()) if cfg.broker == "redis" else None
        report = Report(
            "fanout",
            started,
            asdict(cfg),
            machine.describe(postgresql=db.server_version, database=db.origin),
        )
        hub = _measure_hub(cfg, db, log_dir, redis)
    relay = _measure_relay(cfg, log_dir)
    report.details["client"] = hub.ready.get("client")
    _add_metrics(report, hub, cfg)
    _add_metrics(report, relay, cfg)
    _add_ratios(report, hub, relay)
    report.notes.append(f"logs: {log_dir}")
    return _finish(report, [hub, relay])


# -- W2 and W3: the hub beside the ceilings and the peers ----------------------


def _add_ratios(report: Report, a: TargetOutcome, b: TargetOutcome) -> tuple[float, float]:
    """``a / b`` in saturation deliveries/s and deliveries per server CPU-second
    (each run of ``a`` over ``b``'s median); their medians."""
    rate = report.add(
        f"{a.name} / {b.name}: saturation deliveries/s",
        "ratio",
        [r.deliveries_per_s / b.saturation for r in a.closed],
        f"each {a.name} run divided by the {b.name}'s median",
    )
    b_eff = median([r.deliveries_per_cpu_s for r in b.closed])
    eff = report.add(
        f"{a.name} / {b.name}: deliveries per server CPU-second",
        "ratio",
        [r.deliveries_per_cpu_s / b_eff for r in a.closed],
        "saturation phases; each side's server CPU as counted in its own metric",
    )
    return rate.median, eff.median


def _p99(outcome: TargetOutcome, matched: bool = False) -> float:
    runs = outcome.matched if matched else outcome.open
    return median([r.result["latency"]["p99_ms"] for r in runs])


def _half_rate(outcome: TargetOutcome, cfg: FanoutConfig) -> float:
    """Messages/s of ``outcome``'s half-load phases."""
    return outcome.saturation / 2 / (cfg.devices - 1)


def _peer_targets(
    report: Report,
    workload: str,
    hub: TargetOutcome,
    python_socketio: TargetOutcome,
    node: TargetOutcome | None,
) -> None:
    """The goals against the peers on the same topology."""
    rate, _ = _add_ratios(report, hub, python_socketio)
    report.target(
        f"{workload}: {hub.name} / {python_socketio.name}, saturation deliveries/s",
        rate,
        10.0,
        meaning="medians of the closed-loop runs",
    )
    if hub.matched:
        report.add(
            f"{hub.name}: latency p99 at {python_socketio.name}'s half load",
            "ms",
            [r.result["latency"]["p99_ms"] for r in hub.matched],
            f"open loop at the message rate of {python_socketio.name}'s half-load phases",
        )
        report.target(
            f"{workload}: {hub.name} p99 (ms) at {python_socketio.name}'s half load, "
            "lower than its",
            _p99(hub, matched=True),
            _p99(python_socketio),
            at_least=False,
            meaning="both at the same offered load (the peer's half-saturation rate); "
            "the goal is the peer's median p99",
        )
    report.target(
        f"{workload}: {hub.name} half-load p99 (ms), lower than {python_socketio.name}'s",
        _p99(hub),
        _p99(python_socketio),
        at_least=False,
        meaning="each at half its own saturation rate (the hub's about ten times the "
        "peer's); the goal is the peer's median p99",
    )
    if node is not None:
        rate, _ = _add_ratios(report, hub, node)
        report.target(
            f"{workload}: {hub.name} / {node.name}, saturation deliveries/s",
            rate,
            1.0,
            meaning="medians of the closed-loop runs; the peer persists nothing",
        )


PEERS_NOTE = (
    "python-socketio and socket.io persist nothing: they pass each push on through "
    "Redis pub/sub; the hub validates, merges and commits every push to PostgreSQL "
    "before its events go out"
)


def add_w2_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, seconds=W_SECONDS, loadgens=W_LOADGENS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 50 users, one run of 0.5 s phases (rough numbers)",
    )


add_w3_arguments = add_w2_arguments


def _w_config(args: argparse.Namespace, broker: str) -> FanoutConfig:
    cfg = replace(_config(args), broker=broker, warmup_s=W_WARMUP_S)
    if getattr(args, "quick", False):
        cfg = replace(cfg, users=min(cfg.users, 50), runs=1, seconds=0.5, warmup_s=0.2)
    return cfg


def _describe_servers(report: Report, redis: Redis) -> None:
    report.machine["redis"] = redis.version
    report.config["redis"] = {"url": redis.url, "origin": redis.origin}
    report.config["peers"] = peer_versions()
    report.notes.append(f"Redis {redis.version}: {redis.origin} ({redis.url})")


def run_w2(args: argparse.Namespace) -> Report:
    """W2: same-user fan-out on one process: the hub, both bare relays, both peers."""
    cfg = _w_config(args, "memory")
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-w2-"))
    started = dt.datetime.now(dt.UTC)
    with bench_redis() as redis:
        with bench_database() as db:
            report = Report(
                "w2",
                started,
                asdict(cfg),
                machine.describe(postgresql=db.server_version, database=db.origin),
            )
            _describe_servers(report, redis)
            # The peer first: the hub also runs at its half-load rate.
            python_socketio = _measure_python_socketio(cfg, redis, log_dir)
            matched = replace(cfg, matched_rate=_half_rate(python_socketio, cfg))
            hub = _measure_hub(matched, db, log_dir)
        starlette = _measure_relay(cfg, log_dir, "starlette relay")
        websockets = _measure_websockets_relay(cfg, log_dir)
        node = _measure_node_socketio(cfg, redis, log_dir, report)
    outcomes = [hub, starlette, websockets, python_socketio, node]
    report.details["client"] = hub.ready.get("client")
    for outcome in outcomes:
        if outcome is not None:
            _add_metrics(report, outcome, cfg)
    _, eff = _add_ratios(report, hub, starlette)
    _add_ratios(report, hub, websockets)
    report.target(
        "W2: hub deliveries per server CPU-second / the starlette relay's",
        eff,
        0.5,
        meaning="saturation medians; the hub's CPU includes PostgreSQL (its broker is "
        "in-process); its throughput is the 'hub: saturation deliveries/s' metric",
    )
    _peer_targets(report, "W2", hub, python_socketio, node)
    report.notes.append(PEERS_NOTE)
    report.notes.append(f"logs: {log_dir}")
    return _finish(report, outcomes)


def run_w3(args: argparse.Namespace) -> Report:
    """W3: the W2 topology on two processes per server through Redis, beside the
    one-process hub (in-process broker) for the W3/W2 ratio, measured in the same run."""
    cfg = _w_config(args, "redis")
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-w3-"))
    started = dt.datetime.now(dt.UTC)
    with bench_redis() as redis:
        with bench_database() as db:
            report = Report(
                "w3",
                started,
                asdict(cfg),
                machine.describe(postgresql=db.server_version, database=db.origin),
            )
            _describe_servers(report, redis)
            # The peer first: the hubs also run at its half-load rate.
            python_socketio = _measure_python_socketio(cfg, redis, log_dir, processes=2)
            matched = replace(cfg, matched_rate=_half_rate(python_socketio, cfg))
            hub2 = _measure_hub(matched, db, log_dir, redis, processes=2, name="hub x2")
            hub1 = _measure_hub(replace(cfg, broker="memory"), db, log_dir)
        node = _measure_node_socketio(cfg, redis, log_dir, report, processes=2)
    outcomes = [hub2, hub1, python_socketio, node]
    report.details["client"] = hub2.ready.get("client")
    for outcome in outcomes:
        if outcome is not None:
            _add_metrics(report, outcome, cfg)
    rate, _ = _add_ratios(report, hub2, hub1)
    report.target(
        "W3: hub x2 / hub (W2), saturation deliveries/s",
        rate,
        0.7,
        meaning="two hub processes through Redis, each user's devices split between them "
        "(even devices on one, odd on the other), over one hub process with its in-process "
        "broker, measured in the same run",
    )
    _peer_targets(report, "W3", hub2, python_socketio, node)
    report.notes.append(
        "W3: device d of every user connects to process d mod 2, so the sender and one "
        "receiver share a process and two receivers are on the other"
    )
    report.notes.append(PEERS_NOTE)
    report.notes.append(f"logs: {log_dir}")
    return _finish(report, outcomes)
