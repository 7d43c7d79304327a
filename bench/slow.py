"""Workload ``w6``: a slow consumer must cost only itself.

One hub and two load generators, each its own process:

- ``others``: 250 users x 4 devices, the fan-out load of ``fanout``
  (:mod:`bench.loadgen`), open loop at half the saturation rate measured at
  the start (``--rate`` to fix it);
- ``hot``: one user x 4 devices (``python -m bench.slow``, :class:`HotLoadgen`)
  sending ``hot_rate`` pushes/s, each carrying a ``pad`` field of
  ``pad_bytes``, so that one more device of that user that stops reading has
  a steady stream of sizeable events to fall behind on. The hot sender keeps
  at most ``window`` (32) messages outstanding, half the hub's limit of 64
  pushes in flight per connection: a send due while the window is full waits
  for room and is counted as deferred, and its latency still runs from its
  scheduled time. So a latency spike shows in full, and never turns into
  ``rate_limited`` refusals of the load itself.

Each run has three phases of ``seconds``, both load generators open loop at
the same rates in all three: a baseline, the stalled phase, and a baseline
again. Just before the stalled phase one more device of the hot user
(:mod:`bench.idle_clients` with ``stall``) authenticates, gets its
``welcome`` and then never reads (reading paused, receive buffer 4 KiB), as
a client on a stuck network. The hub should fill that connection's kernel
send buffer and then its bounded queue (``HUB_SEND_QUEUE_SIZE`` events),
close it with 1013 (its ``hub_slow_consumer_closes`` counter rises), and,
since the close frame cannot be written to a peer that does not read, drop
the connection (the hub no longer holds its socket). Should the
stalled phase end before both happened, it goes on in parts, up to
``STALL_LIMIT_S``; those parts are reported but not compared. Afterwards the
device reads again and reports what it got and how its connection ended.
The hub's RSS is sampled every 50 ms, its counter every 250 ms.

Judged (``Report.target``):

- the hub's peak RSS growth during the stalled phase: at most one
  connection's worst-case queue, ``send_queue_size x max_event_bytes`` (16
  MiB), whatever the stall's length;
- the stalled device closed for being slow (1013) and dropped, within
  ``STALL_LIMIT_S``;
- the p99 delivery latency of the other users' devices, and of the hot
  user's 3 other devices, in the stalled phase against the baseline, the
  mean of the p99s of the phases before and after (so a drift of the
  machine's load over the run is not counted as the stall's): at most 1.5x
  the baseline + 2 ms. Why that much and no more: a stalled reader that held
  up the others (a send waiting on its full socket, a fan-out loop blocked
  on it) would add its wait to every delivery of the phase, tens of ms at
  least, while a hub that isolates it pays next to nothing for it; 2 ms
  covers the load generators' millisecond timer ticks, and the factor the
  spread of a p99 between two phases on a quiet machine. It cannot cover
  outside load: the hub, PostgreSQL and both load generators share two
  cores, and when other processes take a share of them (the notes say how
  much), p99s move several-fold between two phases of one run, and such a
  run meets or misses this goal by chance.

The hub's side of the stalled connection is read from ``/proc/net/tcp``
every 50 ms: its state, its send queue, and whether a process still holds
it. The hub ends a connection whose close frame cannot be written by closing
its socket; the kernel then keeps it as an orphan in FIN-WAIT-1, its send
queue full, and the device, which never gets the FIN queued behind that
data, still sees its connection established. Both are reported.

Every delivery to every device that keeps reading must arrive exactly once
(by version, ``prev`` checked, every ack with its version), or the result is
invalid; so is a run with a refused push or a load generator past
``LOADGEN_MAX_CORES``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import tempfile
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import uvloop

from . import machine
from .cpu import CpuMeter, Group, postgres_group
from .database import analyze, bench_database
from .fanout import CHECK_FAILURES, LOADGEN_MAX_CORES, LoadgenProcess
from .loadgen import Loadgen, LoadgenConfig, User
from .report import Report
from .servers import ServerProcess, start_hub
from .stats import median
from .targets import Target
from .worker import WorkerProcess, cpu_s, say, stdin_lines

__all__ = ["HotLoadgen", "SlowConfig", "add_arguments", "main", "run"]

JWT_SECRET = "bench-secret-" + "z" * 40
SEND_QUEUE_SIZE = 256  # the hub's default, set explicitly so the bound below holds
MAX_EVENT_BYTES = 64 * 1024
RSS_STEP_S = 0.05
METRICS_STEP_S = 0.25
SLOW_CLOSES = "hub_slow_consumer_closes_total"
STALL_LIMIT_S = 24.0  # the stalled phase goes on until the hub drops the device, or this
HUB_PUSHES_IN_FLIGHT = 64  # hub.session.MAX_PUSHES_IN_FLIGHT
P99_FACTOR = 1.5
P99_SLACK_MS = 2.0
RSS_GOAL_BYTES = SEND_QUEUE_SIZE * MAX_EVENT_BYTES
PHASES = ("before", "stalled", "after")
TIMELINE_STEP_NS = 100_000_000

# targets.PUSH_TEMPLATE with a second field, ``pad``, in the same change.
HOT_PUSH_TEMPLATE = (
    '{"type":"push","id":"m-%d","changes":[{"collection":"bench","id":"r","op":"upsert",'
    '"fields":{"n":{"value":%d,"hlc":"%s"},"pad":{"value":"%s","hlc":"%s"}}}]}'
)


@dataclass(frozen=True)
class SlowConfig:
    users: int = 250
    devices: int = 4
    # Pushes/s of the hot user and the size of each one's padding: about 470
    # KB/s of events for the stalled device, enough to fill its socket and
    # the hub's queue for it within a few seconds.
    hot_rate: float = 200.0
    pad_bytes: int = 2048
    window: int = HUB_PUSHES_IN_FLIGHT // 2
    rate: float = 0.0  # messages/s of the others; 0: half the measured saturation
    runs: int = 1
    seconds: float = 9.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SlowConfig()
    parser.add_argument("--users", type=int, default=d.users, help="users of the others' load")
    parser.add_argument("--devices", type=int, default=d.devices, help="devices per user")
    parser.add_argument(
        "--rate", type=float, default=d.rate, help="others' messages/s (0: half of saturation)"
    )
    parser.add_argument(
        "--hot-rate", type=float, default=d.hot_rate, help="pushes/s of the stalled device's user"
    )
    parser.add_argument(
        "--pad-bytes",
        type=int,
        default=d.pad_bytes,
        help="padding per hot push (bytes)",
    )
    parser.add_argument("--runs", type=int, default=d.runs, help="baseline/stalled/baseline runs")
    parser.add_argument("--seconds", type=float, default=d.seconds, help="length of each phase")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 3 s phases")


# -- the hot user's load generator (its own process) ---------------------------------


class HotLoadgen(Loadgen):
    """The load generator's open loop for one user, with bigger pushes and a window.

    At most ``window`` messages are outstanding (sent, and not yet both acked
    and delivered to every other device), so never more than ``window``
    pushes are in flight at the hub. A send that falls due while the window is
    full waits, in order, for a message to complete; it keeps its scheduled
    time, from which its latency is measured.
    """

    def __init__(self, config: LoadgenConfig, window: int, pad_bytes: int) -> None:
        super().__init__(config)
        self.window = window
        self.pad = "x" * pad_bytes
        self.backlog: deque[tuple[User, int]] = deque()
        self.deferred = 0
        self.most_outstanding = 0
        self.worst: dict[int, int] = {}  # 100 ms of scheduled time -> worst latency, ns

    def send(self, user: User, t0_ns: int) -> None:
        if self.backlog or len(user.pending) >= self.window:
            self.backlog.append((user, t0_ns))
            self.deferred += 1
            return
        self._send_now(user, t0_ns)

    def _send_now(self, user: User, t0_ns: int) -> None:
        user.seq += 1
        user.pending[user.seq] = [t0_ns, self.expected_receipts]
        self.most_outstanding = max(self.most_outstanding, len(user.pending))
        sender = user.devices[0].conn
        assert sender is not None
        stamp = user.clock.now()
        push = HOT_PUSH_TEMPLATE % (user.seq, user.seq, stamp, self.pad, stamp)
        sender.send(self.frame(push.encode()))
        self.phase.sent += 1

    def _receipt(self, user: User, seq: int, pending: list[int], now: int) -> None:
        slot = pending[0] // TIMELINE_STEP_NS
        self.worst[slot] = max(self.worst.get(slot, 0), now - pending[0])
        super()._receipt(user, seq, pending, now)
        while self.backlog and len(self.backlog[0][0].pending) < self.window:
            self._send_now(*self.backlog.popleft())

    async def _drain(self) -> bool:
        deadline = time.monotonic() + self.config.drain_s
        while time.monotonic() < deadline:
            if not self.backlog and not any(u.pending for u in self.users):
                return True
            await asyncio.sleep(0.01)
        return False

    async def open(self, rate: float, seconds: float) -> dict[str, Any]:
        self.deferred = self.most_outstanding = 0
        self.worst = {}
        result = await super().open(rate, seconds)
        # When, on the system-wide monotonic clock, the worst latencies were (its
        # seconds; the orchestrator's time.monotonic() reads the same clock).
        result["worst_by_100ms"] = [
            (slot * TIMELINE_STEP_NS / 1e9, ns / 1e6) for slot, ns in sorted(self.worst.items())
        ]
        result["deferred"] = self.deferred  # sent late: the window was full when due
        result["never_sent"] = len(self.backlog)
        result["most_outstanding"] = self.most_outstanding
        result["window"] = self.window
        self.backlog.clear()
        return result


async def _serve_hot() -> None:
    """The hot user's process: ``ready`` once connected, then ``open``, ``check``, ``quit``."""
    stdin = await stdin_lines()
    config = orjson.loads(await stdin.readline())
    gen = HotLoadgen(
        LoadgenConfig.from_json(config["loadgen"]), config["window"], config["pad_bytes"]
    )
    try:
        try:
            connect_s = await gen.connect()
        except Exception as exc:  # reported to the orchestrator, which shows the hub's log
            say({"event": "error", "message": f"connecting failed: {type(exc).__name__}: {exc}"})
            return
        say({"event": "ready", "client": gen.client, "connect_s": connect_s})
        for _ in range(1000):  # commands; the orchestrator sends a handful
            line = await stdin.readline()
            if not line:
                return
            command = orjson.loads(line)
            cmd = command["cmd"]
            if cmd == "open":
                cpu0, t0 = cpu_s(), time.perf_counter()
                result = await gen.open(float(command["rate"]), float(command["seconds"]))
                cores = (cpu_s() - cpu0) / (time.perf_counter() - t0)
                say({"event": "result", "cmd": cmd, "loadgen_cores_self": cores, **result})
            elif cmd == "check":
                say({"event": "result", "cmd": cmd, **gen.check()})
            elif cmd == "quit":
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
    finally:
        gen.close()
        await asyncio.sleep(0.2)  # let the close frames go out


