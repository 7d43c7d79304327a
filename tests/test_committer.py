"""The committer's scheduling: natural group commit, one user's order, closing.

A stand-in store gives each push of a user the next version of that user and
lets the test decide when each batch's commit ends, so the interleavings are
the test's, not the machine's. The real store under the same committer is
covered by the real-time and reliability tests.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from hub.committer import Committer
from hub.errors import HubError, Unavailable
from hub.types import Change, FieldWrite, Push, PushResult


class GatedStore:
    """Commits a batch when the test opens its gate (or at once when ``gated`` is False)."""

    def __init__(self, gated: bool = True) -> None:
        self.gated = gated
        self.versions: dict[str, int] = {}
        self.started: list[list[Push]] = []  # batches, in the order their commits began
        self.running: list[list[Push]] = []
        self.gates: list[asyncio.Event] = []
        self.most_running = 0
        self.fail_next = False

    async def commit(self, pushes: Sequence[Push]) -> list[PushResult | HubError]:
        batch = list(pushes)
        self.started.append(batch)
        self.running.append(batch)
        self.most_running = max(self.most_running, len(self.running))
        gate = asyncio.Event()
        self.gates.append(gate)
        if self.gated:
            await gate.wait()
        else:
            await asyncio.sleep(random.random() * 0.002)
        self.running.remove(batch)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a bug in the store")
        results: list[PushResult | HubError] = []
        for push in batch:
            version = self.versions.get(push.user, 0) + 1
            self.versions[push.user] = version
            results.append(PushResult(version, 1, 0, version - 1))
        return results


def push(user: str, key: str) -> Push:
    return Push(user, "d1", (), key, "ws:d1")


async def until(condition, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


async def test_pushes_arriving_during_a_commit_form_the_next_batch() -> None:
    store = GatedStore()
    committer = Committer(store)  # type: ignore[arg-type]
    committer.start()
    a1 = committer.enqueue(push("alice", "a1"))
    await until(lambda: len(store.started) == 1)  # a lone push commits at once
    later = [
        committer.enqueue(push(u, k)) for u, k in [("bob", "b1"), ("alice", "a2"), ("bob", "b2")]
    ]
    await asyncio.sleep(0.01)
    # One batch at a time: the first still committing, three waiting (none answered).
    assert len(store.started) == 1 and committer.pending() == 4
    store.gates[0].set()
    await until(lambda: len(store.started) == 2)
    assert [p.key for p in store.started[1]] == ["b1", "a2", "b2"]  # all of them, in order
    store.gates[1].set()
    assert (await a1).version == 1
    assert [(await f).version for f in later] == [1, 2, 2]
    assert store.most_running == 1
    await committer.close()


async def test_batches_are_bounded_in_pushes_and_changes() -> None:
    store = GatedStore(gated=False)
    committer = Committer(store, max_batch_pushes=3)  # type: ignore[arg-type]
    committer.start()
    futures = [committer.enqueue(push("alice", f"a{i}")) for i in range(7)]
    await committer.close()
    assert [len(b) for b in store.started] == [3, 3, 1]
    assert [f.result().version for f in futures] == list(range(1, 8))


async def test_a_failing_commit_answers_its_pushes_and_the_next_batch_goes_on() -> None:
    store = GatedStore(gated=False)
    store.fail_next = True
    committer = Committer(store)  # type: ignore[arg-type]
    committer.start()
    failed = committer.enqueue(push("alice", "a1"))
    await until(failed.done)
    assert isinstance(failed.exception(), HubError)
    assert (await committer.enqueue(push("alice", "a2"))).version == 1
    await committer.close()


async def test_random_interleavings_keep_each_users_order_and_answers() -> None:
    """Pushes of a few users arrive at random moments while batches take random
    time: every user's pushes get versions 1, 2, 3, ... in the order they were
    queued, every future gets its own push's answer, and close() ends only
    when everything queued is committed."""
    for seed in range(25):
        rng = random.Random(seed)
        random.seed(seed)
        store = GatedStore(gated=False)
        committer = Committer(store, max_batch_pushes=rng.choice([1, 3, 50]))  # type: ignore[arg-type]
        committer.start()
        queued: dict[str, list[asyncio.Future[PushResult]]] = {}
        for i in range(rng.randint(20, 120)):
            user = rng.choice(["u1", "u2", "u3", "u4", "u5"])
            queued.setdefault(user, []).append(committer.enqueue(push(user, f"{user}-{i}")))
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.002)
        await asyncio.wait_for(committer.close(), 5)
        assert committer.pending() == 0
        for futures in queued.values():
            assert [f.result().version for f in futures] == list(range(1, len(futures) + 1)), seed
        assert sum(len(b) for b in store.started) == sum(len(f) for f in queued.values())


async def test_close_commits_what_is_queued_then_refuses_new_pushes() -> None:
    store = GatedStore()
    committer = Committer(store)  # type: ignore[arg-type]
    committer.start()
    first = committer.enqueue(push("alice", "a1"))
    await until(lambda: len(store.started) == 1)
    queued = committer.enqueue(push("bob", "b1"))
    closing = asyncio.ensure_future(committer.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    with pytest.raises(Unavailable):
        committer.enqueue(push("carol", "c1"))
    store.gates[0].set()
    await until(lambda: len(store.started) == 2)
    store.gates[1].set()
    await asyncio.wait_for(closing, 2)
    assert first.result().version == 1 and queued.result().version == 1


async def test_abandon_answers_every_push_not_answered_yet():
    # At shutdown, when the database is stuck: the batch being committed and
    # the queued pushes are all answered `unavailable`, and no more are taken.
    store = GatedStore()
    committer = Committer(store)  # type: ignore[arg-type]
    committer.start()
    first = committer.enqueue(push("alice", "a1"))
    await until(lambda: len(store.started) == 1)
    queued = committer.enqueue(push("bob", "b1"))
    committer.abandon()
    for future in (first, queued):
        with pytest.raises(Unavailable):
            await asyncio.wait_for(future, 1)
    assert committer.pending() == 0
    with pytest.raises(Unavailable):
        committer.enqueue(push("carol", "c1"))
    late: list[tuple[str, int]] = []
    committer.on_late_commit = lambda p, result: late.append((p.key or "", result.version))
    store.gates[0].set()  # the stuck commit ends after all: its event is still due
    await asyncio.wait_for(committer.close(), 1)
    assert late == [("a1", 1)]  # the queued push was never committed


def wide_push(user: str, key: str, fields: int) -> Push:
    writes = tuple(FieldWrite(f"f{i}", "1", "1700000000000-0000-d1") for i in range(fields))
    return Push(user, "d1", (Change("c", "r", "upsert", writes),), key, "ws:d1")


async def test_one_users_big_pushes_do_not_hold_another_users_small_one() -> None:
    # Five pushes of a batch's worth of rows each from one user, then one small
    # push of another: the small one rides with the first batch instead of
    # waiting for all five; the big ones still commit one after another, in order.
    store = GatedStore()
    committer = Committer(store, max_batch_rows=1000)  # type: ignore[arg-type]
    committer.start()
    big = [committer.enqueue(wide_push("heavy", f"h{i}", 1000)) for i in range(5)]
    small = committer.enqueue(push("light", "l1"))
    await until(lambda: len(store.started) == 1)
    assert [p.key for p in store.started[0]] == ["h0", "l1"]
    for n in range(1, 6):
        store.gates[n - 1].set()
        if n < 5:
            await until(lambda n=n: len(store.started) == n + 1)  # type: ignore[misc]
            assert [p.key for p in store.started[n]] == [f"h{n}"]
    assert (await small).version == 1
    assert [(await f).version for f in big] == [1, 2, 3, 4, 5]
