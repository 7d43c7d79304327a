"""The WebSocket load generator: its own process, ``python -m bench.loadgen``.

It opens ``users x devices`` connections to a target (:mod:`bench.targets`)
with picows (a fast asyncio WebSocket client; the ``websockets`` package only
if picows cannot be used) and runs the phases it is told to. Device 0 of each
user sends; the user's other devices receive. When the target is several
server processes, device ``d`` connects to process ``d mod n``. Every delivery
is checked: each receiving connection must get each of its user's messages
exactly once (by version on the hub, by sequence number on the relays and
Socket.IO peers), and at the end each one's replica of the record must hold
the user's last value (and, on the hub, its last version).

Socket.IO peers are spoken to in Engine.IO 4 / Socket.IO 5 directly over the
WebSocket (no Socket.IO client library): ``40`` to connect, ``42[...]`` events,
pings answered.

One process may carry only a shard of the users (``shard`` of ``shards``:
users ``shard, shard + shards, ...``), so that several load generator
processes share a load one core could not drive; each then also returns its
raw latencies (``*_ns`` keys) for the orchestrator to merge.

Phases:

- ``closed``: every user has one message in flight; when all its peers got it
  (and, on the hub, the sender got its ack) the user sends the next. This
  finds the saturation rate.
- ``open``: messages are sent on a fixed timetable (``rate`` per second,
  round-robin over users) whatever the replies, and latency is measured from
  each message's *scheduled* send time, so a stall shows up in full instead of
  slowing the load down (no coordinated omission).

Control is line-delimited JSON: the first line on stdin is the configuration;
the process connects and prints ``{"event": "ready", ...}``; then each command
line (``{"cmd": "closed", "seconds": 5}``, ``{"cmd": "open", "rate": 2000,
"seconds": 5}``, ``{"cmd": "check"}``, ``{"cmd": "quit"}``) is answered with
one ``{"event": "result", ...}`` line on stdout. Diagnostics go to stderr.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import uvloop

from hub.hlc import Clock

from .stats import summarize_ns
from .targets import Target, push_message, sequence_of
from .worker import cpu_s, say, stdin_lines

__all__ = ["LoadgenConfig", "main"]

NS = 1_000_000_000
TICK_S = 0.001


@dataclass(frozen=True)
class LoadgenConfig:
    target: Target
    users: int = 250
    devices: int = 4
    tag: str = "bench"
    client: str = "auto"  # "picows", "websockets" or "auto" (picows, else websockets)
    connect_concurrency: int = 50
    connect_timeout_s: float = 30.0
    drain_s: float = 2.0
    shard: int = 0  # this process carries users shard, shard + shards, ...
    shards: int = 1

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target.as_json(),
            "users": self.users,
            "devices": self.devices,
            "tag": self.tag,
            "client": self.client,
            "connect_concurrency": self.connect_concurrency,
            "connect_timeout_s": self.connect_timeout_s,
            "drain_s": self.drain_s,
            "shard": self.shard,
            "shards": self.shards,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadgenConfig:
        return cls(**{**data, "target": Target.from_json(data["target"])})


# -- connections ----------------------------------------------------------------


class Connection(Protocol):
    """One open WebSocket, whatever the library: send text, close."""

    def send(self, payload: bytes) -> None: ...

    def close(self) -> None: ...


OnMessage = Callable[[bytes], None]
OnClosed = Callable[[int | None], None]


@functools.cache
def _picows_listener() -> type:
    """The picows listener class (made on first use, so picows is imported only then)."""
    from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

    class Listener(WSListener):  # type: ignore[misc]
        def __init__(self, on_message: OnMessage, on_closed: OnClosed) -> None:
            self.on_message = on_message
            self.on_closed = on_closed
            self.transport: WSTransport | None = None
            self.parts: list[bytes] = []
            self.close_code: int | None = None

        def on_ws_connected(self, transport: WSTransport) -> None:
            self.transport = transport

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            kind = frame.msg_type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                if frame.fin:
                    self.on_message(frame.get_payload_as_bytes())
                else:
                    self.parts = [frame.get_payload_as_bytes()]
            elif kind is WSMsgType.CONTINUATION:
                self.parts.append(frame.get_payload_as_bytes())
                if frame.fin:
                    self.on_message(b"".join(self.parts))
                    self.parts = []
            elif kind is WSMsgType.CLOSE:
                self.close_code = frame.get_close_code().value
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            self.on_closed(self.close_code)

        def send(self, payload: bytes) -> None:
            assert self.transport is not None
            self.transport.send(WSMsgType.TEXT, payload)

        def close(self) -> None:
            if self.transport is not None and not self.transport.is_disconnected:
                self.transport.send_close(WSCloseCode.OK)
                self.transport.disconnect()

    return Listener


async def _connect_picows(
    url: str, headers: dict[str, str], on_message: OnMessage, on_closed: OnClosed
) -> Connection:
    from picows import ws_connect

    listener_class = _picows_listener()
    _, listener = await ws_connect(
        lambda: listener_class(on_message, on_closed),
        url,
        extra_headers=headers,
        enable_auto_pong=True,
        max_frame_size=2 << 20,
    )
    conn: Connection = listener
    return conn


async def _connect_websockets(
    url: str, headers: dict[str, str], on_message: OnMessage, on_closed: OnClosed
) -> Connection:
    from websockets.asyncio.client import connect

    ws = await connect(
        url, additional_headers=headers, compression=None, ping_interval=None, max_size=2 << 20
    )

    async def read() -> None:
        try:
            async for message in ws:
                on_message(message.encode() if isinstance(message, str) else message)
        except Exception:  # any end of the connection is reported below
            pass
        on_closed(ws.close_code)

    reader = asyncio.create_task(read())

    class Adapter:
        def send(self, payload: bytes) -> None:
            # Frames are written in the order the tasks start: the order of sends.
            asyncio.ensure_future(ws.send(payload.decode()))

        def close(self) -> None:
            reader.cancel()
            asyncio.ensure_future(ws.close())

    return Adapter()


# -- users, devices, and the bookkeeping of deliveries --------------------------


@dataclass(eq=False)
class Device:
    """One connection of a user, and what it received."""

    user: User
    index: int
    conn: Connection | None = None
    welcome: asyncio.Future[int] | None = None
    seen: set[int] = field(default_factory=set)
    duplicates: int = 0
    latest_key: int = 0  # the highest version (hub) or sequence number received
    latest_value: int = 0  # the record's value in that delivery: the replica's state
    last_version: int = 0  # hub: the version of the last change event received
    gaps: int = 0  # hub: change events whose ``prev`` was not the last version seen
    closed_code: int | None = None
    closed: bool = False


@dataclass(eq=False)
class User:
    """A user: device 0 sends, the others receive. ``pending``: seq -> [t0 ns, receipts left]."""

    index: int
    name: str
    clock: Clock
    devices: list[Device] = field(default_factory=list)
    seq: int = 0
    base_version: int = 0
    pending: dict[int, list[int]] = field(default_factory=dict)
    acks: int = 0
    ack_mismatches: int = 0


@dataclass
class Phase:
    """Counters of the phase being run."""

    kind: str
    active: bool = True  # closed loop: send the next message when a round completes
    window_end_ns: int = 0  # deliveries after this count as drain, not rate
    sent: int = 0
    deliveries: int = 0
    deliveries_in_window: int = 0
    latencies: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)


class Loadgen:
    """The users, their connections, the phase being run, and the delivery checks."""

    def __init__(self, config: LoadgenConfig) -> None:
        self.config = config
        self.target = config.target
        self.expected_receipts = (config.devices - 1) + (1 if self.target.sends_ack else 0)
        self.users = [
            User(i, f"{config.tag}-u{i}", Clock("d0"))
            for i in range(config.shard, config.users, config.shards)
        ]
        for user in self.users:
            user.devices = [Device(user, d) for d in range(config.devices)]
        self.phase = Phase("idle", active=False)
        self.errors: list[str] = []
        self.error_count = 0
        self.unexpected = 0
        self.client = ""
        self.socketio = self.target.kind == "socketio"
        self.relayed = not self.target.sends_ack  # peers get the push itself, not a change
        self.frame = self.target.frame

    # -- receiving ----------------------------------------------------------

    def on_message(self, device: Device, payload: bytes) -> None:
        now = time.perf_counter_ns()
        if self.socketio:
            event = self._engineio(device, payload)
            if event is None:
                return
            msg = event
        else:
            msg = orjson.loads(payload)
        kind = msg.get("type")
        user = device.user
        if kind == "change" or (kind == "push" and self.relayed):
            seq = sequence_of(msg)
            key = msg["version"] if kind == "change" else seq
            if device.index == 0:
                self.unexpected += 1  # the sender must not get its own message
            if key in device.seen:
                device.duplicates += 1
                return
            device.seen.add(key)
            if key > device.latest_key:
                device.latest_key = key
                device.latest_value = seq
            if kind == "change":
                if msg.get("prev") != device.last_version:
                    device.gaps += 1
                device.last_version = key
            phase = self.phase
            phase.deliveries += 1
            if now <= phase.window_end_ns or phase.window_end_ns == 0:
                phase.deliveries_in_window += 1
            pending = user.pending.get(seq)
            if pending is not None:
                phase.latencies.append(now - pending[0])
                self._receipt(user, seq, pending, now)
        elif kind == "ack":
            seq = int(msg["id"][2:])
            user.acks += 1
            if msg.get("version") != user.base_version + seq or msg.get("applied") != 1:
                user.ack_mismatches += 1
            pending = user.pending.get(seq)
            if pending is not None:
                self._receipt(user, seq, pending, now)
        elif kind == "welcome":
            if device.welcome is not None and not device.welcome.done():
                device.welcome.set_result(int(msg.get("version", 0)))
        elif kind == "error":
            self.error_count += 1
            if len(self.errors) < 10:
                self.errors.append(payload.decode(errors="replace")[:300])
        else:
            self.unexpected += 1

    def _engineio(self, device: Device, payload: bytes) -> dict[str, Any] | None:
        """A Socket.IO ``push`` event's message; the other packets are handled here."""
        head = payload[:2]
        if head == b"42":  # a Socket.IO event: ["name", argument]
            event = orjson.loads(payload[2:])
            if event[0] == "push" and len(event) == 2:
                message: dict[str, Any] = event[1]
                return message
            self.unexpected += 1
        elif head == b"40":  # connected to the namespace: the welcome
            if device.welcome is not None and not device.welcome.done():
                device.welcome.set_result(0)
        elif head[:1] == b"2":  # Engine.IO ping
            if device.conn is not None:
                device.conn.send(b"3" + payload[1:])
        elif head[:1] == b"0":  # Engine.IO open: the session's parameters
            pass
        else:  # 44 (connect refused), 41 (disconnect), 1 (close), anything else
            self.error_count += 1
            if len(self.errors) < 10:
                self.errors.append(payload.decode(errors="replace")[:300])
        return None

    def _receipt(self, user: User, seq: int, pending: list[int], now: int) -> None:
        pending[1] -= 1
        if pending[1] > 0:
            return
        del user.pending[seq]
        phase = self.phase
        phase.rounds.append(now - pending[0])
        if phase.active:
            self.send(user, now)

    def on_closed(self, device: Device, code: int | None) -> None:
        device.closed = True
        device.closed_code = code

    # -- sending ------------------------------------------------------------

    def send(self, user: User, t0_ns: int) -> None:
        """Send the user's next message; ``t0_ns`` is when it was due."""
        user.seq += 1
        user.pending[user.seq] = [t0_ns, self.expected_receipts]
        sender = user.devices[0].conn
        assert sender is not None
        sender.send(self.frame(push_message(user.seq, user.clock.now())))
        self.phase.sent += 1

    # -- connecting ---------------------------------------------------------

    async def connect(self) -> float:
        """Open every connection (waiting for each welcome on the hub); seconds taken."""
        connect = self._pick_client()
        gate = asyncio.Semaphore(self.config.connect_concurrency)
        loop = asyncio.get_running_loop()
        hello = self.target.hello

        async def one(device: Device) -> None:
            user = device.user
            async with gate:
                if self.target.sends_welcome:
                    device.welcome = loop.create_future()
                device.conn = await connect(
                    self.target.url(user.name, f"d{device.index}", device.index),
                    self.target.headers(user.name),
                    functools.partial(self.on_message, device),
                    functools.partial(self.on_closed, device),
                )
                if hello is not None:
                    device.conn.send(hello)
                if device.welcome is not None:
                    version = await asyncio.wait_for(device.welcome, 10.0)
                    device.last_version = version
                    if device.index == 0:
                        user.base_version = version

        start = time.perf_counter()
        devices = [d for u in self.users for d in u.devices]
        await asyncio.wait_for(
            asyncio.gather(*(one(d) for d in devices)), self.config.connect_timeout_s
        )
        if not self.target.sends_welcome:
            await asyncio.sleep(0.5)  # let the relay register the last connections
        return time.perf_counter() - start

    def _pick_client(self) -> Callable[[str, dict[str, str], OnMessage, OnClosed], Any]:
        """picows when it loads (or when asked for), else the websockets package."""
        choice = self.config.client
        if choice in ("auto", "picows"):
            try:
                import picows  # noqa: F401

                self.client = "picows"
                return _connect_picows
            except (ImportError, OSError) as exc:
                if choice == "picows":
                    raise
                print(f"loadgen: picows unusable ({exc}); using websockets", file=sys.stderr)
        self.client = "websockets"
        return _connect_websockets

    # -- phases -------------------------------------------------------------

    async def closed(self, seconds: float) -> dict[str, Any]:
        """Saturation: one message in flight per user, the next sent when it completed."""
        phase = self.phase = Phase("closed")
        start = time.perf_counter_ns()
        phase.window_end_ns = start + int(seconds * NS)
        for user in self.users:
            self.send(user, start)
        await asyncio.sleep(seconds)
        phase.active = False
        end = time.perf_counter_ns()
        drained = await self._drain()
        return self._result(phase, start, end, drained, seconds)

    async def open(self, rate: float, seconds: float) -> dict[str, Any]:
        """Fixed timetable: message k is due at start + k/rate, sent to user k mod users."""
        phase = self.phase = Phase("open", active=False)
        total = max(1, int(rate * seconds))
        interval = NS / rate
        start = time.perf_counter_ns()
        phase.window_end_ns = start + int(seconds * NS)
        give_up = phase.window_end_ns + 5 * NS  # bound, should sending fall far behind
        users = self.users
        lag: list[int] = []
        k = 0
        while k < total:
            now = time.perf_counter_ns()
            if now > give_up:
                break
            while k < total:
                due = start + int(k * interval)
                if due > now:
                    break
                lag.append(time.perf_counter_ns() - due)
                self.send(users[k % len(users)], due)
                k += 1
            if k < total:
                # The event loop's timers have millisecond resolution: a shorter
                # sleep would spin. Sends due meanwhile go out together, late by
                # up to a tick; that lateness is part of the measured latency
                # and is reported on its own as ``send_lag``.
                wait = start + int(k * interval) - time.perf_counter_ns()
                await asyncio.sleep(max(TICK_S, wait / NS))
        end = time.perf_counter_ns()
        drained = await self._drain()
        result = self._result(phase, start, end, drained, seconds)
        result["send_lag"] = summarize_ns(lag)
        if self.config.shards > 1:
            result["send_lag_ns"] = lag
        result["target_rate"] = rate
        result["scheduled"] = total
        result["sent_late_or_never"] = total - k
        return result

    async def _drain(self) -> bool:
        """Wait (bounded) until every message sent has all its receipts."""
        deadline = time.monotonic() + self.config.drain_s
        while time.monotonic() < deadline:
            if not any(u.pending for u in self.users):
                return True
            await asyncio.sleep(0.01)
        return False

    def _result(
        self, phase: Phase, start: int, end: int, drained: bool, seconds: float
    ) -> dict[str, Any]:
        window = (end - start) / NS
        pending = sum(len(u.pending) for u in self.users)
        return {
            "phase": phase.kind,
            "seconds": seconds,
            "window_s": window,
            "sent": phase.sent,
            "deliveries": phase.deliveries,
            "deliveries_in_window": phase.deliveries_in_window,
            "deliveries_per_s": phase.deliveries_in_window / window if window > 0 else 0.0,
            "latency": summarize_ns(phase.latencies),
            "round": summarize_ns(phase.rounds),
            "drained": drained,
            "pending_after_drain": pending,
            "closed_connections": sum(d.closed for u in self.users for d in u.devices),
            **(
                {"latency_ns": phase.latencies, "round_ns": phase.rounds}
                if self.config.shards > 1
                else {}
            ),
        }

    def check(self) -> dict[str, Any]:
        """Exactly once, so far: every receiver got each message of its user once,
        and its replica converged: it holds the user's last value (on the hub,
        also at the version the last push got)."""
        expected = received = duplicates = diverged = 0
        for user in self.users:
            last_key = user.base_version + user.seq if self.target.sends_ack else user.seq
            for device in user.devices[1:]:
                expected += user.seq
                received += len(device.seen)
                duplicates += device.duplicates
                if user.seq and (device.latest_value != user.seq or device.latest_key != last_key):
                    diverged += 1
        sent = sum(u.seq for u in self.users)
        acks = sum(u.acks for u in self.users)
        return {
            "messages_sent": sent,
            "deliveries_expected": expected,
            "deliveries_received": received,
            "lost": expected - received,
            "duplicates": duplicates,
            "diverged_replicas": diverged,
            "prev_gaps": sum(d.gaps for u in self.users for d in u.devices),
            "acks": acks,
            "acks_missing": (sent - acks) if self.target.sends_ack else 0,
            "ack_mismatches": sum(u.ack_mismatches for u in self.users),
            "errors": self.error_count,
            "first_errors": self.errors,
            "unexpected_messages": self.unexpected,
            "closed_connections": sum(d.closed for u in self.users for d in u.devices),
            "close_codes": sorted(
                {d.closed_code for u in self.users for d in u.devices if d.closed_code}
            ),
        }

    def close(self) -> None:
        for user in self.users:
            for device in user.devices:
                if device.conn is not None and not device.closed:
                    device.conn.close()


