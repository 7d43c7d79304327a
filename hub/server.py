"""Serving the app with uvicorn: sockets, heartbeats, staged shutdown, workers.

``hub serve`` binds the listening socket itself (so ``--port 0`` works and N
worker processes can share one socket), then runs uvicorn on it with the
fast stack: uvloop, httptools, and the sans-I/O ``websockets`` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from .protocol import WS_4000_HEARTBEAT_TIMEOUT

__all__ = ["HttpProtocol", "HubServer", "bind", "run_workers", "uvicorn_config"]

log = logging.getLogger("hub.server")

WS_MAX_MESSAGE_BYTES = 1024 * 1024
# The kernel's send buffer of a WebSocket (Linux doubles it). Left to grow by
# itself on loopback it reached about 4 MB for a peer that stopped reading,
# so such a peer was found (queue full, 1013) only after minutes of events.
WS_SEND_BUFFER_BYTES = 256 * 1024
DRAIN_BATCH = 200  # connections closed per step of a graceful shutdown
DRAIN_STEP_S = 0.05
WORKER_POLL_S = 0.2  # how often `hub serve --workers N` looks for a worker that exited
# A request's line and headers: at most this many bytes, within this long
# (431 or a close beyond); its body, once the headers are in, must keep coming:
# BODY_STEP_BYTES more (or its end) within every BODY_STEP_S. Slow links
# are fine (about 1 KiB/s), a connection that stops sending is not.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 10.0
BODY_STEP_S = 15.0
BODY_STEP_BYTES = 16 * 1024
LINGER_S = 2.0  # after refusing a request, its connection is read (and dropped) this long


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on what a request may take
    before the application sees it.

    Unbounded, one connection streaming a URL or a header that never ends
    held the event loop (uvicorn and httptools append each piece to what came
    before: quadratic), and connections trickling a byte now and then held
    their sockets for good.
    """

    _head_open = True  # the current request's line and headers are not all in yet
    _head_bytes = 0
    _body_due = 0  # body bytes that re-arm the body's timer when in
    _refused = False  # answered 431 or 408: closing
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm(HEAD_TIMEOUT_S)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered and closing: what comes is dropped, not parsed
        if self._head_open:
            self._head_bytes += len(data)
        super().data_received(data)
        if (
            self._head_open
            and self._head_bytes > MAX_HEAD_BYTES
            and not self.transport.is_closing()
        ):
            self._refuse(b"431 Request Header Fields Too Large", "request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._head_open:  # the next request on a kept-alive connection
            self._head_open, self._head_bytes = True, 0
            self._arm(HEAD_TIMEOUT_S)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._disarm()
        # A head that came in one piece was never counted while it was open.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            self._refuse(b"431 Request Header Fields Too Large", "request headers too large")
            raise _Refused  # stops the parser: the request never reaches the app
        super().on_headers_complete()
        upgrading = self.parser.should_upgrade() and self._should_upgrade()
        if not upgrading and self.cycle is not None and self.cycle.more_body:
            self._body_due = BODY_STEP_BYTES
            self._arm(BODY_STEP_S)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._timer is not None:
            self._body_due -= len(body)
            if self._body_due <= 0:  # it keeps coming: another step
                self._body_due = BODY_STEP_BYTES
                self._arm(BODY_STEP_S)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # What httptools could not parse: answered as every other error is
        # (PROTOCOL.md), not with uvicorn's plain text.
        if not self._refused:  # (or a refusal of ours that stopped the parser)
            self._refuse(b"400 Bad Request", "malformed HTTP request")

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._head_open and self.flow.read_paused:
            # The body waits on the application (its buffer is full), not on
            # the client: no fault of the client's.
            self._arm(BODY_STEP_S)
            return
        if self._head_open and self._head_bytes == 0:
            self.transport.close()  # nothing of a request came: an idle connection
        else:
            self._refuse(b"408 Request Timeout", "request too slow")

    def _refuse(self, status: bytes, why: str) -> None:
        log.info("refused an HTTP request: %s", why, extra={"client": str(self.client)})
        self._disarm()
        body = f'{{"error":{{"code":"bad_request","message":"{why}"}}}}'.encode()
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
        )
        # A lingering close: end the sending side, and for a moment read and
        # drop what the client still sends. Closed at once with its data
        # unread, the socket would be reset, and a client still sending would
        # lose the answer before it read it.
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)


class _Refused(Exception):
    """Raised from a parser callback once the request was refused."""


class HeartbeatProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, closing a silent peer (no pong and no
    message since a ping) with 4000, not 1011,
    taking pre-built frames (:meth:`write_frame`) for fan-out, and handing
    received messages straight to a handler (:attr:`on_message`) once the
    application has set one."""

    # Set by the application once it reads every message the same way: each
    # text or binary message is then passed to it as it is parsed, instead of
    # through the ASGI queue. The queue's way costs, per message, a wake-up of
    # the reading task and a pause and a resume of reading on the socket.
    # Only the disconnect still comes through the queue.
    on_message: Callable[[str | bytes], None] | None = None

    def send_receive_event_to_app(self) -> None:
        handler = self.on_message
        if handler is None or self.close_sent:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.curr_msg_data_type != "text":
            handler(bytes(data))
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.conn.send_close(1007)  # as uvicorn does: invalid UTF-8 ends the connection
            self.handle_parser_exception()
            return
        handler(text)

    def connection_made(self, transport: Any) -> None:  # the upgrade of an HTTP connection
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WS_SEND_BUFFER_BYTES)

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake: for a peer that
        does not read, whose close frame would never go out."""
        if self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: the kernel resets the connection and frees its buffers now,
            # instead of keeping the unsent bytes for a peer that never reads.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def write_frame(self, frame: bytes) -> bool:
        """Write a whole pre-built text frame now if the socket takes it.

        False when it cannot go out at once (the peer reads slowly, or the
        connection is closing): the caller then queues and uses ASGI ``send``,
        which waits. Frames are whole, so they never interleave with uvicorn's
        own pings or closes.
        """
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(frame)
        return True

    heard_at = 0.0  # the loop's time when the peer last sent anything

    def data_received(self, data: bytes) -> None:
        self.heard_at = self.loop.time()
        super().data_received(data)

    def keepalive_timeout(self) -> None:
        self.pong_timer = None
        self.pending_ping_payload = None
        if self.close_sent or self.transport.is_closing():
            return
        if self.heard_at >= self.ping_sent_at:
            # No pong, but the peer spoke since the ping: alive (PROTOCOL.md:
            # only a peer that answers nothing, no pong and no message, is
            # closed). Ping again now, so that silence from here on is found
            # within two intervals of its last sign of life.
            self.send_keepalive_ping()
            return
        self.conn.fail(WS_4000_HEARTBEAT_TIMEOUT, "heartbeat timeout")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, heartbeat_s: float, shutdown_timeout_s: float) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        loop="auto",
        http=HttpProtocol,
        ws=HeartbeatProtocol,
        ws_max_size=WS_MAX_MESSAGE_BYTES,
        ws_per_message_deflate=False,  # off: unbounded inflation is a memory bomb
        ws_ping_interval=heartbeat_s,
        ws_ping_timeout=heartbeat_s,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
    )
    # The shutdown's stages share HUB_SHUTDOWN_TIMEOUT_S: the hub's drain half of
    # it, uvicorn's wait for open requests a quarter, the lifespan's closing the
    # rest (committer and pool an eighth each). uvicorn takes seconds as a float.
    config.timeout_graceful_shutdown = shutdown_timeout_s / 4  # type: ignore[assignment]
    return config


class HubServer(uvicorn.Server):
    """uvicorn's server with the hub's staged graceful shutdown in front of its own."""

    def __init__(
        self, config: uvicorn.Config, drain: Callable[[], Any], *, worker: bool = False
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._worker = worker

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A worker of `hub serve --workers N` gets a terminal's Ctrl-C and then
        # its parent's SIGTERM: for uvicorn a second signal would mean "quit
        # now", skipping the drain. The parent decides that (a second Ctrl-C).
        if self._worker and sig == signal.SIGINT:
            sig = signal.SIGTERM
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # 1. Stop accepting: new connections go to other processes.
        for server in self.servers:
            server.close()
        # 2-3. Close WebSockets in batches with 1012 and a jittered retry hint,
        # and let in-flight pushes commit (bounded inside drain).
        try:
            await self._drain()
        except Exception:
            log.exception("graceful drain failed")
        # 4. uvicorn's own stages: close what is left, wait with a bound,
        # cancel the rest, then the app's lifespan shutdown.
        await super().shutdown(sockets)
        # 5. Exit normally rather than re-raising the signal, so that exit
        # handlers run (they stop an embedded PostgreSQL started for us).
        self._captured_signals.clear()


def retry_hint() -> str:
    """The close reason of 1012: when to reconnect (random 0.5-5 s, PROTOCOL.md)."""
    return f"restarting; reconnect in {random.uniform(0.5, 5.0):.1f}s"


async def drain_connections(connections: list[Any], close: Callable[[Any], None]) -> None:
    for start in range(0, len(connections), DRAIN_BATCH):
        for conn in connections[start : start + DRAIN_BATCH]:
            close(conn)
        await asyncio.sleep(DRAIN_STEP_S)


def run_workers(workers: int, sock: socket.socket, env: dict[str, str], argv: list[str]) -> int:
    """Run ``workers`` hub processes on one listening socket; a SIGTERM or SIGINT
    stops them gracefully, a second one at once.

    The workers share a directory for their metrics, so that /metrics on any
    of them reports the whole hub.
    """
    metrics_dir = tempfile.mkdtemp(prefix="hub-metrics-")
    children = []
    for _ in range(workers):
        child_env = {**env, "HUB_WORKERS": "1", "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "hub", "serve", *argv, "--listen-fd", str(sock.fileno())],
                env=child_env,
                pass_fds=(sock.fileno(),),
            )
        )

    signals = 0

    def forward(sig: int, _frame: Any) -> None:
        # The first signal stops the workers gracefully; a second one, now.
        nonlocal signals
        signals += 1
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if signals == 1 else signal.SIGKILL)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    running = list(children)
    while running:
        for child in [c for c in running if c.poll() is not None]:
            running.remove(child)
            codes.append(child.returncode)
            # Its live gauges (connections, users online, pool, loop lag) leave
            # the sum now, not when the whole hub stops.
            multiprocess.mark_process_dead(child.pid, metrics_dir)  # type: ignore[no-untyped-call]
            if signals == 0:
                log.error("worker %d exited (%s); the others go on", child.pid, child.returncode)
        if running:
            time.sleep(WORKER_POLL_S)
    sock.close()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((abs(c) for c in codes), default=0) if any(c not in (0, -15) for c in codes) else 0
