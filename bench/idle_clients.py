"""Connections that do nothing: ``python -m bench.idle_clients`` (a client process).

Opens ``len(users) x devices`` WebSockets to a target (:mod:`bench.targets`)
with the load generator's picows connector and then only holds them (picows
answers the server's pings). Used by two workloads:

- ``w1`` (:mod:`bench.idle`): many idle connections, and how long each took
  to connect: from the start of its TCP connect to the ``welcome`` message
  on the hub, to the end of the WebSocket handshake on a relay.
- ``w6`` (:mod:`bench.slow`) with ``stall``: a device that authenticates,
  gets its ``welcome`` and then stops reading from its socket (reading is
  paused and its receive buffer made small), as a client on a stuck network
  would. It reports its local port (so the server's side of its connection
  can be found), and its TCP state is read every 50 ms: a reset or a FIN from
  the server would show there even while it does not read. ``resume`` reads
  again and reports how the connection ended.

Protocol (:mod:`bench.worker`): the configuration line, then the commands
``connect``, ``check``, ``resume``, ``close``, ``quit``, each answered with
one ``{"event": "result", ...}`` line.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop

from .loadgen import Connection, _connect_picows
from .targets import Target
from .worker import cpu_s, say, stdin_lines

__all__ = ["main"]

STALLED_RCVBUF_BYTES = 4096
TCP_STATE_STEP_S = 0.05
TCP_ESTABLISHED = 1  # the first byte of Linux's struct tcp_info, tcpi_state
TCP_STATES = {1: "established", 7: "closed (reset)", 8: "close-wait (FIN received)"}


@dataclass(eq=False)
class Idle:
    """One held connection and what came of it."""

    user: str
    device: str
    conn: Connection | None = None
    welcome: asyncio.Future[None] | None = None
    messages: int = 0
    bytes: int = 0
    unexpected: int = 0
    closed: asyncio.Future[int | None] | None = None
    left_established_at: float | None = None  # time.monotonic(), system-wide on Linux
    tcp_state: int = TCP_ESTABLISHED
    local_port: int = 0


class IdleClients:
    def __init__(self, config: dict[str, Any]) -> None:
        self.target = Target.from_json(config["target"])
        self.concurrency: int = config.get("concurrency", 200)
        self.timeout_s: float = config.get("timeout_s", 40.0)
        self.stall: bool = config.get("stall", False)
        prefix = config.get("device_prefix", "d")
        self.idle = [
            Idle(user, f"{prefix}{d}") for user in config["users"] for d in range(config["devices"])
        ]
        self._tokens: dict[str, dict[str, str]] = {}
        self._watches: dict[Idle, asyncio.Task[None]] = {}

    def _headers(self, user: str) -> dict[str, str]:
        found = self._tokens.get(user)
        if found is None:
            found = self._tokens[user] = self.target.headers(user)
        return found

    def _on_message(self, idle: Idle, payload: bytes) -> None:
        idle.messages += 1
        idle.bytes += len(payload)
        if idle.welcome is not None and not idle.welcome.done():
            if orjson.loads(payload).get("type") == "welcome":
                idle.welcome.set_result(None)
                if self.stall:
                    self._stall(idle)
                return
        if not self.stall:
            idle.unexpected += 1  # an idle connection is sent nothing after its welcome

    def _stall(self, idle: Idle) -> None:
        transport = getattr(idle.conn, "transport", None)
        if transport is None:
            return
        raw = transport.underlying_transport
        sock = raw.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF_BYTES)
            idle.local_port = sock.getsockname()[1]
            if idle not in self._watches:
                loop = asyncio.get_running_loop()
                self._watches[idle] = loop.create_task(self._watch_tcp(idle, sock))
        raw.pause_reading()

    async def _watch_tcp(self, idle: Idle, sock: Any) -> None:
        """Note when the connection leaves ESTABLISHED: the server reset or closed it."""
        while True:
            try:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
            except OSError:
                state = 0  # the socket is gone: it ended
            if state != TCP_ESTABLISHED:
                idle.left_established_at = time.monotonic()
                idle.tcp_state = state
                return
            await asyncio.sleep(TCP_STATE_STEP_S)

    def _on_closed(self, idle: Idle, code: int | None) -> None:
        if idle.closed is not None and not idle.closed.done():
            idle.closed.set_result(code)

    async def connect(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(self.concurrency)
        latencies_us: list[int] = []
        errors: list[str] = []

        async def one(idle: Idle) -> None:
            async with gate:
                idle.closed = loop.create_future()
                if self.target.sends_welcome:
                    idle.welcome = loop.create_future()
                t0 = time.perf_counter_ns()
                try:
                    idle.conn = await _connect_picows(
                        self.target.url(idle.user, idle.device),
                        self._headers(idle.user),
                        lambda payload: self._on_message(idle, payload),
                        lambda code: self._on_closed(idle, code),
                    )
                    if idle.welcome is not None:
                        await asyncio.wait_for(asyncio.shield(idle.welcome), 10.0)
                    if self.stall:
                        # Again: the welcome may have come before the connection was returned.
                        self._stall(idle)
                except Exception as exc:  # counted and reported; the run is judged on them
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
                latencies_us.append((time.perf_counter_ns() - t0) // 1000)

        cpu0 = cpu_s()
        start = time.monotonic()
        tasks = [asyncio.ensure_future(one(i)) for i in self.idle]
        done, pending = await asyncio.wait(tasks, timeout=self.timeout_s)
        for task in pending:
            task.cancel()
        end = time.monotonic()
        return {
            "connected": len(latencies_us),
            "failed": len(self.idle) - len(latencies_us),
            "timed_out": len(pending),
            "first_errors": errors,
            "start": start,
            "end": end,
            "latencies_us": latencies_us,
            "cpu_s": cpu_s() - cpu0,
        }

    def check(self) -> dict[str, Any]:
        closed = [i for i in self.idle if i.closed is not None and i.closed.done()]
        return {
            "open": sum(1 for i in self.idle if i.conn is not None) - len(closed),
            "closed": len(closed),
            "close_codes": sorted({c for i in closed if (c := i.closed.result()) is not None}),  # type: ignore[union-attr]
            "unexpected_messages": sum(i.unexpected for i in self.idle),
            "local_ports": [i.local_port for i in self.idle],
            "left_established_at": [i.left_established_at for i in self.idle],
            "tcp_states": [TCP_STATES.get(i.tcp_state, str(i.tcp_state)) for i in self.idle],
        }

    async def resume(self, timeout: float) -> dict[str, Any]:
        """Read again; wait (bounded) until the server ends each connection.

        The TCP states reported are those from before reading again (the
        client's own reads and close would change them).
        """
        self._stop_watches()
        for idle in self.idle:
            transport = getattr(idle.conn, "transport", None)
            if transport is not None and not transport.is_disconnected:
                transport.underlying_transport.resume_reading()
        waits = [i.closed for i in self.idle if i.closed is not None]
        t0 = time.monotonic()
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        result = self.check()
        result["waited_s"] = time.monotonic() - t0
        result["messages"] = sum(i.messages for i in self.idle)
        result["bytes"] = sum(i.bytes for i in self.idle)
        return result

    def _stop_watches(self) -> None:
        for task in self._watches.values():
            task.cancel()

    def close(self) -> None:
        self._stop_watches()
        for idle in self.idle:
            if idle.conn is not None:
                idle.conn.close()


async def _serve() -> None:
    stdin = await stdin_lines()
    clients = IdleClients(orjson.loads(await stdin.readline()))
    say({"event": "loaded"})
    try:
        for _ in range(1000):  # commands; the orchestrator sends a handful
            line = await stdin.readline()
            if not line:
                return
            command = orjson.loads(line)
            cmd = command["cmd"]
            if cmd == "connect":
                say({"event": "result", **await clients.connect()})
            elif cmd == "check":
                say({"event": "result", **clients.check()})
            elif cmd == "resume":
                say({"event": "result", **await clients.resume(float(command["timeout"]))})
            elif cmd == "close":
                clients.close()
                say({"event": "result"})
            elif cmd == "quit":
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
    finally:
        clients.close()
        await asyncio.sleep(0.1)  # let the close frames go out


def main() -> None:
    uvloop.run(_serve())


if __name__ == "__main__":
    main()