# -- the process ----------------------------------------------------------------


async def _serve() -> None:
    stdin = await stdin_lines()
    config = LoadgenConfig.from_json(orjson.loads(await stdin.readline()))
    gen = Loadgen(config)
    try:
        try:
            connect_s = await gen.connect()
        except Exception as exc:  # reported to the orchestrator, which shows the server's log
            say({"event": "error", "message": f"connecting failed: {type(exc).__name__}: {exc}"})
            return
        say(
            {
                "event": "ready",
                "client": gen.client,
                "connections": config.users * config.devices,
                "connect_s": connect_s,
            }
        )
        for _ in range(1000):  # commands; the orchestrator sends a handful
            line = await stdin.readline()
            if not line:
                return
            command = orjson.loads(line)
            cmd = command["cmd"]
            cpu0, t0 = cpu_s(), time.perf_counter()
            if cmd == "closed":
                result = await gen.closed(float(command["seconds"]))
            elif cmd == "open":
                result = await gen.open(float(command["rate"]), float(command["seconds"]))
            elif cmd == "check":
                say({"event": "result", "cmd": cmd, **gen.check()})
                continue
            elif cmd == "quit":
                say({"event": "bye"})
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
            cores = (cpu_s() - cpu0) / (time.perf_counter() - t0)
            say({"event": "result", "cmd": cmd, "loadgen_cores_self": cores, **result})
    finally:
        gen.close()
        await asyncio.sleep(0.2)  # let the close frames go out


def main() -> None:
    uvloop.run(_serve())


if __name__ == "__main__":
    main()
