"""The Python client (hub.client) against real hub processes, real PostgreSQL
and Redis: convergence, offline changes across restarts, gaps, resets and a
hub killed under a pushing client."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from support import (
    JWT_SECRET,
    HubProcess,
    change,
    new_user,
    pull_all_http,
    server_state,
    stamp,
    token_for,
    wait_for,
)

from hub.client import (
    DataFileError,
    HubClient,
    PushRejected,
    Reconnect,
    RecordUpdate,
    Stopped,
    reconnect_plan,
)
from hub.store_postgres import PostgresStore

WAIT_S = 15.0


# -- helpers ----------------------------------------------------------------------------


def closed_port_url() -> str:
    """A URL where nothing listens: a client pointed at it is offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}"


def client(url: Any, user: str, device: str, path: Path, **kwargs: Any) -> HubClient:
    return HubClient(url, token_for(user), device, data_path=path / f"{device}.db", **kwargs)


async def server_version(hub: HubProcess, user: str) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(
            f"{hub.url}/v1/sync/status", headers={"Authorization": f"Bearer {token_for(user)}"}
        )
    assert r.status_code == 200, r.text
    version: int = r.json()["version"]
    return version


async def http_push(hub: HubProcess, user: str, changes: list[dict[str, Any]]) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{hub.url}/v1/sync/push",
            json={"device": "http-dev", "changes": changes},
            headers={"Authorization": f"Bearer {token_for(user)}"},
        )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def converged(hub: HubProcess, user: str, *clients: HubClient) -> dict[Any, Any]:
    """Wait until every client is synced and holds the hub's state; that state."""
    for c in clients:
        await c.synced(WAIT_S)
    expected = await server_state(hub, user)

    try:
        await wait_for(lambda: all(c.state() == expected for c in clients), WAIT_S)
    except AssertionError:
        for c in clients:
            state = c.state()
            diff = {k: (state.get(k), expected.get(k)) for k in state.keys() | expected.keys()}
            wrong = {k: v for k, v in diff.items() if v[0] != v[1]}
            assert not wrong, f"{c.device} (client, hub): {wrong}"
        raise
    return expected


# -- pure rules -------------------------------------------------------------------------


def top(low: float, high: float) -> float:
    """A "random" that always picks the top of the range, to see the bounds."""
    return high


@pytest.mark.parametrize(
    ("code", "reason", "attempt", "refreshable", "plan"),
    [
        (None, "connection lost", 0, False, Reconnect(0.5, next_url=True)),
        (None, "connection lost", 3, False, Reconnect(4.0, next_url=True)),
        (None, "connection lost", 50, False, Reconnect(30.0, next_url=True)),
        (1012, "restarting; reconnect in 2.7s", 5, False, Reconnect(2.7, next_url=True)),
        (1012, "restarting", 0, False, Reconnect(5.0, next_url=True)),
        (1013, "too slow; reconnect and pull", 0, False, Reconnect(0.5, next_url=False)),
        (4000, "heartbeat timeout", 1, False, Reconnect(1.0, next_url=True)),
        (4001, "bad token", 0, False, Reconnect(0.0, next_url=False, stop=True)),
        (4001, "bad token", 0, True, Reconnect(0.5, next_url=False)),
        (4010, "token expired", 2, True, Reconnect(2.0, next_url=False)),
        (4010, "token expired", 0, False, Reconnect(0.0, next_url=False, stop=True)),
        (4003, "this device was revoked", 0, True, Reconnect(0.0, next_url=False, stop=True)),
        (4008, "rate limited", 0, False, Reconnect(3.0, next_url=False)),
        (4009, "too many connections", 1, False, Reconnect(5.0, next_url=False)),
    ],
)
def test_reconnect_plan_follows_the_close_codes(
    code: int | None, reason: str, attempt: int, refreshable: bool, plan: Reconnect
) -> None:
    assert reconnect_plan(code, reason, attempt, refreshable=refreshable, uniform=top) == plan


# -- end to end -------------------------------------------------------------------------


