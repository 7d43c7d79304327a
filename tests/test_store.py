"""The PostgreSQL store against a real server: merge, versions, pages, batches."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest
from changes import commit_one, delete, normalized, pull_all, push, replica_of, stamp, upsert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Databases, new_user, run

from hub.errors import HubError, IdempotencyKeyReused, ResetRequired
from hub.merge import Replica, apply_change
from hub.protocol import PullQuery
from hub.store_postgres import PostgresStore
from hub.types import Change, Cursor, Push, PushResult

# -- versions and merge -------------------------------------------------------------


async def test_versions_only_for_pushes_that_change_something(store, user):
    first = await commit_one(store, push(user, upsert("t1", title=("a", stamp(1)))))
    assert (first.version, first.applied, first.ignored, first.prev) == (1, 1, 0, 0)
    same = await commit_one(store, push(user, upsert("t1", title=("a", stamp(1)))))
    assert (same.version, same.applied, same.ignored) == (1, 0, 1)
    older = await commit_one(store, push(user, upsert("t1", title=("old", stamp(0)))))
    assert (older.version, older.applied) == (1, 0)
    newer = await commit_one(
        store, push(user, upsert("t1", title=("b", stamp(2))), upsert("t2", x=(1, stamp(0))))
    )
    assert (newer.version, newer.applied, newer.prev) == (2, 2, 1)
    assert (await store.status(user))["version"] == 2


async def test_delete_and_revive_in_pull(store, user):
    await commit_one(store, push(user, upsert("t1", title=("a", stamp(1)), done=(False, stamp(1)))))
    await commit_one(store, push(user, delete("t1", stamp(5))))
    deltas, _, version = await pull_all(store, user)
    assert version == 2
    assert [(d.version, d.fields, d.deleted) for d in deltas] == [(2, {}, True)]
    assert deltas[0].deleted_hlc == stamp(5)
    # A write stamped before the delete stays dropped; a later one revives the record.
    stale = await commit_one(store, push(user, upsert("t1", title=("x", stamp(4)))))
    assert stale.applied == 0
    await commit_one(store, push(user, upsert("t1", title=("back", stamp(6)))))
    deltas, _, _ = await pull_all(store, user)
    assert [(d.version, sorted(d.fields), d.deleted) for d in deltas] == [
        (2, [], False),
        (3, ["title"], False),
    ]
    assert all(d.deleted_hlc == stamp(5) for d in deltas)
    status = await store.status(user)
    assert status["collections"] == {"todos": {"records": 1, "deleted": 0}}


async def test_two_changes_to_one_record_in_one_push_merge_in_order(store, user):
    result = await commit_one(
        store,
        push(
            user,
            upsert("t1", title=("a", stamp(1))),
            delete("t1", stamp(2)),
            upsert("t1", done=(True, stamp(3))),
        ),
    )
    assert (result.applied, result.ignored) == (3, 0)
    [delta] = result.deltas
    assert delta.fields == {"done": ("true", stamp(3))}
    assert (delta.deleted, delta.deleted_hlc) == (False, stamp(2))
    deltas, _, _ = await pull_all(store, user)
    assert replica_of(deltas) == {("todos", "t1"): ({"done": (True, stamp(3))}, stamp(2))}


async def test_idempotent_replay_and_reused_key(store, user):
    p = push(user, upsert("t1", title=("a", stamp(1))), key="k1")
    first = await commit_one(store, p)
    again = await commit_one(store, p)
    assert again.replay and again.body() == first.body()
    assert (await store.status(user))["version"] == 1
    other = push(user, upsert("t1", title=("b", stamp(2))), key="k1")
    [result] = await store.commit([other])
    assert isinstance(result, IdempotencyKeyReused)
    deltas, _, _ = await pull_all(store, user)
    assert replica_of(deltas)[("todos", "t1")][0] == {"title": ("a", stamp(1))}


async def test_same_key_twice_in_one_batch_is_a_replay(store, user):
    p = push(user, upsert("t1", title=("a", stamp(1))), key="k")
    first, second = await store.commit([p, p])
    assert isinstance(first, PushResult) and isinstance(second, PushResult)
    assert (first.replay, second.replay) == (False, True)
    assert second.body() == first.body()
    assert (await store.status(user))["version"] == 1


async def test_users_never_see_each_other(store):
    alice, bob = new_user(), new_user()
    results = await store.commit(
        [
            push(alice, upsert("a1", secret=("alice", stamp(1)))),
            push(bob, upsert("b1", x=(1, stamp(1)))),
        ]
    )
    assert [r.version for r in results] == [1, 1]
    deltas, _, _ = await pull_all(store, bob)
    assert [(d.collection, d.record_id) for d in deltas] == [("todos", "b1")]
    assert (await store.status(bob))["collections"] == {"todos": {"records": 1, "deleted": 0}}


async def test_cursor_past_the_users_version_needs_a_reset(store, user):
    await commit_one(store, push(user, upsert("t1", title=("a", stamp(1)))))
    with pytest.raises(ResetRequired):
        await store.pull(user, PullQuery(Cursor(5), 10, None))


# -- pages ------------------------------------------------------------------------


async def test_one_push_of_1000_changes_read_with_limit_7(store, user):
    changes = [upsert(f"r{i:04d}", n=(i, stamp(1))) for i in range(1000)]
    result = await commit_one(store, push(user, *changes))
    assert result.applied == 1000
    deltas, cursor, _ = await pull_all(store, user, limit=7)
    keys = [(d.collection, d.record_id, d.version) for d in deltas]
    assert len(keys) == 1000 and len(set(keys)) == 1000
    assert cursor == Cursor(1)
    # Nothing more after the final cursor.
    page = await store.pull(user, PullQuery(cursor, 7, None))
    assert page.changes == () and not page.has_more


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_fields_changed_by_several_pushes_survive_small_pages(store, user, limit):
    await commit_one(store, push(user, upsert("t1", a=(1, stamp(1)), b=(1, stamp(1)))))
    await commit_one(store, push(user, upsert("t1", b=(2, stamp(2)), c=(2, stamp(2)))))
    await commit_one(store, push(user, upsert("t2", z=(3, stamp(3)))))
    await commit_one(store, push(user, upsert("t1", d=(4, stamp(4)))))
    deltas, _, _ = await pull_all(store, user, limit=limit)
    assert replica_of(deltas) == {
        ("todos", "t1"): (
            {"a": (1, stamp(1)), "b": (2, stamp(2)), "c": (2, stamp(2)), "d": (4, stamp(4))},
            None,
        ),
        ("todos", "t2"): ({"z": (3, stamp(3))}, None),
    }
    assert [d.version for d in deltas] == sorted(d.version for d in deltas)


async def test_pages_stop_at_a_byte_budget_and_lose_nothing(store, user):
    # 30 records of 10 KB each (and one of 50 KB, larger than the budget): a
    # page stops before the delta that would take it past 40 KB, with
    # has_more; paging
    # on gets every delta once, in order; a delta larger than the budget
    # still comes, alone.
    for i in range(30):
        await commit_one(store, push(user, upsert(f"t{i:02d}", body=("x" * 10_000, stamp(i)))))
    await commit_one(store, push(user, upsert("t99", body=("y" * 50_000, stamp(99)))))
    cursor, seen, sizes = Cursor(0), [], []
    for _ in range(100):
        page = await store.pull(user, PullQuery(cursor, 5000, None), max_bytes=40_000)
        seen.extend(d.record_id for d in page.changes)
        sizes.append(len(page.changes))
        cursor = page.cursor
        if not page.has_more:
            break
    assert seen == [f"t{i:02d}" for i in range(30)] + ["t99"]
    assert max(sizes) == 3 and sizes[-1] == 1, sizes  # 4 x 10 KB (+ overhead) pass 40 KB


async def test_a_delta_past_the_budget_is_not_the_end_of_the_pull(store, user):
    # A page that starts with a delta larger than the budget holds only it,
    # and must say there may be more: the deltas after it come on the next
    # pages, whether the big one is first, in the middle or last.
    await commit_one(store, push(user, upsert("big1", body=("x" * 50_000, stamp(1)))))
    await commit_one(store, push(user, upsert("small1", body=("s", stamp(2)))))
    await commit_one(store, push(user, upsert("big2", body=("y" * 50_000, stamp(3)))))
    await commit_one(store, push(user, upsert("small2", body=("s", stamp(4)))))
    await commit_one(store, push(user, upsert("big3", body=("z" * 50_000, stamp(5)))))
    cursor, seen = Cursor(0), []
    for _ in range(20):
        page = await store.pull(user, PullQuery(cursor, 5000, None), max_bytes=40_000)
        seen.extend(d.record_id for d in page.changes)
        cursor = page.cursor
        if not page.has_more:
            break
    assert seen == ["big1", "small1", "big2", "small2", "big3"]
    assert cursor.version == 5


async def test_incremental_pull_gets_only_what_is_new(store, user):
    await commit_one(store, push(user, upsert("t1", a=(1, stamp(1)))))
    _, cursor, _ = await pull_all(store, user)
    await commit_one(store, push(user, upsert("t2", a=(2, stamp(2)))))
    deltas, _, _ = await pull_all(store, user, since=cursor)
    assert [(d.record_id, d.version) for d in deltas] == [("t2", 2)]


# -- batches ------------------------------------------------------------------------


async def test_one_push_failing_in_the_database_does_not_sink_the_batch(databases: Databases):
    url = await databases.acreate()
    store = await PostgresStore.connect(url, max_size=2)
    good1, bad, good2 = new_user(), new_user(), new_user()
    try:
        async with store.pool.acquire() as con:
            await con.execute(
                """
                CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN RAISE EXCEPTION 'refused for this test'; END $$;
                """
            )
            await con.execute(
                f"""CREATE TRIGGER refuse BEFORE INSERT ON hub_fields FOR EACH ROW
                    WHEN (NEW.user_id = '{bad}') EXECUTE FUNCTION refuse()"""
            )
        results = await store.commit(
            [
                push(good1, upsert("t1", a=(1, stamp(1)))),
                push(bad, upsert("t1", a=(1, stamp(1)))),
                push(good2, upsert("t1", a=(1, stamp(1)))),
            ]
        )
        assert isinstance(results[0], PushResult) and results[0].version == 1
        assert isinstance(results[1], HubError) and results[1].code == "internal"
        assert isinstance(results[2], PushResult) and results[2].version == 1
        assert (await store.status(bad))["version"] == 0
        for u in (good1, good2):
            deltas, _, _ = await pull_all(store, u)
            assert [d.record_id for d in deltas] == ["t1"]
        deltas, _, _ = await pull_all(store, bad)
        assert deltas == []
    finally:
        await store.close()


async def test_held_push_is_not_skipped_by_a_reader(databases: Databases):
    """A push whose transaction is held open while a later push of the same
    user tries to commit: the reader, pulling incrementally all the while,
    gets both. With a timestamp or plain sequence cursor the later push would
    commit first and the reader would step past the held one."""
    url = await databases.acreate()
    store = await PostgresStore.connect(url, max_size=4)
    user = new_user()
    gate = await asyncpg.connect(url)
    try:
        await gate.execute(
            """
            CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$;
            """
        )
        await gate.execute(
            f"""CREATE TRIGGER hold BEFORE INSERT ON hub_fields FOR EACH ROW
                WHEN (NEW.record_id = 'held' AND NEW.user_id = '{user}') EXECUTE FUNCTION hold()"""
        )
        await commit_one(store, push(user, upsert("first", a=(0, stamp(0)))))
        _, cursor, _ = await pull_all(store, user)
        await gate.execute("SELECT pg_advisory_lock(4242)")
        held = asyncio.create_task(commit_one(store, push(user, upsert("held", a=(1, stamp(1))))))
        await wait_for_lock_waiters(gate, 1)
        later = asyncio.create_task(commit_one(store, push(user, upsert("later", a=(2, stamp(2))))))
        await wait_for_lock_waiters(gate, 2)
        seen = []
        deltas, cursor, _ = await pull_all(store, user, since=cursor)
        seen.extend(deltas)
        assert deltas == []  # nothing of either push is visible while the first is held
        await gate.execute("SELECT pg_advisory_unlock(4242)")
        held_result, later_result = await asyncio.wait_for(asyncio.gather(held, later), 10)
        assert (held_result.version, later_result.version) == (2, 3)
        deltas, cursor, _ = await pull_all(store, user, since=cursor)
        seen.extend(deltas)
        assert [(d.record_id, d.version) for d in seen] == [("held", 2), ("later", 3)]
    finally:
        await gate.close()
        await store.close()


async def wait_for_lock_waiters(con: asyncpg.Connection, count: int) -> None:
    """Wait until ``count`` hub backends are blocked on a lock."""
    for _ in range(500):
        waiting = await con.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE application_name = 'hub' AND wait_event_type = 'Lock'"""
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} pushes did not block on a lock")


