"""The real-time path end to end: real hub processes, real PostgreSQL and Redis,
real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from support import (
    Device,
    RawClient,
    StalledClient,
    change,
    connect,
    new_user,
    pull_all_http,
    stamp,
    token_for,
    wait_for,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


async def http_push(hub, user: str, changes: list, device: str = "http-dev") -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(
            f"{hub.url}/v1/sync/push",
            json={"device": device, "changes": changes},
            headers={"Authorization": f"Bearer {token_for(user)}"},
        )


async def closed_with(device: Device, timeout: float = 10.0) -> int:
    """Read until the hub closes the connection; its close code."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while time.monotonic() < deadline:
            await device.recv(timeout=max(0.01, deadline - time.monotonic()))
    code = device.close_code
    assert code is not None
    return code


@pytest.fixture
def two_hubs(hub_factory, redis_url):
    env = {"HUB_REDIS_URL": redis_url}
    return hub_factory(env), hub_factory(env)


async def test_change_crosses_processes_to_the_users_other_devices_only(two_hubs):
    hub1, hub2 = two_hubs
    alice, bob = new_user(), new_user()
    a1 = await connect(hub1, alice, "a1")
    a2 = await connect(hub2, alice, "a2")
    b1 = await connect(hub2, bob, "b1")
    ack = await a1.push([change("t1", stamp(node="a1"), title="milk")])
    assert ack["type"] == "ack" and ack["version"] == 1
    event = await a2.expect("change")
    assert (event["version"], event["prev"], event["device"]) == (1, 0, "a1")
    assert event["changes"][0]["fields"]["title"]["value"] == "milk"
    # No echo to the pusher: the next thing a1 hears is a2's push.
    ack2 = await a2.push([change("t2", stamp(node="a2"), title="eggs")])
    assert ack2["version"] == 2
    echo_check = await a1.expect("change")
    assert (echo_check["version"], echo_check["prev"], echo_check["device"]) == (2, 1, "a2")
    # Bob heard nothing of Alice: his first message is his own user's event.
    r = await http_push(hub1, bob, [change("b", stamp(node="x"), n=1)])
    assert r.status_code == 200
    first = await b1.expect("change")
    assert first["changes"][0]["id"] == "b" and first["version"] == 1
    for d in (a1, a2, b1):
        await d.close()


async def test_welcome_comes_first_even_while_the_user_is_pushing(shared_hub, user):
    """A connection subscribes to its user's events before it reads the version
    for its welcome; events of that window must follow the welcome, not precede it."""
    pusher = await connect(shared_hub, user, "pusher")
    stop = asyncio.Event()

    async def push_until_stopped() -> int:
        n = 0
        while not stop.is_set():
            n += 1
            ack = await pusher.push([change(f"r{n % 5}", stamp(node="pusher"), n=n)])
            assert ack["type"] == "ack", ack
        return n

    pushing = asyncio.create_task(push_until_stopped())
    try:
        for i in range(40):
            # connect() reads the first message and requires it to be the welcome.
            d = await connect(shared_hub, user, f"late{i % 3}")
            await d.expect("change")  # and the user's events do come, after it
            await d.close()
    finally:
        stop.set()
        pushed = await asyncio.wait_for(pushing, 10)
    assert pushed > 40
    await pusher.close()


async def test_http_push_reaches_websocket_devices(shared_hub, user):
    d = await connect(shared_hub, user, "phone")
    notify = await connect(shared_hub, user, "watch", query="&mode=notify")
    r = await http_push(shared_hub, user, [change("t1", stamp(), title="from http")])
    assert r.json()["version"] == 1
    event = await d.expect("change")
    assert event["device"] == "http-dev" and event["version"] == 1
    assert await notify.expect("sync_available") == {
        "type": "sync_available",
        "version": 1,
        "collections": ["todos"],
    }
    await d.close()
    await notify.close()


async def test_large_events_become_sync_available(shared_hub, user):
    d = await connect(shared_hub, user, "d1")
    big = "x" * 60_000
    r = await http_push(
        shared_hub, user, [change("a", stamp(), v=big), change("b", stamp(), v=big)]
    )
    assert r.status_code == 200
    event = await d.expect("sync_available")
    assert event["version"] == 1
    await d.close()


async def test_websocket_push_pull_ping_and_errors(shared_hub, user):
    d = await connect(shared_hub, user, "d1")
    assert d.welcome["version"] == 0 and d.welcome["user"] == user
    assert d.welcome["heartbeat_s"] == 30 and isinstance(d.welcome["heartbeat_s"], int)
    await d.send({"type": "ping"})
    assert await d.expect("pong") == {"type": "pong"}
    await d.ws.send("{not json")
    error = await d.expect("error")
    assert error["code"] == "bad_request"
    bad = await d.push([{"collection": "todos", "id": "t", "op": "explode"}], mid="bad-1")
    assert bad == {
        "type": "error",
        "code": "invalid_change",
        "message": bad["message"],
        "id": "bad-1",
        "details": {"index": 0, "field": "op"},  # as an HTTP answer has them
    }
    assert "changes[0].op" in bad["message"]
    skew = await d.push([change("t", stamp(offset_ms=600_000), x=1)])
    assert skew["code"] == "clock_skew"
    ok = await d.push([change("t", stamp(), x=1)])
    assert ok["type"] == "ack" and ok["version"] == 1
    await d.send({"type": "pull", "id": "p1", "since": 0, "limit": 10})
    page = await d.expect("changes")
    assert page["id"] == "p1" and page["version"] == 1 and not page["has_more"]
    assert [c["id"] for c in page["changes"]] == ["t"]
    await d.close()


