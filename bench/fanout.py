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
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

from . import machine
from .cpu import CpuMeter, CpuSample, Group, listener_pid, postgres_group
from .database import Database, analyze, bench_database
from .loadgen import LoadgenConfig
from .report import Report
from .servers import REPO, ServerProcess, start_hub, start_relay
from .stats import median
from .targets import Target

__all__ = [
    "FanoutConfig",
    "add_fanout_arguments",
    "add_relay_arguments",
    "run_fanout",
    "run_relay",
]

LOADGEN_MAX_CORES = 0.8
WARMUP_S = 1.0  # a closed-loop phase before the measured ones, not counted
OTHER_LOAD_WARN_CORES = 0.2
JWT_SECRET = "bench-secret-" + "y" * 40
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class FanoutConfig:
    users: int = 250
    devices: int = 4
    runs: int = 3
    seconds: float = 5.0
    client: str = "auto"
    broker: str = "memory"  # the hub's broker: "memory" (in-process) or "redis"


def _add_common(parser: argparse.ArgumentParser, seconds: float) -> None:
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


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, seconds=5.0)


def add_fanout_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, seconds=3.0)
    parser.add_argument(
        "--broker",
        choices=["memory", "redis"],
        default="memory",
        help="the hub's broker; redis uses HUB_BENCH_REDIS_URL or " + DEFAULT_REDIS_URL,
    )


def _config(args: argparse.Namespace) -> FanoutConfig:
    if args.devices < 2 or args.users < 1 or args.runs < 1 or args.seconds <= 0:
        raise SystemExit("bench: want --devices >= 2, --users >= 1, --runs >= 1, --seconds > 0")
    return FanoutConfig(
        users=args.users,
        devices=args.devices,
        runs=args.runs,
        seconds=args.seconds,
        client=args.client,
        broker=getattr(args, "broker", "memory"),
    )


# -- the load generator process, seen from here --------------------------------


class LoadgenError(RuntimeError):
    """The load generator reported a failure (for example, connections refused)."""


class LoadgenProcess:
    """``python -m bench.loadgen``: configured on stdin, answers one JSON line per command."""

    def __init__(self, config: LoadgenConfig, log_path: Path) -> None:
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=str(REPO),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, name="loadgen-out", daemon=True)
        self._pump.start()
        self._write(config.as_json())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _write(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(message).decode() + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next message, which must be ``event``; fails on timeout or exit."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the load generator did not answer within {timeout:.0f}s") from None
        if line is None:
            self.proc.wait(5)
            raise RuntimeError(
                f"the load generator exited ({self.proc.returncode}); its log:\n"
                + self.log_path.read_text(errors="replace")[-3000:]
            )
        message: dict[str, Any] = orjson.loads(line)
        if message.get("event") == "error":
            raise LoadgenError(message.get("message", "unknown error"))
        if message.get("event") != event:
            raise RuntimeError(f"the load generator said {message}, expected {event!r}")
        return message

    def command(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        self._write(message)
        return self.expect("result", timeout)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self._write({"cmd": "quit"})
                self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)
        self._pump.join(5)
        self._log.close()


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
        return self.cpu.share("loadgen")

    def as_json(self) -> dict[str, Any]:
        return {
            **self.result,
            "cpu": self.cpu.as_json(),
            "server_cores": self.server_cpu_s / self.cpu.wall_s if self.cpu.wall_s else 0.0,
            "deliveries_per_server_cpu_s": self.deliveries_per_cpu_s,
            "loadgen_cores_measured": self.loadgen_cores,
        }


@dataclass
class TargetOutcome:
    name: str
    ready: dict[str, Any]
    closed: list[PhaseRun] = field(default_factory=list)
    open: list[PhaseRun] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def saturation(self) -> float:
        return median([r.deliveries_per_s for r in self.closed])

    def as_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "closed": [r.as_json() for r in self.closed],
            "open": [r.as_json() for r in self.open],
            "check": self.check,
            "problems": self.problems,
        }


