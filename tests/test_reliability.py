"""Fault injection against real hub processes: PostgreSQL stopped hard under
traffic, acks lost on cut connections, hostile input, idle and half-sent
sockets, message floods, and device clocks that are wrong.

Each test that measures delivery prints one line ``RELIABILITY <test>: ...``
with its counts (pushed, acked, lost, duplicates); run with ``-s`` to see
them. docs/RELIABILITY.md quotes them.

Other faults are covered elsewhere: a Redis restart
(test_realtime.py::test_fan_out_resumes_after_a_redis_restart), a killed
pub/sub connection (test_broker.py), the health
checks (test_ops.py), a hub killed under a writing client
(test_client.py::test_a_killed_hub_loses_no_acked_push).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    HubProcess,
    ThrowawayPostgres,
    change,
    connect,
    new_user,
    spawn_hub,
    stamp,
    token_for,
    wait_for,
)
from websockets.exceptions import ConnectionClosed

from hub.client import HubClient

STATUS_OF = {
    "bad_request": 400,
    "invalid_change": 400,
    "clock_skew": 400,
    "unauthorized": 401,
    "token_expired": 401,
    "forbidden": 403,
    "not_found": 404,
    "payload_too_large": 413,
    "idempotency_key_reused": 422,
    "reset_required": 410,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
}
CLIENT_ERROR_CODES = {code for code, status in STATUS_OF.items() if status < 500}


def report(test: str, **counts: Any) -> None:
    """The measured counts of a test, on one line."""
    print(f"RELIABILITY {test}: " + " ".join(f"{k}={v}" for k, v in counts.items()))


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user)}"}


def push_body(changes: list[dict[str, Any]], device: str = "dev") -> bytes:
    return orjson.dumps({"device": device, "changes": changes})


async def pull_all(http: httpx.AsyncClient, user: str) -> tuple[list[dict[str, Any]], int]:
    """Every delta of ``user`` by following cursors from 0; and the user's version."""
    deltas: list[dict[str, Any]] = []
    since = "0"
    for _ in range(1000):
        r = await http.get("/v1/sync/pull", params={"since": since}, headers=auth(user))
        assert r.status_code == 200, r.text
        body = r.json()
        deltas.extend(body["changes"])
        since = body["cursor"]
        if not body["has_more"]:
            return deltas, body["version"]
    raise AssertionError("pull did not end")


async def version_of(http: httpx.AsyncClient, user: str) -> int:
    r = await http.get("/v1/sync/status", headers=auth(user))
    assert r.status_code == 200, r.text
    version: int = r.json()["version"]
    return version


def assert_error_body(r: httpx.Response, code: str | None = None) -> str:
    """``r`` carries PROTOCOL.md's error body with a known code matching its status."""
    body = r.json()
    assert set(body) == {"error"}, r.text
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, r.text
    assert isinstance(error["message"], str)
    assert STATUS_OF.get(error["code"]) == r.status_code, (r.status_code, r.text)
    if code is not None:
        assert error["code"] == code, r.text
    return str(error["code"])


def host_port(hub: HubProcess) -> tuple[str, int]:
    host, port = hub.url.removeprefix("http://").split(":")
    return host, int(port)


def closed_port_url() -> str:
    """A URL where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}"


def log_errors(hub: HubProcess) -> list[dict[str, Any]]:
    """Entries of the hub's JSON log at level error or worse."""
    found = []
    for line in hub.logs().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                found.append(entry)
    return found


# -- 1. PostgreSQL stopped hard under traffic -----------------------------------------


