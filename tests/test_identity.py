"""Identity and access end to end: JWTs (HS256 secret and JWKS), token expiry
and refresh on a WebSocket, API keys and their scopes, devices, isolation of
users, rate limits and the cluster-wide connection limit. Real hub processes
on 127.0.0.1, real PostgreSQL and Redis, real HTTP and WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import pytest
from support import (
    JWT_SECRET,
    Device,
    change,
    connect,
    new_user,
    serve_exits,
    stamp,
    token_for,
    wait_for,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from hub.auth import (
    MAX_KEY_LOOKUPS,
    MAX_KEY_LOOKUPS_WAITING,
    Authenticator,
    JwtVerifier,
    make_api_key,
    parse_api_key,
)
from hub.errors import Unauthorized, Unavailable
from hub.types import ApiKeyRecord

# -- small helpers ------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(user: str, ttl_s: int = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + ttl_s, **extra}


def hs_token(claims: dict[str, Any], secret: str | bytes = JWT_SECRET, **header: Any) -> str:
    """An HS256 JWS made by hand, so any secret (also a PEM public key) can sign it."""
    return hs_token_text(orjson.dumps(claims).decode(), secret, **header)


def hs_token_text(claims: str, secret: str | bytes = JWT_SECRET, **header: Any) -> str:
    """An HS256 JWS of claims written as JSON text, even JSON orjson would not write."""
    key = secret.encode() if isinstance(secret, str) else secret
    head = b64url(orjson.dumps({"alg": "HS256", "typ": "JWT", **header}))
    body = b64url(claims.encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def unsigned_token(claims: dict[str, Any], **header: Any) -> str:
    head = b64url(orjson.dumps({"alg": "none", "typ": "JWT", **header}))
    return f"{head}.{b64url(orjson.dumps(claims))}."


def expiry_of(token: str) -> int:
    exp: int = jwt.decode(token, options={"verify_signature": False})["exp"]
    return exp


async def call(
    hub: Any, method: str, path: str, credential: str | None, **kwargs: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"} if credential is not None else {}
    headers.update(kwargs.pop("headers", {}))
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as client:
        return await client.request(method, path, headers=headers, **kwargs)


async def http_push(hub: Any, credential: str, device: str, record: str) -> httpx.Response:
    body = {"device": device, "changes": [change(record, stamp(node=device), x=1)]}
    return await call(hub, "POST", "/v1/sync/push", credential, json=body)


def code_of(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def create_key(
    hub: Any, credential: str, name: str, scopes: list[str] | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"name": name}
    if scopes is not None:
        body["scopes"] = scopes
    return await call(hub, "POST", "/v1/api-keys", credential, json=body)


async def new_key(hub: Any, credential: str, scopes: list[str] | None = None) -> dict[str, Any]:
    r = await create_key(hub, credential, "key-" + secrets.token_hex(3), scopes)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def open_by_message(hub: Any, message: dict[str, Any]) -> Any:
    """A WebSocket that authenticates with its first message (as browsers do)."""
    ws = await ws_connect(hub.ws_url, open_timeout=10, max_size=None)
    await ws.send(orjson.dumps({"type": "auth", **message}).decode())
    return ws


async def connect_by_message(hub: Any, token: str, device: str, **fields: Any) -> Device:
    ws = await open_by_message(hub, {"token": token, "device": device, **fields})
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome", welcome
    return Device(ws, welcome)


async def refused_with(
    hub: Any, device: str, credential: str, *, by_message: bool = False, timeout: float = 10.0
) -> int:
    """Open a WebSocket that the hub must close before its welcome; the close code."""
    if by_message:
        ws = await open_by_message(hub, {"token": credential, "device": device})
    else:
        ws = await ws_connect(
            f"{hub.ws_url}?device={device}",
            additional_headers={"Authorization": f"Bearer {credential}"},
            open_timeout=10,
        )
    try:
        message = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed:
        code: int = ws.close_code
        return code
    await ws.close()
    raise AssertionError(f"the hub let the connection in: {message}")


async def closed_with(device: Device, timeout: float = 10.0) -> int:
    """Read (and drop) messages until the hub closes the connection; its close code."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"still open after {timeout}s")
            await device.recv(timeout=left)
    code = device.close_code
    assert code is not None
    return code


async def still_open(device: Device) -> None:
    await device.send({"type": "ping"})
    assert await device.expect("pong") == {"type": "pong"}


async def try_connect(hub: Any, user: str, device: str, token: str) -> Device | None:
    try:
        return await connect(hub, user, device, token=token)
    except ConnectionClosed:
        return None


@pytest.fixture
def two_hubs(hub_factory, redis_url):
    env = {"HUB_REDIS_URL": redis_url}
    return hub_factory(env), hub_factory(env)


# -- RSA, by hand (RS256 signing, JWK, PEM) ------------------------------------------
#
# The tests sign their RS256 tokens themselves, so they need nothing beyond the
# standard library; the hub verifies them with its own JWT library.

SMALL_PRIMES = [p for p in range(3, 2000, 2) if all(p % q for q in range(3, int(p**0.5) + 1, 2))]
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _probably_prime(n: int, rounds: int = 32) -> bool:
    if any(n % p == 0 for p in SMALL_PRIMES):
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1  # top two bits: n has 2*bits
        if _probably_prime(candidate):
            return candidate


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _der(tag: int, body: bytes) -> bytes:
    if len(body) < 0x80:
        length = bytes([len(body)])
    else:
        raw = _int_bytes(len(body))
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@dataclass(frozen=True)
class RsaKey:
    kid: str
    n: int
    e: int
    d: int

    @classmethod
    def generate(cls, kid: str, bits: int = 2048) -> RsaKey:
        e = 65537
        while True:
            p, q = _prime(bits // 2), _prime(bits // 2)
            phi = (p - 1) * (q - 1)
            if p != q and math.gcd(e, phi) == 1:
                return cls(kid, p * q, e, pow(e, -1, phi))

    def jwk(self) -> dict[str, str]:
        return {
            "kty": "RSA",
            "kid": self.kid,
            "use": "sig",
            "alg": "RS256",
            "n": b64url(_int_bytes(self.n)),
            "e": b64url(_int_bytes(self.e)),
        }

    def sign(self, claims: dict[str, Any], kid: str | None = None) -> str:
        """An RS256 (RSASSA-PKCS1-v1_5, SHA-256) token; ``kid=""`` leaves the kid out."""
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid if kid is None else kid}
        if not header["kid"]:
            del header["kid"]
        head = b64url(orjson.dumps(header))
        body = b64url(orjson.dumps(claims))
        digest = hashlib.sha256(f"{head}.{body}".encode()).digest()
        size = (self.n.bit_length() + 7) // 8
        t = SHA256_DIGEST_INFO + digest
        em = b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t
        signature = pow(int.from_bytes(em, "big"), self.d, self.n).to_bytes(size, "big")
        return f"{head}.{body}.{b64url(signature)}"

    def public_pem(self) -> bytes:
        """The public key as a PEM SubjectPublicKeyInfo, as a server would keep it."""
        rsa_public = _der(0x30, _der_int(self.n) + _der_int(self.e))
        algorithm = _der(0x30, bytes.fromhex("06092a864886f70d010101") + b"\x05\x00")
        spki = _der(0x30, algorithm + _der(0x03, b"\x00" + rsa_public))
        text = base64.b64encode(spki).decode()
        lines = [text[i : i + 64] for i in range(0, len(text), 64)]
        return (
            "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"
        ).encode()


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[RsaKey, RsaKey]:
    return RsaKey.generate("key-1"), RsaKey.generate("key-2")


