"""Workload ``w6``: a slow consumer must cost only itself.

One hub; two load generators (:mod:`bench.loadgen`, their own processes):

- ``others``: 250 users x 4 devices, the fan-out load of ``fanout``, run
  open loop at half the saturation rate measured at the start (``--rate``
  to fix it);
- ``hot``: one user x 4 devices sending ``hot_rate`` messages/s, so that an
  extra device of that user has a steady stream of events to fall behind on.

Runs alternate: a baseline phase, then the same phase with one more device of
the hot user (:mod:`bench.idle_clients` with ``stall``) that authenticates,
gets its ``welcome`` and then never reads (reading paused, receive buffer
shrunk to 4 KiB), as a client on a stuck network. After the phase it reads
again and reports how its connection ended: the hub should have closed it
with 1013 once its bounded send queue (``HUB_SEND_QUEUE_SIZE`` messages)
overflowed. Meanwhile the hub's RSS is sampled every 50 ms and its
``hub_slow_consumer_closes`` counter every 250 ms.

Judged: the hub's peak RSS growth during a stalled phase (goal: below the
worst case of one connection's queue, ``send_queue_size x max_event_bytes``,
16 MiB with the defaults); the stalled device closed with 1013; the p99
delivery latency of the other users' devices and of the hot user's other
devices in the stalled phases against the baseline phases (medians over the
runs; goal: at most max(1.5 x baseline, baseline + 5 ms), a change the noise
of this shared machine does not reach between two baselines). Every delivery
to every other device must arrive exactly once, or the run is invalid.
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import uvloop

from . import machine
from .cpu import CpuMeter, Group, postgres_group
from .database import analyze, bench_database
from .fanout import LOADGEN_MAX_CORES, LoadgenProcess
from .loadgen import LoadgenConfig
from .report import Report
from .servers import ServerProcess, start_hub
from .stats import median
from .targets import Target
from .worker import WorkerProcess

__all__ = ["SlowConfig", "add_arguments", "run"]

JWT_SECRET = "bench-secret-" + "z" * 40
SEND_QUEUE_SIZE = 256  # the hub's default, set explicitly so the bound below holds
MAX_EVENT_BYTES = 64 * 1024
RSS_STEP_S = 0.05
METRICS_STEP_S = 0.25
SLOW_CLOSES = "hub_slow_consumer_closes_total"
STALL_LIMIT_S = 24.0  # the stalled phase goes on until the hub closes the device, or this


@dataclass(frozen=True)
class SlowConfig:
    users: int = 250
    devices: int = 4
    # Messages/s of the hot user: well under what one connection may have in flight
    # (64 pushes) at this machine's latencies.
    hot_rate: float = 600.0
    rate: float = 0.0  # messages/s of the others; 0: half the measured saturation
    runs: int = 1
    seconds: float = 4.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SlowConfig()
    parser.add_argument("--users", type=int, default=d.users, help="users of the others' load")
    parser.add_argument("--devices", type=int, default=d.devices, help="devices per user")
    parser.add_argument(
        "--rate", type=float, default=d.rate, help="others' messages/s (0: half of saturation)"
    )
    parser.add_argument(
        "--hot-rate", type=float, default=d.hot_rate, help="messages/s of the stalled user"
    )
    parser.add_argument("--runs", type=int, default=d.runs, help="baseline/stalled pairs")
    parser.add_argument("--seconds", type=float, default=d.seconds, help="length of each phase")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 s phases")


def _slow_closes(hub: ServerProcess) -> float:
    with urllib.request.urlopen(hub.url + "/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(SLOW_CLOSES + " "):
                return float(line.split()[1])
    return 0.0


@dataclass
class Watch:
    """The hub's RSS and slow-close counter, sampled on a thread, labelled by phase."""

    hub: ServerProcess
    phase: str = "start"
    rss: list[tuple[float, str, int]] = field(default_factory=list)
    closes: list[tuple[float, str, float]] = field(default_factory=list)
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