async def test_two_clients_of_one_user_converge(shared_hub: HubProcess, tmp_path: Path) -> None:
    user = new_user()
    async with (
        client(shared_hub.url, user, "laptop", tmp_path) as laptop,
        client(shared_hub.url, user, "phone", tmp_path) as phone,
    ):
        await laptop.synced(WAIT_S)
        await phone.synced(WAIT_S)
        seen: list[RecordUpdate] = []
        updates = phone.changes()

        await laptop.upsert("todos", "t1", title="milk", done=False, tags=["a", {"b": 1.5}])
        await laptop.upsert("todos", "t2", title="bread")
        await wait_for(lambda: phone.get("todos", "t2") == {"title": "bread"}, WAIT_S)
        assert phone.get("todos", "t1") == {
            "title": "milk",
            "done": False,
            "tags": ["a", {"b": 1.5}],
        }

        await phone.upsert("todos", "t1", done=True)
        await wait_for(lambda: (laptop.get("todos", "t1") or {}).get("done") is True, WAIT_S)

        await laptop.delete("todos", "t2")
        await wait_for(lambda: phone.get("todos", "t2") is None, WAIT_S)
        assert "t2" not in phone.records("todos")

        await phone.upsert("todos", "t2", title="rye")  # revives, with only the new field
        await wait_for(lambda: laptop.get("todos", "t2") == {"title": "rye"}, WAIT_S)

        expected = await converged(shared_hub, user, laptop, phone)
        assert set(expected) == {("todos", "t1"), ("todos", "t2")}
        assert expected[("todos", "t2")][1] is not None  # the delete stamp stays

        async for update in updates:
            seen.append(update)
            if update.record_id == "t2" and update.source == "local":
                break
        # Remote ones come from events, or from a pull ("resync" when from 0).
        assert [(u.record_id, u.deleted, u.source == "local") for u in seen] == [
            ("t1", False, False),
            ("t2", False, False),
            ("t1", False, True),
            ("t2", True, False),
            ("t2", False, True),
        ]


async def test_values_read_from_the_replica_are_the_apps_to_change(
    shared_hub: HubProcess, tmp_path: Path
) -> None:
    # An app that edits a value it read, in place, changes its own copy: the
    # replica, the queued change and what reaches the hub change only through
    # upsert (a list appended to before it is written back, the usual way).
    user = new_user()
    async with client(shared_hub.url, user, "laptop", tmp_path) as laptop:
        updates = laptop.changes()
        await laptop.upsert("todos", "t1", tags=["a"], meta={"n": 1})
        (update,) = [await anext(updates)]
        update.fields["tags"].append("from the update")
        laptop.records("todos")["t1"]["meta"]["n"] = 2
        tags = laptop.get("todos", "t1")["tags"]
        tags.append("b")
        assert laptop.get("todos", "t1") == {"tags": ["a"], "meta": {"n": 1}}
        await laptop.synced(WAIT_S)
        await laptop.upsert("todos", "t1", tags=tags)
        await laptop.synced(WAIT_S)
        assert laptop.get("todos", "t1") == {"tags": ["a", "b"], "meta": {"n": 1}}
        state = await server_state(shared_hub, user)
        assert {n: v[0] for n, v in state[("todos", "t1")][0].items()} == {
            "tags": ["a", "b"],
            "meta": {"n": 1},
        }


@pytest.mark.parametrize("value", [math.nan, math.inf, [1.0, -math.inf], {"x": math.nan}], ids=str)
async def test_nan_and_infinities_are_refused_not_written_as_null(
    tmp_path: Path, value: Any
) -> None:
    async with client(closed_port_url(), new_user(), "laptop", tmp_path) as laptop:
        with pytest.raises(TypeError, match="fields.n: NaN and infinities are not JSON"):
            await laptop.upsert("todos", "t1", n=value, ok=1)
        assert laptop.get("todos", "t1") is None and laptop.pending == 0


