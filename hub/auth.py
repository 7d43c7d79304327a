"""Authentication: a bearer credential becomes a :class:`~hub.types.Principal`.

Two kinds of credential:

- **JWT** (RFC 8725 practice). Either HS256 with ``HUB_JWT_SECRET``, or
  RS256/ES256/EdDSA with keys from ``HUB_JWKS_URL``; never both, so an HS
  token signed with a public key (algorithm confusion) cannot pass. The
  accepted algorithms come from configuration, never from the token, so
  ``none`` never passes. ``exp`` and ``sub`` are required, ``aud`` and ``iss``
  checked when configured, leeway 30 s. The key set is cached; a token with
  an unknown ``kid`` refreshes it at most once per ``HUB_JWKS_MIN_REFRESH_S``,
  so keys rotate without a restart and a flood of bogus kids costs nothing;
  it is also fetched again every 5 minutes, so removed keys stop counting.
- **API key**: ``hub_`` + 12-character id + 32-character secret + 6-character
  checksum (base62). The checksum rejects typos before any lookup and lets
  secret scanners recognise leaked keys. Only HMAC-SHA256(pepper, key) is
  stored, compared in constant time. Keys are cached briefly per process;
  a revocation evicts them on every process at once (through the broker).

Tokens and keys are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import string
import time
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jwt
import orjson

from .config import ASYMMETRIC_ALGORITHMS, HS_ALGORITHMS
from .errors import BadRequest, TokenExpired, Unauthorized, Unavailable
from .types import ApiKeyRecord, Principal

__all__ = [
    "ALL_SCOPES",
    "ApiKeyRecord",
    "Authenticator",
    "JwtVerifier",
    "bearer_token",
    "is_key_id",
    "make_api_key",
    "make_token",
    "valid_user",
    "parse_api_key",
]

log = logging.getLogger("hub.auth")

ALL_SCOPES = frozenset({"read", "write", "admin"})
LEEWAY_S = 30
MAX_USER_CHARS = 128
BASE62 = string.digits + string.ascii_letters
KEY_PREFIX = "hub_"
KEY_ID_CHARS = 12
KEY_SECRET_CHARS = 32
KEY_CHECK_CHARS = 6
KEY_CHARS = len(KEY_PREFIX) + KEY_ID_CHARS + KEY_SECRET_CHARS + KEY_CHECK_CHARS
KEY_CACHE_S = 10.0
# API keys looked up in the database at once by one process, and how many
# lookups may wait for their turn (503 beyond). Unbounded, a flood of forged
# keys (well formed, so each one costs a lookup) took every connection of the
# pool, and everyone's commits queued behind the lookups.
MAX_KEY_LOOKUPS = 2
MAX_KEY_LOOKUPS_WAITING = 256
JWKS_TIMEOUT_S = 5.0
JWKS_MAX_AGE_S = 300.0  # the key set is fetched again at least this often


def bearer_token(headers: Mapping[str, str]) -> str:
    """The credential of an ``Authorization: Bearer ...`` header."""
    header = headers.get("authorization")
    if not header:
        raise Unauthorized("missing Authorization header (want 'Bearer <token>')")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header (want 'Bearer <token>')")
    return token.strip()


# -- JWT ------------------------------------------------------------------------


class JwtVerifier:
    """Checks JWTs with a secret (HS) or a JWKS (asymmetric), as configured."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks_url: str | None = None,
        algorithms: tuple[str, ...] = (),
        audience: str | None = None,
        issuer: str | None = None,
        jwks_min_refresh_s: float = 30.0,
        fetch: Callable[[str], Awaitable[bytes]] | None = None,
    ) -> None:
        if (secret is None) == (jwks_url is None):
            raise ValueError("exactly one of a JWT secret and a JWKS URL")
        if secret is not None:
            self._algorithms = list(algorithms or ("HS256",))
            if not set(self._algorithms) <= HS_ALGORITHMS:
                raise ValueError(f"with a JWT secret only {sorted(HS_ALGORITHMS)} are allowed")
        else:
            self._algorithms = list(algorithms or ("RS256", "ES256", "EdDSA"))
            if not set(self._algorithms) <= ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"with a JWKS only {sorted(ASYMMETRIC_ALGORITHMS)} are allowed")
        self._secret = secret
        self._jwks_url = jwks_url
        self._audience = audience
        self._issuer = issuer
        self._min_refresh_s = jwks_min_refresh_s
        self._fetch = fetch or _fetch_url
        self._keys: dict[str, Any] = {}
        self._fetched_at = -1e18
        self._refreshing: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"JwtVerifier(algorithms={self._algorithms}, jwks={self._jwks_url is not None})"

    async def verify(self, token: str) -> Principal:
        if self._secret is not None:
            return self._decode(token, self._secret)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("the token is invalid") from None
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise Unauthorized("the token has no key id ('kid')")
        if time.monotonic() - self._fetched_at > JWKS_MAX_AGE_S:
            await self._refresh()  # keys removed from the set stop being trusted
        key = self._keys.get(kid)
        if key is None:
            await self._refresh()
            key = self._keys.get(kid)
            if key is None:
                raise Unauthorized("the token's key id is not in the key set")
        return self._decode(token, key)

    async def _refresh(self) -> None:
        """Fetch the key set, at most once per interval (also under a flood)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if time.monotonic() - self._fetched_at < self._min_refresh_s:
                return
            self._fetched_at = time.monotonic()
            assert self._jwks_url is not None
            try:
                data = orjson.loads(await self._fetch(self._jwks_url))
                keys = jwt.PyJWKSet.from_dict(data).keys
            except Exception as exc:  # a bad or unreachable key set keeps the old keys
                log.warning("could not refresh the JWKS: %s", type(exc).__name__)
                return
            self._keys = {k.key_id: k for k in keys if k.key_id}
            log.info("JWKS refreshed", extra={"keys": len(self._keys)})

    def _decode(self, token: str, key: Any) -> Principal:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
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
        if not valid_user(user):
            raise Unauthorized("the token's 'sub' must be a user id of 1..128 characters")
        expires_at = _expiry(claims["exp"])
        if expires_at is None:
            # A string of digits passes the library's check, but a connection
            # would then have no expiry to enforce (RFC 7519: a JSON number).
            raise Unauthorized("the token's 'exp' must be a number")
        return Principal(user, ALL_SCOPES, "jwt", expires_at)


def valid_user(user: object) -> bool:
    """1..128 characters, no U+0000, and storable (no lone surrogate)."""
    if not isinstance(user, str) or not 1 <= len(user) <= MAX_USER_CHARS or "\x00" in user:
        return False
    try:
        user.encode()
    except UnicodeEncodeError:
        return False
    return True


def _expiry(exp: object) -> float | None:
    """A token's ``exp`` as a finite Unix time; None when it is no such number."""
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    try:
        expires_at = float(exp)
    except OverflowError:  # an integer past float's range
        return None
    return expires_at if math.isfinite(expires_at) else None


