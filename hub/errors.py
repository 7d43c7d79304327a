"""Errors of the hub, one root, each with a code from PROTOCOL.md.

The tree::

    HubError                      code        HTTP
    ├── BadRequest                bad_request       400
    │   ├── InvalidChange         invalid_change    400  (index, field)
    │   └── ClockSkew             clock_skew        400  (stamp, ahead_ms, max_ms)
    ├── Unauthorized              unauthorized      401
    │   └── TokenExpired          token_expired     401
    ├── Forbidden                 forbidden         403
    ├── NotFound                  not_found         404
    ├── ResetRequired             reset_required    410  (horizon)
    ├── PayloadTooLarge           payload_too_large 413  (size, limit)
    ├── IdempotencyKeyReused      idempotency_key_reused 422
    ├── RateLimited               rate_limited      429  (retry_after)
    ├── Unavailable               unavailable       503  (retry_after)
    └── Internal                  internal          500

Errors carry fields, not only text, so that the HTTP and WebSocket layers can
each map them in one place (a status or an ``error`` message). This module is
pure: no I/O, no asyncio.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "ClockSkew",
    "Forbidden",
    "HubError",
    "IdempotencyKeyReused",
    "Internal",
    "InvalidChange",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "retry_delay",
    "ResetRequired",
    "TokenExpired",
    "Unauthorized",
    "Unavailable",
]


class HubError(Exception):
    """Root of every error the hub reports to a client."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        """The error body of PROTOCOL.md: ``{"error": {code, message, details}}``."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(HubError):
    code = "bad_request"
    status = 400


class InvalidChange(BadRequest):
    """A change of a push breaks a rule; ``index`` is its position, ``field`` the culprit."""

    code = "invalid_change"

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None):
        where = []
        if index is not None:
            where.append(f"changes[{index}]")
        if field is not None:
            where.append(field)
        text = f"{'.'.join(where)}: {message}" if where else message
        super().__init__(text, {"index": index, "field": field})
        self.index = index
        self.field = field


class ClockSkew(BadRequest):
    """A stamp's wall clock is further ahead of the hub's than the drift bound allows."""

    code = "clock_skew"

    def __init__(
        self,
        stamp: str,
        ahead_ms: int,
        max_ms: int,
        *,
        index: int | None = None,
        field: str | None = None,
    ):
        where = ".".join(
            part for part in (f"changes[{index}]" if index is not None else None, field) if part
        )
        super().__init__(
            f"{where + ': ' if where else ''}stamp {stamp!r} is {ahead_ms} ms ahead of the "
            f"hub's clock (at most {max_ms} ms allowed); correct the device clock",
            {
                "index": index,
                "field": field,
                "stamp": stamp,
                "ahead_ms": ahead_ms,
                "max_ms": max_ms,
            },
        )
        self.stamp = stamp
        self.ahead_ms = ahead_ms
        self.max_ms = max_ms


class Unauthorized(HubError):
    code = "unauthorized"
    status = 401


class TokenExpired(Unauthorized):
    code = "token_expired"


class Forbidden(HubError):
    code = "forbidden"
    status = 403


class NotFound(HubError):
    code = "not_found"
    status = 404


class ResetRequired(HubError):
    """The cursor is older than the retention horizon, or ahead of the user's
    version (a database restored from an older backup): start again from 0."""

    code = "reset_required"
    status = 410

    def __init__(self, horizon: int, message: str | None = None, details: Any = None) -> None:
        super().__init__(
            message
            or f"cursor is older than the retention horizon (version {horizon}); pull again from 0",
            {"horizon": horizon} if details is None else details,
        )
        self.horizon = horizon

    @classmethod
    def ahead(cls, version: int) -> ResetRequired:
        """A cursor past the user's current ``version``."""
        return cls(
            0,
            f"cursor is ahead of the user's version ({version}): the server's data is older "
            "than the device's; pull again from 0",
            {"version": version},
        )


class PayloadTooLarge(HubError):
    code = "payload_too_large"
    status = 413

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} is {size}, the limit is {limit}", {"size": size, "limit": limit})
        self.size = size
        self.limit = limit


class IdempotencyKeyReused(HubError):
    code = "idempotency_key_reused"
    status = 422

    def __init__(self, key: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for a different request", {"key": key}
        )
        self.key = key


def retry_delay(seconds: float) -> float:
    """A wait as clients are told it: whole milliseconds, rounded up, and at
    least 10. (A bucket a hair short of a token gave ``"retry_after": 0``,
    which a client takes as "now", to be refused again.)"""
    return max(0.01, math.ceil(seconds * 1000) / 1000)


class RateLimited(HubError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        retry_after = retry_delay(retry_after)
        super().__init__(message, {"retry_after": retry_after})
        self.retry_after = retry_after


class Unavailable(HubError):
    code = "unavailable"
    status = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, {"retry_after": retry_after})
        self.retry_after = retry_after


class Internal(HubError):
    code = "internal"
    status = 500