# -- the store against the reference merge --------------------------------------------

NODES = ("d1", "d2", "d3")
RECORDS = (("todos", "a"), ("todos", "b"), ("notes", "a"))


@st.composite
def changes(draw: st.DrawFn) -> Change:
    collection, record = draw(st.sampled_from(RECORDS))
    # A small stamp space makes equal and crossing stamps common.
    stamps = st.builds(stamp, st.integers(0, 4), st.integers(0, 1), st.sampled_from(NODES))
    if draw(st.integers(0, 3)) == 0:
        return delete(record, draw(stamps), collection)
    names = draw(st.lists(st.sampled_from("xyz"), min_size=1, max_size=3, unique=True))
    # A stamp names one write: equal stamps carry equal values, as with real devices.
    fields = {}
    for n in names:
        hlc = draw(stamps)
        fields[n] = (f"{n}@{hlc}", hlc)
    return upsert(record, collection, **fields)


pushes_strategy = st.lists(st.lists(changes(), min_size=1, max_size=4), min_size=1, max_size=8)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pushes=pushes_strategy, data=st.data())
def test_store_matches_the_reference_merge(database_url, pushes, data):
    """Random pushes, committed in different orders and batchings for two users,
    give the reference merge's state; pulls from 0 with small pages converge."""
    orders = [data.draw(st.permutations(range(len(pushes)))) for _ in range(2)]
    cuts = data.draw(st.lists(st.integers(1, 4), min_size=len(pushes), max_size=len(pushes)))
    limit = data.draw(st.integers(1, 5))

    async def scenario() -> None:
        store = PostgresStore(await asyncpg.create_pool(database_url, min_size=1, max_size=2))
        try:
            users = [new_user(), new_user()]
            expected_applied: dict[str, list[int]] = {}
            sequence: list[Push] = []
            for u, order in zip(users, orders, strict=True):
                reference = Replica()
                counts = []
                for i in order:
                    p = push(u, *pushes[i], device=f"dev{i % 3}")
                    sequence.append(p)
                    counts.append(sum(reference.apply_change(c) for c in p.changes))
                expected_applied[u] = counts
            # Interleave the two users' pushes and commit them in batches of varying size.
            interleaved = [
                p
                for pair in zip(sequence[: len(pushes)], sequence[len(pushes) :], strict=True)
                for p in pair
            ]
            results: list[PushResult | HubError] = []
            at = 0
            for cut in cuts:
                if at >= len(interleaved):
                    break
                results.extend(await store.commit(interleaved[at : at + cut]))
                at += cut
            if at < len(interleaved):
                results.extend(await store.commit(interleaved[at:]))
            by_user: dict[str, list[PushResult]] = {u: [] for u in users}
            for p, r in zip(interleaved, results, strict=True):
                assert isinstance(r, PushResult), r
                by_user[p.user].append(r)
            truth = Replica()
            for change_list in pushes:
                for c in change_list:
                    apply_change(truth.record(c.collection, c.record_id), c)
            states = []
            for u in users:
                assert [r.applied for r in by_user[u]] == expected_applied[u]
                versions = [r.version for r in by_user[u] if r.applied]
                assert versions == list(range(1, len(versions) + 1))
                deltas, _, _ = await pull_all(store, u, limit=limit)
                states.append(live(replica_of(deltas)))
            assert states[0] == states[1] == live(normalized(truth))
        finally:
            await store.close()

    run(scenario())