class JwksServer:
    """Serves a JWKS on 127.0.0.1 from a thread and counts how often it is fetched."""

    def __init__(self) -> None:
        self.fetches = 0
        self._keys: list[dict[str, str]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                with outer._lock:
                    outer.fetches += 1
                    body = json.dumps({"keys": outer._keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def serve(self, *keys: RsaKey) -> None:
        with self._lock:
            self._keys = [k.jwk() for k in keys]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    try:
        yield server
    finally:
        server.stop()


def jwks_env(server: JwksServer, min_refresh_s: str) -> dict[str, str]:
    return {
        "HUB_JWT_SECRET": "",
        "HUB_JWKS_URL": server.url,
        "HUB_JWKS_MIN_REFRESH_S": min_refresh_s,
    }


# -- 1. JWTs on an HS256 hub ------------------------------------------------------------


async def test_hs256_hub_refuses_bad_tokens_with_401(shared_hub, user):
    good = hs_token(claims_for(user))
    assert (await call(shared_hub, "GET", "/v1/sync/status", good)).status_code == 200
    now = int(time.time())
    refused = {
        "alg none": unsigned_token(claims_for(user)),
        "alg none, capitalised": unsigned_token(claims_for(user), alg="None"),
        "HS256 without a signature": good.rsplit(".", 1)[0] + ".",
        "another secret": hs_token(claims_for(user), "another-secret-" + "y" * 40),
        "tampered claims": ".".join(
            [
                good.split(".")[0],
                b64url(orjson.dumps(claims_for("someone-else"))),
                good.split(".")[2],
            ]
        ),
        "no sub": hs_token({"iat": now, "exp": now + 3600}),
        "no exp": hs_token({"sub": user, "iat": now}),
        # Would pass the JWT library, and leave a WebSocket with no expiry.
        "exp a string of digits": hs_token({"sub": user, "exp": str(now + 3600)}),
        "sub not a string": hs_token({"sub": 42, "exp": now + 3600}),
        "sub too long": hs_token({"sub": "u" * 129, "exp": now + 3600}),
        "empty sub": hs_token({"sub": "", "exp": now + 3600}),
        "sub with NUL": hs_token({"sub": "\x00control", "exp": now + 3600}),
        # Claims JSON allows and the JWT library takes, but no user id or expiry can be.
        "sub a lone surrogate": hs_token_text(f'{{"sub": "\\ud800", "exp": {now + 3600}}}'),
        "exp past a float's range": hs_token_text(f'{{"sub": "{user}", "exp": 1{"0" * 400}}}'),
        "exp Infinity": hs_token_text(f'{{"sub": "{user}", "exp": Infinity}}'),
        "exp NaN": hs_token_text(f'{{"sub": "{user}", "exp": NaN}}'),
        "HS384 when only HS256 is allowed": jwt.encode(
            claims_for(user), JWT_SECRET, algorithm="HS384"
        ),
        "not before in the future": hs_token(claims_for(user, nbf=now + 600)),
        "garbage": "not-a-token",
    }
    for what, token in refused.items():
        r = await call(shared_hub, "GET", "/v1/sync/status", token)
        assert r.status_code == 401, (what, r.text)
        assert code_of(r) == "unauthorized", (what, r.text)
    missing = await call(shared_hub, "GET", "/v1/sync/status", None)
    assert missing.status_code == 401 and code_of(missing) == "unauthorized"
    r = await call(shared_hub, "GET", "/v1/sync/status", None, headers={"Authorization": "Basic x"})
    assert r.status_code == 401 and code_of(r) == "unauthorized"


async def test_expired_token_is_token_expired_over_http_and_4001_on_websocket(shared_hub, user):
    expired = token_for(user, ttl_s=-120)  # past the 30 s leeway
    for method, path in (("GET", "/v1/sync/status"), ("GET", "/v1/sync/pull")):
        r = await call(shared_hub, method, path, expired)
        assert r.status_code == 401 and code_of(r) == "token_expired", r.text
    r = await http_push(shared_hub, expired, "d1", "t1")
    assert r.status_code == 401 and code_of(r) == "token_expired"
    assert await refused_with(shared_hub, "d1", expired) == 4001
    assert await refused_with(shared_hub, "d1", expired, by_message=True) == 4001
    assert await refused_with(shared_hub, "d1", unsigned_token(claims_for(user))) == 4001
    assert await refused_with(shared_hub, "x" * 65, token_for(user)) == 4001  # a bad device id
    assert await refused_with(shared_hub, "", token_for(user)) == 4001


async def test_audience_and_issuer_are_checked_when_configured(hub_factory):
    hub = hub_factory({"HUB_JWT_AUDIENCE": "sync-hub", "HUB_JWT_ISSUER": "https://id.test/"})
    user = new_user()
    accepted = {
        "right aud and iss": claims_for(user, aud="sync-hub", iss="https://id.test/"),
        "aud list holding ours": claims_for(
            user, aud=["other", "sync-hub"], iss="https://id.test/"
        ),
    }
    refused = {
        "wrong aud": claims_for(user, aud="other-app", iss="https://id.test/"),
        "wrong iss": claims_for(user, aud="sync-hub", iss="https://evil.test/"),
        "no aud": claims_for(user, iss="https://id.test/"),
        "no iss": claims_for(user, aud="sync-hub"),
        "neither": claims_for(user),
    }
    for what, claims in accepted.items():
        r = await call(hub, "GET", "/v1/sync/status", hs_token(claims))
        assert r.status_code == 200, (what, r.text)
    for what, claims in refused.items():
        r = await call(hub, "GET", "/v1/sync/status", hs_token(claims))
        assert r.status_code == 401 and code_of(r) == "unauthorized", (what, r.text)
    good = hs_token(accepted["right aud and iss"])
    d = await connect(hub, user, "d1", token=good)
    assert d.welcome["user"] == user
    await d.close()
    wrong = hs_token(refused["wrong aud"])
    assert await refused_with(hub, "d1", wrong) == 4001


# -- 2. JWKS ----------------------------------------------------------------------------


async def test_jwks_hub_refuses_confusion_unknown_kids_and_bad_signatures(
    hub_factory, jwks, rsa_keys
):
    key1, key2 = rsa_keys
    jwks.serve(key1)
    hub = hub_factory(jwks_env(jwks, "0.2"))
    user = new_user()
    claims = claims_for(user)
    refused = {
        # HS/RS confusion: the public key, which anyone has, as the HMAC secret.
        "HS256 signed with the public PEM": hs_token(claims, key1.public_pem(), kid=key1.kid),
        "HS256 signed with the HS hubs' test secret": hs_token(claims, kid=key1.kid),
        "HS256 without a kid": hs_token(claims),
        "alg none with a served kid": unsigned_token(claims, kid=key1.kid),
        "unknown kid": key2.sign(claims),
        "served kid, signed by another key": key2.sign(claims, kid=key1.kid),
        "RS256 without a kid": key1.sign(claims, kid=""),
    }
    for what, token in refused.items():
        r = await call(hub, "GET", "/v1/sync/status", token)
        assert r.status_code == 401 and code_of(r) == "unauthorized", (what, r.text)
    confused = hs_token(claims, key1.public_pem(), kid=key1.kid)
    assert await refused_with(hub, "d1", confused) == 4001
    assert await refused_with(hub, "d1", confused, by_message=True) == 4001
    assert jwks.fetches >= 1  # the hub did look at the key set


async def test_jwks_rs256_token_works_over_http_and_websocket(hub_factory, jwks, rsa_keys):
    key1, _ = rsa_keys
    jwks.serve(key1)
    hub = hub_factory(jwks_env(jwks, "0.2"))
    user = new_user()
    token = key1.sign(claims_for(user))
    r = await call(hub, "GET", "/v1/sync/status", token)
    assert r.status_code == 200, r.text
    r = await http_push(hub, token, "d-http", "t1")
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    by_header = await connect(hub, user, "d-ws", token=token)
    by_message = await connect_by_message(hub, token, "d-web")
    assert by_header.welcome["user"] == by_message.welcome["user"] == user
    assert by_header.welcome["version"] == 1
    expired = key1.sign(claims_for(user, ttl_s=-120))
    r = await call(hub, "GET", "/v1/sync/status", expired)
    assert r.status_code == 401 and code_of(r) == "token_expired"
    for d in (by_header, by_message):
        await d.close()


async def test_jwks_keys_rotate_without_a_restart(hub_factory, jwks, rsa_keys):
    key1, key2 = rsa_keys
    jwks.serve(key1)
    hub = hub_factory(jwks_env(jwks, "0.2"))
    user = new_user()

    async def status(token: str) -> int:
        return (await call(hub, "GET", "/v1/sync/status", token)).status_code

    assert await status(key1.sign(claims_for(user))) == 200
    assert await status(key2.sign(claims_for(user))) == 401  # not served yet
    jwks.serve(key1, key2)  # the identity provider adds a key

    async def new_key_accepted() -> bool:
        return await status(key2.sign(claims_for(user))) == 200

    await wait_for(new_key_accepted, timeout=5, interval=0.05)
    assert await status(key1.sign(claims_for(user))) == 200  # the old key still works
    d = await connect(hub, user, "d1", token=key2.sign(claims_for(user)))
    await still_open(d)
    await d.close()
    jwks.serve(key2)  # and drops the old one: once the hub refetches, it is gone

    async def old_key_refused() -> bool:
        await status(key2.sign(claims_for(user), kid="key-3"))  # an unknown kid: refetch
        return await status(key1.sign(claims_for(user))) == 401

    await wait_for(old_key_refused, timeout=5, interval=0.1)
    assert await status(key2.sign(claims_for(user))) == 200


async def test_a_flood_of_unknown_kids_fetches_the_jwks_rarely(hub_factory, jwks, rsa_keys):
    key1, _ = rsa_keys
    jwks.serve(key1)
    hub = hub_factory(jwks_env(jwks, "30"))
    user = new_user()
    tokens = [key1.sign(claims_for(user), kid="bogus-" + secrets.token_hex(4)) for _ in range(50)]
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as client:
        answers = await asyncio.gather(
            *(
                client.get("/v1/sync/status", headers={"Authorization": f"Bearer {t}"})
                for t in tokens
            )
        )
    assert [r.status_code for r in answers] == [401] * 50
    assert jwks.fetches == 1, jwks.fetches


def test_hs_and_asymmetric_algorithms_are_never_mixed(database_url, jwks, tmp_path):
    both = serve_exits(
        tmp_path, HUB_DATABASE_URL=database_url, HUB_JWT_SECRET=JWT_SECRET, HUB_JWKS_URL=jwks.url
    )
    assert both.returncode != 0 and "never mixed" in both.stderr
    hs_on_jwks = serve_exits(
        tmp_path,
        HUB_DATABASE_URL=database_url,
        HUB_JWKS_URL=jwks.url,
        HUB_JWT_ALGORITHMS="RS256,HS256",
    )
    assert hs_on_jwks.returncode != 0
    assert "listening on" not in hs_on_jwks.stdout
    rs_on_secret = serve_exits(
        tmp_path,
        HUB_DATABASE_URL=database_url,
        HUB_JWT_SECRET=JWT_SECRET,
        HUB_JWT_ALGORITHMS="HS256,RS256",
    )
    assert rs_on_secret.returncode != 0
    assert "listening on" not in rs_on_secret.stdout


# -- 3. Token lifecycle on a WebSocket -------------------------------------------------


async def test_token_refresh_on_a_websocket_and_4010_without_it(shared_hub, user):
    exp = int(time.time()) + 3
    refreshing = await connect(shared_hub, user, "tab-1", token=hs_token({"sub": user, "exp": exp}))
    lazy = await connect(shared_hub, user, "tab-2", token=hs_token({"sub": user, "exp": exp}))
    # A token good for 63 s is warned about a minute before its exp: not now.
    minute = hs_token({"sub": user, "exp": int(time.time()) + 63})
    timed = await connect(shared_hub, user, "tab-3", token=minute)
    await still_open(timed)
    # The warning fires a minute before exp, which is already past: at once.
    for d in (refreshing, lazy):
        warning = await d.expect("auth_expiring", timeout=2)
        assert 0 <= warning["expires_in_s"] <= 3, warning
    # A token of another user, a bad or an expired one is refused and changes nothing.
    await refreshing.send({"type": "auth", "id": "r-0", "token": token_for(new_user())})
    other = await refreshing.expect("error")
    assert other["code"] == "forbidden" and other["id"] == "r-0"
    await refreshing.send({"type": "auth", "id": "r-1", "token": "garbage"})
    bad = await refreshing.expect("error")
    assert bad["code"] == "unauthorized" and bad["id"] == "r-1"
    await refreshing.send({"type": "auth", "id": "r-2", "token": token_for(user, ttl_s=-120)})
    old = await refreshing.expect("error")
    assert old["code"] == "token_expired" and old["id"] == "r-2"
    fresh = token_for(user, ttl_s=3600)
    await refreshing.send({"type": "auth", "token": fresh})
    ok = await refreshing.expect("auth_ok")
    assert ok["expires_at"] == expiry_of(fresh)
    # The lazy one is closed with 4010 at its exp (no leeway for the timer).
    assert await closed_with(lazy, timeout=exp - time.time() + 3) == 4010
    assert time.time() >= exp - 0.5
    # Past the old exp, the refreshed one is still open, and warned no more.
    await asyncio.sleep(max(0.0, exp + 0.5 - time.time()))
    await still_open(refreshing)
    assert refreshing.close_code is None
    # By now the 63 s token's warning has come, about 60 s ahead of its exp.
    warning = await timed.expect("auth_expiring", timeout=5)
    assert 57 <= warning["expires_in_s"] <= 60, warning
    for d in (refreshing, timed):
        await d.close()


async def test_a_token_already_past_its_exp_is_not_welcomed(shared_hub, user):
    assert await refused_with(shared_hub, "d1", token_for(user, ttl_s=-10)) == 4001


# -- 4. API keys ----------------------------------------------------------------------


async def test_api_keys_are_made_listed_used_scoped_and_revoked(shared_hub, user):
    jwt_token = token_for(user)
    before = time.time()
    r = await create_key(shared_hub, jwt_token, "ci", ["write", "read"])
    assert r.status_code == 201, r.text
    made = r.json()
    assert set(made) == {"id", "key", "name", "scopes", "created_at"}
    assert made["key"].startswith("hub_") and len(made["key"]) == 54
    assert made["key"][4:16] == made["id"]
    assert made["name"] == "ci" and made["scopes"] == ["read", "write"]
    assert datetime.fromisoformat(made["created_at"]).timestamp() >= before - 5
    default = await new_key(shared_hub, jwt_token)
    assert default["scopes"] == ["read", "write"]
    reader = await new_key(shared_hub, jwt_token, ["read"])
    admin = await new_key(shared_hub, jwt_token, ["admin"])
    # Bad requests to make one.
    for body in (
        {"scopes": ["read"]},
        {"name": ""},
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["root"]},
        {"name": "x", "scopes": "read"},
    ):
        r = await call(shared_hub, "POST", "/v1/api-keys", jwt_token, json=body)
        assert r.status_code == 400 and code_of(r) == "bad_request", (body, r.text)

    # The list has every key, and never a secret.
    r = await call(shared_hub, "GET", "/v1/api-keys", jwt_token)
    assert r.status_code == 200
    listed = {k["id"]: k for k in r.json()}
    assert set(listed) == {made["id"], default["id"], reader["id"], admin["id"]}
    for k in listed.values():
        assert "key" not in k and "key_hash" not in k
        assert k["revoked"] is False
    for secret in (made, default, reader, admin):
        assert secret["key"] not in r.text and secret["key"][16:48] not in r.text
    assert listed[made["id"]]["name"] == "ci"

    # read+write: pull, status, push.
    key = made["key"]
    assert (await call(shared_hub, "GET", "/v1/sync/pull", key)).status_code == 200
    assert (await call(shared_hub, "GET", "/v1/sync/status", key)).status_code == 200
    r = await http_push(shared_hub, key, "bot", "t1")
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    # ...but not manage keys or devices.
    for method, path in (
        ("GET", "/v1/api-keys"),
        ("POST", "/v1/api-keys"),
        ("DELETE", f"/v1/api-keys/{reader['id']}"),
        ("GET", "/v1/devices"),
        ("DELETE", "/v1/devices/bot"),
    ):
        r = await call(
            shared_hub, method, path, key, json={"name": "x"} if method == "POST" else None
        )
        assert r.status_code == 403 and code_of(r) == "forbidden", (method, path, r.text)

    # read only: pull and status, no push, no keys.
    rkey = reader["key"]
    r = await call(shared_hub, "GET", "/v1/sync/pull", rkey)
    assert r.status_code == 200 and [c["id"] for c in r.json()["changes"]] == ["t1"]
    assert (await call(shared_hub, "GET", "/v1/sync/status", rkey)).status_code == 200
    r = await http_push(shared_hub, rkey, "bot", "t2")
    assert r.status_code == 403 and code_of(r) == "forbidden"
    r = await create_key(shared_hub, rkey, "escalate", ["admin"])
    assert r.status_code == 403 and code_of(r) == "forbidden"
    # A read-only key on a WebSocket receives events but cannot push.
    watcher = await connect(shared_hub, user, "watcher", token=rkey)
    refused = await watcher.push([change("t3", stamp(), x=1)])
    assert refused["type"] == "error" and refused["code"] == "forbidden"
    assert (await http_push(shared_hub, key, "bot", "t4")).status_code == 200
    event = await watcher.expect("change")
    assert event["changes"][0]["id"] == "t4"
    await watcher.close()

    # write only: push, no pull.
    writer = await new_key(shared_hub, jwt_token, ["write"])
    assert (await http_push(shared_hub, writer["key"], "bot", "t5")).status_code == 200
    r = await call(shared_hub, "GET", "/v1/sync/pull", writer["key"])
    assert r.status_code == 403 and code_of(r) == "forbidden"

    # admin: manages keys (and nothing else).
    akey = admin["key"]
    by_admin = await create_key(shared_hub, akey, "made-by-admin", ["read"])
    assert by_admin.status_code == 201
    assert (await call(shared_hub, "GET", "/v1/api-keys", akey)).status_code == 200
    assert (await call(shared_hub, "GET", "/v1/devices", akey)).status_code == 200
    r = await call(shared_hub, "GET", "/v1/sync/pull", akey)
    assert r.status_code == 403 and code_of(r) == "forbidden"

    # A typo is refused (before any lookup: the checksum).
    for position in (5, 20, len(key) - 1):
        typo = key[:position] + ("A" if key[position] != "A" else "B") + key[position + 1 :]
        r = await call(shared_hub, "GET", "/v1/sync/status", typo)
        assert r.status_code == 401 and code_of(r) == "unauthorized", position
    r = await call(shared_hub, "GET", "/v1/sync/status", key[:-1])
    assert r.status_code == 401

    # Revoke: 204, then refused at once; an unknown id is 404.
    r = await call(shared_hub, "DELETE", "/v1/api-keys/nosuchkey123", jwt_token)
    assert r.status_code == 404 and code_of(r) == "not_found"
    r = await call(shared_hub, "DELETE", f"/v1/api-keys/{made['id']}", akey)
    assert r.status_code == 204
    r = await call(shared_hub, "GET", "/v1/sync/status", key)
    assert r.status_code == 401 and code_of(r) == "unauthorized"
    assert await refused_with(shared_hub, "bot", key) == 4001
    r = await call(shared_hub, "GET", "/v1/api-keys", jwt_token)
    assert {k["id"]: k["revoked"] for k in r.json()}[made["id"]] is True
    assert (await call(shared_hub, "GET", "/v1/sync/status", rkey)).status_code == 200


async def test_malformed_key_ids_device_ids_and_key_names_are_refused(shared_hub, user):
    token = token_for(user)
    for path in ("/v1/devices/%00", "/v1/devices/x%00y", "/v1/api-keys/%00", "/v1/api-keys/a%00"):
        r = await call(shared_hub, "DELETE", path, token)
        assert r.status_code == 404 and code_of(r) == "not_found", (path, r.text)
    r = await create_key(shared_hub, token, "a\x00b", ["read"])
    assert r.status_code == 400 and code_of(r) == "bad_request", r.text


async def test_a_hub_without_a_pepper_refuses_keys_with_503_not_401(hub_factory, user):
    # Keys made while the pepper was set stay valid: a hub started without it
    # cannot check them, and says so (503), so clients keep their key.
    with_pepper = hub_factory()
    key = (await new_key(with_pepper, token_for(user)))["key"]
    assert (await call(with_pepper, "GET", "/v1/sync/status", key)).status_code == 200
    without = hub_factory({"HUB_API_KEY_PEPPER": ""})
    r = await call(without, "GET", "/v1/sync/status", key)
    assert r.status_code == 503 and code_of(r) == "unavailable", r.text
    assert "HUB_API_KEY_PEPPER" in r.json()["error"]["message"]


async def test_revoking_a_key_is_felt_at_once_on_every_process(two_hubs, user):
    hub1, hub2 = two_hubs
    key = await new_key(hub1, token_for(user))
    other = await new_key(hub1, token_for(user))
    # Used on both processes first, so both have it cached.
    for hub in (hub1, hub2):
        assert (await call(hub, "GET", "/v1/sync/status", key["key"])).status_code == 200
    on_hub2 = await connect(hub2, user, "bot", token=key["key"])
    on_hub1 = await connect(hub1, user, "bot", token=key["key"])
    other_ws = await connect(hub2, user, "bot-2", token=other["key"])
    by_jwt = await connect(hub2, user, "phone")
    r = await call(hub1, "DELETE", f"/v1/api-keys/{key['id']}", token_for(user))
    assert r.status_code == 204
    assert (await call(hub1, "GET", "/v1/sync/status", key["key"])).status_code == 401

    async def refused_on_hub2() -> bool:
        return (await call(hub2, "GET", "/v1/sync/status", key["key"])).status_code == 401

    started = time.monotonic()
    await wait_for(refused_on_hub2, timeout=3)
    assert time.monotonic() - started < 3  # well within the 10 s cache
    assert await closed_with(on_hub2, timeout=3) == 4003
    assert await closed_with(on_hub1, timeout=3) == 4003
    # Connections with other credentials stay.
    await still_open(other_ws)
    await still_open(by_jwt)
    assert (await call(hub2, "GET", "/v1/sync/status", other["key"])).status_code == 200
    for d in (other_ws, by_jwt):
        await d.close()


async def test_a_key_without_read_scope_is_refused_on_websocket_with_4003(shared_hub, user):
    writer = await new_key(shared_hub, token_for(user), ["write"])
    assert await refused_with(shared_hub, "bot", writer["key"]) == 4003


# -- 5. Devices -----------------------------------------------------------------------


async def test_devices_are_listed_and_revoked_on_every_process(two_hubs, user):
    hub1, hub2 = two_hubs
    jwt_token = token_for(user)
    phone = await connect_by_message(
        hub1, jwt_token, "phone-1", device_name="Ada's phone", platform="android"
    )
    r = await call(hub1, "GET", "/v1/devices", jwt_token)
    assert r.status_code == 200
    listed = {d["device"]: d for d in r.json()}
    entry = listed["phone-1"]
    assert set(entry) == {
        "device",
        "name",
        "platform",
        "first_seen",
        "last_seen",
        "revoked",
        "connections",
    }
    assert (entry["name"], entry["platform"], entry["revoked"], entry["connections"]) == (
        "Ada's phone",
        "android",
        False,
        1,
    )
    first_seen = datetime.fromisoformat(entry["first_seen"])
    assert first_seen <= datetime.fromisoformat(entry["last_seen"])
    assert abs(first_seen.timestamp() - time.time()) < 60

    # The same device on the other process too (name and platform kept), and a laptop.
    phone_again = await connect(hub2, user, "phone-1")
    laptop = await connect(hub2, user, "laptop")

    async def counted() -> dict[str, Any] | None:
        r = await call(hub2, "GET", "/v1/devices", jwt_token)
        devices = {d["device"]: d for d in r.json()}
        phone_entry = devices.get("phone-1")
        if phone_entry and phone_entry["connections"] == 2 and "laptop" in devices:
            return devices
        return None

    devices = await wait_for(counted, timeout=5)
    assert (devices["phone-1"]["name"], devices["phone-1"]["platform"]) == (
        "Ada's phone",
        "android",
    )
    assert devices["laptop"]["connections"] == 1

    r = await call(hub2, "DELETE", "/v1/devices/phone-1", jwt_token)
    assert r.status_code == 204
    assert await closed_with(phone, timeout=3) == 4003
    assert await closed_with(phone_again, timeout=3) == 4003
    await still_open(laptop)
    # Later connects and pushes of the device are refused; others are not.
    for hub in (hub1, hub2):
        assert await refused_with(hub, "phone-1", jwt_token) == 4003
        assert await refused_with(hub, "phone-1", jwt_token, by_message=True) == 4003
        r = await http_push(hub, jwt_token, "phone-1", "t-" + secrets.token_hex(2))
        assert r.status_code == 403 and code_of(r) == "forbidden", r.text
    r = await http_push(hub1, jwt_token, "laptop", "t-ok")
    assert r.status_code == 200
    assert (await laptop.expect("change"))["changes"][0]["id"] == "t-ok"

    async def shown_revoked() -> bool:
        r = await call(hub1, "GET", "/v1/devices", jwt_token)
        entry = {d["device"]: d for d in r.json()}["phone-1"]
        return entry["revoked"] is True and entry["connections"] == 0

    await wait_for(shown_revoked, timeout=5)
    r = await call(hub1, "DELETE", "/v1/devices/no-such-device", jwt_token)
    assert r.status_code == 404 and code_of(r) == "not_found"
    await laptop.close()


async def closes_with(ws: Any, timeout: float = 10.0) -> int:
    """Read (and drop) what comes until the hub closes the connection; its close code."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
    code: int = ws.close_code
    return code


@contextlib.asynccontextmanager
async def statements_ran(database_url: str, like: str) -> AsyncIterator[Callable[[], Any]]:
    """A condition for :func:`wait_for`: a statement whose text is ``like``
    (SQL LIKE) has run to its end on the database since this block began."""
    watcher = await asyncpg.connect(database_url)
    try:
        began = await watcher.fetchval("SELECT now()")

        async def ran() -> bool:
            return bool(
                await watcher.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                       WHERE datname = current_database() AND state = 'idle'
                         AND query LIKE $1 AND query_start > $2""",
                    like,
                    began,
                )
            )

        yield ran
    finally:
        await watcher.close()


