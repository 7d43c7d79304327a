"""A bare WebSocket relay on Starlette: the reference point for the hub's fan-out.

No authentication, no storage, no parsing, no queues: a text message from one
connection of a user (the ``user`` query parameter of ``/ws``) is sent, as it
is, to that user's other open connections, in the receiving connection's own
task. Whatever the hub does beyond this (auth, validation, merge, PostgreSQL,
bounded send queues) is what the ``fanout`` workload's ratio prices.

Run it with the same server stack as the hub::

    uvicorn bench.relay_starlette:app --loop uvloop --http httptools \\
        --ws websockets-sansio --ws-per-message-deflate false --ws-ping-interval 0
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

__all__ = ["app"]

# user -> that user's open connections
connections: dict[str, set[WebSocket]] = {}


async def relay(websocket: WebSocket) -> None:
    user = websocket.query_params.get("user", "")
    await websocket.accept()
    peers = connections.setdefault(user, set())
    peers.add(websocket)
    try:
        while True:
            message = await websocket.receive_text()
            for peer in tuple(peers):
                if peer is not websocket:
                    try:
                        await peer.send_text(message)
                    except WebSocketDisconnect:  # that peer is gone, not this one
                        peers.discard(peer)
    except WebSocketDisconnect:
        pass
    finally:
        peers.discard(websocket)
        if not peers:
            connections.pop(user, None)


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"ok {sum(len(p) for p in connections.values())} connections")


app = Starlette(routes=[WebSocketRoute("/ws", relay), Route("/health", health)])
