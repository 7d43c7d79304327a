"""End-to-end tests of the HTTP API of PROTOCOL.md against a real hub process.

Every test talks to ``shared_hub`` (one real process on a real PostgreSQL) over
HTTP, in users of its own, and checks the wire contract: authentication,
validation of pushes (a rejected push writes nothing), idempotency keys, the
merge rules as seen through push and pull, isolation between users, pull
paging, status, health, and the hub's behaviour towards clients that hang up.
Every token sent is checked against the hub's log afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
import pytest
from support import JWT_SECRET, HubProcess, new_user, token_for, wait_for

BASE_MS = 1732185600000  # a fixed past instant: stamps built on it never trip the skew check
MIB = 1024 * 1024
MAX_BODY = 10 * MIB
PROTOCOL_CODES = {
    "bad_request",
    "invalid_change",
    "clock_skew",
    "unauthorized",
    "token_expired",
    "forbidden",
    "not_found",
    "payload_too_large",
    "idempotency_key_reused",
    "reset_required",
    "rate_limited",
    "unavailable",
    "internal",
}

# Every token this module sends; after each test the hub's log must hold none of them.
SENT_TOKENS: list[str] = []


# -- helpers ---------------------------------------------------------------


def stamp(n: int, node: str = "d1", counter: int = 0) -> str:
    return f"{BASE_MS + n:013d}-{counter:04d}-{node}"


def now_stamp(ahead_ms: int = 0, node: str = "d1") -> str:
    return f"{time.time_ns() // 1_000_000 + ahead_ms:013d}-0000-{node}"


def upsert(record_id: str, fields: dict[str, tuple[Any, str]], collection: str = "todos") -> dict:
    return {
        "collection": collection,
        "id": record_id,
        "op": "upsert",
        "fields": {name: {"value": value, "hlc": hlc} for name, (value, hlc) in fields.items()},
    }


def delete(record_id: str, hlc: str, collection: str = "todos") -> dict:
    return {"collection": collection, "id": record_id, "op": "delete", "hlc": hlc}


def bearer(token: str) -> dict[str, str]:
    SENT_TOKENS.append(token)
    return {"Authorization": f"Bearer {token}"}


def auth(user: str) -> dict[str, str]:
    return bearer(token_for(user))


@asynccontextmanager
async def client(hub: HubProcess, user: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = auth(user) if user is not None else {}
    async with httpx.AsyncClient(base_url=hub.url, headers=headers, timeout=10) as http:
        yield http


def push_body(changes: list[dict], device: str = "d1") -> bytes:
    return orjson.dumps({"device": device, "changes": changes})


async def post_push(
    http: httpx.AsyncClient, body: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await http.post(
        "/v1/sync/push",
        content=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


async def push(
    http: httpx.AsyncClient, changes: list[dict], device: str = "d1", **headers: str
) -> httpx.Response:
    return await post_push(http, push_body(changes, device), headers)


async def push_ok(http: httpx.AsyncClient, changes: list[dict], device: str = "d1") -> dict:
    r = await push(http, changes, device)
    assert r.status_code == 200, r.text
    assert "idempotent-replay" not in r.headers
    return r.json()


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """The error of a response, checked against PROTOCOL.md's error body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, body
    assert error["code"] in PROTOCOL_CODES
    if code is not None:
        assert error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"]
    return error


async def pull(http: httpx.AsyncClient, **params: Any) -> dict:
    r = await http.get("/v1/sync/pull", params={k: str(v) for k, v in params.items()})
    assert r.status_code == 200, r.text
    page = r.json()
    assert set(page) == {"changes", "cursor", "has_more", "version"}, page
    assert isinstance(page["cursor"], str)
    return page


async def pull_all(
    http: httpx.AsyncClient, since: str = "0", **params: Any
) -> tuple[list[dict], list[dict]]:
    """Follow cursors from ``since`` until ``has_more`` is false: (deltas, pages)."""
    deltas: list[dict] = []
    pages: list[dict] = []
    cursor = since
    for _ in range(10_000):
        page = await pull(http, since=cursor, **params)
        pages.append(page)
        deltas.extend(page["changes"])
        cursor = page["cursor"]
        if not page["has_more"]:
            return deltas, pages
        assert page["changes"], "a page with has_more must hold deltas"
    raise AssertionError("pull never reached the end")


async def status_of(http: httpx.AsyncClient) -> dict:
    r = await http.get("/v1/sync/status")
    assert r.status_code == 200, r.text
    return r.json()


async def assert_untouched(http: httpx.AsyncClient) -> None:
    """The user of ``http`` has nothing stored: no version, no change, no device."""
    page = await pull(http, since="0")
    assert (page["changes"], page["has_more"], page["version"]) == ([], False, 0)
    assert await status_of(http) == {"version": 0, "collections": {}, "devices": []}


def delta(
    record_id: str,
    version: int,
    fields: dict[str, tuple[Any, str]],
    *,
    device: str = "d1",
    collection: str = "todos",
    deleted: bool = False,
    deleted_hlc: str | None = None,
    origin: str | None = None,
    actor: Any = None,
) -> dict:
    """A record delta as PROTOCOL.md spells it."""
    return {
        "collection": collection,
        "id": record_id,
        "version": version,
        "device": device,
        "fields": {name: {"value": v, "hlc": h} for name, (v, h) in fields.items()},
        "deleted": deleted,
        "deleted_hlc": deleted_hlc,
        "origin": origin,
        "actor": actor,
    }


def log_entries(hub: HubProcess, start: int = 0) -> list[dict]:
    """The JSON lines of the hub's log from character ``start`` on."""
    entries = []
    for line in hub.logs()[start:].splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unsigned_token(claims: dict) -> str:
    """A JWT with ``alg: none`` and an empty signature."""
    header = b64(orjson.dumps({"alg": "none", "typ": "JWT"}))
    return f"{header}.{b64(orjson.dumps(claims))}."


@pytest.fixture(autouse=True)
def tokens_stay_out_of_the_log(shared_hub: HubProcess) -> Any:
    first = len(SENT_TOKENS)
    yield
    text = shared_hub.logs() + "\n".join(shared_hub.stdout_lines)
    for token in SENT_TOKENS[first:]:
        assert token not in text, "a token was written to the hub's log"
        signature = token.rsplit(".", 1)[-1]
        if len(signature) >= 16:
            assert signature not in text, "a token's signature was written to the hub's log"
    assert JWT_SECRET not in text