async def test_a_device_revoked_while_it_connects_is_closed(hub_factory, redis_url, user):
    # Hub A's Redis commands arrive 0.8 s late, so a connection of the device
    # waits there for its admission after it checked the device in the
    # database. The device is revoked through hub B meanwhile: the connection
    # was not there to be closed, and must be closed all the same.

    from support import TcpProxy

    async with TcpProxy.for_url(redis_url, delay_s=0.8) as proxy:
        hub_a = await asyncio.to_thread(hub_factory, {"HUB_REDIS_URL": proxy.url(redis_url)})
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        jwt_token = token_for(user)
        connecting = asyncio.ensure_future(
            ws_connect(
                f"{hub_a.ws_url}?device=phone",
                additional_headers={"Authorization": f"Bearer {jwt_token}"},
                open_timeout=10,
            )
        )

        async def registered() -> bool:
            r = await call(hub_b, "GET", "/v1/devices", jwt_token)
            return any(d["device"] == "phone" for d in r.json())

        await wait_for(registered, timeout=5, interval=0.02)
        assert (await call(hub_b, "DELETE", "/v1/devices/phone", jwt_token)).status_code == 204
        ws = await connecting
        assert await closes_with(ws) == 4003


async def test_a_revocation_missed_while_redis_was_away_still_closes(hub_factory, redis_url, user):
    # Hub A loses Redis; a device connected there is revoked through hub B
    # meanwhile, and A cannot hear of it. Once A is back on Redis it looks its
    # connections up and closes the revoked one.

    from support import TcpProxy

    async with TcpProxy.for_url(redis_url) as proxy:
        hub_a = await asyncio.to_thread(hub_factory, {"HUB_REDIS_URL": proxy.url(redis_url)})
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        jwt_token = token_for(user)
        phone = await connect(hub_a, user, "phone")
        laptop = await connect(hub_a, user, "laptop")
        proxy.cut(refuse=True)
        assert (await call(hub_b, "DELETE", "/v1/devices/phone", jwt_token)).status_code == 204
        proxy.cut(refuse=False)  # Redis is reachable again
        assert await closed_with(phone, timeout=20) == 4003
        await still_open(laptop)
        await laptop.close()