async def _fetch_url(url: str) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=JWKS_TIMEOUT_S) as response:  # noqa: S310
            body: bytes = response.read(1024 * 1024)
            return body

    return await asyncio.to_thread(get)


def make_token(
    secret: str, user: str, *, ttl_s: float = 86400.0, algorithm: str = "HS256", **claims: Any
) -> str:
    """An HS token for ``user`` (``hub token``, development, tests, the demo)."""
    now = int(time.time())
    payload = {"sub": user, "iat": now, "exp": now + int(ttl_s), **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)


# -- API keys ---------------------------------------------------------------------


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode())
    chars = []
    for _ in range(KEY_CHECK_CHARS):
        value, digit = divmod(value, 62)
        chars.append(BASE62[digit])
    return "".join(chars)


def make_api_key() -> tuple[str, str]:
    """A new key: ``(id, raw key)``."""
    key_id = "".join(secrets.choice(BASE62) for _ in range(KEY_ID_CHARS))
    secret = "".join(secrets.choice(BASE62) for _ in range(KEY_SECRET_CHARS))
    body = KEY_PREFIX + key_id + secret
    return key_id, body + _checksum(body)


def is_key_id(text: str) -> bool:
    """Whether ``text`` can be the id of a key (what ``DELETE /v1/api-keys/{id}`` names)."""
    return len(text) == KEY_ID_CHARS and all(c in BASE62 for c in text)


def parse_api_key(key: str) -> str:
    """The id of a well-formed key; ``Unauthorized`` for a typo, before any lookup."""
    if len(key) != KEY_CHARS or not key.startswith(KEY_PREFIX):
        raise Unauthorized("malformed API key")
    body, check = key[:-KEY_CHECK_CHARS], key[-KEY_CHECK_CHARS:]
    if any(c not in BASE62 for c in key[len(KEY_PREFIX) :]) or _checksum(body) != check:
        raise Unauthorized("malformed API key (checksum)")
    return key[len(KEY_PREFIX) : len(KEY_PREFIX) + KEY_ID_CHARS]