async def test_offline_changes_survive_a_restart_and_are_pushed_once(
    shared_hub: HubProcess, tmp_path: Path
) -> None:
    user = new_user()
    offline = closed_port_url()
    async with client(offline, user, "phone", tmp_path) as phone:
        first = await phone.upsert("todos", "t1", title="milk", done=False)
        await phone.upsert("todos", "t2", title="bread")
        await phone.delete("todos", "t2")
        assert not phone.connected and phone.pending == 3
    before_restart = phone.state()

    async with client(offline, user, "phone", tmp_path) as phone:  # restarted, still offline
        assert phone.state() == before_restart and phone.pending == 3
        later = await phone.upsert("todos", "t3", title="eggs")
        assert later > first  # the clock did not go back across the restart

    async with client(shared_hub.url, user, "phone", tmp_path) as phone:
        expected = await converged(shared_hub, user, phone)
        assert phone.pending == 0
    assert set(expected) == {("todos", "t1"), ("todos", "t2"), ("todos", "t3")}
    assert expected[("todos", "t2")] == ({}, expected[("todos", "t2")][1])
    # Everything queued went as one push; nothing went twice.
    assert await server_version(shared_hub, user) == 1

    async with client(shared_hub.url, user, "phone", tmp_path) as phone:
        await phone.synced(WAIT_S)
        assert phone.state() == expected
    assert await server_version(shared_hub, user) == 1


async def test_missed_events_are_caught_up_by_a_pull(hub_factory: Any, tmp_path: Path) -> None:
    # Two hubs without a broker between them: a push on one is an event on
    # that one only, so the client on the other sees a gap in `prev`.
    hub_a, hub_b = hub_factory(), hub_factory()
    user = new_user()
    async with client(hub_a.url, user, "phone", tmp_path) as phone:
        await phone.synced(WAIT_S)
        await http_push(hub_b, user, [change("missed", stamp(node="http-dev"), title="x")])
        ack = await http_push(hub_a, user, [change("seen", stamp(node="http-dev"), title="y")])
        assert ack["version"] == 2
        # The event of version 2 says prev=1, which the phone never saw: it pulls.
        await wait_for(lambda: phone.get("todos", "missed") == {"title": "x"}, WAIT_S)
        assert phone.get("todos", "seen") == {"title": "y"}
        await converged(hub_a, user, phone)
        assert phone.version == 2

    # Closed meanwhile: the next start resumes from the stored cursor.
    await http_push(hub_b, user, [change("later", stamp(node="http-dev"), title="z")])
    async with client(hub_b.url, user, "phone", tmp_path) as phone:
        await converged(hub_b, user, phone)
        assert phone.get("todos", "later") == {"title": "z"}


async def test_sync_available_makes_the_client_pull(shared_hub: HubProcess, tmp_path: Path) -> None:
    user = new_user()
    async with (
        client(shared_hub.url, user, "laptop", tmp_path) as laptop,
        client(shared_hub.url, user, "watch", tmp_path, mode="notify") as watch,
    ):
        await watch.synced(WAIT_S)
        await laptop.synced(WAIT_S)
        await laptop.upsert("todos", "t1", title="small")
        await wait_for(lambda: watch.get("todos", "t1") == {"title": "small"}, WAIT_S)

        # An event over max_event_bytes (64 KiB) reaches the laptop as sync_available.
        big = {f"part{i}": "x" * 40_000 for i in range(3)}
        await watch.upsert("todos", "big", **big)
        await wait_for(lambda: laptop.get("todos", "big") == big, WAIT_S)
        await converged(shared_hub, user, laptop, watch)