class Writer:
    """Pushes one new record per push over HTTP, each with its own Idempotency-Key,
    and retries a push (same key, same body) until it is acked, honouring
    Retry-After; counts what happens."""

    def __init__(self, http: httpx.AsyncClient, user: str) -> None:
        self.http = http
        self.user = user
        self.acked: dict[int, dict[str, Any]] = {}  # push number -> its answer
        self.bodies: dict[int, bytes] = {}
        self.pushed = 0
        self.attempts = 0
        self.unavailable = 0
        self.replays = 0
        self.transport_errors = 0
        self.slowest_unavailable_s = 0.0
        self.other: list[tuple[int, str]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            await self.push_until_acked(i)
            i += 1

    async def push_until_acked(self, i: int) -> None:
        key = f"k-{i}"
        body = push_body([change(f"r{i}", stamp(node="writer"), n=i)], device="writer")
        self.bodies[i] = body
        self.pushed += 1
        while True:
            self.attempts += 1
            started = time.monotonic()
            try:
                r = await self.http.post(
                    "/v1/sync/push",
                    content=body,
                    headers={**auth(self.user), "Idempotency-Key": key},
                )
            except httpx.TransportError:
                self.transport_errors += 1
                await asyncio.sleep(0.2)
                continue
            if r.status_code == 200:
                if r.headers.get("Idempotent-Replay") == "true":
                    self.replays += 1
                self.acked[i] = r.json()
                return
            if r.status_code == 503:
                assert_error_body(r, "unavailable")
                self.unavailable += 1
                self.slowest_unavailable_s = max(
                    self.slowest_unavailable_s, time.monotonic() - started
                )
                await asyncio.sleep(int(r.headers["Retry-After"]))
                continue
            self.other.append((r.status_code, r.text))
            raise AssertionError(f"push {i}: unexpected {r.status_code} {r.text}")


async def test_postgres_stopped_hard_under_traffic_loses_and_doubles_nothing(tmp_path: Path):
    with ThrowawayPostgres() as pg:
        hub = spawn_hub({"HUB_DATABASE_URL": pg.url}, tmp_path)
        try:
            await _postgres_outage(hub, pg)
        finally:
            hub.stop()


async def _postgres_outage(hub: HubProcess, pg: ThrowawayPostgres) -> None:
    user, probe_user = new_user(), new_user()
    pid = hub.proc.pid
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
        writer = Writer(http, user)
        probe = await connect(hub, probe_user, "probe")  # connected while the database is up
        writing = asyncio.ensure_future(writer.run())
        try:
            await wait_for(lambda: len(writer.acked) >= 20 or writing.done(), timeout=15)
            pg.stop()  # pg_ctl stop -m immediate, with pushes in flight
            stopped_at = time.monotonic()

            # HTTP: 503 unavailable with Retry-After, promptly.
            started = time.monotonic()
            r = await http.post(
                "/v1/sync/push",
                content=push_body([change("p1", stamp(node="probe"), n=1)], device="probe"),
                headers={**auth(probe_user), "Idempotency-Key": "probe-1"},
            )
            http_answer_s = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert_error_body(r, "unavailable")
            assert int(r.headers["Retry-After"]) >= 1
            assert http_answer_s < 5.0, http_answer_s

            # WebSocket: error unavailable, with retry_after, and the connection stays.
            ws_changes = [change("p2", stamp(node="probe"), n=2)]
            started = time.monotonic()
            answer = await probe.push(ws_changes, mid="probe-ws-1")
            ws_answer_s = time.monotonic() - started
            assert answer["type"] == "error" and answer["code"] == "unavailable", answer
            assert answer["retry_after"] > 0 and answer["id"] == "probe-ws-1", answer
            assert ws_answer_s < 5.0, ws_answer_s
            await probe.send({"type": "ping"})
            assert await probe.expect("pong") == {"type": "pong"}

            # The writer keeps being refused, not hung, while the database is down.
            await wait_for(lambda: writer.unavailable >= 2, timeout=15)
            outage_s = time.monotonic() - stopped_at
            pg.start()

            # The same process recovers its pool: pushes succeed again.
            acked_at_restart = len(writer.acked)
            await wait_for(lambda: len(writer.acked) >= acked_at_restart + 20, timeout=30)
            writer.stop.set()
            await asyncio.wait_for(writing, 15)
        finally:
            writer.stop.set()
            if not writing.done():
                writing.cancel()
        assert hub.proc.poll() is None and hub.proc.pid == pid

        # The probe's refused pushes, retried with their keys, apply once.
        r = await http.post(
            "/v1/sync/push",
            content=push_body([change("p1", stamp(node="probe"), n=1)], device="probe"),
            headers={**auth(probe_user), "Idempotency-Key": "probe-1"},
        )
        assert r.status_code == 200, r.text
        answer = await probe.push(ws_changes, mid="probe-ws-1")
        assert answer["type"] == "ack", answer
        await probe.close()
        probe_deltas, probe_version = await pull_all(http, probe_user)
        assert sorted(d["id"] for d in probe_deltas) == ["p1", "p2"]
        assert probe_version == 2

        # Every acked push is there exactly once, with the version it was acked with.
        deltas, version = await pull_all(http, user)
        by_record = Counter(d["id"] for d in deltas)
        versions = [d["version"] for d in deltas]
        duplicates = sum(n - 1 for n in by_record.values()) + len(versions) - len(set(versions))
        lost = [i for i in writer.acked if by_record[f"r{i}"] == 0]
        assert duplicates == 0 and lost == []
        assert len(deltas) == len(writer.acked) == writer.pushed
        assert sorted(versions) == list(range(1, version + 1))  # consecutive, no gaps
        for d in deltas:
            i = int(d["id"][1:])
            assert writer.acked[i]["version"] == d["version"], (i, writer.acked[i], d)
            assert d["fields"]["n"]["value"] == i
        # Replaying acked keys now changes nothing and answers the same.
        for i in sorted(writer.acked)[:: max(1, len(writer.acked) // 10)]:
            r = await http.post(
                "/v1/sync/push",
                content=writer.bodies[i],
                headers={**auth(user), "Idempotency-Key": f"k-{i}"},
            )
            assert r.status_code == 200 and r.headers.get("Idempotent-Replay") == "true"
            assert r.json() == writer.acked[i]
        assert await version_of(http, user) == version
        assert writer.other == []
        report(
            "postgres_stopped_hard",
            pushed=writer.pushed,
            attempts=writer.attempts,
            unavailable_503=writer.unavailable,
            transport_errors=writer.transport_errors,
            acked=len(writer.acked),
            acked_as_replay=writer.replays,
            lost=len(lost),
            duplicates=duplicates,
            final_version=version,
            outage_s=f"{outage_s:.1f}",
            http_503_in_s=f"{http_answer_s:.2f}",
            ws_unavailable_in_s=f"{ws_answer_s:.2f}",
            slowest_503_s=f"{writer.slowest_unavailable_s:.2f}",
        )


async def test_pulls_during_a_postgres_outage_get_unavailable(tmp_path: Path):
    with ThrowawayPostgres() as pg:
        hub = spawn_hub({"HUB_DATABASE_URL": pg.url}, tmp_path)
        try:
            user = new_user()
            device = await connect(hub, user, "d1")
            pg.stop()
            async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
                r = await http.get("/v1/sync/pull", headers=auth(user))
            http_answer = (r.status_code, r.json()["error"]["code"], "Retry-After" in r.headers)
            await device.send({"type": "pull", "id": "p-1"})
            try:
                message = await device.recv(timeout=5)
                ws_answer = (message["type"], message.get("code"))
            except TimeoutError:
                ws_answer = ("no answer within 5 s", None)
            await device.close()
            pg.start()
        finally:
            hub.stop()
    assert (http_answer, ws_answer) == ((503, "unavailable", True), ("error", "unavailable"))


async def test_server_processes_terminated_under_traffic_get_unavailable_not_internal(
    hub_factory, database_url
):
    # An operator (or a failover) terminates the hub's PostgreSQL connections
    # every 50 ms while four clients push: each push is acked or answered
    # 503 unavailable (retry), never 500 internal. A connection whose server
    # process went away mid-statement is not handed out again.
    import asyncpg

    hub = hub_factory()
    codes: Counter[str] = Counter()
    stop = time.monotonic() + 3

    async def push_until_stopped() -> None:
        user = new_user()
        async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
            n = 0
            while time.monotonic() < stop:
                n += 1
                r = await http.post(
                    "/v1/sync/push",
                    json={"device": "d", "changes": [change(f"t{n}", stamp(), n=n)]},
                    headers=auth(user),
                )
                codes["ok" if r.status_code == 200 else r.json()["error"]["code"]] += 1

    async def terminate_until_stopped() -> None:
        con = await asyncpg.connect(database_url)
        try:
            while time.monotonic() < stop:
                await con.execute(
                    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                       WHERE application_name = 'hub' AND datname = current_database()"""
                )
                await asyncio.sleep(0.05)
        finally:
            await con.close()

    await asyncio.gather(terminate_until_stopped(), *(push_until_stopped() for _ in range(4)))
    assert set(codes) <= {"ok", "unavailable"} and codes["ok"] > 0, codes


# -- 2. Lost acks -------------------------------------------------------------------------


async def test_an_http_ack_lost_on_a_reset_connection_is_replayed(shared_hub: HubProcess):
    user = new_user()
    body = push_body([change("t1", stamp(node="dev"), title="milk")])
    key = "lost-" + secrets.token_hex(4)
    host, port = host_port(shared_hub)
    head = (
        "POST /v1/sync/push HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {token_for(user)}\r\n"
        f"Idempotency-Key: {key}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(head + body)
        # Cut hard (RST) before any answer can be read: the ack is lost.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as http:

        async def committed() -> bool:
            return await version_of(http, user) == 1

        await wait_for(committed)
        answers = []
        for _ in range(2):
            r = await http.post(
                "/v1/sync/push", content=body, headers={**auth(user), "Idempotency-Key": key}
            )
            assert r.status_code == 200, r.text
            assert r.headers.get("Idempotent-Replay") == "true"
            answers.append(r.json())
        assert answers == [{"version": 1, "applied": 1, "ignored": 0}] * 2
        deltas, version = await pull_all(http, user)
    assert [(d["id"], d["version"]) for d in deltas] == [("t1", 1)] and version == 1
    report("http_lost_ack", pushed=1, acked=1, retries=2, replays=2, lost=0, duplicates=0)


async def test_an_http_ack_lost_to_a_client_read_timeout_is_replayed(shared_hub: HubProcess):
    """A client that gives up waiting (here: a read timeout far too short for a
    commit) retries with the same key until it gets an answer."""
    user = new_user()
    body = push_body([change(f"t{i}", stamp(node="dev"), n=i) for i in range(200)])
    key = "timeout-" + secrets.token_hex(4)
    timeouts = 0
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as http:
        impatient = httpx.Timeout(10, read=0.0005)
        with contextlib.suppress(httpx.ReadTimeout):
            await http.post(
                "/v1/sync/push",
                content=body,
                headers={**auth(user), "Idempotency-Key": key},
                timeout=impatient,
            )
            pytest.skip("the commit answered within 0.5 ms; no ack was lost")
        timeouts += 1

        async def committed() -> bool:
            return await version_of(http, user) == 1

        await wait_for(committed)
        r = await http.post(
            "/v1/sync/push", content=body, headers={**auth(user), "Idempotency-Key": key}
        )
        assert r.status_code == 200, r.text
        assert r.headers.get("Idempotent-Replay") == "true"
        assert r.json() == {"version": 1, "applied": 200, "ignored": 0}
        deltas, version = await pull_all(http, user)
    assert len(deltas) == 200 and {d["version"] for d in deltas} == {1} and version == 1
    report("http_read_timeout", pushed=1, timeouts=timeouts, acked=1, lost=0, duplicates=0)


async def test_a_websocket_ack_lost_on_a_cut_connection_is_replayed(shared_hub: HubProcess):
    user = new_user()
    changes = [change("t1", stamp(node="phone"), title="milk"), change("t2", stamp(node="phone"))]
    changes[1]["fields"] = {"title": {"value": "bread", "hlc": stamp(node="phone")}}
    first = await connect(shared_hub, user, "phone")
    await first.send({"type": "push", "id": "m-1", "changes": changes})
    first.ws.transport.abort()  # gone before the ack: it is never read
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as http:

        async def committed() -> bool:
            return await version_of(http, user) == 1

        await wait_for(committed)
        again = await connect(shared_hub, user, "phone")
        ack = await again.push(changes, mid="m-1")
        assert ack == {
            "type": "ack",
            "id": "m-1",
            "version": 1,
            "applied": 2,
            "ignored": 0,
            "replay": True,
        }
        await again.send({"type": "ping"})
        assert await again.expect("pong") == {"type": "pong"}
        await again.close()
        deltas, version = await pull_all(http, user)
    assert sorted((d["id"], d["version"]) for d in deltas) == [("t1", 1), ("t2", 1)]
    assert version == 1
    report("ws_lost_ack", pushed=1, acked=1, replays=1, lost=0, duplicates=0)


# -- 3. Hostile input ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[HubProcess]:
    """One hub for the fuzzing, with rate limits out of the way."""
    hub = spawn_hub(
        {
            "HUB_DATABASE_URL": database_url,
            "HUB_RATE_MESSAGES_PER_S": "100000",
            "HUB_RATE_PUSHES_PER_S": "100000",
            "HUB_RATE_REQUESTS_PER_S": "100000",
        },
        tmp_path_factory.mktemp("fuzz"),
    )
    yield hub
    hub.stop()


NAMES = st.sampled_from(["todos", "t1", "", "_x", "a" * 65, "é", "x.y-z", "\x00", "0"])
STAMPS = st.one_of(
    st.builds(lambda: stamp(node="fz")),
    st.sampled_from(["", "1-2-3", "9999999999999-0000-x", "0000000000000-0000-x", "x" * 200]),
    st.text(max_size=30),
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELD = st.fixed_dictionaries({"value": JSON, "hlc": STAMPS}) | JSON
CHANGE = st.fixed_dictionaries(
    {
        "collection": NAMES | JSON,
        "id": NAMES | JSON,
        "op": st.sampled_from(["upsert", "delete", "x"]),
    },
    optional={
        "fields": st.dictionaries(NAMES | st.text(max_size=10), FIELD, max_size=3) | JSON,
        "hlc": STAMPS,
        "actor": JSON,
        "origin": st.sampled_from(["user", "agent", "robot"]) | JSON,
        "feilds": JSON,
    },
)
PUSH = st.fixed_dictionaries(
    {},
    optional={
        "device": st.sampled_from(["d1", "", "bad device"]) | JSON,
        "changes": st.lists(CHANGE, max_size=4) | JSON,
    },
)
GOOD_CHANGE = st.builds(
    lambda record, value: change(record, stamp(node="fz"), n=value),
    st.sampled_from(["a", "b", "c"]),
    JSON,
)
NEAR_GOOD_PUSH = st.fixed_dictionaries(
    {"device": st.just("d1"), "changes": st.lists(GOOD_CHANGE | CHANGE, max_size=4)}
)
HTTP_BODY = st.one_of(
    NEAR_GOOD_PUSH.map(orjson.dumps),
    PUSH.map(orjson.dumps),
    JSON.map(orjson.dumps),
    st.binary(max_size=300),
)
PULL_PARAMS = st.dictionaries(
    st.sampled_from(["since", "limit", "collection", "x", ""]) | st.text(max_size=5),
    st.text(max_size=40)
    | st.integers().map(str)
    | st.sampled_from(["0", "-1", "5001", "1:todos:t1"]),
    max_size=4,
)


def test_fuzzed_http_pushes_and_pulls_get_4xx_or_success_never_5xx(fuzz_hub: HubProcess):
    user = new_user()
    counts: Counter[str] = Counter()
    with httpx.Client(base_url=fuzz_hub.url, timeout=10) as http:

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=HTTP_BODY, key=st.none() | st.text(min_size=1, max_size=40))
        def push(body: bytes, key: str | None) -> None:
            headers = auth(user)
            if key is not None and key.isprintable() and key.isascii() and key.strip() == key:
                headers["Idempotency-Key"] = key
            r = http.post("/v1/sync/push", content=body, headers=headers)
            if r.status_code == 200:
                assert set(r.json()) == {"version", "applied", "ignored"}, r.text
                counts["push 200"] += 1
            else:
                counts[f"push {r.status_code} " + assert_error_body(r)] += 1
                assert r.status_code < 500, r.text

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
        @given(params=PULL_PARAMS, raw=st.text(max_size=40))
        def pull(params: dict[str, str], raw: str) -> None:
            for request in (
                http.build_request("GET", "/v1/sync/pull", params=params, headers=auth(user)),
                http.build_request(
                    "GET", "/v1/sync/pull?" + quote(raw, safe="&=;%+/"), headers=auth(user)
                ),
            ):
                r = http.send(request)
                if r.status_code == 200:
                    assert {"changes", "cursor", "has_more", "version"} <= set(r.json())
                    counts["pull 200"] += 1
                else:
                    counts[f"pull {r.status_code} " + assert_error_body(r)] += 1
                    assert r.status_code < 500, r.text

        push()
        pull()
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert log_errors(fuzz_hub) == []
    report("fuzz_http", **{k.replace(" ", "_"): v for k, v in sorted(counts.items())})


WS_MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("push"),
            "id": st.text("abc123-", min_size=1, max_size=8),
            "changes": st.lists(GOOD_CHANGE | CHANGE, max_size=3),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("push")},
        optional={
            "id": st.text(max_size=70) | JSON,
            "changes": st.lists(CHANGE, max_size=3) | JSON,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("pull")},
        optional={"id": st.text(max_size=10) | JSON, "since": JSON | st.just("0"), "limit": JSON},
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["auth", "ping", "welcome", "ack", "", "PUSH"]) | JSON},
        optional={"token": st.text(max_size=20) | JSON, "id": JSON},
    ),
    JSON,
)


def test_fuzzed_websocket_messages_get_error_answers_and_the_connection_stays(
    fuzz_hub: HubProcess,
):
    from websockets.sync.client import connect as ws_connect

    user = new_user()
    counts: Counter[str] = Counter()
    with ws_connect(
        f"{fuzz_hub.ws_url}?device=fuzz", additional_headers=auth(user), open_timeout=10
    ) as ws:
        assert orjson.loads(ws.recv(10))["type"] == "welcome"

        def answer() -> dict[str, Any]:
            message: dict[str, Any] = orjson.loads(ws.recv(5))
            return message

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
        @given(message=WS_MESSAGE, as_text=st.booleans())
        def one(message: Any, as_text: bool) -> None:
            data = orjson.dumps(message)
            ws.send(data.decode() if as_text else data)
            reply = answer()
            kind = reply["type"]
            counts[f"{kind} {reply.get('code', '')}".strip()] += 1
            if kind == "error":
                assert reply["code"] in CLIENT_ERROR_CODES, reply
                assert isinstance(reply["message"], str)
            else:
                assert kind in {"ack", "changes", "pong", "auth_ok"}, reply

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
        @given(raw=st.binary(max_size=200) | st.text(max_size=200))
        def raw(raw: bytes | str) -> None:
            ws.send(raw)
            reply = answer()
            counts[f"{reply['type']} {reply.get('code', '')}".strip()] += 1
            if reply["type"] == "error":
                assert reply["code"] in CLIENT_ERROR_CODES, reply
            else:
                assert reply["type"] in {"pong", "ack", "changes"}, reply

        one()
        raw()
        ws.send(orjson.dumps({"type": "ping"}).decode())
        assert orjson.loads(ws.recv(5)) == {"type": "pong"}
    with httpx.Client(base_url=fuzz_hub.url, timeout=10) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert log_errors(fuzz_hub) == []
    report("fuzz_ws", **{k.replace(" ", "_") or "none": v for k, v in sorted(counts.items())})


async def test_idle_and_half_sent_sockets_do_not_slow_another_users_pushes(
    fuzz_hub: HubProcess,
):
    host, port = host_port(fuzz_hub)
    idle_kinds = {
        "silent": b"",
        "partial_head": b"POST /v1/sync/push HTTP/1.1\r\nHost: x\r\nContent-Le",
        "partial_body": (
            b"POST /v1/sync/push HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Authorization: Bearer " + token_for(new_user()).encode() + b'\r\n\r\n{"dev'
        ),
        "partial_upgrade": b"GET /v1/ws?device=d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
    }
    held: list[asyncio.StreamWriter] = []
    user = new_user()
    latencies: list[float] = []
    rss_before = rss_mib(fuzz_hub)
    try:
        for data in idle_kinds.values():
            for _ in range(50):
                _, w = await asyncio.open_connection(host, port)
                if data:
                    w.write(data)
                    await w.drain()
                held.append(w)
        async with httpx.AsyncClient(base_url=fuzz_hub.url, timeout=5) as http:
            for i in range(30):
                # A fresh connection each other time: accepting is not blocked either.
                client = http if i % 2 else httpx.AsyncClient(base_url=fuzz_hub.url, timeout=5)
                started = time.monotonic()
                r = await client.post(
                    "/v1/sync/push",
                    content=push_body([change(f"t{i}", stamp(node="ctl"), n=i)]),
                    headers={**auth(user), "Idempotency-Key": f"ctl-{i}"},
                )
                latencies.append(time.monotonic() - started)
                if client is not http:
                    await client.aclose()
                assert r.status_code == 200, r.text
            deltas, version = await pull_all(http, user)
        assert len(deltas) == version == 30
        rss_held = rss_mib(fuzz_hub)
    finally:
        for w in held:
            w.close()
    assert max(latencies) < 1.0, latencies
    # 200 held sockets cost the hub little memory (bounded per connection).
    assert rss_held - rss_before < 64, (rss_before, rss_held)
    report(
        "idle_sockets",
        held_sockets=len(held),
        control_pushes=len(latencies),
        acked=30,
        max_latency_ms=f"{max(latencies) * 1000:.0f}",
        hub_rss_growth_mib=f"{rss_held - rss_before:.1f}",
    )


async def test_a_request_head_that_never_ends_is_refused_and_stalls_no_one(
    fuzz_hub: HubProcess,
):
    # One connection streams a URL (then, on another, a header) that never
    # ends. It was appended piece by piece, quadratically, on the event loop:
    # 85 MiB in 10 s held another user's acks for seconds. Now past 64 KiB of
    # head the request gets 431 and the connection is closed.
    host, port = host_port(fuzz_hub)
    user = new_user()
    for start in (b"GET /", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(start)
        chunk = b"a" * 16384
        answer = b""
        try:
            for _ in range(4096):  # up to 64 MiB, until the hub answers or closes
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(4096), 0.001)
                if answer or reader.at_eof():
                    break
        except (ConnectionError, OSError):
            pass
        if not answer:
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                answer = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    async with httpx.AsyncClient(base_url=fuzz_hub.url, timeout=5) as http:
        started = time.monotonic()
        r = await http.post(
            "/v1/sync/push", content=push_body([change("t", stamp(), n=1)]), headers=auth(user)
        )
        assert r.status_code == 200 and time.monotonic() - started < 1.0


@pytest.mark.parametrize("size", [70_000, 100_000])
async def test_a_request_head_past_64_kib_in_one_piece_gets_431(fuzz_hub: HubProcess, size: int):
    # Counted only while the head was still open, a head that arrived whole
    # in one read (as curl sends it) passed; the limit holds however it comes.
    host, port = host_port(fuzz_hub)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)  # until the hub closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",  # a control byte
        b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"NOT-A-METHOD\x00 / HTTP/1.1\r\n\r\n",
    ],
    ids=["control byte", "header without colon", "NUL in the method"],
)
async def test_a_malformed_request_gets_a_json_400(fuzz_hub: HubProcess, request_head: bytes):
    host, port = host_port(fuzz_hub)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request_head)
    answer = await asyncio.wait_for(reader.read(), 10)  # until the hub closes
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:80]
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "bad_request"


async def test_a_request_head_trickled_a_byte_at_a_time_is_closed(fuzz_hub: HubProcess):
    # Slowloris: a head that never completes, one byte every second, would hold
    # its socket for good. The head must be in within 10 s (408, closed).
    host, port = host_port(fuzz_hub)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    answer = b""
    while time.monotonic() - started < 20 and not answer:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(b"a")
        with contextlib.suppress(TimeoutError):
            answer = await asyncio.wait_for(reader.read(4096), 1.0)
        if reader.at_eof():
            break
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert time.monotonic() - started < 12


async def test_a_push_body_that_is_slow_to_read_does_not_hold_other_users(
    fuzz_hub: HubProcess,
):
    # 8 MiB of 17-digit numbers: read exactly (digit for digit) that takes
    # about a second. Done on the event loop, three such bodies held another
    # user's acks for seconds; they are read on a thread now.
    victim, heavy = new_user(), new_user()
    body = (
        b'{"device":"x","changes":[],"pad":['
        + b",".join(b"0.%017d" % (12345678901234567 + i) for i in range(400_000))
        + b"]}"
    )
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=fuzz_hub.url, timeout=30) as http:

        async def heavy_push() -> None:
            r = await http.post("/v1/sync/push", content=body, headers=auth(heavy))
            assert r.status_code in (200, 429), r.text

        heavies = [asyncio.ensure_future(heavy_push()) for _ in range(3)]
        i = 0
        while not all(h.done() for h in heavies):
            i += 1
            started = time.monotonic()
            r = await http.post(
                "/v1/sync/push",
                content=push_body([change(f"t{i}", stamp(node="ctl"), n=i)]),
                headers=auth(victim),
            )
            assert r.status_code == 200, r.text
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
        await asyncio.gather(*heavies)
    latencies.sort()
    assert len(latencies) >= 5, latencies
    assert latencies[len(latencies) // 2] < 0.25, latencies


async def test_a_slow_body_that_keeps_coming_is_taken_and_a_stalled_one_is_not(
    fuzz_hub: HubProcess,
):
    # A valid push sent slowly but steadily (20 KiB every 5 s: 20 s in all) is
    # answered 200; a body that stops coming gets 408 within a step (15 s).
    # A fixed deadline for the whole body refused uploads on slow links.
    host, port = host_port(fuzz_hub)
    user = new_user()
    changes = [change(f"t{i}", stamp(), note="n" * 19_000) for i in range(4)]
    body = push_body(changes)
    head = (
        f"POST /v1/sync/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: Bearer {token_for(user)}\r\n\r\n"
    ).encode()

    async def send_slowly() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head)
        for start in range(0, len(body), 20_000):
            writer.write(body[start : start + 20_000])
            await writer.drain()
            if start + 20_000 < len(body):
                await asyncio.sleep(5)
        answer = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        return answer

    async def stall() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body[:1000])
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(4096), 30)
        writer.close()
        return answer, time.monotonic() - started

    slow, (stalled, after) = await asyncio.gather(send_slowly(), stall())
    assert slow.startswith(b"HTTP/1.1 200"), slow[:200]
    assert stalled.startswith(b"HTTP/1.1 408"), stalled[:200]
    assert 14 < after < 20, after


def rss_mib(hub: HubProcess) -> float:
    """The hub process's resident memory, in MiB (Linux)."""
    for line in Path(f"/proc/{hub.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_a_websocket_push_flood_is_refused_while_another_user_keeps_pushing(
    hub_factory: Any,
):
    hub = hub_factory({"HUB_RATE_MESSAGES_PER_S": "50", "HUB_RATE_BURST_S": "1"})
    flooder, calm_user = new_user(), new_user()
    flood = await connect(hub, flooder, "flood")
    calm = await connect(hub, calm_user, "calm")
    changes = [change(f"r{i}", stamp(node="flood"), n=i) for i in range(20)]
    frame = orjson.dumps({"type": "push", "id": "x", "changes": changes}).decode()
    received: list[dict[str, Any]] = []
    latencies: list[float] = []

    async def keep_flooding() -> None:
        with contextlib.suppress(ConnectionClosed):
            for i in range(2000):
                await flood.ws.send(frame.replace('"id":"x"', f'"id":"f{i}"', 1))

    async def read_flood() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                received.append(await flood.recv(timeout=15))

    tasks = [asyncio.ensure_future(keep_flooding()), asyncio.ensure_future(read_flood())]
    try:
        for i in range(20):
            started = time.monotonic()
            ack = await calm.push([change(f"c{i}", stamp(node="calm"), n=i)])
            latencies.append(time.monotonic() - started)
            assert ack["type"] == "ack" and ack["applied"] == 1, ack
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
    finally:
        for t in tasks:
            t.cancel()
    assert flood.close_code == 4008
    codes = Counter(m.get("code", m["type"]) for m in received)
    assert codes["rate_limited"] > 0 and set(codes) <= {"ack", "rate_limited"}, codes
    assert all(m["retry_after"] > 0 for m in received if m.get("code") == "rate_limited"), received[
        :3
    ]
    await calm.send({"type": "ping"})
    assert await calm.expect("pong") == {"type": "pong"}
    await calm.close()
    assert max(latencies) < 1.0, latencies
    report(
        "ws_flood",
        flood_acked=codes["ack"],
        flood_rate_limited=codes["rate_limited"],
        flood_close=flood.close_code,
        control_pushes=len(latencies),
        control_max_latency_ms=f"{max(latencies) * 1000:.0f}",
    )


# -- 4. Clocks ----------------------------------------------------------------------------


async def test_a_fast_device_clock_gets_clock_skew_then_succeeds_once_corrected(
    shared_hub: HubProcess,
):
    user = new_user()
    ten_minutes = 10 * 60 * 1000
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as http:
        fast = push_body([change("t1", stamp(ten_minutes, node="fast"), title="from the future")])
        r = await http.post(
            "/v1/sync/push", content=fast, headers={**auth(user), "Idempotency-Key": "k1"}
        )
        assert r.status_code == 400, r.text
        assert_error_body(r, "clock_skew")
        details = r.json()["error"]["details"]
        assert details["index"] == 0 and details["field"] == "fields.title.hlc"
        assert ten_minutes - 5000 < details["ahead_ms"] <= ten_minutes + 1000, details

        device = await connect(shared_hub, user, "fast")
        answer = await device.push([change("t2", stamp(ten_minutes, node="fast"), title="x")])
        assert answer["type"] == "error" and answer["code"] == "clock_skew", answer
        assert await version_of(http, user) == 0  # nothing of either was written

        # The clock is corrected: the same key and the same message id now go through
        # (a refused push leaves its key unused).
        fixed = push_body([change("t1", stamp(node="fast"), title="now")])
        r = await http.post(
            "/v1/sync/push", content=fixed, headers={**auth(user), "Idempotency-Key": "k1"}
        )
        assert r.status_code == 200 and r.json()["applied"] == 1, r.text
        ack = await device.push([change("t2", stamp(node="fast"), title="now")])
        assert ack["type"] == "ack" and ack["applied"] == 1, ack
        await device.close()
        deltas, version = await pull_all(http, user)
    assert sorted(d["id"] for d in deltas) == ["t1", "t2"] and version == 2
    assert all(d["fields"]["title"]["value"] == "now" for d in deltas)


async def test_a_device_clock_never_goes_back_across_client_restarts(
    shared_hub: HubProcess, tmp_path: Path
):
    """The last stamp is persisted: a client restarted on the same data file
    stamps after it, even when that stamp is ahead of the wall clock (here it
    moved 30 s ahead by observing another device's stamp)."""
    user = new_user()
    path = tmp_path / "phone.db"
    ahead = stamp(30_000, node="other")
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as http:
        r = await http.post(
            "/v1/sync/push",
            content=push_body([change("t0", ahead, title="ahead")], device="other"),
            headers=auth(user),
        )
        assert r.status_code == 200, r.text
    old: list[str] = []
    async with HubClient(shared_hub.url, token_for(user), "phone", data_path=path) as phone:
        await phone.synced(15)
        for i in range(5):
            old.append(await phone.upsert("todos", f"t{i + 1}", n=i))
        await phone.synced(15)
    assert old == sorted(old) and old[0] > ahead
    wall_now_ms = time.time_ns() // 1_000_000
    assert int(old[-1][:13]) > wall_now_ms  # so a clock started afresh would go back
    new: list[str] = []
    for _ in range(3):  # restart three times, offline
        async with HubClient(closed_port_url(), token_for(user), "phone", data_path=path) as phone:
            new.append(await phone.upsert("todos", "t9", n=len(new)))
    assert old[-1] < new[0] < new[1] < new[2], (old[-1], new)
    report("clock_restarts", old_last=old[-1], new_first=new[0], restarts=3, went_back=0)