class Authenticator:
    """JWTs and API keys; the one place where a credential becomes a principal."""

    def __init__(
        self,
        verifier: JwtVerifier,
        *,
        pepper: str,
        find_key: Callable[[str], Awaitable[ApiKeyRecord | None]] | None = None,
    ) -> None:
        self._verifier = verifier
        self._pepper = pepper.encode()
        self._find_key = find_key
        self._keys: dict[str, tuple[float, ApiKeyRecord | None]] = {}
        self._forgets = 0  # keys forgotten so far: a lookup across one is not cached
        self._lookup_slots = asyncio.Semaphore(MAX_KEY_LOOKUPS)
        self._lookups = 0  # lookups running or waiting for a slot
        # Lookups running, by key id, with the forgets count they began at:
        # a request for the same key joins one that began since the last forget.
        self._running: dict[str, tuple[int, asyncio.Future[ApiKeyRecord | None]]] = {}
        self.keys_used: dict[str, float] = {}  # id -> Unix time, flushed in bulk

    def __repr__(self) -> str:
        return f"Authenticator({self._verifier!r})"

    def hash_key(self, key: str) -> bytes:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).digest()

    async def authenticate(self, credential: str) -> Principal:
        if credential.startswith(KEY_PREFIX):
            return await self._api_key(credential)
        return await self._verifier.verify(credential)

    async def _api_key(self, key: str) -> Principal:
        if not self._pepper:  # keys cannot be checked: refused, not called unknown
            raise Unavailable("API keys need HUB_API_KEY_PEPPER to be set", retry_after=3600)
        key_id = parse_api_key(key)
        record = await self._lookup(key_id)
        if record is None or not hmac.compare_digest(record.key_hash, self.hash_key(key)):
            raise Unauthorized("unknown API key")
        if record.revoked:
            raise Unauthorized("this API key was revoked")
        self.keys_used[key_id] = time.time()
        return Principal(record.user, record.scopes, "api_key", None, key_id)

    async def _lookup(self, key_id: str) -> ApiKeyRecord | None:
        now = time.monotonic()
        cached = self._keys.get(key_id)
        if cached is not None and now - cached[0] < KEY_CACHE_S:
            return cached[1]
        if self._find_key is None:
            return None
        forgets = self._forgets
        running = self._running.get(key_id)
        if running is None or running[0] != forgets:
            if self._lookups >= MAX_KEY_LOOKUPS_WAITING:
                raise Unavailable(
                    "too many API keys are being checked at once; retry", retry_after=1.0
                )
            # A task of its own: a caller that goes away does not end the
            # lookup for the others that joined it.
            task = asyncio.ensure_future(self._look_up(key_id, forgets, now))
            task.add_done_callback(lambda t: self._looked_up(key_id, t))
            running = self._running[key_id] = (forgets, task)
            self._lookups += 1
        return await asyncio.shield(running[1])

    async def _look_up(self, key_id: str, forgets: int, now: float) -> ApiKeyRecord | None:
        assert self._find_key is not None
        async with self._lookup_slots:
            record = await self._find_key(key_id)
        if forgets != self._forgets:
            # A revocation came while the database was asked: what it said may
            # predate it, and must not be what this process goes on believing.
            return record
        if len(self._keys) > 100_000:
            self._keys.clear()
        self._keys[key_id] = (now, record)
        return record

    def _looked_up(self, key_id: str, task: asyncio.Future[ApiKeyRecord | None]) -> None:
        self._lookups -= 1
        if self._running.get(key_id, (0, None))[1] is task:
            del self._running[key_id]
        if not task.cancelled():
            task.exception()  # read: when every caller went away, nobody else will

    @property
    def forgets(self) -> int:
        """Keys forgotten (revoked) so far: changed by any revocation heard here."""
        return self._forgets

    def forget_key(self, key_id: str) -> None:
        """A key was revoked (here or on another process): look it up again."""
        self._keys.pop(key_id, None)
        self._forgets += 1


def check_scopes(scopes: object) -> frozenset[str]:
    """The scopes of a new API key (default read and write)."""
    if scopes is None:
        return frozenset({"read", "write"})
    if (
        not isinstance(scopes, list)
        or not scopes
        or not all(isinstance(s, str) and s in ALL_SCOPES for s in scopes)
    ):
        raise BadRequest(f"'scopes' must be a non-empty list of {sorted(ALL_SCOPES)}")
    return frozenset(scopes)