# -- authentication -----------------------------------------------------------

ENDPOINTS = [("POST", "/v1/sync/push"), ("GET", "/v1/sync/pull"), ("GET", "/v1/sync/status")]


def _claims(user: str, **over: Any) -> dict:
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + 3600, **over}
    return {k: v for k, v in claims.items() if v is not None}


def _hs(claims: dict, key: str = JWT_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


OTHER_SECRET = "another-secret-" + "y" * 40

# id -> Authorization header value for a user (None: no header at all)
UNAUTHORIZED: dict[str, Callable[[str], str | None]] = {
    "missing header": lambda u: None,
    "empty header": lambda u: "",
    "basic scheme": lambda u: "Basic dXNlcjpwYXNzd29yZA==",
    "scheme only": lambda u: "Bearer",
    "token without scheme": lambda u: token_for(u),
    "garbage token": lambda u: "Bearer not-a-jwt",
    "three garbage parts": lambda u: "Bearer aaaa.bbbb.cccc",
    "other secret": lambda u: "Bearer " + _hs(_claims(u), OTHER_SECRET),
    "expired, other secret": lambda u: (
        "Bearer " + _hs(_claims(u, exp=int(time.time()) - 3600), OTHER_SECRET)
    ),
    "no sub": lambda u: "Bearer " + _hs(_claims(u, sub=None)),
    "empty sub": lambda u: "Bearer " + _hs(_claims(u, sub="")),
    "sub of 129 chars": lambda u: "Bearer " + _hs(_claims(u, sub="u" * 129)),
    "sub not a string": lambda u: "Bearer " + _hs(_claims(u, sub=12345)),
    "no exp": lambda u: "Bearer " + _hs(_claims(u, exp=None)),
    "exp not a number": lambda u: "Bearer " + _hs(_claims(u, exp="tomorrow")),
    "alg none": lambda u: "Bearer " + unsigned_token(_claims(u)),
    "alg HS384": lambda u: "Bearer " + _hs(_claims(u), alg="HS384"),
}


@pytest.mark.parametrize("case", list(UNAUTHORIZED))
async def test_bad_credentials_get_401_unauthorized(shared_hub, user, case):
    value = UNAUTHORIZED[case](user)
    headers = {} if value is None else {"Authorization": value}
    if value:
        SENT_TOKENS.append(value.removeprefix("Bearer "))
    body = push_body([upsert("t1", {"title": ("a", stamp(1))})])
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as http:
        for method, path in ENDPOINTS:
            content = body if method == "POST" else None
            r = await http.request(method, path, headers=headers, content=content)
            error_of(r, 401, "unauthorized")
            credential = (value or "").removeprefix("Bearer ")
            if len(credential) > 8:
                assert credential not in r.text
    async with client(shared_hub, user) as http:
        await assert_untouched(http)


@pytest.mark.parametrize("how", ["token_for", "pyjwt"])
async def test_expired_token_gets_401_token_expired(shared_hub, user, how):
    if how == "token_for":
        token = token_for(user, ttl_s=-3600)
    else:
        token = _hs(_claims(user, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600))
    body = push_body([upsert("t1", {"title": ("a", stamp(1))})])
    async with httpx.AsyncClient(base_url=shared_hub.url, headers=bearer(token), timeout=10) as h:
        for method, path in ENDPOINTS:
            r = await h.request(method, path, content=body if method == "POST" else None)
            error = error_of(r, 401, "token_expired")
            assert token not in error["message"]
    async with client(shared_hub, user) as http:
        await assert_untouched(http)


async def test_bearer_scheme_is_case_insensitive(shared_hub, user):
    headers = {"Authorization": f"bearer {token_for(user)}"}
    SENT_TOKENS.append(headers["Authorization"].split(" ", 1)[1])
    async with httpx.AsyncClient(base_url=shared_hub.url, headers=headers, timeout=10) as http:
        assert (await status_of(http))["version"] == 0


# -- bad input on push ------------------------------------------------------

GOOD = upsert("good", {"title": ("fine", stamp(1))})


def _body(changes: list[dict], device: str = "d1") -> bytes:
    return push_body(changes, device)


# id -> (body, status, code, words the message must contain)
BAD_PUSHES: dict[str, tuple[Callable[[], bytes], int, str, list[str]]] = {
    "malformed JSON": (lambda: b'{"device": "d1", "changes": [', 400, "bad_request", ["JSON"]),
    "not UTF-8": (lambda: b'{"device": "d1\xff", "changes": []}', 400, "bad_request", []),
    "not an object": (lambda: b"[]", 400, "bad_request", ["object"]),
    "missing device": (
        lambda: orjson.dumps({"changes": [GOOD]}),
        400,
        "bad_request",
        ["device"],
    ),
    "bad device": (lambda: _body([GOOD], "no spaces"), 400, "bad_request", ["device"]),
    "missing changes": (lambda: orjson.dumps({"device": "d1"}), 400, "bad_request", ["changes"]),
    "changes not an array": (
        lambda: orjson.dumps({"device": "d1", "changes": {"0": GOOD}}),
        400,
        "bad_request",
        ["changes"],
    ),
    "change not an object": (lambda: _body([GOOD, "x"]), 400, "invalid_change", ["changes[1]"]),
    "unknown op": (
        lambda: _body([GOOD, {**GOOD, "id": "t2", "op": "patch"}]),
        400,
        "invalid_change",
        ["changes[1]", "op", "patch"],
    ),
    "missing op": (
        lambda: _body([GOOD, {k: v for k, v in GOOD.items() if k != "op"}]),
        400,
        "invalid_change",
        ["changes[1]", "op"],
    ),
    "bad collection name": (
        lambda: _body([GOOD, upsert("t2", {"title": ("a", stamp(1))}, "to dos")]),
        400,
        "invalid_change",
        ["changes[1]", "collection"],
    ),
    "collection name of 65 chars": (
        lambda: _body([GOOD, upsert("t2", {"title": ("a", stamp(1))}, "c" * 65)]),
        400,
        "invalid_change",
        ["changes[1]", "collection"],
    ),
    "record id of 129 chars": (
        lambda: _body([GOOD, upsert("r" * 129, {"title": ("a", stamp(1))})]),
        400,
        "invalid_change",
        ["changes[1]", "id"],
    ),
    "unknown key": (
        lambda: _body([GOOD, {**GOOD, "colour": "red"}]),
        400,
        "invalid_change",
        ["changes[1]", "colour"],
    ),
    "upsert without fields": (
        lambda: _body([GOOD, {**GOOD, "fields": {}}]),
        400,
        "invalid_change",
        ["changes[1]", "fields"],
    ),
    "delete with fields": (
        lambda: _body([GOOD, {**delete("t2", stamp(2)), "fields": GOOD["fields"]}]),
        400,
        "invalid_change",
        ["changes[1]", "fields"],
    ),
    "field name starting with _": (
        lambda: _body([GOOD, upsert("t2", {"_secret": ("a", stamp(1))})]),
        400,
        "invalid_change",
        ["changes[1]", "_secret"],
    ),
    "field without hlc": (
        lambda: _body([GOOD, {**GOOD, "fields": {"title": {"value": "a"}}}]),
        400,
        "invalid_change",
        ["changes[1]", "title"],
    ),
    "malformed stamp": (
        lambda: _body([GOOD, upsert("t2", {"title": ("a", "yesterday")})]),
        400,
        "invalid_change",
        ["changes[1]", "title", "hlc"],
    ),
    "malformed delete stamp": (
        lambda: _body([GOOD, delete("t2", "1732185600123-7-d1")]),
        400,
        "invalid_change",
        ["changes[1]", "hlc"],
    ),
    "bad origin": (
        lambda: _body([GOOD, {**upsert("t2", {"a": (1, stamp(1))}), "origin": "robot"}]),
        400,
        "invalid_change",
        ["changes[1]", "origin"],
    ),
    "actor over 4 KiB": (
        lambda: _body([GOOD, {**upsert("t2", {"a": (1, stamp(1))}), "actor": "a" * 5000}]),
        400,
        "invalid_change",
        ["changes[1]", "actor"],
    ),
    "too many changes": (
        lambda: _body([upsert(f"t{i}", {"n": (i, stamp(1))}) for i in range(1001)]),
        413,
        "payload_too_large",
        ["1001", "1000"],
    ),
    "value over 64 KiB": (
        # encoded with its quotes: 65 537 bytes, one past the limit
        lambda: _body([GOOD, upsert("t2", {"big": ("x" * 65535, stamp(1))})]),
        400,
        "invalid_change",
        ["changes[1]", "big", "65537"],
    ),
    "U+0000 in a string value": (
        lambda: _body([GOOD, upsert("t2", {"title": ("a\x00b", stamp(1))})]),
        400,
        "invalid_change",
        ["changes[1]", "title", "U+0000"],
    ),
    "U+0000 in a nested key": (
        lambda: _body([GOOD, upsert("t2", {"meta": ({"k\x00": [1]}, stamp(1))})]),
        400,
        "invalid_change",
        ["changes[1]", "meta", "U+0000"],
    ),
    "U+0000 in a record id": (
        lambda: _body([GOOD, upsert("t\x002", {"title": ("a", stamp(1))})]),
        400,
        "invalid_change",
        ["changes[1]", "id"],
    ),
    "field stamp 10 minutes ahead": (
        lambda: _body([GOOD, upsert("t2", {"title": ("a", now_stamp(600_000))})]),
        400,
        "clock_skew",
        ["ahead"],
    ),
    "delete stamp 10 minutes ahead": (
        lambda: _body([GOOD, delete("t2", now_stamp(600_000))]),
        400,
        "clock_skew",
        ["ahead"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_PUSHES))
async def test_bad_push_is_rejected_whole(shared_hub, user, case):
    make, status, code, words = BAD_PUSHES[case]
    body = make()
    async with client(shared_hub, user) as http:
        r = await post_push(http, body)
        error = error_of(r, status, code)
        for word in words:
            assert word in error["message"], error
        if code == "clock_skew":
            assert error["details"]["index"] == 1
            assert error["details"]["stamp"] in error["message"]
        await assert_untouched(http)


async def test_rejected_push_leaves_its_idempotency_key_unused(shared_hub, user):
    async with client(shared_hub, user) as http:
        bad = _body([GOOD, {**GOOD, "op": "patch"}])
        error_of(await post_push(http, bad, {"Idempotency-Key": "k1"}), 400, "invalid_change")
        r = await post_push(http, _body([GOOD]), {"Idempotency-Key": "k1"})
        assert r.status_code == 200, r.text
        assert r.json() == {"version": 1, "applied": 1, "ignored": 0}
        assert "idempotent-replay" not in r.headers


async def test_idempotency_key_over_255_chars_is_bad_request(shared_hub, user):
    async with client(shared_hub, user) as http:
        r = await post_push(http, _body([GOOD]), {"Idempotency-Key": "k" * 256})
        assert "Idempotency-Key" in error_of(r, 400, "bad_request")["message"]
        await assert_untouched(http)


async def test_limits_are_inclusive(shared_hub, user):
    """1000 changes, a value of exactly 64 KiB encoded, a stamp 30 s ahead: all accepted."""
    async with client(shared_hub, user) as http:
        many = [upsert(f"t{i:04d}", {"n": (i, stamp(1))}) for i in range(1000)]
        assert await push_ok(http, many) == {"version": 1, "applied": 1000, "ignored": 0}
        exact = "x" * (64 * 1024 - 2)  # plus its two quotes: 65 536 bytes
        assert len(orjson.dumps(exact)) == 64 * 1024
        assert (await push_ok(http, [upsert("big", {"v": (exact, stamp(1))})]))["version"] == 2
        soon = now_stamp(30_000)
        assert (await push_ok(http, [upsert("soon", {"v": (1, soon)})]))["version"] == 3
        # old stamps are never refused: offline devices come back with them
        old = "0946684800000-0000-d1"
        assert (await push_ok(http, [upsert("old", {"v": (1, old)})]))["version"] == 4
        page = await pull(http, since="3", limit=10)
        assert [d["id"] for d in page["changes"]] == ["old"]
        assert page["changes"][0]["fields"]["v"]["hlc"] == old


def body_of_size(size: int) -> bytes:
    """A valid push body of exactly ``size`` bytes (JSON padded with spaces)."""
    body = _body([GOOD])
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def test_body_of_exactly_10_mib_is_accepted(shared_hub, user):
    async with client(shared_hub, user) as http:
        r = await post_push(http, body_of_size(MAX_BODY))
        assert r.status_code == 200, r.text
        assert r.json() == {"version": 1, "applied": 1, "ignored": 0}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_10_mib_is_payload_too_large(shared_hub, user, framing):
    body = body_of_size(MAX_BODY + 1)
    async with client(shared_hub, user) as http:
        if framing == "content-length":
            r = await post_push(http, body)
        else:

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(body), MIB):
                    yield body[i : i + MIB]

            r = await http.post(
                "/v1/sync/push", content=chunks(), headers={"Content-Type": "application/json"}
            )
        error = error_of(r, 413, "payload_too_large")
        assert "body" in error["message"] and str(MAX_BODY) in error["message"]
        await assert_untouched(http)


async def test_values_round_trip(shared_hub, user):
    values = {
        "text": "Grüße, 世界 🌍",
        "empty": "",
        "lookalike": "\\u0000 is six characters here",
        "int": 2**63 - 1,
        "negative": -(2**63),
        "float": 1.5,
        "null": None,
        "true": True,
        "list": [1, "two", [3], {"four": 4}],
        "object": {"b": 1, "a": {"nested": [None, False]}},
        "emptyobj": {},
    }
    async with client(shared_hub, user) as http:
        fields = {name: (value, stamp(1)) for name, value in values.items()}
        change = {**upsert("t1", fields), "origin": "agent", "actor": {"name": "bot", "n": 1}}
        assert await push_ok(http, [change]) == {"version": 1, "applied": 1, "ignored": 0}
        page = await pull(http, since="0")
        assert page["changes"] == [
            delta("t1", 1, fields, origin="agent", actor={"name": "bot", "n": 1})
        ]


@pytest.mark.parametrize(
    "number",
    [
        "123456789012345678901234567890",
        "-9223372036854775809",
        "3.141592653589793238462643",
        "0.1000000000000000055511151231257827",
        "1e-400",
    ],
)
async def test_numbers_round_trip_exactly(shared_hub, user, number):
    body = _body([upsert("t1", {"n": (0, stamp(1))})]).replace(
        b'"value":0', b'"value":' + number.encode()
    )
    async with client(shared_hub, user) as http:
        r = await post_push(http, body)
        assert r.status_code == 200, r.text
        r = await http.get("/v1/sync/pull", params={"since": "0"})
        assert r.status_code == 200
        pulled = json.loads(r.text, parse_float=Decimal, parse_int=Decimal)
        assert pulled["changes"][0]["fields"]["n"]["value"] == Decimal(number)


@pytest.mark.parametrize(
    ("value", "mentions"),
    [
        (b"[" * 1000 + b"1" + b"]" * 1000, "nested"),
        (b"[" * 1000 + b"123456789012345678901234" + b"]" * 1000, "nested"),
        (b"[" + b",".join([b"1e308"] * 250) + b"]", "written out in full"),
    ],
)
async def test_values_past_the_limits_are_refused_not_failed(shared_hub, user, value, mentions):
    # Deep nesting, or numbers that PostgreSQL would write out to over 64 KiB.
    body = _body([upsert("t1", {"n": (0, stamp(1))})]).replace(b'"value":0', b'"value":' + value)
    async with client(shared_hub, user) as http:
        r = await post_push(http, body)
        assert r.status_code == 400, r.text
        assert mentions in r.json()["error"]["message"]
        assert (await pull(http, since="0"))["changes"] == []


# -- idempotency ----------------------------------------------------------


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Idempotency-Key"])
async def test_replay_returns_the_stored_response(shared_hub, user, header):
    body = _body([upsert("t1", {"title": ("a", stamp(1))})])
    async with client(shared_hub, user) as http:
        first = await post_push(http, body, {header: "key-1"})
        assert first.status_code == 200, first.text
        assert first.json() == {"version": 1, "applied": 1, "ignored": 0}
        assert "idempotent-replay" not in first.headers
        second = await post_push(http, body, {header: "key-1"})
        assert second.status_code == 200, second.text
        assert second.json() == first.json()
        assert second.headers["idempotent-replay"] == "true"
        # The stored answer, also after the user moved on; the replay changes nothing.
        assert (await push_ok(http, [upsert("t2", {"title": ("b", stamp(2))})]))["version"] == 2
        third = await post_push(http, body, {header: "key-1"})
        assert third.json() == {"version": 1, "applied": 1, "ignored": 0}
        assert third.headers["idempotent-replay"] == "true"
        deltas, pages = await pull_all(http)
        assert [(d["id"], d["version"]) for d in deltas] == [("t1", 1), ("t2", 2)]
        assert pages[-1]["version"] == 2


async def test_both_key_headers_name_the_same_key(shared_hub, user):
    body = _body([upsert("t1", {"title": ("a", stamp(1))})])
    async with client(shared_hub, user) as http:
        first = await post_push(http, body, {"Idempotency-Key": "same"})
        second = await post_push(http, body, {"X-Idempotency-Key": "same"})
        assert second.status_code == 200, second.text
        assert second.json() == first.json()
        assert second.headers["idempotent-replay"] == "true"
        assert (await pull(http))["version"] == 1


async def test_same_key_with_another_body_is_422_and_writes_nothing(shared_hub, user):
    async with client(shared_hub, user) as http:
        first = _body([upsert("t1", {"title": ("a", stamp(1))})])
        other = _body(
            [upsert("t1", {"title": ("b", stamp(2))}), upsert("t9", {"x": (1, stamp(2))})]
        )
        assert (await post_push(http, first, {"Idempotency-Key": "k"})).status_code == 200
        r = await post_push(http, other, {"Idempotency-Key": "k"})
        error = error_of(r, 422, "idempotency_key_reused")
        assert "k" in error["message"]
        r = await post_push(http, other, {"X-Idempotency-Key": "k"})
        error_of(r, 422, "idempotency_key_reused")
        page = await pull(http)
        assert page["version"] == 1
        assert page["changes"] == [delta("t1", 1, {"title": ("a", stamp(1))})]


async def test_idempotency_keys_are_per_user(shared_hub, user):
    other = new_user()
    body = _body([upsert("t1", {"title": ("a", stamp(1))})])
    async with client(shared_hub, user) as a, client(shared_hub, other) as b:
        assert (await post_push(a, _body([GOOD, GOOD]), {"Idempotency-Key": "k"})).json() == {
            "version": 1,
            "applied": 1,
            "ignored": 1,
        }
        # The same key, another user: neither a replay nor a reuse, but a push of its own.
        r = await post_push(b, body, {"Idempotency-Key": "k"})
        assert r.status_code == 200, r.text
        assert r.json() == {"version": 1, "applied": 1, "ignored": 0}
        assert "idempotent-replay" not in r.headers
        assert [d["id"] for d in (await pull(b))["changes"]] == ["t1"]
        assert [d["id"] for d in (await pull(a))["changes"]] == ["good"]


async def test_concurrent_pushes_with_one_key_commit_once(shared_hub, user):
    body = _body([upsert("t1", {"title": ("a", stamp(1))})])
    async with client(shared_hub, user) as http:
        answers = await asyncio.gather(
            *(post_push(http, body, {"Idempotency-Key": "race"}) for _ in range(8))
        )
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert {r.text for r in answers} == {answers[0].text}
        assert answers[0].json() == {"version": 1, "applied": 1, "ignored": 0}
        fresh = [r for r in answers if "idempotent-replay" not in r.headers]
        assert len(fresh) == 1
        assert all(r.headers.get("idempotent-replay") == "true" for r in answers if r not in fresh)
        assert (await pull(http))["version"] == 1


# -- merge over HTTP ------------------------------------------------------


async def test_newer_stamp_wins_older_and_equal_are_ignored(shared_hub, user):
    async with client(shared_hub, user) as http:
        first = [upsert("t1", {"title": ("a", stamp(10)), "done": (False, stamp(10))})]
        assert await push_ok(http, first) == {"version": 1, "applied": 1, "ignored": 0}
        older = [upsert("t1", {"title": ("old", stamp(5, "d2"))})]
        assert await push_ok(http, older, "d2") == {"version": 1, "applied": 0, "ignored": 1}
        equal = [upsert("t1", {"title": ("same", stamp(10))})]
        assert await push_ok(http, equal) == {"version": 1, "applied": 0, "ignored": 1}
        newer = [upsert("t1", {"title": ("b", stamp(20, "d2"))})]
        assert await push_ok(http, newer, "d2") == {"version": 2, "applied": 1, "ignored": 0}
        # The node breaks a tie of wall clock and counter: "d2" > "d1".
        tie = [upsert("t1", {"done": (True, stamp(10, "d2"))})]
        assert await push_ok(http, tie, "d2") == {"version": 3, "applied": 1, "ignored": 0}
        page = await pull(http)
        assert page["version"] == 3
        assert page["changes"] == [
            delta("t1", 2, {"title": ("b", stamp(20, "d2"))}, device="d2"),
            delta("t1", 3, {"done": (True, stamp(10, "d2"))}, device="d2"),
        ]


async def test_no_op_push_gets_no_version(shared_hub, user):
    change = upsert("t1", {"title": ("a", stamp(1))})
    async with client(shared_hub, user) as http:
        assert await push_ok(http, [change]) == {"version": 1, "applied": 1, "ignored": 0}
        for _ in range(2):
            assert await push_ok(http, [change]) == {"version": 1, "applied": 0, "ignored": 1}
        assert await push_ok(http, []) == {"version": 1, "applied": 0, "ignored": 0}
        assert (await pull(http))["version"] == 1
        # The next push that changes something gets the very next version.
        nxt = [upsert("t2", {"title": ("b", stamp(2))})]
        assert await push_ok(http, nxt) == {"version": 2, "applied": 1, "ignored": 0}
        deltas, _ = await pull_all(http)
        assert [(d["id"], d["version"]) for d in deltas] == [("t1", 1), ("t2", 2)]


async def test_results_count_changes_not_fields(shared_hub, user):
    async with client(shared_hub, user) as http:
        three = upsert("t1", {"a": (1, stamp(10)), "b": (2, stamp(10)), "c": (3, stamp(10))})
        assert await push_ok(http, [three]) == {"version": 1, "applied": 1, "ignored": 0}
        half = upsert("t1", {"a": (9, stamp(5)), "b": (9, stamp(20))})
        stale = upsert("t1", {"c": (9, stamp(1))})
        assert await push_ok(http, [half, stale]) == {"version": 2, "applied": 1, "ignored": 1}
        # Two changes to one record in one push merge in order.
        forward = [upsert("t2", {"x": ("1st", stamp(1))}), upsert("t2", {"x": ("2nd", stamp(2))})]
        assert await push_ok(http, forward) == {"version": 3, "applied": 2, "ignored": 0}
        backward = [upsert("t3", {"x": ("new", stamp(9))}), upsert("t3", {"x": ("old", stamp(8))})]
        assert await push_ok(http, backward) == {"version": 4, "applied": 1, "ignored": 1}
        deltas, _ = await pull_all(http)
        assert deltas == [
            delta("t1", 1, {"a": (1, stamp(10)), "c": (3, stamp(10))}),
            delta("t1", 2, {"b": (9, stamp(20))}),
            delta("t2", 3, {"x": ("2nd", stamp(2))}),
            delta("t3", 4, {"x": ("new", stamp(9))}),
        ]


async def test_delete_then_revive(shared_hub, user):
    async with client(shared_hub, user) as http:
        first = [upsert("t1", {"title": ("a", stamp(10)), "done": (False, stamp(10))})]
        assert await push_ok(http, first) == {"version": 1, "applied": 1, "ignored": 0}
        assert await push_ok(http, [delete("t1", stamp(20, "d2"))], "d2") == {
            "version": 2,
            "applied": 1,
            "ignored": 0,
        }
        # A delete shows as a delta without fields; the fields stamped before it are gone.
        page = await pull(http)
        assert page["changes"] == [
            delta("t1", 2, {}, device="d2", deleted=True, deleted_hlc=stamp(20, "d2"))
        ]
        assert (await status_of(http))["collections"] == {"todos": {"records": 0, "deleted": 1}}
        # An older delete, and a write stamped before the delete, change nothing.
        assert await push_ok(http, [delete("t1", stamp(15))]) == {
            "version": 2,
            "applied": 0,
            "ignored": 1,
        }
        late = [upsert("t1", {"title": ("stale", stamp(19))})]
        assert await push_ok(http, late) == {"version": 2, "applied": 0, "ignored": 1}
        # A write stamped after the delete revives the record, with only that field.
        revive = [upsert("t1", {"title": ("back", stamp(30))})]
        assert await push_ok(http, revive) == {"version": 3, "applied": 1, "ignored": 0}
        deltas, pages = await pull_all(http)
        assert deltas == [
            delta("t1", 2, {}, device="d2", deleted=False, deleted_hlc=stamp(20, "d2")),
            delta("t1", 3, {"title": ("back", stamp(30))}, deleted_hlc=stamp(20, "d2")),
        ]
        assert pages[-1]["version"] == 3
        assert (await status_of(http))["collections"] == {"todos": {"records": 1, "deleted": 0}}
        # From the cursor before the revive, a device sees only the revive.
        page = await pull(http, since="2")
        assert page["changes"] == deltas[1:]


async def test_delete_older_than_the_fields_keeps_the_record(shared_hub, user):
    async with client(shared_hub, user) as http:
        await push_ok(http, [upsert("t1", {"title": ("a", stamp(10))})])
        assert await push_ok(http, [delete("t1", stamp(5))]) == {
            "version": 2,
            "applied": 1,
            "ignored": 0,
        }
        # A delete of a record never seen leaves a tombstone.
        assert await push_ok(http, [delete("ghost", stamp(5))]) == {
            "version": 3,
            "applied": 1,
            "ignored": 0,
        }
        deltas, _ = await pull_all(http)
        assert deltas == [
            delta("t1", 1, {"title": ("a", stamp(10))}, deleted_hlc=stamp(5)),
            delta("t1", 2, {}, deleted_hlc=stamp(5)),
            delta("ghost", 3, {}, deleted=True, deleted_hlc=stamp(5)),
        ]
        assert (await status_of(http))["collections"] == {"todos": {"records": 1, "deleted": 1}}


# -- isolation ---------------------------------------------------------------


async def test_users_never_see_each_other(shared_hub, user):
    other = new_user()
    async with client(shared_hub, user) as a, client(shared_hub, other) as b:
        for i in range(3):
            await push_ok(a, [upsert("t1", {"title": (f"a{i}", stamp(i))})], "a-phone")
        await push_ok(a, [upsert("n1", {"body": ("secret", stamp(1))}, "notes")], "a-phone")
        await assert_untouched(b)
        # The same collection and record ids: B's own version, B's own values.
        r = await push_ok(b, [upsert("t1", {"title": ("b", stamp(0))})], "b-phone")
        assert r == {"version": 1, "applied": 1, "ignored": 0}
        b_deltas, b_pages = await pull_all(b)
        assert b_deltas == [delta("t1", 1, {"title": ("b", stamp(0))}, device="b-phone")]
        assert b_pages[-1]["version"] == 1
        assert await status_of(b) == {
            "version": 1,
            "collections": {"todos": {"records": 1, "deleted": 0}},
            "devices": ["b-phone"],
        }
        a_deltas, a_pages = await pull_all(a)
        assert a_pages[-1]["version"] == 4
        assert a_deltas[0]["fields"]["title"]["value"] == "a2"
        assert {d["device"] for d in a_deltas} == {"a-phone"}
        # B's delete does not reach A's record.
        await push_ok(b, [delete("t1", stamp(100))], "b-phone")
        assert (await pull_all(a))[0] == a_deltas
        assert (await status_of(a))["devices"] == ["a-phone"]


# -- pull ------------------------------------------------------------------


async def test_pull_limit_default_and_bounds(shared_hub, user):
    async with client(shared_hub, user) as http:
        many = [upsert(f"r{i:04d}", {"n": (i, stamp(1))}) for i in range(501)]
        assert await push_ok(http, many) == {"version": 1, "applied": 501, "ignored": 0}
        page = await pull(http)  # since absent: from the beginning, default limit 500
        assert len(page["changes"]) == 500 and page["has_more"] is True
        assert page["version"] == 1
        rest = await pull(http, since=page["cursor"])
        assert len(rest["changes"]) == 1 and rest["has_more"] is False
        ids = [d["id"] for d in page["changes"] + rest["changes"]]
        assert sorted(ids) == [f"r{i:04d}" for i in range(501)]
        assert (await pull(http, since="0", limit=5000))["has_more"] is False
        assert len((await pull(http, since="0", limit=1))["changes"]) == 1
        for bad in ["0", "5001", "-1", "ten", "1.5"]:
            r = await http.get("/v1/sync/pull", params={"limit": bad})
            assert "limit" in error_of(r, 400, "bad_request")["message"], bad


def _cursor(version: int, payload: bytes) -> str:
    return f"{version}.{b64(payload)}"


MALFORMED_CURSORS = [
    "abc",
    "-1",
    "1e3",
    "1" * 19,
    "1.!!",
    _cursor(1, b"not json"),
    _cursor(1, b'["only one"]'),
    _cursor(1, b"[1, 2]"),
    pytest.param(
        _cursor(1, b"5"),
        id="position-is-a-number",
    ),
    pytest.param(
        _cursor(1, b"null"),
        id="position-is-null",
    ),
    pytest.param(
        "\u00b2",
        id="superscript-two",
    ),
    pytest.param(_cursor(1, b'["todos\\u0000","x"]'), id="nul-in-collection"),
    pytest.param(_cursor(1, b'["todos","\\u0000"]'), id="nul-in-id"),
]


@pytest.mark.parametrize("since", MALFORMED_CURSORS)
async def test_malformed_cursor_is_bad_request(shared_hub, user, since):
    async with client(shared_hub, user) as http:
        await push_ok(http, [GOOD])
        r = await http.get("/v1/sync/pull", params={"since": since})
        assert "cursor" in error_of(r, 400, "bad_request")["message"]


async def test_cursor_ahead_of_the_user_is_reset_required(shared_hub, user):
    async with client(shared_hub, user) as http:
        r = await http.get("/v1/sync/pull", params={"since": "1"})
        error_of(r, 410, "reset_required")
        await push_ok(http, [upsert("t1", {"a": (1, stamp(1))})])
        await push_ok(http, [upsert("t1", {"a": (2, stamp(2))})])
        page = await pull(http, since="2")
        assert (page["changes"], page["has_more"], page["version"]) == ([], False, 2)
        for since in ["3", "1000000", _cursor(3, orjson.dumps(["todos", "t1"]))]:
            r = await http.get("/v1/sync/pull", params={"since": since})
            error = error_of(r, 410, "reset_required")
            # Says what happened: not the retention horizon, the server is behind.
            assert "ahead of the user's version (2)" in error["message"]
            assert error["details"] == {"version": 2}


async def test_pull_by_collection(shared_hub, user):
    async with client(shared_hub, user) as http:
        await push_ok(http, [upsert("t1", {"a": (1, stamp(1))})])
        await push_ok(http, [upsert("n1", {"a": (2, stamp(1))}, "notes")])
        await push_ok(http, [upsert("t2", {"a": (3, stamp(1))}), delete("n2", stamp(1), "notes")])
        page = await pull(http, collection="notes")
        assert [(d["collection"], d["id"], d["version"]) for d in page["changes"]] == [
            ("notes", "n1", 2),
            ("notes", "n2", 3),
        ]
        assert page["version"] == 3 and page["has_more"] is False
        deltas, pages = await pull_all(http, collection="todos", limit=1)
        assert [(d["collection"], d["id"]) for d in deltas] == [("todos", "t1"), ("todos", "t2")]
        assert all(p["version"] == 3 for p in pages)
        assert (await pull(http, collection="nothing"))["changes"] == []
        r = await http.get("/v1/sync/pull", params={"collection": "no such"})
        assert "collection" in error_of(r, 400, "bad_request")["message"]


def _reference(pushes: list[list[dict]]) -> dict[tuple[str, str], tuple[dict, str | None]]:
    """PROTOCOL.md's merge over the pushed changes: (visible fields, delete stamp) per record."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for changes in pushes:
        for c in changes:
            rec = records.setdefault((c["collection"], c["id"]), {"fields": {}, "del": None})
            if c["op"] == "delete":
                if rec["del"] is None or c["hlc"] > rec["del"]:
                    rec["del"] = c["hlc"]
                continue
            for name, spec in c["fields"].items():
                old = rec["fields"].get(name)
                if (rec["del"] is None or spec["hlc"] > rec["del"]) and (
                    old is None or spec["hlc"] > old[1]
                ):
                    rec["fields"][name] = (spec["value"], spec["hlc"])
    return {key: _visible(rec["fields"], rec["del"]) for key, rec in records.items()}


def _visible(fields: dict[str, tuple[Any, str]], deleted_hlc: str | None) -> tuple[dict, Any]:
    cut = deleted_hlc or ""
    return {n: f for n, f in fields.items() if f[1] > cut}, deleted_hlc


def _replay(deltas: list[dict]) -> dict[tuple[str, str], tuple[dict, str | None]]:
    """The state a device builds from pulled deltas."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for d in deltas:
        rec = records.setdefault((d["collection"], d["id"]), {"fields": {}, "del": None})
        if d["deleted_hlc"] is not None and (rec["del"] is None or d["deleted_hlc"] > rec["del"]):
            rec["del"] = d["deleted_hlc"]
        for name, spec in d["fields"].items():
            old = rec["fields"].get(name)
            if old is None or spec["hlc"] > old[1]:
                rec["fields"][name] = (spec["value"], spec["hlc"])
    return {key: _visible(rec["fields"], rec["del"]) for key, rec in records.items()}


async def test_following_cursors_yields_every_delta_once(shared_hub, user):
    ids = ["a", "B", "_x", "é", "z", "a.b", "Z-1", "ü", "0"]
    pushes = [
        [upsert(i, {"title": (i, stamp(1)), "done": (False, stamp(1))}) for i in ids],
        [upsert("n1", {"body": ("x", stamp(2))}, "notes"), upsert("a", {"title": ("A", stamp(3))})],
        [delete("B", stamp(4)), delete("n1", stamp(1), "notes"), delete("gone", stamp(4))],
        [upsert(f"bulk{i:02d}", {"n": (i, stamp(5))}, "bulk") for i in range(30)],
        [upsert("B", {"title": ("back", stamp(6))}), upsert("é", {"done": (True, stamp(6))})],
        [upsert("z", {"title": ("stale", stamp(0))})],  # ignored: gets no version
        [delete("ü", stamp(7)), upsert("ü", {"done": (True, stamp(8))})],
    ]
    async with client(shared_hub, user) as http:
        for i, changes in enumerate(pushes):
            await push_ok(http, changes, device=f"dev{i % 3}")
        version = (await status_of(http))["version"]
        assert version == 6
        expected = _reference(pushes)
        everything, _ = await pull_all(http, limit=5000)
        reference_keys = [(d["collection"], d["id"], d["version"]) for d in everything]
        for limit in [1, 2, 3, 7, 29, 30, 31, 500]:
            deltas, pages = await pull_all(http, limit=limit)
            keys = [(d["collection"], d["id"], d["version"]) for d in deltas]
            assert len(keys) == len(set(keys)), f"limit={limit}: a delta came twice"
            assert keys == reference_keys, f"limit={limit}"
            assert all(len(p["changes"]) <= limit for p in pages)
            assert all(p["version"] == version for p in pages)
            assert [d["version"] for d in deltas] == sorted(d["version"] for d in deltas)
            assert _replay(deltas) == expected, f"limit={limit}"
            # Every delta carries the record's deletion state now.
            for d in deltas:
                fields, deleted_hlc = expected[(d["collection"], d["id"])]
                assert d["deleted_hlc"] == deleted_hlc
                assert d["deleted"] == (deleted_hlc is not None and not fields)
        # At the end: an empty page; then only what comes later.
        end = pages[-1]["cursor"]
        page = await pull(http, since=end)
        assert (page["changes"], page["has_more"], page["version"]) == ([], False, version)
        await push_ok(http, [upsert("late", {"t": (1, stamp(9))})])
        page = await pull(http, since=end)
        assert [(d["id"], d["version"]) for d in page["changes"]] == [("late", version + 1)]


# -- status -------------------------------------------------------------------


async def test_status_counts_live_and_deleted_records(shared_hub, user):
    async with client(shared_hub, user) as http:
        assert await status_of(http) == {"version": 0, "collections": {}, "devices": []}
        three = [upsert(f"t{i}", {"title": (i, stamp(1))}) for i in (1, 2, 3)]
        await push_ok(http, three, "phone")
        await push_ok(http, [upsert("n1", {"body": ("x", stamp(1))}, "notes")], "laptop")
        await push_ok(http, [delete("t2", stamp(2)), delete("t3", stamp(2))], "tablet")
        await push_ok(http, [upsert("t3", {"title": ("back", stamp(3))})], "phone")
        await push_ok(http, [delete("ghost", stamp(2), "notes")], "laptop")
        status = await status_of(http)
        assert set(status) == {"version", "collections", "devices"}
        assert status["version"] == 5
        assert status["collections"] == {
            "todos": {"records": 2, "deleted": 1},
            "notes": {"records": 1, "deleted": 1},
        }
        assert sorted(status["devices"]) == ["laptop", "phone", "tablet"]


# -- health, routing --------------------------------------------------------


async def test_health(shared_hub):
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as http:
        r = await http.get("/health")
        assert r.status_code == 200, r.text
        body = r.json()
        assert {"status", "checks", "connections", "users_online", "uptime_s", "version"} <= set(
            body
        )
        assert body["status"] == "ok"
        assert body["checks"]["postgres"]["ok"] is True
        assert "broker" in body["checks"]
        # No credential needed, and a bad one does not matter.
        r = await http.get("/health", headers={"Authorization": "Bearer nonsense"})
        assert r.status_code == 200
        r = await http.get("/health/live")
        assert r.status_code == 200


@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("POST", "/v1/sync/nope")])
async def test_unknown_path_is_404_not_found(shared_hub, user, method, path):
    async with client(shared_hub, user) as http:
        r = await http.request(method, path)
        assert path in error_of(r, 404, "not_found")["message"]


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/sync/push"),
        ("POST", "/v1/sync/pull"),
        ("DELETE", "/v1/sync/status"),
        ("POST", "/health"),
    ],
)
async def test_wrong_method_is_405_with_the_error_body(shared_hub, user, method, path):
    async with client(shared_hub, user) as http:
        r = await http.request(method, path)
        assert method in error_of(r, 405)["message"]