async def test_reset_required_makes_the_client_resync_from_zero(
    shared_hub: HubProcess, store: PostgresStore, tmp_path: Path
) -> None:
    user = new_user()
    async with client(shared_hub.url, user, "phone", tmp_path) as phone:
        for i in range(5):
            await phone.upsert("todos", f"t{i}", title=f"n{i}")
        await converged(shared_hub, user, phone)
        assert phone.version == await server_version(shared_hub, user)

    # While the phone is away, another device deletes two records and the
    # purge makes those deletes (and the phone's cursor) history.
    gone = stamp(node="http-dev")
    await http_push(
        shared_hub,
        user,
        [
            {"collection": "todos", "id": "t0", "op": "delete", "hlc": gone},
            {"collection": "todos", "id": "t1", "op": "delete", "hlc": gone},
        ],
    )
    await http_push(shared_hub, user, [change("t9", stamp(node="http-dev"), title="new")])
    report = await store.purge(retention_s=0)
    assert report.get("tombstones", 0) >= 2, report

    # Offline first: a change of its own waits in the outbox across the reset.
    async with client(closed_port_url(), user, "phone", tmp_path) as phone:
        await phone.upsert("todos", "t2", title="mine")

    async with client(shared_hub.url, user, "phone", tmp_path) as phone:
        resynced = [u async for u in _until_synced(phone)]
        expected = await converged(shared_hub, user, phone)
    # Only a resync from 0 forgets t0 and t1: an incremental pull would have
    # brought their tombstones, and the purge removed those.
    assert ("todos", "t0") not in expected and ("todos", "t0") not in phone.state()
    assert phone.records("todos") == {
        "t2": {"title": "mine"},
        "t3": {"title": "n3"},
        "t4": {"title": "n4"},
        "t9": {"title": "new"},
    }
    assert {u.record_id for u in resynced if u.source == "resync"} >= {"t0", "t1", "t9"}, resynced


async def _until_synced(c: HubClient) -> Any:
    """The updates a client applies until it is synced."""
    updates = c.changes()
    done = asyncio.ensure_future(c.synced(WAIT_S))
    try:
        while not done.done():
            step = asyncio.ensure_future(anext(updates))
            await asyncio.wait({step, done}, return_when=asyncio.FIRST_COMPLETED)
            if step.done():
                yield step.result()
            else:
                step.cancel()
        await done
    finally:
        done.cancel()


async def test_a_killed_hub_loses_no_acked_push(
    hub_factory: Any, redis_url: str, tmp_path: Path
) -> None:
    env = {"HUB_REDIS_URL": redis_url}
    hub_a, hub_b = hub_factory(env), hub_factory(env)
    user = new_user()
    errors: list[Any] = []
    async with (
        client([hub_a.url, hub_b.url], user, "writer", tmp_path, on_error=errors.append) as writer,
        client(hub_b.url, user, "reader", tmp_path) as reader,
    ):
        await writer.synced(WAIT_S)
        await reader.synced(WAIT_S)
        written: dict[str, int] = {}

        async def keep_writing(start: int, stop: int) -> None:
            for i in range(start, stop):
                written[f"r{i % 25}"] = i
                await writer.upsert("items", f"r{i % 25}", n=i)
                await asyncio.sleep(0.005)

        await keep_writing(0, 60)
        await wait_for(lambda: writer.pending < 20, WAIT_S)  # most acked by hub A
        acked_before_kill = await server_state(hub_b, user)
        assert acked_before_kill

        writing = asyncio.ensure_future(keep_writing(60, 140))
        await asyncio.sleep(0.1)
        hub_a.kill()
        await writing
        assert not errors

        expected = await converged(hub_b, user, writer, reader)
        assert {rid: f[0]["n"][0] for (_, rid), f in expected.items()} == written
        for key, (fields, _) in acked_before_kill.items():
            assert expected[key][0]["n"][1] >= fields["n"][1]  # nothing acked went back
        versions = {d["version"] for d in await pull_all_http(hub_b, user)}
        assert max(versions) == await server_version(hub_b, user)


async def test_a_bad_static_token_stops_the_client(shared_hub: HubProcess, tmp_path: Path) -> None:
    bad = HubClient(
        shared_hub.url, "not-a-token", "phone", data_path=tmp_path / f"{secrets.token_hex(3)}.db"
    )
    async with bad:
        with pytest.raises(Stopped) as stopped:
            await bad.synced(WAIT_S)
        assert stopped.value.code == 4001
        await bad.upsert("todos", "t1", title="kept for later")  # still works locally
        assert bad.pending == 1