async def test_a_key_revoked_while_it_is_looked_up_is_refused(
    hub_factory, database_url, redis_url, user
):
    # Hub A's database answers reach it 0.8 s late. A connection with a key it
    # has not seen waits for the key's lookup (made before the revocation)
    # while the key is revoked through hub B: hub A must neither keep the
    # connection nor the lookup's answer.

    from support import TcpProxy

    async with TcpProxy.for_url(database_url) as proxy:
        hub_a = await asyncio.to_thread(
            hub_factory, {"HUB_DATABASE_URL": proxy.url(database_url), "HUB_REDIS_URL": redis_url}
        )
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        key = await new_key(hub_b, token_for(user))
        proxy.answer_delay_s = 0.8
        async with statements_ran(database_url, "%FROM hub_api_keys WHERE id%") as ran:
            connecting = asyncio.ensure_future(
                ws_connect(
                    f"{hub_a.ws_url}?device=bot",
                    additional_headers={"Authorization": f"Bearer {key['key']}"},
                    open_timeout=10,
                )
            )
            await wait_for(ran, timeout=5, interval=0.005)  # its answer is on its way to A
        r = await call(hub_b, "DELETE", f"/v1/api-keys/{key['id']}", token_for(user))
        assert r.status_code == 204
        ws = await connecting
        assert await closes_with(ws) == 4003
        assert (await call(hub_a, "GET", "/v1/sync/status", key["key"])).status_code == 401


