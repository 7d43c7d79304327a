"""Authentication: a bearer credential becomes a :class:`~hub.types.Principal`.

JWTs are HS256 with the hub's secret; the accepted algorithm is fixed by the
hub, never read from the token (so ``none`` and algorithm confusion are
impossible), and ``exp`` and ``sub`` are required. ``aud`` and ``iss`` are
checked when configured. Tokens are never logged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jwt

from .errors import TokenExpired, Unauthorized
from .types import Principal

__all__ = ["ALL_SCOPES", "Authenticator", "bearer_token", "make_token"]

ALL_SCOPES = frozenset({"read", "write", "admin"})
LEEWAY_S = 30
MAX_USER_CHARS = 128


def bearer_token(headers: Mapping[str, str]) -> str:
    """The credential of an ``Authorization: Bearer ...`` header."""
    header = headers.get("authorization")
    if not header:
        raise Unauthorized("missing Authorization header (want 'Bearer <token>')")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header (want 'Bearer <token>')")
    return token.strip()


class Authenticator:
    def __init__(
        self, secret: str, *, audience: str | None = None, issuer: str | None = None
    ) -> None:
        self._secret = secret
        self._audience = audience
        self._issuer = issuer

    def __repr__(self) -> str:
        return f"Authenticator(audience={self._audience!r}, issuer={self._issuer!r})"

    def authenticate(self, token: str) -> Principal:
        """Check a JWT; ``TokenExpired`` or ``Unauthorized`` saying why not."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("the token has expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("the token is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("the token is not from the expected issuer") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("the token is invalid") from None
        user = claims["sub"]
        if not isinstance(user, str) or not 1 <= len(user) <= MAX_USER_CHARS or "\x00" in user:
            raise Unauthorized("the token's 'sub' must be a user id of 1..128 characters")
        exp = claims.get("exp")
        return Principal(
            user, ALL_SCOPES, "jwt", float(exp) if isinstance(exp, (int, float)) else None
        )


def make_token(secret: str, user: str, *, ttl_s: float = 86400.0, **claims: Any) -> str:
    """An HS256 token for ``user`` (development, tests, the demo)."""
    now = int(time.time())
    payload = {"sub": user, "iat": now, "exp": now + int(ttl_s), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")