def _run_target(
    name: str,
    target: Target,
    server: ServerProcess,
    groups: dict[str, Group],
    cfg: FanoutConfig,
    log_dir: Path,
    after_warmup: Callable[[], None] | None = None,
) -> TargetOutcome:
    """Connect the load, warm up, run the closed then the open phases, check the deliveries."""
    loadgen_config = LoadgenConfig(
        target,
        users=cfg.users,
        devices=cfg.devices,
        tag=f"bench-{secrets.token_hex(3)}",
        client=cfg.client,
    )
    loadgen = LoadgenProcess(loadgen_config, log_dir / f"loadgen-{name}.log")
    try:
        try:
            ready = loadgen.expect("ready", loadgen_config.connect_timeout_s + 15)
        except LoadgenError as exc:
            raise RuntimeError(
                f"the load generator could not connect to the {name}: {exc}\n"
                f"the end of the {name}'s log ({server.log_path}):\n{server.log_tail(1500)}"
            ) from None
        outcome = TargetOutcome(name, ready)
        meter = CpuMeter(
            {**groups, "loadgen": Group.of([loadgen.pid]), "bench": Group.of([os.getpid()])}
        )
        server_groups = tuple(groups)
        timeout = cfg.seconds + loadgen_config.drain_s + 30

        def phase(message: dict[str, Any]) -> PhaseRun:
            meter.start()
            result = loadgen.command(message, timeout)
            run = PhaseRun(result, meter.stop(), server_groups)
            if not server.alive():
                raise RuntimeError(f"the {name} died; its log:\n{server.log_tail()}")
            return run

        phase({"cmd": "closed", "seconds": WARMUP_S})  # not counted
        if after_warmup is not None:
            after_warmup()
        for _ in range(cfg.runs):
            outcome.closed.append(phase({"cmd": "closed", "seconds": cfg.seconds}))
        rate = outcome.saturation / 2 / (cfg.devices - 1)  # messages/s for half the deliveries
        for _ in range(cfg.runs):
            outcome.open.append(phase({"cmd": "open", "rate": rate, "seconds": cfg.seconds}))
        outcome.check = loadgen.command({"cmd": "check"}, 30)
    finally:
        loadgen.stop()
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
    for key in ("lost", "duplicates", "acks_missing", "ack_mismatches", "errors"):
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
        "deliveries divided by the CPU-seconds of the server process"
        + (
            " plus its PostgreSQL (and Redis) processes"
            if len(outcome.closed[0].server_groups) > 1
            else ""
        ),
    )
    report.add(
        f"{n}: server cores (saturation)",
        "cores",
        [r.server_cpu_s / r.cpu.wall_s for r in outcome.closed],
        "CPU of the same processes, in cores (1.0 = one core busy all the time)",
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
        f"a run is invalid above {LOADGEN_MAX_CORES}",
    )


def _redis_url() -> str:
    return os.environ.get("HUB_BENCH_REDIS_URL") or DEFAULT_REDIS_URL


def _measure_relay(cfg: FanoutConfig, log_dir: Path) -> TargetOutcome:
    relay = start_relay(log_dir)
    try:
        target = Target("relay", relay.ws_url("/ws"))
        return _run_target("relay", target, relay, {"server": Group.of([relay.pid])}, cfg, log_dir)
    finally:
        relay.stop()


def _measure_hub(cfg: FanoutConfig, db: Database, log_dir: Path) -> TargetOutcome:
    env = {"HUB_MAX_CONNECTIONS_PER_USER": str(max(10, cfg.devices))}
    groups = {"server": Group.of([0]), "postgres": postgres_group(db.server_pid, db.name)}
    if cfg.broker == "redis":
        url = _redis_url()
        env["HUB_REDIS_URL"] = url
        port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        groups["redis"] = Group.of([listener_pid(port)])
    hub = start_hub(db.url, JWT_SECRET, log_dir, env)
    try:
        groups["server"] = Group.of([hub.pid])
        target = Target("hub", hub.ws_url("/v1/ws"), JWT_SECRET)
        return _run_target(
            "hub", target, hub, groups, cfg, log_dir, lambda: uvloop.run(analyze(db.url))
        )
    finally:
        hub.stop()


def _finish(report: Report, outcomes: list[TargetOutcome]) -> Report:
    for outcome in outcomes:
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
    with bench_database() as db:
        report = Report(
            "fanout",
            started,
            asdict(cfg),
            machine.describe(postgresql=db.server_version, database=db.origin),
        )
        hub = _measure_hub(cfg, db, log_dir)
    relay = _measure_relay(cfg, log_dir)
    report.details["client"] = hub.ready.get("client")
    _add_metrics(report, hub, cfg)
    _add_metrics(report, relay, cfg)
    report.add(
        "hub / relay: saturation deliveries/s",
        "ratio",
        [h.deliveries_per_s / relay.saturation for h in hub.closed],
        "each hub run divided by the relay's median",
    )
    relay_eff = median([r.deliveries_per_cpu_s for r in relay.closed])
    report.add(
        "hub / relay: deliveries per server CPU-second",
        "ratio",
        [h.deliveries_per_cpu_s / relay_eff for h in hub.closed],
        "saturation phases; the hub's CPU includes its PostgreSQL backends",
    )
    report.notes.append(f"logs: {log_dir}")
    return _finish(report, [hub, relay])