async def test_a_refresh_to_a_key_revoked_meanwhile_is_refused(
    hub_factory, database_url, redis_url, user
):
    # A connection swaps its JWT for a key with `auth`; the key is revoked
    # while hub A reads it again (its answers reach A 0.8 s late). The
    # revocation looked for connections holding the key, and this one did
    # not hold it yet: the refresh must be refused, or the connection closed.
    from support import TcpProxy

    async with TcpProxy.for_url(database_url) as proxy:
        hub_a = await asyncio.to_thread(
            hub_factory, {"HUB_DATABASE_URL": proxy.url(database_url), "HUB_REDIS_URL": redis_url}
        )
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        jwt_token = token_for(user)
        key = await new_key(hub_b, jwt_token)
        device = await connect(hub_a, user, "d1")
        # Hub A has the key cached, not revoked.
        assert (await call(hub_a, "GET", "/v1/sync/status", key["key"])).status_code == 200
        proxy.answer_delay_s = 0.8
        async with statements_ran(database_url, "%revoked_at IS NOT NULL%") as ran:
            await device.send({"type": "auth", "token": key["key"], "id": "r1"})
            await wait_for(ran, timeout=5, interval=0.005)  # the key read again
        r = await call(hub_b, "DELETE", f"/v1/api-keys/{key['id']}", jwt_token)
        assert r.status_code == 204
        proxy.answer_delay_s = 0.0
        try:
            answer = await device.recv(timeout=10)
        except ConnectionClosed:
            assert device.close_code == 4003
        else:
            assert answer["type"] == "error" and answer["code"] == "unauthorized", answer
            # It keeps its JWT, and is not closed for the key.
            await still_open(device)
            await device.close()