async def test_replayed_push_id_is_acked_again_and_changes_nothing(shared_hub, user):
    d = await connect(shared_hub, user, "d1")
    other = await connect(shared_hub, user, "d2")
    changes = [change("t1", stamp(), title="once")]
    first = await d.push(changes, mid="same-id")
    replay = await d.push(changes, mid="same-id")
    assert first["version"] == 1 and "replay" not in first
    assert replay == {**first, "replay": True}
    reused = await d.push([change("t1", stamp(), title="other")], mid="same-id")
    assert reused["code"] == "idempotency_key_reused"
    # The replay made no second event: the next event d2 gets after the first is version 2.
    assert (await other.expect("change"))["version"] == 1
    await d.push([change("t2", stamp(), title="next")])
    assert (await other.expect("change"))["version"] == 2
    await d.close()
    await other.close()


async def test_first_message_auth_and_token_refresh(shared_hub, user):
    async with ws_connect(shared_hub.ws_url, open_timeout=10) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": token_for(user), "device": "web"}))
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome" and welcome["device"] == "web"
        d = Device(ws, welcome)
        await d.send({"type": "auth", "token": token_for(user, ttl_s=7200)})
        ok = await d.expect("auth_ok")
        assert ok["expires_at"] > time.time() + 3600
        await d.send({"type": "auth", "token": token_for(new_user())})
        refused = await d.expect("error")
        assert refused["code"] == "forbidden"
        await d.send({"type": "ping"})
        await d.expect("pong")


async def test_messages_sent_right_behind_the_auth_are_answered_in_order(shared_hub, user):
    """Pushes sent without waiting, right behind a first-message auth: some wait
    in the server while the connection is set up, the rest arrive after it; all
    are answered, in the order sent, with versions in that order."""
    async with ws_connect(shared_hub.ws_url, open_timeout=10) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": token_for(user), "device": "web"}))
        ids = [f"burst-{i}" for i in range(40)]
        for i, mid in enumerate(ids):
            push = {"type": "push", "id": mid, "changes": [change(f"t{i}", stamp(), n=i)]}
            await ws.send(orjson.dumps(push).decode())
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome"
        acks = [orjson.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in ids]
        assert [a["id"] for a in acks] == ids
        assert [a["version"] for a in acks] == list(range(1, len(ids) + 1))


async def test_a_text_frame_that_is_not_utf8_closes_with_1007(shared_hub, user):
    d = await connect(shared_hub, user, "d1")
    await d.send({"type": "ping"})
    await d.expect("pong")
    await d.ws.send(b'{"type": "ping", "x": "\xff"}', text=True)
    assert await closed_with(d) == 1007


@pytest.mark.parametrize(
    "first_message",
    [
        None,  # nothing at all within the timeout
        {"type": "auth", "token": "garbage", "device": "web"},
        {"type": "auth", "device": "web"},
        {"type": "push", "id": "x", "changes": []},
        # A good token ("valid" stands for one), with a bad field beside it.
        {"type": "auth", "token": "valid", "device": "web", "mode": ["events"]},
        {"type": "auth", "token": "valid", "device": "web", "device_name": "a\x00b"},
        {"type": "auth", "token": "valid", "device": "web", "platform": "\x00"},
    ],
)
async def test_unauthenticated_connections_are_closed_with_4001(hub_factory, first_message):
    hub = hub_factory({"HUB_AUTH_TIMEOUT_S": "0.5"})
    async with ws_connect(hub.ws_url, open_timeout=10) as ws:
        if first_message is not None:
            if first_message.get("token") == "valid":
                first_message = {**first_message, "token": token_for("u-" + secrets.token_hex(4))}
            await ws.send(orjson.dumps(first_message).decode())
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 4001


async def test_expired_header_token_is_closed_with_4001(shared_hub, user):
    with pytest.raises((ConnectionClosed, AssertionError)):
        d = await connect(shared_hub, user, "d1", token=token_for(user, ttl_s=-120))
        await d.recv()
    async with ws_connect(
        f"{shared_hub.ws_url}?device=d1",
        additional_headers={"Authorization": f"Bearer {token_for(user, ttl_s=-120)}"},
    ) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 4001


async def test_foreign_origin_is_refused_with_403(shared_hub, user):
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(
            f"{shared_hub.ws_url}?device=d1",
            additional_headers={"Authorization": f"Bearer {token_for(user)}"},
            origin="https://evil.example",
        )
    assert refused.value.response.status_code == 403
    allowed = await connect(shared_hub, user, "d1", origin="http://localhost:8080")
    await allowed.close()