def live(state: dict) -> dict:
    """Drop records that never held a field after their delete and have no delete stamp."""
    return {k: v for k, v in state.items() if v[0] or v[1] is not None}


async def test_cached_plans_look_rows_up_by_index_even_on_an_empty_database(databases):
    """A plan made while the tables are empty must not scan them whole: cached,
    it would stay in use as they grow (measured: batch time grew linearly)."""
    from hub.store_postgres import PULL, READ

    url = await databases.acreate()
    store = await PostgresStore.connect(url, max_size=1)
    try:
        keys = orjson.dumps([[f"u{i}", "c", f"k{i}"] for i in range(64)]).decode()
        async with store.pool.acquire() as con:
            for sql, args in (
                (READ, [keys, keys, keys]),
                (PULL, ["u", 0, "", "", 10, None, 4 << 20]),
            ):
                plan = "\n".join(r[0] for r in await con.fetch("EXPLAIN " + sql, *args))
                assert "Seq Scan on hub_" not in plan, plan
                assert "Hash Join" not in plan, plan
    finally:
        await store.close()


async def test_a_busy_connection_is_kept_past_50000_statements(store):
    """The pool does not replace a connection after a number of statements
    (asyncpg's default is 50,000): the committer's connection runs five per
    batch, so under load it was closed and opened again every half minute or
    so, and the batches waiting meanwhile were late by a reconnect and a
    fresh set of prepared statements."""
    async with store.pool.acquire() as con:
        pid = await con.fetchval("SELECT pg_backend_pid()")
        for _ in range(50_000):
            await con.fetchval("SELECT 1")
    await store.ping()  # the connection goes back to the pool and comes out again
    async with store.pool.acquire() as con:
        assert await con.fetchval("SELECT pg_backend_pid()") == pid