async def test_a_revocation_broadcast_into_a_silent_link_closes_within_the_recheck(
    hub_factory, redis_url, user
):
    # Hub B's Redis link goes silent (a NAT dropped it) just before a device
    # is revoked through B: the broadcast is written into the dead link and
    # heard nowhere. Hub A, which never lost Redis, finds the revocation at
    # its next look-up of its connections (every second here).
    from support import TcpProxy

    async with TcpProxy.for_url(redis_url) as proxy:
        hub_a = hub_factory({"HUB_REDIS_URL": redis_url, "HUB_REVOCATION_RECHECK_S": "1"})
        hub_b = await asyncio.to_thread(
            hub_factory, {"HUB_REDIS_URL": proxy.url(redis_url), "HUB_BROKER_CHECK_S": "0.5"}
        )
        jwt_token = token_for(user)
        phone = await connect(hub_a, user, "phone")
        laptop = await connect(hub_a, user, "laptop")
        proxy.freeze()  # B's flows open now carry nothing; new ones work
        assert (await call(hub_b, "DELETE", "/v1/devices/phone", jwt_token)).status_code == 204
        assert await closed_with(phone, timeout=10) == 4003
        await still_open(laptop)
        await laptop.close()


# -- 6. Users are isolated ------------------------------------------------------------