async def test_a_frame_over_1_mib_closes_with_1009(shared_hub, user):
    d = await connect(shared_hub, user, "d1")
    await d.ws.send("x" * (1024 * 1024 + 1))
    assert await closed_with(d) == 1009


async def test_the_11th_connection_of_a_user_is_closed_with_4009(shared_hub, user):
    devices = [await connect(shared_hub, user, f"d{i}") for i in range(10)]
    from websockets.asyncio.client import connect as raw

    async with raw(
        f"{shared_hub.ws_url}?device=d10",
        additional_headers={"Authorization": f"Bearer {token_for(user)}"},
    ) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 4009
    # Another user is not affected, and a slot frees when one closes.
    other = await connect(shared_hub, new_user(), "d0")
    await devices[0].close()
    again = await wait_for(lambda: _try_connect(shared_hub, user, "d11"), timeout=10)
    for d in [*devices[1:], other, again]:
        await d.close()


async def _try_connect(hub, user, device):
    try:
        return await connect(hub, user, device)
    except (ConnectionClosed, AssertionError):
        return None


async def test_a_connection_that_stops_reading_is_closed_with_1013(hub_factory):
    hub = hub_factory({"HUB_SEND_QUEUE_SIZE": "8", "HUB_RATE_MESSAGES_PER_S": "10000"})
    user = new_user()
    slow = await StalledClient.open(hub, user, "slow")
    fast = await connect(hub, user, "fast")
    pusher = await connect(hub, user, "pusher")
    value = "v" * 50_000
    closed = False
    for i in range(400):
        ack = await pusher.push([change(f"r{i}", stamp(), blob=value)])
        assert ack["type"] == "ack", ack
        event = await fast.expect("change")
        assert event["version"] == ack["version"]
        if i % 10 == 0:
            async with httpx.AsyncClient(timeout=10) as client:
                health = (await client.get(f"{hub.url}/health")).json()
            if health["connections"] == 2:
                closed = True
                break
    assert closed, "the slow connection was never closed"
    assert await slow.close_code() == 1013
    # The others go on.
    ack = await pusher.push([change("after", stamp(), x=1)])
    assert (await fast.expect("change"))["version"] == ack["version"]
    await fast.close()
    await pusher.close()


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of a socket (linux/tcp.h: 1 established, 7 closed)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="needs TCP_INFO (Linux)")
async def test_a_device_that_never_reads_again_is_dropped_not_kept(hub_factory):
    """Its 1013 close frame can never be written: the hub drops the connection
    instead of holding its socket and buffers for good."""
    hub = hub_factory({"HUB_SEND_QUEUE_SIZE": "8", "HUB_RATE_MESSAGES_PER_S": "10000"})
    user = new_user()
    host, port = hub.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    sock.sendall(
        (
            f"GET /v1/ws?device=stalled HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token_for(user)}\r\n\r\n"
        ).encode()
    )
    assert sock.recv(12) == b"HTTP/1.1 101"  # and from now on it reads nothing
    pusher = await connect(hub, user, "pusher")
    value = "v" * 50_000

    async def connections() -> int:
        async with httpx.AsyncClient(timeout=10) as client:
            return int((await client.get(f"{hub.url}/health")).json()["connections"])

    for i in range(400):
        ack = await pusher.push([change(f"r{i}", stamp(), blob=value)])
        assert ack["type"] == "ack", ack
        if i % 10 == 0 and await connections() == 1:
            break
    assert await connections() == 1, "the stalled device was never let go"
    assert _tcp_state(sock) == 1  # still open: the close frame is stuck behind the events
    await wait_for(lambda: _tcp_state(sock) == 7, timeout=20, interval=0.2)
    sock.close()
    await pusher.close()


async def test_fan_out_resumes_after_a_redis_restart(hub_factory):
    from support import restartable_redis

    with restartable_redis() as redis_server:
        env = {"HUB_REDIS_URL": redis_server.url}
        hub1, hub2 = hub_factory(env), hub_factory(env)
        user = new_user()
        receiver = await connect(hub2, user, "receiver")
        sender = await connect(hub1, user, "sender")
        await sender.push([change("before", stamp(), x=1)])
        assert (await receiver.expect("change"))["version"] == 1
        redis_server.stop()
        # While Redis is down pushes still commit and ack.
        acked = []
        for i in range(5):
            ack = await sender.push([change(f"down{i}", stamp(), x=i)])
            assert ack["type"] == "ack"
            acked.append(ack["version"])
        health = await wait_for(
            lambda: _health(hub1, lambda h: h["status"] == "degraded"), timeout=15
        )
        assert health["checks"]["broker"]["ok"] is False
        redis_server.start()

        # Fan-out resumes without restarting the hubs.
        async def delivered() -> bool:
            ack = await sender.push([change(f"probe{len(acked)}", stamp(), x=1)])
            acked.append(ack["version"])
            try:
                while True:
                    event = await receiver.recv(timeout=0.5)
                    if event.get("version") == ack["version"]:
                        return True
            except TimeoutError:
                return False

        await wait_for(delivered, timeout=30, interval=0.2)
        # Every acked push is in pull (each wrote a record of its own).
        versions = {d["version"] for d in await pull_all_http(hub1, user)}
        assert {1, *acked} == versions
        await sender.close()
        await receiver.close()


