"""What the load generator talks to: the bare relay or a real hub.

Both get the same messages, so their costs compare: each send is a hub push
message (``{"type": "push", "id": "m-<seq>", "changes": [one upsert]}``) whose
field value is the user's sequence number. The relay passes those bytes on to
the user's other connections; the hub merges and stores the change, acks the
sender and sends the others a ``change`` event carrying the same value.

============  ============================  ===========================
              relay                         hub (PROTOCOL.md)
============  ============================  ===========================
connect       ``/ws?user=U&device=D``       ``/v1/ws?device=D`` with
                                            ``Authorization: Bearer <jwt>``
first frame   none                          ``welcome`` (holds the version)
sender gets   nothing                       ``ack`` with the push's version
peers get     the push message, as sent     ``change`` with version, prev
============  ============================  ===========================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

__all__ = ["Target", "push_message", "sequence_of"]

Kind = Literal["relay", "hub"]


@dataclass(frozen=True)
class Target:
    """A server to load: its kind and WebSocket endpoint (``ws://host:port/path``)."""

    kind: Kind
    endpoint: str
    jwt_secret: str | None = None

    @property
    def sends_welcome(self) -> bool:
        return self.kind == "hub"

    @property
    def sends_ack(self) -> bool:
        return self.kind == "hub"

    def url(self, user: str, device: str) -> str:
        if self.kind == "hub":
            return f"{self.endpoint}?device={quote(device)}"
        return f"{self.endpoint}?user={quote(user)}&device={quote(device)}"

    def headers(self, user: str) -> dict[str, str]:
        if self.kind != "hub":
            return {}
        from hub.auth import make_token

        assert self.jwt_secret is not None, "a hub target needs the hub's JWT secret"
        return {"Authorization": f"Bearer {make_token(self.jwt_secret, user, ttl_s=3600)}"}

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "endpoint": self.endpoint, "jwt_secret": self.jwt_secret}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Target:
        return cls(data["kind"], data["endpoint"], data.get("jwt_secret"))


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