async def test_one_user_never_sees_or_touches_another_users_things(shared_hub):
    alice, bob = new_user(), new_user()
    a_token, b_token = token_for(alice), token_for(bob)
    a_key = await new_key(shared_hub, a_token, ["read", "write", "admin"])
    b_key = await new_key(shared_hub, b_token, ["read", "write", "admin"])
    a_phone = await connect(shared_hub, alice, "a-phone")
    b_phone = await connect(shared_hub, bob, "b-phone")
    r = await http_push(shared_hub, a_token, "a-laptop", "alice-secret")
    assert r.status_code == 200
    assert (await a_phone.expect("change"))["changes"][0]["id"] == "alice-secret"

    for b_cred in (b_token, b_key["key"]):
        r = await call(shared_hub, "GET", "/v1/api-keys", b_cred)
        assert [k["id"] for k in r.json()] == [b_key["id"]]
        r = await call(shared_hub, "DELETE", f"/v1/api-keys/{a_key['id']}", b_cred)
        assert r.status_code == 404 and code_of(r) == "not_found"
        r = await call(shared_hub, "GET", "/v1/devices", b_cred)
        assert [d["device"] for d in r.json()] == ["b-phone"]
        r = await call(shared_hub, "DELETE", "/v1/devices/a-phone", b_cred)
        assert r.status_code == 404 and code_of(r) == "not_found"
        r = await call(shared_hub, "GET", "/v1/sync/pull", b_cred)
        assert r.json()["changes"] == [] and r.json()["version"] == 0
        r = await call(shared_hub, "GET", "/v1/sync/status", b_cred)
        assert r.json() == {"version": 0, "collections": {}, "devices": ["b-phone"]}
    # Alice's key and devices are untouched.
    assert (await call(shared_hub, "GET", "/v1/sync/status", a_key["key"])).status_code == 200
    await still_open(a_phone)
    r = await call(shared_hub, "GET", "/v1/devices", a_token)
    assert {d["device"]: d["revoked"] for d in r.json()} == {"a-phone": False, "a-laptop": False}

    # Bob's push is his alone; Bob's socket never hears Alice.
    r = await http_push(shared_hub, b_key["key"], "b-laptop", "bob-note")
    assert r.status_code == 200 and r.json()["version"] == 1
    r = await http_push(shared_hub, a_key["key"], "a-laptop", "alice-2")
    assert r.json()["version"] == 2
    first = await b_phone.expect("change")
    assert first["changes"][0]["id"] == "bob-note" and first["version"] == 1
    r = await call(shared_hub, "GET", "/v1/sync/pull", a_token)
    assert sorted(c["id"] for c in r.json()["changes"]) == ["alice-2", "alice-secret"]
    # A's socket cannot be taken over by B's token.
    await a_phone.send({"type": "auth", "id": "swap", "token": b_token})
    assert (await a_phone.expect("change"))["changes"][0]["id"] == "alice-2"
    refused = await a_phone.expect("error")
    assert refused["code"] == "forbidden" and refused["id"] == "swap"
    await http_push(shared_hub, b_token, "b-laptop", "bob-2")
    await b_phone.expect("change")
    r = await http_push(shared_hub, a_token, "a-laptop", "alice-3")
    event = await a_phone.expect("change")
    assert event["changes"][0]["id"] == "alice-3" and event["version"] == 3
    # The same device name and the same idempotency key, for two users: separate.
    b_same = await connect(shared_hub, bob, "a-phone")
    r = await call(shared_hub, "DELETE", "/v1/devices/a-phone", a_token)
    assert r.status_code == 204
    assert await closed_with(a_phone, timeout=3) == 4003
    await still_open(b_same)
    r = await http_push(shared_hub, b_token, "a-phone", "bob-3")
    assert r.status_code == 200
    key = {"Idempotency-Key": "same-key-" + secrets.token_hex(3)}
    bodies = {
        who: {"device": "d", "changes": [change(f"{who}-idem", stamp(), x=who)]}
        for who in ("alice", "bob")
    }
    a_r = await call(
        shared_hub, "POST", "/v1/sync/push", a_token, json=bodies["alice"], headers=key
    )
    b_r = await call(shared_hub, "POST", "/v1/sync/push", b_token, json=bodies["bob"], headers=key)
    assert a_r.status_code == b_r.status_code == 200, (a_r.text, b_r.text)
    assert "Idempotent-Replay" not in b_r.headers and b_r.json()["applied"] == 1
    r = await call(shared_hub, "GET", "/v1/sync/pull", b_token)
    assert "alice-idem" not in r.text and "bob-idem" in r.text
    for d in (b_phone, b_same):
        await d.close()


# -- 7. Rate limits -------------------------------------------------------------------


@pytest.fixture
def limited_hub(hub_factory):
    return hub_factory(
        {
            "HUB_RATE_REQUESTS_PER_S": "2",
            "HUB_RATE_PUSHES_PER_S": "1",
            "HUB_RATE_MESSAGES_PER_S": "2",
            "HUB_RATE_BURST_S": "1",
        }
    )


