"""A bare relay on the ``websockets`` package's own server: the transport ceiling.

The same contract as :mod:`bench.relay_starlette` (``/ws?user=U&device=D``; a
text message from one connection of a user goes, as it is, to that user's
other open connections), without ASGI, Starlette or uvicorn in between: what
one Python process can relay, and what an idle connection costs in memory,
with a well-made WebSocket server and nothing else.

Run it as ``python -m bench.relay_websockets [--port 0]``; it prints
``relay: listening on http://127.0.0.1:PORT`` when it is ready.
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import parse_qs, urlsplit

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["main"]

# user -> that user's open connections
connections: dict[str, set[ServerConnection]] = {}


async def relay(websocket: ServerConnection) -> None:
    query = parse_qs(urlsplit(websocket.request.path).query if websocket.request else "")
    user = query.get("user", [""])[0]
    peers = connections.setdefault(user, set())
    peers.add(websocket)
    try:
        async for message in websocket:
            # broadcast() writes without waiting: the relay of one message costs
            # one frame written per peer, the least a relay can do.
            broadcast([p for p in peers if p is not websocket], message)
    except ConnectionClosed:
        pass
    finally:
        peers.discard(websocket)
        if not peers:
            connections.pop(user, None)


async def serve_forever(host: str, port: int) -> None:
    async with serve(
        relay,
        host,
        port,
        compression=None,
        ping_interval=None,
        max_size=1 << 20,
        backlog=4096,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"relay: listening on http://{host}:{bound}", flush=True)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_websockets", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        uvloop.run(serve_forever(args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