def main() -> None:
    uvloop.run(_serve_hot())


# -- the orchestrator ---------------------------------------------------------------


def _slow_closes(hub: ServerProcess) -> float:
    with urllib.request.urlopen(hub.url + "/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(SLOW_CLOSES + " "):
                return float(line.split()[1])
    return 0.0


# /proc/net/tcp's states (include/net/tcp_states.h)
TCP_STATES = {
    "01": "ESTABLISHED",
    "04": "FIN-WAIT-1",
    "05": "FIN-WAIT-2",
    "06": "TIME-WAIT",
    "07": "CLOSE",
    "08": "CLOSE-WAIT",
    "09": "LAST-ACK",
    "0B": "CLOSING",
}


def _hub_socket(hub_port: int, peer_port: int) -> tuple[str, int, bool] | None:
    """The hub's side of the connection from ``peer_port``: its TCP state, the bytes in
    its send queue, and whether a process still holds it (an inode of 0 is an orphan,
    closed by the hub and left to the kernel); None once the kernel has dropped it."""
    local, remote = f":{hub_port:04X}", f":{peer_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table:
            cols = line.split()
            if cols[1].endswith(local) and cols[2].endswith(remote):
                tx_queue = int(cols[4].split(":")[0], 16)
                return TCP_STATES.get(cols[3], cols[3]), tx_queue, cols[9] != "0"
    return None


@dataclass
class Watch:
    """The hub's RSS, its slow-close counter and, once ``peer_port`` is set, the hub's
    side of that connection, sampled on a thread, labelled by phase."""

    hub: ServerProcess
    phase: str = "start"
    peer_port: int = 0
    rss: list[tuple[float, str, int]] = field(default_factory=list)
    closes: list[tuple[float, str, float]] = field(default_factory=list)
    sockets: list[tuple[float, int, tuple[str, int, bool] | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hub-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        process = psutil.Process(self.hub.pid)
        next_metrics = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self.rss.append((now, self.phase, int(process.memory_info().rss)))
                if now >= next_metrics:
                    self.closes.append((now, self.phase, _slow_closes(self.hub)))
                    next_metrics = now + METRICS_STEP_S
                if self.peer_port:
                    port = self.peer_port
                    self.sockets.append((now, port, _hub_socket(self.hub.port, port)))
            except (psutil.Error, OSError):
                return
            self._stop.wait(RSS_STEP_S)

    def growth(self, phase: str) -> float:
        """Peak RSS within ``phase`` minus the RSS at its start, in bytes."""
        values = [r for _, p, r in self.rss if p == phase]
        return float(max(values) - values[0]) if values else float("nan")

    def closed_after(self, phase: str, start: float) -> float | None:
        """Seconds from ``start`` to the first reading in ``phase`` with more slow closes."""
        readings = [(t, c) for t, p, c in self.closes if p == phase]
        if not readings:
            return None
        first = readings[0][1]
        return next((t - start for t, c in readings if c > first), None)

    def released_after(self, peer_port: int, start: float) -> float | None:
        """Seconds from ``start`` until the hub no longer held that connection."""
        return next(
            (t - start for t, p, s in self.sockets if p == peer_port and (s is None or not s[2])),
            None,
        )

    def socket_states(self, peer_port: int, start: float) -> list[Any]:
        """The hub's side of that connection as it changed: [seconds, state, held by
        the hub, its send queue's bytes then and at most so far]; its send queue
        grows on every sample, so only a change of state or holder is listed."""
        changes: list[Any] = []
        most = 0
        for t, p, s in self.sockets:
            if p != peer_port:
                continue
            most = max(most, s[1] if s else 0)
            key = (s[0], s[2]) if s else ("gone", False)
            if not changes or changes[-1][1:3] != list(key):
                changes.append([round(t - start, 2), *key, s[1] if s else 0, most])
        return changes


def _open_phase(
    others: LoadgenProcess, hot: WorkerProcess, rate: float, cfg: SlowConfig, seconds: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same open-loop phase on both load generators at once."""
    timeout = seconds + 30
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(others.command, {"cmd": "open", "rate": rate, "seconds": seconds}, timeout)
        b = pool.submit(
            hot.command, {"cmd": "open", "rate": cfg.hot_rate, "seconds": seconds}, timeout
        )
        return a.result(), b.result()


def _stall(
    i: int,
    cfg: SlowConfig,
    rate: float,
    target: Target,
    tag: str,
    others: LoadgenProcess,
    hot: WorkerProcess,
    watch: Watch,
    log_dir: Path,
) -> dict[str, Any]:
    """The stalled phase of run ``i``, and what came of the stalled device."""
    stalled = WorkerProcess(
        "bench.idle_clients",
        {
            "target": target.as_json(),
            "users": [f"w6h-{tag}-u0"],
            "devices": 1,
            "device_prefix": "stalled",
            "stall": True,
        },
        log_dir / f"stalled-{i}.log",
    )
    try:
        stalled.expect("loaded", 30)
        connected = stalled.command({"cmd": "connect"}, 30)
        if connected["connected"] != 1:
            raise RuntimeError(f"the stalled device did not connect: {connected}")
        port = stalled.command({"cmd": "check"}, 10)["local_ports"][0]
        phase = f"stalled{i}"
        watch.phase = phase
        watch.peer_port = port
        t0 = time.monotonic()
        out: dict[str, Any] = {"stalled": _open_phase(others, hot, rate, cfg, cfg.seconds)}
        out["stalled_s"] = time.monotonic() - t0
        # Should the hub not have dropped the device yet: more of the same load, in
        # parts, until it has (or the bound), reported apart from the comparison.
        extra = []
        while True:
            time.sleep(2 * METRICS_STEP_S)  # one more reading of the counter
            if watch.closed_after(phase, t0) is not None and watch.released_after(port, t0):
                break
            if time.monotonic() - t0 > STALL_LIMIT_S:
                break
            extra.append(_open_phase(others, hot, rate, cfg, min(cfg.seconds, 4.0)))
        out["stalled_extra"] = extra
        out["closed_after_s"] = watch.closed_after(phase, t0)
        out["dropped_after_s"] = watch.released_after(port, t0)
        out["hub_socket"] = watch.socket_states(port, t0)
        state = stalled.command({"cmd": "check"}, 10)
        left = state["left_established_at"][0]
        out["device_saw_end_after_s"] = None if left is None else left - t0
        out["device_tcp_state"] = state["tcp_states"][0]
        out["rss_growth_stalled"] = watch.growth(phase)
        watch.peer_port = 0
        watch.phase = f"resume{i}"
        out["resumed"] = stalled.command({"cmd": "resume", "timeout": 3.0}, 15)
        out["t0"] = t0
        return out
    finally:
        stalled.stop()


def _slow(cfg: SlowConfig, report: Report, log_dir: Path) -> None:
    with bench_database() as db:
        report.machine.update(postgresql=db.server_version, database=db.origin)
        env = {
            "HUB_MAX_CONNECTIONS_PER_USER": "10",
            "HUB_SEND_QUEUE_SIZE": str(SEND_QUEUE_SIZE),
            "HUB_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
        }
        hub = start_hub(db.url, JWT_SECRET, log_dir, env)
        processes: list[Any] = []
        watch = Watch(hub)
        try:
            target = Target("hub", hub.ws_url("/v1/ws"), JWT_SECRET)
            tag = secrets.token_hex(3)
            others = LoadgenProcess(
                LoadgenConfig(target, users=cfg.users, devices=cfg.devices, tag=f"w6o-{tag}"),
                log_dir / "loadgen-others.log",
            )
            processes.append(others)
            hot_config = LoadgenConfig(target, users=1, devices=cfg.devices, tag=f"w6h-{tag}")
            hot = WorkerProcess(
                "bench.slow",
                {
                    "loadgen": hot_config.as_json(),
                    "window": cfg.window,
                    "pad_bytes": cfg.pad_bytes,
                },
                log_dir / "loadgen-hot.log",
            )
            processes.append(hot)
            others.expect("ready", 60)
            hot.expect("ready", 60)
            meter = CpuMeter(
                {
                    "hub": Group.of([hub.pid]),
                    "postgres": postgres_group(db.server_pid, db.name),
                    "others": Group.of([others.pid]),
                    "hot": Group.of([hot.pid]),
                }
            )
            others.command({"cmd": "closed", "seconds": 1.0}, 30)  # warm-up, not counted
            uvloop.run(analyze(db.url))
            rate = cfg.rate
            saturation = None
            if rate <= 0:
                saturation = others.command({"cmd": "closed", "seconds": 2.0}, 40)
                # Half the saturation in all, the hot user's messages included.
                half = saturation["deliveries_per_s"] / 2 / (cfg.devices - 1)
                rate = max(half - cfg.hot_rate, half / 4)
            _open_phase(others, hot, rate, cfg, 1.0)  # warm-up of the hot user, not counted
            watch.start()
            runs: list[dict[str, Any]] = []
            for i in range(cfg.runs):
                run: dict[str, Any] = {}
                for name in PHASES:
                    meter.start()
                    if name == "stalled":
                        run.update(_stall(i, cfg, rate, target, tag, others, hot, watch, log_dir))
                    else:
                        watch.phase = f"{name}{i}"
                        run[name] = _open_phase(others, hot, rate, cfg, cfg.seconds)
                        run[f"rss_growth_{name}"] = watch.growth(f"{name}{i}")
                    run[f"{name}_cpu"] = meter.stop().as_json()
                runs.append(run)
            checks = {"others": others.command({"cmd": "check"}, 30)}
            checks["hot"] = hot.command({"cmd": "check"}, 30)
            if not hub.alive():
                raise RuntimeError(f"the hub died; its log:\n{hub.log_tail()}")
        finally:
            watch.stop()
            for p in processes:
                p.stop()
            hub.stop()
    _report(report, cfg, rate, saturation, runs, checks, watch)


def _p99(result: dict[str, Any]) -> float:
    value: float = result["latency"]["p99_ms"]
    return value


def _report(
    report: Report,
    cfg: SlowConfig,
    rate: float,
    saturation: dict[str, Any] | None,
    runs: list[dict[str, Any]],
    checks: dict[str, dict[str, Any]],
    watch: Watch,
) -> None:
    for idx, who in enumerate(("others", "hot")):
        before = [_p99(r["before"][idx]) for r in runs]
        after = [_p99(r["after"][idx]) for r in runs]
        stalled = [_p99(r["stalled"][idx]) for r in runs]
        base = [(b + a) / 2 for b, a in zip(before, after, strict=True)]
        what = (
            f"the {cfg.users} other users' devices"
            if who == "others"
            else "the stalled device's user's 3 other devices"
        )
        report.add(f"{who}: p99 baseline before", "ms", before, f"{what}: delivery p99, open loop")
        report.add(f"{who}: p99 with a stalled device", "ms", stalled, "the same, stalled phase")
        report.add(f"{who}: p99 baseline after", "ms", after, "the same, once it was dropped")
        goal = P99_FACTOR * median(base) + P99_SLACK_MS
        report.target(
            f"{who}: p99 with a stalled device (median of runs)",
            median(stalled),
            goal,
            at_least=False,
            meaning=f"{what}: at most {P99_FACTOR}x the baseline p99 + {P99_SLACK_MS:g} ms "
            f"(baseline: mean of the phases before and after, {median(base):.2f} ms)",
        )
    report.add(
        "hub RSS growth, baseline phases",
        "MiB",
        [max(r["rss_growth_before"], r["rss_growth_after"]) / 2**20 for r in runs],
        "peak RSS in the phase minus RSS at its start (the larger of the two)",
    )
    growth = [r["rss_growth_stalled"] / 2**20 for r in runs]
    report.add("hub RSS growth, stalled phase", "MiB", growth, "until the device was dropped")
    report.target(
        "hub RSS growth with a stalled device (max of runs)",
        max(growth),
        RSS_GOAL_BYTES / 2**20,
        at_least=False,
        meaning="at most one connection's worst-case queue, send_queue_size x max_event_bytes "
        f"({SEND_QUEUE_SIZE} x {MAX_EVENT_BYTES // 1024} KiB)",
    )
    closed = [r["closed_after_s"] for r in runs]
    dropped = [r["dropped_after_s"] for r in runs]
    nan = float("nan")
    report.add(
        "hub closed the stalled device (1013) after",
        "s",
        [nan if c is None else c for c in closed],
        "from the start of the stall to the hub's slow-consumer counter rising "
        f"(read every {METRICS_STEP_S} s); that counter counts only 1013 closes",
    )
    report.add(
        "hub dropped the stalled device's connection after",
        "s",
        [nan if d is None else d for d in dropped],
        "from the start of the stall until the hub no longer held its socket "
        f"(/proc/net/tcp, read every {RSS_STEP_S} s)",
    )
    both = sum(1 for c, d in zip(closed, dropped, strict=True) if c is not None and d is not None)
    report.target(
        "stalled device closed with 1013 and dropped (share of runs)",
        both / len(runs),
        1.0,
        meaning=f"within {STALL_LIMIT_S:g} s of the stall: the hub drops a reader that fell "
        "a whole queue behind, and counts it as too slow",
    )
    report.add("others: messages/s", "messages/s", [rate])
    report.add("hot user: pushes/s", "messages/s", [cfg.hot_rate], f"each {cfg.pad_bytes} B padded")
    deferred = [r[name][1]["deferred"] for r in runs for name in PHASES]
    report.add(
        "hot user: sends deferred by its window",
        "messages",
        [float(sum(deferred))],
        f"sent late because {cfg.window} were outstanding; latency still from the schedule",
    )
    loadgen_cores = max(
        r[f"{name}_cpu"].get(f"{who}_cpu_s", 0.0) / r[f"{name}_cpu"]["wall_s"]
        for r in runs
        for name in PHASES
        for who in ("others", "hot")
    )
    report.add("load generator cores (max)", "cores", [loadgen_cores])
    report.details.update(
        {
            "rate": rate,
            "saturation": saturation,
            "runs": runs,
            "checks": checks,
            "rss_samples": len(watch.rss),
        }
    )
    for who, check in checks.items():
        for key in (*CHECK_FAILURES, "closed_connections"):
            if check.get(key):
                report.invalid(f"{who}: {check[key]} {key.replace('_', ' ')}")
    for i, r in enumerate(runs):
        # What the kernel did with the hub's side, and what the device saw of it.
        report.notes.append(
            f"run {i}: the hub's side of the stalled connection ([s, state, held by the hub, "
            f"send queue bytes, most so far]): {r['hub_socket']}; the device saw its connection "
            f"{r['device_tcp_state']}, and reading again got {r['resumed']['messages']} "
            f"messages, close codes {r['resumed']['close_codes'] or 'none'}"
        )
        for name in PHASES:
            for result in r[name]:
                if not result["drained"] or result.get("sent_late_or_never"):
                    report.notes.append(
                        f"a {name} phase did not complete on time: "
                        f"{result['pending_after_drain']} pending, "
                        f"{result.get('sent_late_or_never', 0)} never sent"
                    )
            if r[name][1].get("never_sent"):
                report.notes.append(f"{name}: the hot user never sent {r[name][1]['never_sent']}")
            other = r[f"{name}_cpu"]["other_cores"]
            if other > 0.2:
                report.notes.append(f"{name} phase: other processes used {other:.2f} cores")
    if loadgen_cores > LOADGEN_MAX_CORES:
        report.invalid(f"a load generator used {loadgen_cores:.2f} cores")


def run(args: argparse.Namespace) -> Report:
    cfg = SlowConfig(
        users=args.users,
        devices=args.devices,
        hot_rate=args.hot_rate,
        pad_bytes=args.pad_bytes,
        rate=args.rate,
        runs=args.runs,
        seconds=3.0 if args.quick else args.seconds,
    )
    if cfg.devices < 2 or cfg.users < 1 or cfg.runs < 1 or cfg.seconds <= 0 or cfg.pad_bytes < 0:
        raise SystemExit(
            "bench: want --devices >= 2, --users >= 1, --runs >= 1, --seconds > 0, --pad-bytes >= 0"
        )
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-w6-"))
    report = Report("w6", dt.datetime.now(dt.UTC), asdict(cfg), machine.describe())
    _slow(cfg, report, log_dir)
    report.notes.append(f"logs: {log_dir}")
    report.finished_at = dt.datetime.now(dt.UTC)
    return report


if __name__ == "__main__":
    main()