def assert_rate_limited(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert code_of(r) == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1


async def test_http_requests_and_pushes_are_rate_limited_per_user(limited_hub):
    reader, pusher, bystander = new_user(), new_user(), new_user()
    answers = [
        await call(limited_hub, "GET", "/v1/sync/status", token_for(reader)) for _ in range(8)
    ]
    codes = [r.status_code for r in answers]
    assert codes[0] == 200 and 429 in codes, codes
    assert_rate_limited(next(r for r in answers if r.status_code == 429))
    first = await http_push(limited_hub, token_for(pusher), "d", "t1")
    second = await http_push(limited_hub, token_for(pusher), "d", "t2")
    assert first.status_code == 200
    assert_rate_limited(second)
    # Another user is not limited.
    assert (
        await call(limited_hub, "GET", "/v1/sync/status", token_for(bystander))
    ).status_code == 200
    assert (await http_push(limited_hub, token_for(bystander), "d", "t1")).status_code == 200


async def test_websocket_messages_are_rate_limited_then_closed_with_4008(limited_hub):
    flooder, bystander = new_user(), new_user()
    d = await connect(limited_hub, flooder, "d1")
    calm = await connect(limited_hub, bystander, "d1")
    sent = [f"p-{i}" for i in range(40)]
    for mid in sent:
        await d.send({"type": "ping", "id": mid})
    received = []
    with pytest.raises(ConnectionClosed):
        while True:
            received.append(await d.recv(timeout=10))
    assert d.close_code == 4008
    errors = [m for m in received if m["type"] == "error"]
    assert any(m["type"] == "pong" for m in received)  # the burst allowance
    assert errors and all(e["code"] == "rate_limited" for e in errors), errors
    ids = [e["id"] for e in errors]  # each names the refused message, in order
    assert all(i in sent for i in ids) and ids == sorted(ids, key=sent.index)
    await still_open(calm)
    await calm.close()


# -- 8. The connection limit spans processes -------------------------------------------


async def test_the_connection_limit_counts_every_process(hub_factory, redis_url):
    env = {"HUB_REDIS_URL": redis_url, "HUB_MAX_CONNECTIONS_PER_USER": "3"}
    hub1, hub2 = hub_factory(env), hub_factory(env)
    user = new_user()
    token = token_for(user)
    a = await connect(hub1, user, "a", token=token)
    b = await connect(hub1, user, "b", token=token)
    c = await connect(hub2, user, "c", token=token)
    assert await refused_with(hub1, "d", token) == 4009
    assert await refused_with(hub2, "d", token) == 4009
    assert await refused_with(hub2, "d", token, by_message=True) == 4009
    other = await connect(hub2, new_user(), "a")  # another user is not affected
    await b.close()
    again = await wait_for(lambda: try_connect(hub2, user, "d", token), timeout=5, interval=0.1)
    assert await refused_with(hub1, "e", token) == 4009
    for d in (a, c, again):
        await still_open(d)
    for d in (a, c, again, other):
        await d.close()


# -- CORS ---------------------------------------------------------------------------------


async def test_cors_allows_exactly_the_allowed_origins(shared_hub, user):
    allowed, foreign = "http://localhost:8080", "https://evil.example"
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as http:
        preflight = await http.options(
            "/v1/sync/push",
            headers={
                "Origin": allowed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert "idempotency-key" in preflight.headers["access-control-allow-headers"].lower()
        refused = await http.options(
            "/v1/sync/push",
            headers={"Origin": foreign, "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in refused.headers
        # Refused in the error body every answer of the hub uses.
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "bad_request"
        assert "origin" in refused.json()["error"]["message"]
        auth = {"Authorization": f"Bearer {token_for(user)}"}
        ok = await http.get("/v1/sync/status", headers={**auth, "Origin": allowed})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == allowed
        assert "idempotent-replay" in ok.headers["access-control-expose-headers"].lower()
        other = await http.get("/v1/sync/status", headers={**auth, "Origin": foreign})
        assert "access-control-allow-origin" not in other.headers


# -- API key lookups: bounded, shared -------------------------------------------------


def key_authenticator(find_key: Callable[[str], Any]) -> Authenticator:
    verifier = JwtVerifier(secret=JWT_SECRET, algorithms=("HS256",))
    return Authenticator(verifier, pepper="test-pepper-" + "p" * 20, find_key=find_key)


class SlowKeys:
    """A key store whose every lookup waits until released; it counts them."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.records: dict[str, ApiKeyRecord] = {}
        self.started = self.running = self.most = 0

    async def __call__(self, key_id: str) -> ApiKeyRecord | None:
        record = self.records.get(key_id)  # what the database says as it is asked
        self.started += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return record

    def add(self, authenticator: Authenticator) -> str:
        key_id, key = make_api_key()
        self.records[key_id] = ApiKeyRecord(
            key_id, "u1", frozenset({"read"}), authenticator.hash_key(key), False
        )
        return key


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_forged_keys_are_looked_up_a_few_at_a_time():
    keys = SlowKeys()
    authenticator = key_authenticator(keys)
    tries = [
        asyncio.ensure_future(authenticator.authenticate(make_api_key()[1])) for _ in range(20)
    ]
    await wait_for(lambda: keys.started == MAX_KEY_LOOKUPS)
    await settle()
    assert keys.started == MAX_KEY_LOOKUPS  # the rest wait here, not for the database
    keys.release.set()
    answers = await asyncio.gather(*tries, return_exceptions=True)
    assert all(isinstance(a, Unauthorized) for a in answers), answers
    assert keys.started == 20 and keys.most == MAX_KEY_LOOKUPS


async def test_lookups_past_the_queue_are_refused_with_503_and_the_rest_go_on():
    keys = SlowKeys()
    authenticator = key_authenticator(keys)
    good = keys.add(authenticator)
    tries = [
        asyncio.ensure_future(authenticator.authenticate(make_api_key()[1]))
        for _ in range(MAX_KEY_LOOKUPS_WAITING - 1)
    ]
    tries.append(asyncio.ensure_future(authenticator.authenticate(good)))
    await settle()
    with pytest.raises(Unavailable) as refused:
        await authenticator.authenticate(make_api_key()[1])
    assert refused.value.status == 503 and refused.value.retry_after
    keys.release.set()
    answers = await asyncio.gather(*tries, return_exceptions=True)
    assert all(isinstance(a, Unauthorized) for a in answers[:-1])
    assert answers[-1].user == "u1"  # queued before the limit: answered


async def test_requests_with_one_key_share_its_lookup_even_when_one_goes_away():
    keys = SlowKeys()
    authenticator = key_authenticator(keys)
    key = keys.add(authenticator)
    tries = [asyncio.ensure_future(authenticator.authenticate(key)) for _ in range(10)]
    await settle()
    tries[0].cancel()  # the first caller's client left
    keys.release.set()
    answers = await asyncio.gather(*tries[1:])
    assert {a.user for a in answers} == {"u1"} and keys.started == 1


async def test_a_request_after_a_revocation_does_not_join_a_lookup_made_before_it():
    keys = SlowKeys()
    authenticator = key_authenticator(keys)
    key = keys.add(authenticator)
    before = asyncio.ensure_future(authenticator.authenticate(key))
    await wait_for(lambda: keys.started == 1)
    key_id = parse_api_key(key)
    keys.records[key_id] = dataclasses.replace(keys.records[key_id], revoked=True)
    authenticator.forget_key(key_id)
    after = asyncio.ensure_future(authenticator.authenticate(key))
    await wait_for(lambda: keys.started == 2)
    keys.release.set()
    with pytest.raises(Unauthorized, match="revoked"):
        await after
    assert (await before).user == "u1"  # asked before the revocation: as the database said


async def test_a_flood_of_forged_keys_does_not_hold_up_other_users_pushes(
    hub_factory, database_url, user
):
    # The database's answers reach the hub 0.2 s late. 40 requests with
    # forged (well-formed, unknown) keys each cost a lookup; a JWT user's push
    # must not queue behind them for a connection of the pool: it is acked
    # while most of the forged requests are still waiting for their turn.
    from support import TcpProxy

    async with TcpProxy.for_url(database_url) as proxy:
        hub = await asyncio.to_thread(hub_factory, {"HUB_DATABASE_URL": proxy.url(database_url)})
        assert (await http_push(hub, token_for(user), "d1", "warm")).status_code == 200
        proxy.answer_delay_s = 0.2
        answered = 0

        async def forged() -> None:
            nonlocal answered
            r = await call(hub, "GET", "/v1/sync/status", make_api_key()[1])
            assert r.status_code == 401, r.text
            answered += 1

        async with statements_ran(database_url, "%FROM hub_api_keys WHERE id%") as ran:
            flood = [asyncio.ensure_future(forged()) for _ in range(40)]
            await wait_for(ran, timeout=5, interval=0.005)
        r = await http_push(hub, token_for(user), "d1", "r1")
        assert r.status_code == 200, r.text
        assert answered < 20, f"the push waited for {answered} of 40 forged keys' lookups"
        await asyncio.gather(*flood)