async def test_a_reader_at_the_tip_misses_nothing_of_a_busy_writer(databases: Databases):
    """A device pulling incrementally while another process pushes: the user's
    version that moves its cursor is read in the same snapshot as the deltas,
    so no push committed in between is stepped over."""
    url = await databases.acreate()
    reader = await PostgresStore.connect(url, max_size=2)
    writer = await PostgresStore.connect(url, max_size=2)
    user = new_user()
    rounds = 300

    async def pushing() -> None:
        for i in range(rounds):
            await commit_one(writer, push(user, upsert(f"r{i}", a=(i, stamp(i)))))

    try:
        task = asyncio.create_task(pushing())
        seen: set[str] = set()
        cursor = Cursor(0)
        while True:
            finished = task.done()  # a pull that starts after the last push, to end on
            page = await reader.pull(user, PullQuery(cursor, 500, None))
            seen.update(d.record_id for d in page.changes)
            cursor = page.cursor
            if finished and not page.has_more:
                break
        await task
        assert len(seen) == rounds, f"missed {rounds - len(seen)} of {rounds}"
    finally:
        await reader.close()
        await writer.close()


async def test_a_purge_inside_a_cursors_version_needs_a_reset(databases: Databases):
    """A device paging through one push that deleted two records is between
    them when the purge takes both tombstones: the second delete is gone, so
    its next pull must be 410, not an empty page."""
    url = await databases.acreate()
    store = await PostgresStore.connect(url, max_size=2)
    user = new_user()
    try:
        await commit_one(
            store, push(user, upsert("a", t=("A", stamp(1))), upsert("z", t=("Z", stamp(1))))
        )
        _, cursor, _ = await pull_all(store, user)
        await commit_one(store, push(user, delete("a", stamp(2)), delete("z", stamp(2))))
        page = await store.pull(user, PullQuery(cursor, 1, None))
        assert [d.record_id for d in page.changes] == ["a"] and page.has_more
        assert (await store.purge(retention_s=0))["tombstones"] == 2
        with pytest.raises(ResetRequired):
            await store.pull(user, PullQuery(page.cursor, 1, None))
        # A cursor past the whole version, or made after the purge, is fine.
        deltas, after, _ = await pull_all(store, user)
        assert deltas == []
        assert (await store.pull(user, PullQuery(after, 1, None))).changes == ()
    finally:
        await store.close()