def _open_phase(
    others: LoadgenProcess, hot: LoadgenProcess, rate: float, cfg: SlowConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same open-loop phase on both load generators at once."""
    timeout = cfg.seconds + 30
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(
            others.command, {"cmd": "open", "rate": rate, "seconds": cfg.seconds}, timeout
        )
        b = pool.submit(
            hot.command, {"cmd": "open", "rate": cfg.hot_rate, "seconds": cfg.seconds}, timeout
        )
        return a.result(), b.result()


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
            hot = LoadgenProcess(hot_config, log_dir / "loadgen-hot.log")
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
            watch.start()
            runs: list[dict[str, Any]] = []
            for i in range(cfg.runs):
                run: dict[str, Any] = {}
                watch.phase = f"baseline{i}"
                meter.start()
                run["baseline"] = _open_phase(others, hot, rate, cfg)
                run["baseline_cpu"] = meter.stop().as_json()
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
                processes.append(stalled)
                stalled.expect("loaded", 30)
                connected = stalled.command({"cmd": "connect"}, 30)
                if connected["connected"] != 1:
                    raise RuntimeError(f"the stalled device did not connect: {connected}")
                watch.phase = f"stalled{i}"
                t0 = time.monotonic()
                meter.start()
                # Phases of ``seconds`` until the hub has closed the stalled device (its
                # kernel send buffer fills first, up to a few MB on loopback), bounded.
                segments = []
                while True:
                    segments.append(_open_phase(others, hot, rate, cfg))
                    time.sleep(2 * METRICS_STEP_S)  # one more reading of the counter
                    closed_after = watch.closed_after(f"stalled{i}", t0)
                    if closed_after is not None or time.monotonic() - t0 > STALL_LIMIT_S:
                        break
                run["stalled_cpu"] = meter.stop().as_json()
                run["stalled_segments"] = segments
                # The stalled phase's p99s: each side's median part (one baseline part
                # is compared with several stalled ones; the worst would not be fair).
                run["stalled"] = tuple(
                    sorted((seg[k] for seg in segments), key=_p99)[len(segments) // 2]
                    for k in range(2)
                )
                run["closed_after_s"] = closed_after
                watch.phase = f"resume{i}"
                run["resumed"] = stalled.command({"cmd": "resume", "timeout": 5.0}, 15)
                stalled.stop()
                processes.remove(stalled)
                run["rss_growth_baseline"] = watch.growth(f"baseline{i}")
                run["rss_growth_stalled"] = watch.growth(f"stalled{i}")
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
    bound = SEND_QUEUE_SIZE * MAX_EVENT_BYTES
    for idx, who in enumerate(("others", "hot")):
        base = [_p99(r["baseline"][idx]) for r in runs]
        slow = [_p99(r["stalled"][idx]) for r in runs]
        what = (
            f"the {cfg.users} other users' devices"
            if who == "others"
            else "the stalled device's user's 3 other devices"
        )
        report.add(f"{who}: p99 baseline", "ms", base, f"{what}: delivery latency p99, open loop")
        report.add(
            f"{who}: p99 with a stalled device",
            "ms",
            slow,
            "the median p99 of the stalled phase's parts, which go on until the hub closes it",
        )
        goal = max(1.5 * median(base), median(base) + 5.0)
        report.target(
            f"{who}: p99 with a stalled device (median of runs)",
            median(slow),
            goal,
            at_least=False,
            meaning=f"{what}: at most max(1.5x, +5 ms) the baseline median p99 "
            f"({median(base):.2f} ms)",
        )
    report.add(
        "hub RSS growth, baseline phase",
        "MiB",
        [r["rss_growth_baseline"] / 2**20 for r in runs],
        "peak RSS in the phase minus RSS at its start",
    )
    growth = [r["rss_growth_stalled"] / 2**20 for r in runs]
    report.add("hub RSS growth, stalled phase", "MiB", growth)
    report.target(
        "hub RSS growth with a stalled device (max of runs)",
        max(growth),
        bound / 2**20,
        at_least=False,
        meaning="below one connection's worst-case queue, send_queue_size x max_event_bytes "
        f"({SEND_QUEUE_SIZE} x {MAX_EVENT_BYTES // 1024} KiB)",
    )
    codes = [r["resumed"]["close_codes"] for r in runs]
    closed_1013 = sum(1 for c in codes if c == [1013])
    report.add(
        "stalled device closed with 1013",
        "runs",
        [float(closed_1013)],
        f"of {len(runs)}; the close code it read once it read again",
    )
    after = [r["closed_after_s"] for r in runs if r["closed_after_s"] is not None]
    if after:
        report.add(
            "hub closed the stalled device after",
            "s",
            after,
            "from the start of the stalled phase to the hub's slow-consumer counter rising "
            f"(read every {METRICS_STEP_S} s)",
        )
    report.target(
        "stalled device closed with 1013 (share of runs)",
        closed_1013 / len(runs),
        1.0,
        meaning="the hub drops a reader that fell a whole queue behind, and says why",
    )
    report.add("others: messages/s", "messages/s", [rate])
    report.add("hot user: messages/s", "messages/s", [cfg.hot_rate])
    loadgen_cores = max(
        r[f"{kind}_cpu"].get(f"{who}_cpu_s", 0.0) / r[f"{kind}_cpu"]["wall_s"]
        for r in runs
        for kind in ("baseline", "stalled")
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
        for key in (
            "lost",
            "duplicates",
            "diverged_replicas",
            "acks_missing",
            "ack_mismatches",
            "errors",
            "closed_connections",
        ):
            if check.get(key):
                report.invalid(f"{who}: {check[key]} {key.replace('_', ' ')}")
    for r in runs:
        for kind in ("baseline", "stalled"):
            for result in r[kind]:
                if not result["drained"] or result.get("sent_late_or_never"):
                    report.notes.append(
                        f"a {kind} phase did not complete on time: "
                        f"{result['pending_after_drain']} pending, "
                        f"{result.get('sent_late_or_never', 0)} never sent"
                    )
            other = r[f"{kind}_cpu"]["other_cores"]
            if other > 0.2:
                report.notes.append(f"{kind} phase: other processes used {other:.2f} cores")
    if loadgen_cores > LOADGEN_MAX_CORES:
        report.invalid(f"a load generator used {loadgen_cores:.2f} cores")


def run(args: argparse.Namespace) -> Report:
    cfg = SlowConfig(
        users=args.users,
        devices=args.devices,
        hot_rate=args.hot_rate,
        rate=args.rate,
        runs=args.runs,
        seconds=2.0 if args.quick else args.seconds,
    )
    if cfg.devices < 2 or cfg.users < 1 or cfg.runs < 1 or cfg.seconds <= 0:
        raise SystemExit("bench: want --devices >= 2, --users >= 1, --runs >= 1, --seconds > 0")
    log_dir = Path(tempfile.mkdtemp(prefix="hub-bench-w6-"))
    report = Report("w6", dt.datetime.now(dt.UTC), asdict(cfg), machine.describe())
    _slow(cfg, report, log_dir)
    report.notes.append(f"logs: {log_dir}")
    report.finished_at = dt.datetime.now(dt.UTC)
    return report