async def test_api_keys_write_and_a_read_only_key_is_refused_and_undone(
    shared_hub: HubProcess, tmp_path: Path
) -> None:
    user = new_user()
    keys = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for name, scopes in (("writer", ["read", "write"]), ("reader", ["read"])):
            r = await http.post(
                f"{shared_hub.url}/v1/api-keys",
                json={"name": name, "scopes": scopes},
                headers={"Authorization": f"Bearer {token_for(user)}"},
            )
            assert r.status_code == 201, r.text
            keys[name] = r.json()["key"]
    refused: list[Any] = []
    async with (
        HubClient(shared_hub.url, keys["writer"], "ingest", data_path=tmp_path / "w.db") as ingest,
        HubClient(
            shared_hub.url,
            keys["reader"],
            "viewer",
            data_path=tmp_path / "r.db",
            on_error=refused.append,
        ) as viewer,
    ):
        await ingest.upsert("metrics", "m1", value=1)
        await viewer.upsert("metrics", "m2", value=2)  # shown at once, refused by the hub
        assert viewer.get("metrics", "m2") == {"value": 2}
        await wait_for(lambda: refused, WAIT_S)
        assert isinstance(refused[0], PushRejected) and refused[0].code == "forbidden"
        assert refused[0].changes[0]["id"] == "m2"
        expected = await converged(shared_hub, user, ingest, viewer)
        assert set(expected) == {("metrics", "m1")}
        assert viewer.get("metrics", "m2") is None and viewer.pending == 0


async def test_a_restarting_hub_sends_the_client_to_the_next_after_its_hint(
    hub_factory: Any, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"HUB_REDIS_URL": redis_url}
    hub_a, hub_b = hub_factory(env), hub_factory(env)
    user = new_user()
    caplog.set_level(logging.INFO, logger="hub.client")
    async with client([hub_a.url, hub_b.url], user, "phone", tmp_path) as phone:
        await phone.upsert("todos", "t1", title="before")
        await phone.synced(WAIT_S)
        first = phone.connection
        hub_a.proc.terminate()  # a graceful stop: close 1012, "reconnect in N s"
        await wait_for(lambda: phone.connection not in (None, first), WAIT_S)
        await phone.upsert("todos", "t1", title="after")
        await converged(hub_b, user, phone)
    ended = [r for r in caplog.records if r.getMessage().startswith("connection to")]
    url, code, reason, delay = ended[0].args  # type: ignore[misc]
    assert url.startswith(hub_a.ws_url) and code == 1012
    hint = float(reason.split("reconnect in ")[1].rstrip("s"))
    assert 0.5 <= hint <= 5.0 and delay == hint


async def test_a_credential_function_refreshes_the_token_in_place(
    shared_hub: HubProcess, tmp_path: Path
) -> None:
    user = new_user()
    exp = int(time.time()) + 2
    short = hs_token(user, exp)
    calls: list[float] = []

    async def fetch_token() -> str:
        calls.append(time.time())
        return short if len(calls) == 1 else token_for(user)

    async with (
        HubClient(shared_hub.url, fetch_token, "fresh", data_path=tmp_path / "f.db") as fresh,
        HubClient(shared_hub.url, short, "stale", data_path=tmp_path / "s.db") as stale,
    ):
        await fresh.synced(WAIT_S)
        connection = fresh.connection
        # The hub warns a minute ahead, so at once: the function is asked again.
        await wait_for(lambda: len(calls) >= 2, WAIT_S)
        await stale.synced(WAIT_S)
        stopped = await wait_for(lambda: stale.stopped, exp - time.time() + WAIT_S)
        assert isinstance(stopped, Stopped) and stopped.code == 4010  # a fixed token: stop
        await asyncio.sleep(max(0.0, exp + 0.5 - time.time()))  # past the old token's exp
        await fresh.upsert("todos", "t1", title="still here")
        await fresh.synced(WAIT_S)
        assert fresh.connection == connection  # the same connection, past the old exp


def hs_token(user: str, exp: int) -> str:
    return jwt.encode({"sub": user, "exp": exp}, JWT_SECRET, algorithm="HS256")


async def test_a_data_file_belongs_to_one_open_client_and_one_device(tmp_path: Path) -> None:
    user = new_user()
    offline = closed_port_url()
    async with client(offline, user, "phone", tmp_path):
        with pytest.raises(DataFileError):
            await client(offline, user, "phone", tmp_path).start()
    other = HubClient(offline, token_for(user), "tablet", data_path=tmp_path / "phone.db")
    with pytest.raises(DataFileError):
        await other.start()