async def test_a_big_purge_goes_in_bounded_transactions(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
):
    """Each purge transaction holds its users' version locks, which their
    pushes wait for: it takes a bounded number of tombstones, and the purge
    goes on in as many transactions as it needs, oldest versions first."""
    from hub import store_postgres

    monkeypatch.setattr(store_postgres, "PURGE_RECORDS_PER_TRANSACTION", 10)
    url = await databases.acreate()
    store = await PostgresStore.connect(url, max_size=2)
    user = new_user()
    try:
        for i in range(25):  # 25 records written, then deleted: 50 versions
            await commit_one(store, push(user, upsert(f"r{i:02d}", a=(i, stamp(2 * i)))))
            await commit_one(store, push(user, delete(f"r{i:02d}", stamp(2 * i + 1))))
        _, old_cursor, _ = await pull_all(store, user)
        async with store.pool.acquire() as con:
            before = await con.fetchval("SELECT txid_current()")
        result = await store.purge(retention_s=0)
        async with store.pool.acquire() as con:
            used = await con.fetchval("SELECT txid_current()") - before - 1
            horizon = await con.fetchval("SELECT horizon FROM hub_users WHERE user_id = $1", user)
        assert (result["tombstones"], result["fields"]) == (25, 25)
        assert used >= 3, used  # 25 tombstones, 10 at a time
        assert horizon == 50
        assert (await store.pull(user, PullQuery(old_cursor, 10, None))).changes == ()
    finally:
        await store.close()