# -- clients that hang up, and the log ----------------------------------------


async def _send_and_hang_up(hub: HubProcess, user: str, body: bytes, declared: int) -> None:
    token = token_for(user)
    SENT_TOKENS.append(token)
    url = urlsplit(hub.url)
    assert url.hostname is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = (
        "POST /v1/sync/push HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n"
        "\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def _errors(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e.get("level") in ("error", "critical")]


async def test_client_hanging_up_mid_body_is_not_an_error(shared_hub, user):
    start = len(shared_hub.logs())
    body = _body([upsert("t1", {"title": ("a", stamp(1))})])
    await _send_and_hang_up(shared_hub, user, body[:20], declared=1000)

    def hub_saw_it() -> list[dict]:
        return [e for e in log_entries(shared_hub, start) if e.get("path") == "/v1/sync/push"]

    seen = await wait_for(hub_saw_it)
    assert all(e["level"] not in ("error", "critical") for e in seen), seen
    assert _errors(log_entries(shared_hub, start)) == []
    async with client(shared_hub, user) as http:
        assert (await http.get("/health/live")).status_code == 200
        await assert_untouched(http)
        assert await push_ok(http, [GOOD]) == {"version": 1, "applied": 1, "ignored": 0}
    assert _errors(log_entries(shared_hub, start)) == []


async def test_client_hanging_up_before_the_answer_is_not_an_error(shared_hub, user):
    start = len(shared_hub.logs())
    body = _body([upsert("t1", {"title": ("a", stamp(1))})])
    await _send_and_hang_up(shared_hub, user, body, declared=len(body))
    async with client(shared_hub, user) as http:
        # The whole push arrived, so it commits although nobody reads the answer.
        await wait_for(lambda: _version_is(http, 1))
        assert (await http.get("/health/live")).status_code == 200
        assert await push_ok(http, [GOOD]) == {"version": 2, "applied": 1, "ignored": 0}
    assert _errors(log_entries(shared_hub, start)) == []


async def _version_is(http: httpx.AsyncClient, version: int) -> bool:
    return (await pull(http))["version"] == version


async def test_tokens_never_reach_the_log(shared_hub, user):
    """Requests that make the hub log (errors, hang-ups) with tokens good and bad."""
    start = len(shared_hub.logs())
    good = token_for(user)
    expired = token_for(user, ttl_s=-3600)
    foreign = _hs(_claims(user), OTHER_SECRET)
    body = _body([GOOD])
    for token in (good, expired, foreign):
        async with httpx.AsyncClient(
            base_url=shared_hub.url, headers=bearer(token), timeout=10
        ) as http:
            await post_push(http, body, {"Idempotency-Key": "k"})
            await post_push(http, b"{not json", {"Idempotency-Key": "k"})
            await http.get("/v1/sync/pull", params={"since": "garbage"})
            await http.get("/v1/sync/status")
            await http.get("/nope")
    await _send_and_hang_up(shared_hub, user, body[:10], declared=len(body))
    await wait_for(
        lambda: any(e.get("path") == "/v1/sync/push" for e in log_entries(shared_hub, start))
    )
    text = shared_hub.logs()
    for token in (good, expired, foreign):
        assert token not in text
        assert token.rsplit(".", 1)[-1] not in text
