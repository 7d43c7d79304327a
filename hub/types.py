"""The shared vocabulary of the hub: values that cross module boundaries.

Names follow PROTOCOL.md. All values are immutable; field values and actors are
kept as their encoded JSON text, so that they are encoded once, stored as
``jsonb`` and re-emitted without a decode/encode round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "ApiKeyRecord",
    "Change",
    "Cursor",
    "Delta",
    "FieldWrite",
    "Principal",
    "PullPage",
    "Push",
    "PushResult",
]

Op = Literal["upsert", "delete"]


class FieldWrite(NamedTuple):
    """One field of an upsert: its name, its value as JSON text, its stamp."""

    name: str
    value: str
    hlc: str


# FieldWrite and Change are named tuples rather than frozen dataclasses: as
# immutable, and made in a third of the time (a frozen dataclass sets each
# field through object.__setattr__), which is a tenth of parsing a
# 1000-change push.
class Change(NamedTuple):
    """One validated change of a push."""

    collection: str
    record_id: str
    op: Op
    fields: tuple[FieldWrite, ...] = ()
    hlc: str | None = None  # the delete stamp; None for an upsert
    origin: str | None = None
    actor: str | None = None  # JSON text


@dataclass(frozen=True, slots=True)
class Push:
    """A validated push of one device of one user.

    ``key`` is the idempotency key (HTTP header or WebSocket message id) and
    ``scope`` where it is unique within the user (``"http"`` or
    ``"ws:<device>"``); ``digest`` identifies the request, so that a reused
    key with another request is told apart from a replay.
    """

    user: str
    device: str
    changes: tuple[Change, ...]
    key: str | None = None
    scope: str = "http"
    digest: bytes = b""


@dataclass(frozen=True, slots=True)
class PushResult:
    """What a push got: PROTOCOL.md's ``version``, ``applied``, ``ignored``.

    ``prev`` is the user's version just before this push (equal to
    ``version`` when nothing was applied); ``deltas`` are the record deltas
    the push wrote, for the change event, or None when that event would be
    too large anyway (it becomes ``sync_available`` for ``collections``);
    ``replay`` marks a stored answer.
    """

    version: int
    applied: int
    ignored: int
    prev: int = 0
    replay: bool = False
    deltas: tuple[Delta, ...] | None = field(default=(), compare=False, repr=False)
    collections: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def body(self) -> dict[str, int]:
        return {"version": self.version, "applied": self.applied, "ignored": self.ignored}


@dataclass(frozen=True, slots=True)
class Delta:
    """A record delta (PROTOCOL.md): the fields of one record written at ``version``."""

    collection: str
    record_id: str
    version: int
    device: str | None
    fields: dict[str, tuple[Any, str]]  # name -> (value as JSON text or fragment, stamp)
    deleted: bool
    deleted_hlc: str | None
    origin: str | None
    actor: Any  # JSON text or fragment, or None


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """Where a device stands: after every delta up to ``version``, or, inside
    ``version``, after the delta of record ``(collection, record_id)``.

    ``horizon`` is the user's retention horizon when the cursor was made: a
    cursor made after a purge has not seen what the purge removed, so it
    stays good even when its version is below the horizon.
    """

    version: int
    collection: str | None = None
    record_id: str | None = None
    horizon: int = 0


@dataclass(frozen=True, slots=True)
class PullPage:
    changes: tuple[Delta, ...]
    cursor: Cursor
    has_more: bool
    version: int


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a user, the scopes it holds, and how it proved it."""

    user: str
    scopes: frozenset[str]
    kind: Literal["jwt", "api_key"] = "jwt"
    expires_at: float | None = None
    key_id: str | None = None

    def can(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A stored API key: whose it is, what it may do, the HMAC of the key."""

    id: str
    user: str
    scopes: frozenset[str]
    key_hash: bytes
    revoked: bool
