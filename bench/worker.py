"""Client processes driven by JSON lines: both ends of the conversation.

The workloads W1, W5 and W6 keep their clients out of the orchestrator's
process (so the orchestrator's own work never sets the pace, and the open
files of 20k sockets are spread over processes). Each client process is
``python -m bench.<module>``; the orchestrator writes the configuration as
the first line on its stdin, then one command per line; the process answers
each with one JSON line on stdout (``{"event": ...}``). Diagnostics go to
stderr, which is kept in a log file.

- :class:`WorkerProcess`: the orchestrator's side (spawn, ``expect``,
  ``command``, ``stop``), every wait bounded.
- :func:`say`, :func:`stdin_lines`, :func:`cpu_s`: the client process's side.
"""

from __future__ import annotations

import asyncio
import queue
import resource
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson

from .servers import REPO, raise_open_files_limit

__all__ = ["WorkerError", "WorkerProcess", "cpu_s", "say", "stdin_lines"]


class WorkerError(RuntimeError):
    """The client process reported a failure (``{"event": "error", "message": ...}``)."""


class WorkerProcess:
    """``python -m <module>`` with the whole open-files limit, configured by ``config``."""

    def __init__(self, module: str, config: dict[str, Any], log_path: Path) -> None:
        self.module = module
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=str(REPO),
            preexec_fn=raise_open_files_limit,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, name=f"{module}-out", daemon=True)
        self._pump.start()
        self.send(config)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, message: dict[str, Any]) -> None:
        """Write one line (a command) without waiting for the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(message).decode() + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next message, which must be ``event``; fails on timeout, error or exit."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"{self.module} did not answer within {timeout:.0f}s (waiting for {event!r})"
            ) from None
        if line is None:
            self.proc.wait(5)
            raise RuntimeError(
                f"{self.module} exited ({self.proc.returncode}); its log:\n"
                + self.log_path.read_text(errors="replace")[-3000:]
            )
        message: dict[str, Any] = orjson.loads(line)
        if message.get("event") == "error":
            raise WorkerError(f"{self.module}: {message.get('message', 'unknown error')}")
        if message.get("event") != event:
            raise RuntimeError(f"{self.module} said {str(message)[:300]}, expected {event!r}")
        return message

    def command(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(message)
        return self.expect("result", timeout)

    def kill(self) -> None:
        """End it at once (SIGKILL): its sockets are closed by the kernel, without handshakes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._pump.join(5)
        self._log.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask it to quit; kill it when it takes longer than ``timeout``."""
        try:
            if self.proc.poll() is None:
                self.send({"cmd": "quit"})
                self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)
        self._pump.join(5)
        self._log.close()


# -- the client process's side ------------------------------------------------------


def say(event: dict[str, Any]) -> None:
    """Write one answer line to the orchestrator."""
    sys.stdout.write(orjson.dumps(event).decode() + "\n")
    sys.stdout.flush()


async def stdin_lines() -> asyncio.StreamReader:
    """The orchestrator's lines, readable without blocking the event loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def cpu_s() -> float:
    """CPU-seconds this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