@pytest.mark.parametrize("timeout", ["statement_timeout", "lock_timeout"])
async def test_a_statement_timeout_is_unavailable_not_internal(databases: Databases, timeout: str):
    # With a statement_timeout set on the database's side, a pull or a push
    # that waits past it (here on a lock held from outside) is a retry later
    # (503 unavailable), not an internal error (500).
    url, user = await databases.acreate(), new_user()
    await (await PostgresStore.connect(url)).close()  # the schema
    holder = await asyncpg.connect(url)
    name = await holder.fetchval("SELECT current_database()")
    await holder.execute(f'ALTER DATABASE "{name}" SET {timeout} = 300')
    store = await PostgresStore.connect(url, max_size=2)
    try:
        await commit_one(store, push(user, upsert("t1", a=(1, stamp(1)))))
        async with holder.transaction():
            await holder.execute("LOCK TABLE hub_fields IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(HubError) as pulled:
                await store.pull(user, PullQuery(Cursor(0), 100, None))
            assert pulled.value.code == "unavailable" and pulled.value.status == 503
            (pushed,) = await store.commit([push(user, upsert("t1", a=(2, stamp(2))))])
            assert isinstance(pushed, HubError) and pushed.code == "unavailable", pushed
        deltas, _, _ = await pull_all(store, user)  # the lock gone, all is well
        assert replica_of(deltas)[("todos", "t1")][0]["a"] == (1, stamp(1))
    finally:
        await holder.close()
        await store.close()