# -- what the local file keeps, and pushes the hub takes only in part -------------------


async def test_a_cancelled_writer_leaves_the_file_as_the_replica(tmp_path: Path) -> None:
    # An app task writing offline is cancelled mid-way: every change the
    # replica shows is in the data file too, and queued for the hub.
    user = new_user()
    offline = closed_port_url()
    async with client(offline, user, "phone", tmp_path) as phone:

        async def writing() -> None:
            for i in range(1000):
                await phone.upsert("todos", f"t{i}", title="x" * 100)

        task = asyncio.create_task(writing())
        await wait_for(lambda: phone.pending >= 100, WAIT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        shown, pending = len(phone.records("todos")), phone.pending
    async with client(offline, user, "phone", tmp_path) as phone:
        assert (len(phone.records("todos")), phone.pending) == (shown, pending)


async def test_a_hub_taking_fewer_changes_per_push_gets_them_all(
    hub_factory: Any, tmp_path: Path
) -> None:
    hub = hub_factory({"HUB_MAX_CHANGES_PER_PUSH": "50"})
    user = new_user()
    errors: list[Any] = []
    async with client(closed_port_url(), user, "phone", tmp_path) as phone:
        for i in range(120):
            await phone.upsert("todos", f"t{i}", n=i)
    async with client(hub.url, user, "phone", tmp_path, on_error=errors.append) as phone:
        await phone.synced(WAIT_S)
        assert phone.pending == 0 and not errors
    assert len(await server_state(hub, user)) == 120


async def test_one_refused_change_does_not_take_the_others_with_it(
    hub_factory: Any, tmp_path: Path
) -> None:
    # The hub's value limit is below the client's: one change is refused,
    # the ones pushed with it are stored, and the refused one is undone here.
    hub = hub_factory({"HUB_MAX_VALUE_BYTES": "1000"})
    user = new_user()
    errors: list[Any] = []
    async with client(closed_port_url(), user, "phone", tmp_path) as phone:
        await phone.upsert("todos", "a", title="fine")
        await phone.upsert("todos", "big", title="x" * 2000)
        await phone.upsert("todos", "b", title="fine too")
    async with client(hub.url, user, "phone", tmp_path, on_error=errors.append) as phone:
        await wait_for(lambda: errors, WAIT_S)
        await phone.synced(WAIT_S)
        assert [e.code for e in errors] == ["invalid_change"]
        assert [c["id"] for c in errors[0].changes] == ["big"]
        assert set(phone.records("todos")) == {"a", "b"}
    assert set(await server_state(hub, user)) == {("todos", "a"), ("todos", "b")}


async def test_a_refused_change_is_undone_even_if_the_client_closes_before_resyncing(
    hub_factory: Any, tmp_path: Path
) -> None:
    # The refusal drops the change from the outbox; the resync that undoes it
    # here had not run when the client was closed. Opened again, the client
    # resyncs (its cursor alone would only pull what is new).
    hub = hub_factory({"HUB_MAX_VALUE_BYTES": "1000"})
    user = new_user()
    await http_push(hub, user, [change("other", stamp(node="laptop"), title="from the laptop")])
    errors: list[Any] = []
    async with client(hub.url, user, "phone", tmp_path) as phone:
        await phone.synced(WAIT_S)  # its cursor is past 0
        await phone.upsert("todos", "fine", title="fine")
        await phone.synced(WAIT_S)

    def closing_at_once(error: Any) -> None:
        errors.append(error)
        asyncio.ensure_future(phone.close())

    phone = client(hub.url, user, "phone", tmp_path, on_error=closing_at_once)
    await phone.start()
    await phone.upsert("todos", "big", title="x" * 2000)
    await wait_for(lambda: errors, WAIT_S)
    await phone.close()
    assert [e.code for e in errors] == ["invalid_change"]
    async with client(hub.url, user, "phone", tmp_path) as phone:
        await phone.synced(WAIT_S)
        assert set(phone.records("todos")) == {"other", "fine"}
    assert set(await server_state(hub, user)) == {("todos", "other"), ("todos", "fine")}


async def test_short_lived_tokens_are_not_refreshed_over_and_over(
    shared_hub: HubProcess, tmp_path: Path
) -> None:
    # Each token lives 45 s, so the hub warns at once that it expires within a
    # minute: the client refreshes, but not at every warning.
    user = new_user()
    calls: list[float] = []

    def fetch_token() -> str:
        calls.append(time.time())
        return hs_token(user, int(time.time()) + 45)

    async with HubClient(shared_hub.url, fetch_token, "d", data_path=tmp_path / "d.db") as d:
        await d.synced(WAIT_S)
        await wait_for(lambda: len(calls) >= 2, WAIT_S)  # connect, then one refresh
        await asyncio.sleep(2)  # what a loop would have made of it meanwhile
        assert len(calls) <= 3, len(calls)
        await d.upsert("todos", "t1", title="works")
        await d.synced(WAIT_S)


async def test_numbers_read_the_same_on_the_writer_and_on_a_puller(
    shared_hub: HubProcess, tmp_path: Path
) -> None:
    user = new_user()
    async with client(shared_hub.url, user, "writer", tmp_path) as writer:
        await writer.upsert("todos", "t1", big=2.5e300, small=1e-7, plain=1.5)
        await writer.synced(WAIT_S)
        mine = writer.get("todos", "t1")
    async with client(shared_hub.url, user, "newcomer", tmp_path) as newcomer:
        await newcomer.synced(WAIT_S)
        assert newcomer.get("todos", "t1") == mine
        assert mine is not None and mine["big"] == 25 * 10**299


async def test_an_iterator_made_after_close_ends(tmp_path: Path) -> None:
    phone = client(closed_port_url(), new_user(), "phone", tmp_path)
    await phone.start()
    await phone.close()
    assert [u async for u in phone.changes()] == []


async def test_refused_pushes_free_their_slots_for_the_rest(
    shared_hub: HubProcess, tmp_path: Path
) -> None:
    # A read-only key: every push is refused. With the answers slowed, more
    # than the 16 pushes in flight are queued; each refusal makes room, so
    # all of them are sent and answered without another write to wake it.
    from support import TcpProxy

    user = new_user()
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{shared_hub.url}/v1/api-keys",
            json={"name": "reader", "scopes": ["read"]},
            headers={"Authorization": f"Bearer {token_for(user)}"},
        )
    assert r.status_code == 201, r.text
    refused: list[Any] = []
    port = int(shared_hub.url.rsplit(":", 1)[1])
    async with TcpProxy(port, delay_s=0.2) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        async with HubClient(
            url, r.json()["key"], "d", data_path=tmp_path / "d.db", on_error=refused.append
        ) as d:
            await wait_for(lambda: d.connected, WAIT_S)
            for i in range(40):
                await d.upsert("todos", f"t{i}", n=i)
            await wait_for(lambda: d.pending == 0, WAIT_S)
            assert sum(len(e.changes) for e in refused) == 40


async def test_a_warning_within_the_refresh_interval_is_answered_after_it(
    shared_hub: HubProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tokens of 59 s: the hub warns at once after each swap. With the interval
    # at 0.5 s, the client keeps refreshing, every 0.5 s, never dropping one.
    import hub.client

    monkeypatch.setattr(hub.client, "REFRESH_MIN_INTERVAL_S", 0.5)
    user = new_user()
    calls: list[float] = []

    def fetch_token() -> str:
        calls.append(time.monotonic())
        return hs_token(user, int(time.time()) + 59)

    async with HubClient(shared_hub.url, fetch_token, "d", data_path=tmp_path / "d.db") as d:
        await d.synced(WAIT_S)
        await wait_for(lambda: len(calls) >= 6, WAIT_S)
        gaps = [b - a for a, b in zip(calls[1:], calls[2:], strict=False)]
        assert all(gap >= 0.45 for gap in gaps), gaps
