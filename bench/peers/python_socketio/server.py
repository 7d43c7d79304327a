"""python-socketio with Redis: a peer the hub's fan-out benchmarks compare against.

It persists nothing: a ``push`` event from a connection is emitted, as it
came, to the other connections of the same user, on this process and (through
``AsyncRedisManager``'s Redis pub/sub) on every other process of the same
Redis. The user comes from the handshake (the ``user`` query parameter, or
``user`` in the auth payload); each connection joins its user's room.
WebSocket transport only.

Run it with the hub's server stack (see ``bench.servers.start_python_socketio``)::

    PEER_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn bench.peers.python_socketio.server:app \\
        --loop uvloop --http httptools --ws websockets-sansio --ws-per-message-deflate false
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs

import socketio

__all__ = ["app", "sio"]

REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")

sio = socketio.AsyncServer(
    async_mode="asgi",
    client_manager=socketio.AsyncRedisManager(REDIS_URL),
    transports=["websocket"],
    http_compression=False,
    max_http_buffer_size=1 << 20,
    cors_allowed_origins=[],
)
app = socketio.ASGIApp(sio, socketio_path="socket.io")

# sid -> the connection's user (a dict, not python-socketio's session: cheaper)
users: dict[str, str] = {}


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    user = query.get("user", [""])[0]
    if not user and isinstance(auth, dict):
        user = str(auth.get("user", ""))
    users[sid] = user
    await sio.enter_room(sid, user)


@sio.event
async def disconnect(sid: str, reason: Any = None) -> None:
    users.pop(sid, None)


@sio.on("push")
async def push(sid: str, message: Any) -> None:
    user = users[sid]
    await sio.emit("push", message, room=user, skip_sid=sid)  # the user's room, except the sender
