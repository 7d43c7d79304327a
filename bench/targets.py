"""What the load generator talks to: a bare relay, a real hub, or a Socket.IO peer.

All get the same messages, so their costs compare: each send is a hub push
message (``{"type": "push", "id": "m-<seq>", "changes": [one upsert]}``) whose
field value is the user's sequence number. The relays pass those bytes on to
the user's other connections; the hub merges and stores the change, acks the
sender and sends the others a ``change`` event carrying the same value; a
Socket.IO peer gets the message as the argument of a ``push`` event and emits
it, unchanged, to the user's room except the sender.

- **relay**: connect to ``/ws?user=U&device=D``; no first frame; peers get
  the push as sent; the sender gets nothing.
- **hub** (PROTOCOL.md): connect to ``/v1/ws?device=D`` with ``Authorization:
  Bearer <jwt>``; the first frame is ``welcome`` (holds the version); the
  sender gets an ``ack`` with the push's version; peers get a ``change`` with
  version and prev.
- **socketio** (Engine.IO 4, Socket.IO 5, WebSocket transport only): connect to
  ``/socket.io/?EIO=4&transport=websocket&user=U&device=D``; the server sends
  ``0{open}``, the client ``40`` (connect to namespace ``/``), the server
  ``40{"sid": ...}`` (the welcome); the sender sends ``42["push",<the push>]``
  and peers get the same event; the server's ping ``2`` is answered with ``3``.

A target may have several endpoints (server processes sharing a broker);
device ``d`` of every user connects to endpoint ``d mod n``, so with two, a
user's sender and one of its receivers are on one process and the other
receivers on the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

__all__ = ["Target", "push_message", "sequence_of"]

Kind = Literal["relay", "hub", "socketio"]


@dataclass(frozen=True)
class Target:
    """A server to load: its kind and WebSocket endpoint (``ws://host:port/path``).

    ``endpoints``: when the server is several processes, all their endpoints
    (``endpoint`` is then the first); see :meth:`endpoint_of`.
    """

    kind: Kind
    endpoint: str
    jwt_secret: str | None = None
    endpoints: tuple[str, ...] = ()

    @classmethod
    def of(cls, kind: Kind, endpoints: list[str], jwt_secret: str | None = None) -> Target:
        """A target on one or more server processes."""
        return cls(kind, endpoints[0], jwt_secret, tuple(endpoints))

    @property
    def processes(self) -> int:
        return len(self.endpoints) or 1

    def endpoint_of(self, device_index: int) -> str:
        """Where device ``device_index`` of every user connects: endpoint ``index mod n``."""
        if not self.endpoints:
            return self.endpoint
        return self.endpoints[device_index % len(self.endpoints)]

    @property
    def sends_welcome(self) -> bool:
        return self.kind in ("hub", "socketio")

    @property
    def sends_ack(self) -> bool:
        return self.kind == "hub"

    def url(self, user: str, device: str, device_index: int = 0) -> str:
        endpoint = self.endpoint_of(device_index)
        if self.kind == "hub":
            return f"{endpoint}?device={quote(device)}"
        if self.kind == "socketio":
            return f"{endpoint}?EIO=4&transport=websocket&user={quote(user)}&device={quote(device)}"
        return f"{endpoint}?user={quote(user)}&device={quote(device)}"

    @property
    def hello(self) -> bytes | None:
        """What the client sends first, once the WebSocket is open (Socket.IO: connect)."""
        return b"40" if self.kind == "socketio" else None

    def frame(self, push: bytes) -> bytes:
        """A push message as this target's wire wants it (Socket.IO: a ``push`` event)."""
        if self.kind == "socketio":
            return b'42["push",' + push + b"]"
        return push

    def headers(self, user: str) -> dict[str, str]:
        if self.kind != "hub":
            return {}
        from hub.auth import make_token

        assert self.jwt_secret is not None, "a hub target needs the hub's JWT secret"
        return {"Authorization": f"Bearer {make_token(self.jwt_secret, user, ttl_s=3600)}"}

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "endpoint": self.endpoint,
            "jwt_secret": self.jwt_secret,
            "endpoints": list(self.endpoints),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        return cls(
            data["kind"],
            data["endpoint"],
            data.get("jwt_secret"),
            tuple(data.get("endpoints", ())),
        )


# The same bytes orjson makes of the message, formatted directly: this is the
# load generator's hottest path.
PUSH_TEMPLATE = (
    '{"type":"push","id":"m-%d","changes":[{"collection":"bench","id":"r","op":"upsert",'
    '"fields":{"n":{"value":%d,"hlc":"%s"}}}]}'
)


def push_message(seq: int, stamp: str) -> bytes:
    """The push a sender sends: one upsert of field ``n`` (value ``seq``) of record ``r``."""
    return (PUSH_TEMPLATE % (seq, seq, stamp)).encode()


def sequence_of(delivery: dict[str, Any]) -> int:
    """The sender's sequence number in a delivery (a relayed push or a hub change)."""
    value: int = delivery["changes"][0]["fields"]["n"]["value"]
    return value
