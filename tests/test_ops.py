"""What ops see and run: /health, /metrics, logs, retention."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import asyncpg
import httpx
import jwt
import pytest
from changes import commit_one, delete, pull_all, push, upsert
from changes import stamp as old_stamp
from support import (
    JWT_SECRET,
    TcpProxy,
    change,
    connect,
    new_user,
    restartable_redis,
    run,
    serve_exits,
    stamp,
    token_for,
    wait_for,
)

from hub.auth import JwtVerifier
from hub.config import MAX_DURATION_S
from hub.errors import ResetRequired
from hub.protocol import PullQuery
from hub.store_postgres import RETENTION_LOCK, PostgresStore
from hub.types import Cursor


async def get(hub, path: str, user: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token_for(user)}"} if user else {}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"{hub.url}{path}", headers=headers)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# -- retention ---------------------------------------------------------------------


async def test_purged_tombstones_make_older_cursors_reset(store, user):
    await commit_one(store, push(user, upsert("a", x=(1, old_stamp(1)))))  # v1
    await commit_one(store, push(user, upsert("kept", x=(1, old_stamp(1)))))  # v2
    await commit_one(store, push(user, delete("a", old_stamp(2))))  # v3
    await commit_one(store, push(user, delete("kept", old_stamp(2))))  # v4
    await commit_one(store, push(user, upsert("kept", y=(2, old_stamp(3)))))  # v5: revived
    dry = await store.purge(retention_s=0, dry_run=True)
    assert dry["tombstones"] >= 1
    report = await store.purge(retention_s=0)
    assert report["tombstones"] >= 1 and report["fields"] >= 1
    with pytest.raises(ResetRequired) as reset:
        await store.pull(user, PullQuery(Cursor(2), 10, None))
    assert reset.value.horizon == 3
    page = await store.pull(user, PullQuery(Cursor(3), 10, None))
    assert [(d.record_id, d.version) for d in page.changes] == [("kept", 4), ("kept", 5)]
    deltas, _, _ = await pull_all(store, user)
    assert {d.record_id for d in deltas} == {"kept"}  # the revived record stays
    status = await store.status(user)
    assert status["collections"] == {"todos": {"records": 1, "deleted": 0}}


async def test_tombstones_within_the_retention_stay(store, user):
    await commit_one(store, push(user, upsert("a", x=(1, old_stamp(1)))))
    await commit_one(store, push(user, delete("a", old_stamp(2))))
    await store.purge(retention_s=3600)
    page = await store.pull(user, PullQuery(Cursor(1), 10, None))
    assert [(d.record_id, d.deleted) for d in page.changes] == [("a", True)]


async def test_the_longest_retention_setting_is_within_postgresql_range(store, user):
    await commit_one(store, push(user, upsert("a", x=(1, old_stamp(1)))))
    await commit_one(store, push(user, delete("a", old_stamp(2))))
    assert (await store.purge(retention_s=MAX_DURATION_S, dry_run=True))["tombstones"] == 0
    assert (await store.purge(retention_s=MAX_DURATION_S))["tombstones"] == 0


def run_cli(args: list[str], database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    full_env.update({"HUB_DATABASE_URL": database_url, "HUB_JWT_SECRET": JWT_SECRET, **env})
    return subprocess.run(
        [sys.executable, "-m", "hub", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_hub_retention_command_then_410_over_http(shared_hub, databases, user):
    url = shared_hub.database_url
    async with httpx.AsyncClient(timeout=10, base_url=shared_hub.url) as http:
        headers = {"Authorization": f"Bearer {token_for(user)}"}
        for changes in (
            [change("a", stamp(), x=1)],
            [{"collection": "todos", "id": "a", "op": "delete", "hlc": stamp(1)}],
        ):
            r = await http.post(
                "/v1/sync/push", json={"device": "d", "changes": changes}, headers=headers
            )
            assert r.status_code == 200
        dry = run_cli(["retention", "--dry-run"], url, HUB_TOMBSTONE_RETENTION="0.001")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["tombstones"] >= 1
        r = await http.get("/v1/sync/pull", params={"since": "1"}, headers=headers)
        assert r.status_code == 200  # a dry run purges nothing
        done = run_cli(["retention"], url, HUB_TOMBSTONE_RETENTION="0.001")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["tombstones"] >= 1
        r = await http.get("/v1/sync/pull", params={"since": "1"}, headers=headers)
        assert r.status_code == 410
        assert r.json()["error"]["code"] == "reset_required"
        r = await http.get("/v1/sync/pull", params={"since": "0"}, headers=headers)
        assert r.status_code == 200 and r.json()["changes"] == []


def test_maintenance_commands_need_the_hub_database(tmp_path):
    # An embedded PostgreSQL would be a database of its own: purging or
    # resyncing it does nothing to the hub's, and says nothing about that.
    for args in (["retention"], ["retention", "--dry-run"], ["resync-all", "--yes"]):
        done = run_cli(args, "", HUB_DATA_DIR=str(tmp_path / "data"))
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("hub: HUB_DATABASE_URL is not set"), done.stderr
        assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert not (tmp_path / "data").exists()


async def test_a_dry_run_leaves_a_database_without_hub_tables_as_it_is(databases):
    url = await databases.acreate()
    done = run_cli(["retention", "--dry-run"], url)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hub: HUB_DATABASE_URL: this database has no hub tables")
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    con = await asyncpg.connect(url)
    try:
        assert await con.fetchval("SELECT count(*) FROM pg_tables WHERE tablename ~ '^hub_'") == 0
    finally:
        await con.close()


async def test_retention_is_bounded_by_the_database_timeout_and_fails_in_one_line(databases):
    url = await databases.acreate()
    store = await PostgresStore.connect(url)
    await store.close()
    con = await asyncpg.connect(url)
    try:
        async with con.transaction():  # the purge's statements wait behind this lock
            await con.execute("LOCK TABLE hub_records IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            done = run_cli(["retention", "--dry-run"], url, HUB_DB_TIMEOUT_S="1")
            took = time.monotonic() - started
    finally:
        await con.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hub: retention failed on HUB_DATABASE_URL: "), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert took < 4.5  # HUB_DB_TIMEOUT_S, not the store's default of 5 s


async def test_retention_exits_3_while_another_process_purges(database_url):
    con = await asyncpg.connect(database_url)
    try:
        await con.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK)
        done = run_cli(["retention"], database_url)
    finally:
        await con.close()
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout) == {"skipped": True}
    assert done.stderr.startswith("hub: another process is purging now")
    assert done.stderr.count("\n") == 1


# -- tokens ------------------------------------------------------------------------


async def test_hub_token_is_accepted_by_a_hub_with_the_same_settings():
    settings = {
        "HUB_JWT_AUDIENCE": "app",
        "HUB_JWT_ISSUER": "https://hub.example",
        "HUB_JWT_ALGORITHMS": "HS384,HS256",
    }
    done = run_cli(["token", "alice", "--ttl", "60"], "", **settings)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    token = done.stdout.strip()
    verifier = JwtVerifier(
        secret=JWT_SECRET,
        algorithms=("HS384", "HS256"),
        audience="app",
        issuer="https://hub.example",
    )
    principal = await verifier.verify(token)
    assert principal.user == "alice"
    assert principal.expires_at is not None and principal.expires_at - time.time() <= 60
    assert jwt.get_unverified_header(token)["alg"] == "HS384"


def test_hub_token_warns_about_the_development_secret(tmp_path):
    done = run_cli(["token", "alice"], "", HUB_JWT_SECRET="", HUB_DATA_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("hub: warning: HUB_JWT_SECRET is not set")
    assert done.stderr.count("\n") == 1
    assert done.stdout.count(".") == 2  # the token, still made


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["token", ""], "hub: the user must be"),
        (["token", "u" * 129], "hub: the user must be"),
        (["token", "alice", "--ttl", "0"], "hub: --ttl must be"),
        (["token", "alice", "--ttl", "-60"], "hub: --ttl must be"),
        (["token", "alice", "--ttl", "nan"], "hub: --ttl must be"),
        (["token", "alice", "--ttl", "inf"], "hub: --ttl must be"),
    ],
)
def test_hub_token_refuses_what_no_hub_would_accept(args, says):
    done = run_cli(args, "")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith(says) and done.stderr.count("\n") == 1
    assert done.stdout == ""


# -- metrics -----------------------------------------------------------------------


async def test_metrics_move_when_pushes_happen(shared_hub):
    user = new_user()
    before = (await get(shared_hub, "/metrics")).text
    receiver = await connect(shared_hub, user, "receiver")
    sender = await connect(shared_hub, user, "sender")
    for i in range(3):
        ack = await sender.push([change(f"t{i}", stamp(), x=i)])
        assert ack["type"] == "ack"
        await receiver.expect("change")
    await sender.push([change("t0", stamp(-60_000), x=0)])  # older: ignored
    refused = await sender.push([change("t0", stamp(3_600_000), x=0)])  # an hour ahead
    assert refused["code"] == "clock_skew", refused
    async with httpx.AsyncClient(timeout=10) as client:  # no 'device': refused before a commit
        r = await client.post(
            f"{shared_hub.url}/v1/sync/push",
            json={"changes": []},
            headers={"Authorization": f"Bearer {token_for(user)}"},
        )
    assert r.status_code == 400
    r = await get(shared_hub, "/v1/sync/pull?since=99", user)
    assert r.status_code == 410

    async def moved() -> str | None:
        text = (await get(shared_hub, "/metrics")).text
        return text if metric(text, "hub_connections") >= 2 else None

    after = await wait_for(moved, timeout=5)
    for name, labels, at_least in (
        ("hub_pushes_total", {"result": "applied"}, 3),
        ("hub_pushes_total", {"result": "unchanged"}, 1),
        ("hub_pushes_total", {"result": "clock_skew"}, 1),
        ("hub_pushes_total", {"result": "bad_request"}, 1),
        ("hub_changes_total", {"result": "applied"}, 3),
        ("hub_changes_total", {"result": "ignored"}, 1),
        ("hub_event_deliveries_total", {"type": "change"}, 3),
        ("hub_events_published_total", {}, 3),
        ("hub_pulls_total", {"result": "reset_required"}, 1),
        ("hub_push_seconds_count", {}, 4),
        ("hub_commit_batch_pushes_count", {}, 1),
        ("hub_commit_seconds_count", {}, 1),
    ):
        grew = metric(after, name, **labels) - metric(before, name, **labels)
        assert grew >= at_least, (name, labels, grew)
    await receiver.close()
    await sender.close()


async def test_auth_failures_are_counted_by_reason(shared_hub, user):
    before = (await get(shared_hub, "/metrics")).text
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(
            f"{shared_hub.url}/v1/sync/status",
            headers={"Authorization": f"Bearer {token_for(user, ttl_s=-300)}"},
        )
    assert r.status_code == 401
    after = (await get(shared_hub, "/metrics")).text
    grew = metric(after, "hub_auth_failures_total", reason="token_expired") - metric(
        before, "hub_auth_failures_total", reason="token_expired"
    )
    assert grew == 1


# -- health -----------------------------------------------------------------------


async def test_health_is_degraded_while_redis_is_down_and_ok_again(hub_factory):
    with restartable_redis() as redis_server:
        hub = hub_factory({"HUB_REDIS_URL": redis_server.url})

        async def status_is(want: str):
            body = (await get(hub, "/health")).json()
            return body if body["status"] == want else None

        body = await wait_for(lambda: status_is("ok"), timeout=10, interval=0.2)
        assert body["checks"]["broker"]["ok"] and body["checks"]["postgres"]["ok"]
        redis_server.stop()
        body = await wait_for(lambda: status_is("degraded"), timeout=15, interval=0.2)
        assert body["checks"]["postgres"]["ok"] and not body["checks"]["broker"]["ok"]
        assert (await get(hub, "/health")).status_code == 200
        redis_server.start()
        await wait_for(lambda: status_is("ok"), timeout=20, interval=0.2)


async def test_health_is_down_while_postgres_is_unreachable(tmp_path):
    from support import ThrowawayPostgres, spawn_hub

    with ThrowawayPostgres() as pg:
        hub = spawn_hub({"HUB_DATABASE_URL": pg.url, "HUB_DB_TIMEOUT_S": "1"}, tmp_path)
        try:

            async def status_is(want: str):
                r = await get(hub, "/health")
                return r if r.json()["status"] == want else None

            await wait_for(lambda: status_is("ok"), timeout=10, interval=0.2)
            pg.stop()
            r = await wait_for(lambda: status_is("down"), timeout=20, interval=0.2)
            assert r.status_code == 503
            assert r.json()["checks"]["postgres"]["ok"] is False
            assert (await get(hub, "/health/live")).status_code == 200
            pg.start()
            await wait_for(lambda: status_is("ok"), timeout=30, interval=0.3)
        finally:
            hub.stop()


async def test_health_answers_within_the_database_timeout_when_postgres_hangs(
    hub_factory, database_url
):
    # A blackholed database: the probe's statement times out, and so would
    # the driver's cancel request of it; /health must not wait for either.
    async with TcpProxy.for_url(database_url) as proxy:
        hub = await asyncio.to_thread(
            hub_factory,
            {"HUB_DATABASE_URL": proxy.url(database_url), "HUB_DB_TIMEOUT_S": "1"},
        )

        async def status_is(want: str):
            r = await get(hub, "/health")
            return r if r.json()["status"] == want else None

        await wait_for(lambda: status_is("ok"), timeout=10, interval=0.2)
        proxy.freeze(new_flows=True)
        for _ in range(5):  # the cached answer first (about a second), then the probe's
            started = time.monotonic()
            r = await get(hub, "/health")
            took = time.monotonic() - started
            assert took < 1.5, f"/health took {took:.2f}s with HUB_DB_TIMEOUT_S=1"
            if r.status_code == 503:
                break
            await asyncio.sleep(0.3)
        assert r.status_code == 503 and r.json()["checks"]["postgres"]["ok"] is False
        # Still bounded while the probes before it hang on.
        started = time.monotonic()
        await asyncio.sleep(1.1)
        assert (await get(hub, "/health")).status_code == 503
        assert time.monotonic() - started < 1.1 + 1.5


# -- logs --------------------------------------------------------------------------


async def test_logs_are_json_lines_without_tokens(hub_factory):
    hub = hub_factory()
    user = new_user()
    token = token_for(user)
    d = await connect(hub, user, "d1", token=token)
    await d.push([change("t", stamp(), secret_value="do-not-log-me")])
    await d.close()
    r = await get(hub, "/v1/sync/status")  # 401: logged as an auth failure at most
    assert r.status_code == 401
    hub.stop()
    logs = hub.logs()
    assert logs.strip(), "the hub logged nothing"
    for line in logs.splitlines():
        entry = json.loads(line)
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
    assert token not in logs and token.split(".")[2] not in logs
    assert "do-not-log-me" not in logs


async def test_every_response_carries_a_request_id(shared_hub):
    async with httpx.AsyncClient(timeout=10, base_url=shared_hub.url) as http:
        given = await http.get("/health/live", headers={"X-Request-Id": "trace-42.a"})
        assert given.headers["x-request-id"] == "trace-42.a"
        made = await http.get("/health/live")
        refused = await http.get("/health/live", headers={"X-Request-Id": "bad id; x" * 10})
    assert re.fullmatch(r"[0-9a-f]{16}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{16}", refused.headers["x-request-id"])


async def test_a_full_resync_after_a_purge_completes_page_by_page(store, user):
    """Cursors made after the purge are good below the horizon: a device
    pulling from 0 in small pages reaches the end instead of 410 forever."""
    for i in range(8):
        await commit_one(store, push(user, upsert(f"r{i}", x=(i, old_stamp(1)))))
    await commit_one(store, push(user, delete("r3", old_stamp(2))))  # v9
    await store.purge(retention_s=0)
    deltas, cursor, version = await pull_all(store, user, limit=3)
    assert sorted(d.record_id for d in deltas) == [f"r{i}" for i in range(8) if i != 3]
    assert cursor.version == version == 9
    # A cursor from before the purge, below the horizon, still must reset.
    with pytest.raises(ResetRequired):
        await store.pull(user, PullQuery(Cursor(5), 3, None))


async def test_resync_all_after_a_restore_resets_every_older_cursor(shared_hub, user):
    url = shared_hub.database_url
    refused = run_cli(["resync-all"], url)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    async with httpx.AsyncClient(timeout=10, base_url=shared_hub.url) as http:
        headers = {"Authorization": f"Bearer {token_for(user)}"}
        r = await http.post(
            "/v1/sync/push",
            json={"device": "d", "changes": [change("a", stamp(), x=1)]},
            headers=headers,
        )
        assert r.status_code == 200
        cursor = (await http.get("/v1/sync/pull", params={"since": "0"}, headers=headers)).json()[
            "cursor"
        ]
        done = run_cli(["resync-all", "--yes"], url)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["users"] >= 1
        r = await http.get("/v1/sync/pull", params={"since": cursor}, headers=headers)
        assert r.status_code == 410
        fresh = (await http.get("/v1/sync/pull", params={"since": "0"}, headers=headers)).json()
        assert [c["id"] for c in fresh["changes"]] == ["a"]
        r = await http.get("/v1/sync/pull", params={"since": fresh["cursor"]}, headers=headers)
        assert r.status_code == 200 and r.json()["changes"] == []


async def test_metrics_add_up_over_the_workers(hub_factory, user):
    """With --workers 2, /metrics on either worker reports the whole hub."""
    hub = hub_factory(args=["--workers", "2"])
    headers = {"Authorization": f"Bearer {token_for(user)}"}

    async def live() -> bool:
        try:
            return (await get(hub, "/health/live")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(live, timeout=20)
    for i in range(20):
        # A new connection each time, so that both workers take some.
        async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
            r = await http.post(
                "/v1/sync/push",
                json={"device": "d", "changes": [change(f"t{i}", stamp(), n=i)]},
                headers=headers,
            )
            assert r.status_code == 200
    seen = set()
    for _ in range(6):
        text = (await get(hub, "/metrics")).text
        seen.add(metric(text, "hub_pushes_total", result="applied"))
    assert seen == {20.0}, seen


def test_start_up_problems_are_one_line_that_names_them(tmp_path, database_url, databases):
    # A database whose hub_records is something else: the schema cannot go in.
    clashing = databases.create()
    run(_execute(clashing, "CREATE VIEW hub_records AS SELECT 1 AS x"))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    free_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    unreachable = f"postgresql://hub:pw-not-shown@127.0.0.1:{free_port}/hub"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    try:
        for env, says in (
            ({"HUB_DATABASE_URL": unreachable}, "hub: HUB_DATABASE_URL: cannot connect"),
            (  # no database configured: the embedded one cannot start
                {"HUB_DATA_DIR": str(not_a_dir / "data")},
                "hub: cannot start the embedded PostgreSQL",
            ),
            (
                {"HUB_DATABASE_URL": database_url, "HUB_PORT": str(taken.getsockname()[1])},
                "hub: cannot listen on 127.0.0.1:",
            ),
            (
                {"HUB_DATABASE_URL": clashing},
                "hub: HUB_DATABASE_URL: cannot apply the hub's schema",
            ),
        ):
            done = serve_exits(tmp_path, HUB_HOST="127.0.0.1", HUB_JWT_SECRET="s" * 40, **env)
            assert done.returncode == 2, done.stderr
            assert done.stderr.startswith(says), done.stderr
            assert "Traceback" not in done.stderr and "pw-not-shown" not in done.stderr
        # The development secret (no JWT setting) on an address others reach.
        done = serve_exits(tmp_path, HUB_HOST="0.0.0.0", HUB_DATABASE_URL=database_url)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("hub: HUB_HOST=0.0.0.0 with the development secret")
        assert "Traceback" not in done.stderr
    finally:
        taken.close()


async def test_a_schema_that_waits_on_a_lock_is_given_up_in_time(tmp_path, databases):
    # An open write transaction holds hub_fields: the start-up check's schema
    # waits for it no longer than HUB_DB_TIMEOUT_S, and says so in one line
    # (waiting for good would also queue every other writer behind it).
    url = await databases.acreate()
    await (await PostgresStore.connect(url)).close()  # the schema in place
    holder = await asyncpg.connect(url)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE hub_fields IN ROW EXCLUSIVE MODE")
            started = time.monotonic()
            done = await asyncio.to_thread(
                serve_exits,
                tmp_path,
                HUB_HOST="127.0.0.1",
                HUB_JWT_SECRET="s" * 40,
                HUB_DATABASE_URL=url,
                HUB_DB_TIMEOUT_S="2",
            )
            took = time.monotonic() - started
    finally:
        await holder.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hub: HUB_DATABASE_URL: cannot apply the hub's schema")
    assert took < 30, took


async def _execute(url: str, sql: str) -> None:
    con = await asyncpg.connect(url)
    try:
        await con.execute(sql)
    finally:
        await con.close()


async def test_a_dead_workers_connections_leave_the_metrics(hub_factory, user):
    """A worker killed outright: the connections it held are not counted in
    /metrics any more (the other worker keeps serving)."""
    import os
    import signal
    from pathlib import Path

    hub = hub_factory(args=["--workers", "2"])
    await wait_for(lambda: hub.logs().count('"msg":"broker connected"') == 2, timeout=20)

    def workers() -> list[int]:
        children = Path(f"/proc/{hub.proc.pid}/task/{hub.proc.pid}/children").read_text().split()
        return [
            int(c) for c in children if b"--listen-fd" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]

    devices = []
    for i in range(8):  # new connections spread over both workers
        devices.append(await connect(hub, user, f"d{i}"))

    async def counted(n: float) -> bool:
        try:
            text = (await get(hub, "/metrics")).text
        except httpx.TransportError:
            return False  # the dead worker's socket was the one picked; try again
        return metric(text, "hub_connections") == n

    await wait_for(lambda: counted(8), timeout=15)  # every worker has reported its own
    # Which worker holds how many (the kernel's view), to kill one that holds some.
    sockets = subprocess.run(
        ["ss", "-Htnp", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    port = hub.url.rsplit(":", 1)[1]
    mine = [line for line in sockets.splitlines() if line.split()[2].endswith(f":{port}")]
    counts = {pid: sum(f"pid={pid}," in line for line in mine) for pid in workers()}
    victim = max(counts, key=lambda pid: counts[pid])
    assert counts[victim] > 0, counts
    os.kill(victim, signal.SIGKILL)

    await wait_for(lambda: counted(8 - counts[victim]), timeout=15)
    for d in devices:
        await d.close()
    await wait_for(lambda: counted(0), timeout=15)