async def _http_pull(hub, user: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(
            f"{hub.url}/v1/sync/pull", headers={"Authorization": f"Bearer {token_for(user)}"}
        )


async def _health(hub, predicate):
    async with httpx.AsyncClient(timeout=10) as client:
        body = (await client.get(f"{hub.url}/health")).json()
    return body if predicate(body) else None


async def test_sigterm_closes_connections_with_1012_and_exits_in_time(hub_factory):
    hub = hub_factory({"HUB_SHUTDOWN_TIMEOUT_S": "5"})
    user = new_user()
    devices = [await connect(hub, user, f"d{i}") for i in range(5)]
    started = time.monotonic()
    hub.proc.send_signal(signal.SIGTERM)
    for d in devices:
        code = await closed_with(d, timeout=10)
        assert code == 1012
        assert "reconnect in" in (d.ws.close_reason or "")
    hub.proc.wait(15)
    assert time.monotonic() - started < 10


async def test_workers_share_one_port_with_an_embedded_redis(hub_factory):
    """`hub serve --workers 2` with no HUB_REDIS_URL: two processes on one port,
    fanning out through a Redis-compatible server it starts itself."""
    hub = hub_factory(args=["--workers", "2"])
    assert any("embedded Redis-compatible server" in line for line in hub.stdout_lines)

    def workers() -> list[str]:
        children = Path(f"/proc/{hub.proc.pid}/task/{hub.proc.pid}/children").read_text().split()
        cmdlines = [Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0") for c in children]
        return [c for c, cmd in zip(children, cmdlines, strict=True) if b"--listen-fd" in cmd]

    await wait_for(lambda: len(workers()) == 2, timeout=20)
    user = new_user()
    devices = [
        await wait_for(lambda i=i: _try_connect(hub, user, f"d{i}"), timeout=20) for i in range(4)
    ]
    async with httpx.AsyncClient(timeout=10) as client:
        health = (await client.get(f"{hub.url}/health")).json()
    assert health["checks"]["broker"] == {**health["checks"]["broker"], "ok": True, "kind": "redis"}
    ack = await devices[0].push([change("t1", stamp(), title="hello")])
    for d in devices[1:]:
        event = await d.expect("change")
        assert event["version"] == ack["version"]
    for d in devices:
        await d.close()
    started = time.monotonic()
    hub.proc.send_signal(signal.SIGTERM)
    hub.proc.wait(20)
    assert time.monotonic() - started < 15
    assert workers_gone(workers)


def workers_gone(workers) -> bool:
    try:
        return workers() == []
    except FileNotFoundError:
        return True


# -- what a connection's credential, subscription and peers may do -------------


async def test_a_token_swapped_in_must_pass_what_a_connection_needs(shared_hub, user):
    d = await connect(shared_hub, user, "d1")
    async with httpx.AsyncClient(base_url=shared_hub.url, timeout=10) as client:
        made = await client.post(
            "/v1/api-keys",
            json={"name": "pusher", "scopes": ["write"]},
            headers={"Authorization": f"Bearer {token_for(user)}"},
        )
    assert made.status_code == 201, made.text
    # A credential without `read` cannot hold a connection; nor can an expired
    # token, even within the leeway that lets it pass validation.
    for token, code in ((made.json()["key"], "forbidden"), (token_for(user, -10), "token_expired")):
        await d.send({"type": "auth", "id": "swap", "token": token})
        refused = await d.expect("error")
        assert (refused["code"], refused["id"]) == (code, "swap")
    # The connection keeps its credential, and goes on receiving.
    ack = (await http_push(shared_hub, user, [change("t1", stamp(), x=1)])).json()
    assert (await d.expect("change"))["version"] == ack["version"]
    await d.close()


async def test_a_second_connection_is_welcomed_once_the_user_is_subscribed(hub_factory, redis_url):
    # Hub A's commands reach Redis 0.8 s late. Two devices of one user connect
    # to it at once; each is welcomed only once the user's channel is live
    # there, so a push committed on hub B right after a welcome reaches it.
    from support import TcpProxy

    async with TcpProxy.for_url(redis_url, delay_s=0.8) as proxy:
        hub_a = await asyncio.to_thread(hub_factory, {"HUB_REDIS_URL": proxy.url(redis_url)})
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        user = new_user()
        first = asyncio.create_task(connect(hub_a, user, "d1"))
        await asyncio.sleep(0.2)
        second = await connect(hub_a, user, "d2")
        ack = (await http_push(hub_b, user, [change("t1", stamp(), x=1)])).json()
        event = await second.expect("change", timeout=10)
        assert event["version"] == ack["version"]
        await (await first).close()
        await second.close()


async def test_after_a_redis_reconnect_a_new_connection_waits_for_the_subscription(
    hub_factory, redis_url
):
    # Hub A's link to Redis breaks and is made again (its commands 0.8 s late):
    # a second device of a user already online there is welcomed only once
    # the user's channel is subscribed again, so it misses nothing after.
    from support import TcpProxy

    async with TcpProxy.for_url(redis_url, delay_s=0.8) as proxy:
        hub_a = await asyncio.to_thread(hub_factory, {"HUB_REDIS_URL": proxy.url(redis_url)})
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        user = new_user()
        first = await connect(hub_a, user, "d1")
        proxy.cut(refuse=False)
        await wait_for(lambda: hub_a.logs().count('"msg":"broker connected"') == 2, timeout=20)
        second = await connect(hub_a, user, "d2")
        ack = (await http_push(hub_b, user, [change("after", stamp(), x=1)])).json()
        assert (await second.expect("change", timeout=10))["version"] == ack["version"]
        await first.close()
        await second.close()


async def test_a_silent_redis_link_is_replaced(hub_factory, redis_url):
    # The flows between hub A and Redis stop carrying anything without
    # closing (a NAT that dropped them): hub A notices and reconnects.
    from support import TcpProxy

    async with TcpProxy.for_url(redis_url) as proxy:
        env = {"HUB_REDIS_URL": proxy.url(redis_url), "HUB_BROKER_CHECK_S": "0.5"}
        hub_a = await asyncio.to_thread(hub_factory, env)
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        user = new_user()
        receiver = await connect(hub_a, user, "receiver")
        ack = (await http_push(hub_b, user, [change("before", stamp(), x=1)])).json()
        assert (await receiver.expect("change"))["version"] == ack["version"]
        proxy.freeze()

        async def delivered() -> bool:
            ack = (await http_push(hub_b, user, [change("probe", stamp(), x=1)])).json()
            try:
                while True:
                    if (await receiver.recv(timeout=0.5)).get("version") == ack["version"]:
                        return True
            except TimeoutError:
                return False

        await wait_for(delivered, timeout=20, interval=0.2)
        assert "broker link silent; reconnecting" in hub_a.logs()
        await receiver.close()


async def test_credentials_that_cannot_be_checked_now_close_with_1013_not_4001(
    hub_factory, database_url
):
    # An API key while the database is down: the device is to retry, not to
    # give up on its key (4001 is final for clients).
    from support import TcpProxy

    async with TcpProxy.for_url(database_url) as proxy:
        env = {"HUB_DATABASE_URL": proxy.url(database_url), "HUB_DB_TIMEOUT_S": "2"}
        hub = await asyncio.to_thread(hub_factory, env)  # the proxy serves meanwhile
        user = new_user()
        async with httpx.AsyncClient(base_url=hub.url, timeout=10) as client:
            made = await client.post(
                "/v1/api-keys",
                json={"name": "k"},
                headers={"Authorization": f"Bearer {token_for(user)}"},
            )
        assert made.status_code == 201, made.text
        proxy.cut()
        with pytest.raises(ConnectionClosed) as closed:
            d = await connect(hub, user, "d1", token=made.json()["key"])
            await d.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013


async def test_pulls_being_answered_are_bounded_per_connection(shared_hub, user):
    d = await RawClient.open(shared_hub, user, "d1")
    assert (await d.message())["type"] == "welcome"
    d.send(*({"type": "pull", "id": f"p{i}", "since": 0} for i in range(12)))
    answers = [await d.message() for _ in range(12)]
    assert sorted(a["id"] for a in answers) == sorted(f"p{i}" for i in range(12))
    kinds = [a["type"] if a["type"] == "changes" else a["code"] for a in answers]
    assert kinds.count("changes") == 4 and kinds.count("rate_limited") == 8, kinds
    # Answered, they make room again.
    d.send({"type": "pull", "id": "again", "since": 0})
    assert (await d.message())["type"] == "changes"
    d.writer.close()


async def test_a_peer_that_sends_messages_is_alive_without_pongs(hub_factory):
    hub = hub_factory({"HUB_HEARTBEAT_S": "1"})
    user = new_user()
    silent = await RawClient.open(hub, user, "silent")
    talking = await RawClient.open(hub, user, "talking")
    for d in (silent, talking):
        assert (await d.message())["type"] == "welcome"
    # Neither answers the hub's pings; one sends a message every 0.2 s.
    started = time.monotonic()
    while time.monotonic() - started < 3.5:  # over three heartbeat intervals
        talking.send({"type": "ping"})
        assert (await talking.message(timeout=2))["type"] == "pong"
        await asyncio.sleep(0.2)
    assert await silent.close_code(timeout=5) == 4000
    # Silent from now on, it is closed within two intervals of its last message.
    talking.send({"type": "ping"})
    assert (await talking.message(timeout=2))["type"] == "pong"
    last = time.monotonic()
    assert await talking.close_code(timeout=5) == 4000
    assert time.monotonic() - last < 2.5


async def test_a_slow_reader_is_bounded_in_bytes_too(hub_factory):
    # Events of 60 KB to a device that reads nothing: the queue's 4 MiB
    # close it long before its 256 messages would.
    hub = hub_factory({"HUB_RATE_MESSAGES_PER_S": "10000"})
    user = new_user()
    slow = await StalledClient.open(hub, user, "slow")
    pusher = await connect(hub, user, "pusher")
    value = "v" * 60_000
    for i in range(256):
        ack = await pusher.push([change(f"r{i}", stamp(), blob=value)])
        assert ack["type"] == "ack", ack
        if "closing a slow connection" in hub.logs():
            break
    else:
        pytest.fail("the slow connection was never closed")
    assert i < 120, i  # 4 MiB of 60 KB events, plus what the socket buffers took
    assert await slow.close_code() == 1013
    await pusher.close()


# -- stopping, and the workers of one `hub serve` ------------------------------


async def test_ctrl_c_stops_workers_gracefully(hub_factory):
    # A terminal's Ctrl-C reaches the parent and every worker at once, and the
    # parent passes it on: the workers must still drain (1012) and close cleanly.
    hub = hub_factory(args=["--workers", "2"], own_session=True)
    await wait_for(lambda: hub.logs().count('"msg":"broker connected"') == 2, timeout=20)
    user = new_user()
    devices = [
        await wait_for(lambda i=i: _try_connect(hub, user, f"d{i}"), timeout=20) for i in range(4)
    ]
    os.killpg(hub.proc.pid, signal.SIGINT)
    for d in devices:
        assert await closed_with(d, timeout=10) == 1012
    assert hub.proc.wait(20) == 0
    logs = hub.logs()
    assert "Traceback" not in logs and "CancelledError" not in logs
    # Each worker ran its whole shutdown (commits, pool, broker), not skipped it.
    assert logs.count('"msg":"shutdown complete"') == 2, logs[-3000:]


async def test_development_tokens_work_with_workers(hub_factory):
    # Without a JWT setting the hub makes a development secret; its workers
    # serve the demo's /dev/token as a single process does.
    hub = hub_factory({"HUB_JWT_SECRET": "", "HUB_API_KEY_PEPPER": ""}, args=["--workers", "2"])
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as client:
        for _ in range(4):  # either worker may answer
            r = await client.get("/dev/token", params={"user": "bob"})
            assert r.status_code == 200, r.text
            status = await client.get(
                "/v1/sync/status", headers={"Authorization": f"Bearer {r.json()['token']}"}
            )
            assert status.status_code == 200, status.text


async def test_a_stuck_database_does_not_hold_the_shutdown_past_its_bound(
    hub_factory, database_url
):
    # PostgreSQL stops answering mid-push; on SIGTERM the push is answered
    # 503 unavailable (to retry elsewhere) and the process exits within
    # HUB_SHUTDOWN_TIMEOUT_S, though each statement may wait HUB_DB_TIMEOUT_S.
    from support import TcpProxy

    async with TcpProxy.for_url(database_url) as proxy:
        env = {
            "HUB_DATABASE_URL": proxy.url(database_url),
            "HUB_DB_TIMEOUT_S": "30",
            "HUB_SHUTDOWN_TIMEOUT_S": "2",
        }
        hub = await asyncio.to_thread(hub_factory, env)
        user = new_user()
        assert (await http_push(hub, user, [change("t0", stamp(), x=0)])).status_code == 200
        proxy.freeze(new_flows=True)
        pushing = asyncio.create_task(http_push(hub, user, [change("t1", stamp(), x=1)]))
        pulling = asyncio.create_task(_http_pull(hub, user))
        await asyncio.sleep(0.5)  # both are waiting on the database
        started = time.monotonic()
        hub.proc.send_signal(signal.SIGTERM)
        for answer in await asyncio.wait_for(asyncio.gather(pushing, pulling), 10):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "unavailable"
        await asyncio.to_thread(hub.proc.wait, 10)
        assert time.monotonic() - started < 2 + 1.0  # the bound, and the process's own exit


async def test_an_events_origin_is_that_of_the_change_that_altered_the_record(shared_hub, user):
    # The delete after the upsert in the same push is older than its fields:
    # it raises the record's delete stamp but hides none of them. The event
    # credits the fields to their writer, as pull does.
    receiver = await connect(shared_hub, user, "receiver")
    pusher = await connect(shared_hub, user, "pusher")
    older, newer = stamp(-1000), stamp()
    upsert = {**change("t1", newer, title="milk"), "origin": "user", "actor": {"name": "alice"}}
    delete = {"collection": "todos", "id": "t1", "op": "delete", "hlc": older}
    delete.update(origin="agent", actor={"name": "bot"})
    ack = await pusher.push([upsert, delete])
    assert ack["type"] == "ack", ack
    (delta,) = (await receiver.expect("change"))["changes"]
    pulled = [d for d in await pull_all_http(shared_hub, user) if d["id"] == "t1"]
    assert (delta["origin"], delta["actor"]) == ("user", {"name": "alice"})
    assert (pulled[0]["origin"], pulled[0]["actor"]) == ("user", {"name": "alice"})
    # Two changes of one push write fields of one record: as pull does, the
    # event credits the writer of the first field by name.
    first = {**change("t2", stamp(), a=1), "origin": "user", "actor": {"name": "alice"}}
    second = {**change("t2", stamp(), b=2), "origin": "agent", "actor": {"name": "bot"}}
    assert (await pusher.push([first, second]))["type"] == "ack"
    (delta,) = (await receiver.expect("change"))["changes"]
    pulled = [d for d in await pull_all_http(shared_hub, user) if d["id"] == "t2"]
    assert (delta["origin"], delta["actor"]) == (pulled[0]["origin"], pulled[0]["actor"])
    assert pulled[0]["origin"] == "user"
    await receiver.close()
    await pusher.close()


async def test_the_connection_limit_holds_again_after_a_redis_restart(hub_factory):
    # Redis keeps nothing across a restart: each process writes its open
    # connections back at its next refresh, so the other process refuses again.
    import redis.asyncio as aioredis
    from support import restartable_redis

    with restartable_redis() as redis_server:
        env = {"HUB_REDIS_URL": redis_server.url, "HUB_MAX_CONNECTIONS_PER_USER": "3"}
        hub1, hub2 = hub_factory(env), hub_factory(env)
        user = new_user()
        held = [await connect(hub1, user, f"d{i}") for i in range(3)]
        with pytest.raises((ConnectionClosed, InvalidStatus)):
            await (await connect(hub2, user, "fourth")).recv()
        redis_server.stop()
        redis_server.start()
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await wait_for(lambda: _counted(client, user, 3), timeout=25, interval=0.5)
        finally:
            await client.aclose()
        with pytest.raises((ConnectionClosed, InvalidStatus)) as refused:
            await (await connect(hub2, user, "fourth")).recv()
        if isinstance(refused.value, ConnectionClosed):
            assert refused.value.rcvd is not None and refused.value.rcvd.code == 4009
        for d in held:
            await d.close()


async def test_a_connect_storm_uses_a_bounded_number_of_redis_connections(hub_factory, redis_url):
    # 80 users connecting at once to one hub: their admissions share a few
    # Redis connections (it opened one per concurrent admission: 48 here),
    # so a reconnect storm cannot use up Redis's clients.
    from support import TcpProxy

    async with TcpProxy.for_url(redis_url) as proxy:
        hub = await asyncio.to_thread(hub_factory, {"HUB_REDIS_URL": proxy.url(redis_url)})
        devices = await asyncio.gather(*(connect(hub, new_user(), "d") for _ in range(80)))
        assert all(d.welcome["type"] == "welcome" for d in devices)
        # The broker's two, and at most 16 for presence.
        assert proxy.flows_made <= 18, proxy.flows_made
        await asyncio.gather(*(d.close() for d in devices))


async def _counted(client, user: str, count: int) -> bool:
    return bool(await client.zcard(f"hub:c:{user}") == count)


async def test_messages_that_are_not_messages_count_against_the_rate(hub_factory):
    # Junk (not JSON, not an object) is refused with bad_request, and counted:
    # a flood of it is closed with 4008, as a flood of pings is.
    hub = hub_factory({"HUB_RATE_MESSAGES_PER_S": "2", "HUB_RATE_BURST_S": "1"})
    d = await RawClient.open(hub, new_user(), "junk")
    assert (await d.message())["type"] == "welcome"
    frames = []
    for _ in range(40):
        mask = secrets.token_bytes(4)
        payload = b"not json"
        frames.append(
            bytes([0x81, 0x80 | len(payload)])
            + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        )
    d.writer.write(b"".join(frames))
    assert await d.close_code(timeout=10) == 4008


async def test_devices_hear_of_what_their_process_missed_while_off_redis(hub_factory, redis_url):
    # Hub A loses Redis while hub B commits a push: its event cannot reach A's
    # device, and nothing later may reveal the gap (no next push). Once A is
    # subscribed again, its devices get sync_available with the user's
    # version, and pull.
    from support import TcpProxy

    async with TcpProxy.for_url(redis_url) as proxy:
        hub_a = await asyncio.to_thread(hub_factory, {"HUB_REDIS_URL": proxy.url(redis_url)})
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        user = new_user()
        phone = await connect(hub_a, user, "phone")
        ack = (await http_push(hub_b, user, [change("t1", stamp(), x=1)])).json()
        assert (await phone.expect("change"))["version"] == ack["version"]
        proxy.cut(refuse=True)
        await wait_for(lambda: '"msg":"broker connection lost"' in hub_a.logs(), timeout=10)
        missed = (await http_push(hub_b, user, [change("t2", stamp(), x=2)])).json()
        proxy.cut(refuse=False)  # Redis is reachable again
        notice = await phone.expect("sync_available", timeout=20)
        assert notice["version"] == missed["version"] and notice["collections"] == []
        await phone.close()


async def test_a_push_that_commits_during_shutdown_still_reaches_the_other_processes(
    hub_factory, redis_url, database_url
):
    # The user's version row is locked from outside, so hub A's commit waits;
    # on SIGTERM A gives up waiting and answers the push `unavailable`. The
    # commit then ends well while A is still closing: its event must reach
    # the device on hub B (the pusher's retry will be a replay, with no event).
    env = {"HUB_REDIS_URL": redis_url, "HUB_SHUTDOWN_TIMEOUT_S": "4"}
    hub_a = await asyncio.to_thread(hub_factory, env)
    hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
    user = new_user()
    first = (await http_push(hub_a, user, [change("t0", stamp(), x=0)])).json()
    phone = await connect(hub_b, user, "phone")
    laptop = await connect(hub_a, user, "laptop")
    holder = await asyncpg.connect(database_url)
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM hub_users WHERE user_id = $1 FOR UPDATE", user)
        await laptop.send({"type": "push", "id": "late", "changes": [change("t1", stamp(), x=1)]})
        await asyncio.sleep(0.3)  # the commit waits on the lock
        hub_a.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "did not finish the last commit in time" in hub_a.logs(), 10)
        await lock.rollback()  # the commit goes through now
    finally:
        await holder.close()
    event = await phone.expect("change", timeout=10)
    assert event["version"] == first["version"] + 1
    await asyncio.to_thread(hub_a.proc.wait, 10)
    await phone.close()


async def test_a_device_welcomed_before_its_subscription_is_live_is_told_to_pull(
    hub_factory, redis_url
):
    # Hub A's commands reach Redis 3 s late, past the 2 s a connection waits
    # for its user's subscription: it is welcomed all the same, and a push on
    # hub B right then is published before A listens. Once A's subscription
    # is live, the device gets sync_available with the user's version.
    from support import TcpProxy

    async with TcpProxy.for_url(redis_url) as proxy:
        hub_a = await asyncio.to_thread(hub_factory, {"HUB_REDIS_URL": proxy.url(redis_url)})
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        user = new_user()
        proxy.delay_s = 3.0
        phone = await connect(hub_a, user, "phone")
        missed = (await http_push(hub_b, user, [change("t1", stamp(), x=1)])).json()
        notice = await phone.expect("sync_available", timeout=15)
        assert notice["version"] == missed["version"]
        await phone.close()


async def test_devices_hear_of_a_gap_once_the_database_answers_again(
    hub_factory, redis_url, database_url
):
    # Hub A loses Redis and PostgreSQL; hub B commits a push. Redis comes
    # back first: A cannot read the user's version yet, and tells its device
    # once PostgreSQL answers again.
    from support import TcpProxy

    async with (
        TcpProxy.for_url(redis_url) as redis_proxy,
        TcpProxy.for_url(database_url) as db_proxy,
    ):
        env = {
            "HUB_REDIS_URL": redis_proxy.url(redis_url),
            "HUB_DATABASE_URL": db_proxy.url(database_url),
            "HUB_DB_TIMEOUT_S": "1",
        }
        hub_a = await asyncio.to_thread(hub_factory, env)
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        user = new_user()
        phone = await connect(hub_a, user, "phone")
        db_proxy.cut(refuse=True)
        redis_proxy.cut(refuse=True)
        await wait_for(lambda: '"msg":"broker connection lost"' in hub_a.logs(), timeout=10)
        missed = (await http_push(hub_b, user, [change("t1", stamp(), x=1)])).json()
        redis_proxy.cut(refuse=False)
        await wait_for(lambda: "could not tell devices of a gap" in hub_a.logs(), timeout=20)
        db_proxy.cut(refuse=False)
        notice = await phone.expect("sync_available", timeout=30)
        assert notice["version"] == missed["version"]
        await phone.close()


async def test_devices_elsewhere_hear_of_events_published_into_a_dead_link(hub_factory, redis_url):
    # Hub A's link to Redis goes silent (a NAT that dropped it) and A commits
    # a push: its event goes nowhere. Once A has found the link dead and made
    # a new one, the devices on hub B get sync_available with the version.
    from support import TcpProxy

    async with TcpProxy.for_url(redis_url) as proxy:
        env = {"HUB_REDIS_URL": proxy.url(redis_url), "HUB_BROKER_CHECK_S": "0.5"}
        hub_a = await asyncio.to_thread(hub_factory, env)
        hub_b = hub_factory({"HUB_REDIS_URL": redis_url})
        user = new_user()
        phone = await connect(hub_b, user, "phone")
        ack = (await http_push(hub_a, user, [change("t0", stamp(), x=0)])).json()
        assert (await phone.expect("change"))["version"] == ack["version"]
        proxy.freeze()
        # A revocation published into the dead link too: its channel is no
        # user's, and must not stop the users' announcements.
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.delete(
                f"{hub_a.url}/v1/devices/http-dev",
                headers={"Authorization": f"Bearer {token_for(user)}"},
            )
        assert r.status_code == 204, r.text
        lost = (await http_push(hub_a, user, [change("t1", stamp(), x=1)], device="laptop")).json()
        notice = await phone.expect("sync_available", timeout=20)
        assert notice["version"] == lost["version"] and notice["collections"] == []
        assert "broker link silent; reconnecting" in hub_a.logs()
        await phone.close()
