"""A minimal keep-alive HTTP/1.1 client for load: one request in flight per
connection, responses parsed with ``httptools`` (the parser uvicorn uses).

General clients spend far more CPU per request than this; on a two-core
machine that CPU would be taken from the server being measured.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools

__all__ = ["HttpConnection", "Response"]

Response = tuple[int, bytes]  # (status, body)


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; :meth:`request` sends and awaits one response."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._body: list[bytes] = []

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(host, port), host, port)
        return conn

    def request_bytes(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        """The bytes of a request, for callers that build them ahead of time."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(self, raw: bytes) -> Response:
        """Send one prepared request; its (status, body)."""
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("the connection is closed")
        if self._waiter is not None:
            raise RuntimeError("one request at a time on a connection")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return await waiter

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> Response:
        return await self.send(self.request_bytes(method, path, headers, body))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("the server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # -- httptools callbacks ------------------------------------------------

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        body = b"".join(self._body)
        self._body = []
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))
